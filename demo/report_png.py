"""Redraw docs/report.png, the README's picture of train-head's report, from the current demo.

    python -m demo.report_png [docs/report.png]

Runs what `make demo` runs up to its report (demo.run's data folder, cache and options; the
ImageNet weights where Keras has them, else seeded random weights, as the demo does), writes
`train-head --head all`'s report into a scratch folder and takes a screenshot of the page's
top with headless Chromium, at a desktop's width. The picture therefore shows the page the
code draws today, warnings included; run it after changing classify/report.py or the demo.
Needs Chromium (or Chrome) on the PATH; a second run reuses the demo's cached features.
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from PIL import Image

from classify import train_head
from demo.make_data import main as make_data
from demo.run import CACHE, DATA, INPUT_SIZE, POOLING
from extract import WeightsUnavailableError, extract_features

OPTIONS = dict(input_size=INPUT_SIZE, pooling=POOLING)  # make demo's
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
WIDTH, HEIGHT = 1280, 2000  # the window, in CSS pixels: the warning, the leaderboard, the mistakes and the map
SHOWN_WIDTH = 960  # the picture's width in the README


def main(target: str = "docs/report.png") -> int:
    browser = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if browser is None:
        print("Expected Chromium or Chrome on the PATH to take the screenshot; install Debian's chromium package.",
              file=sys.stderr)
        return 2
    make_data(DATA)
    try:
        extract_features(DATA, CACHE, weights="imagenet", augment=0, progress=False, **OPTIONS)
    except WeightsUnavailableError:  # offline: the demo's seeded random weights, which the page then says
        extract_features(DATA, CACHE, weights="random", augment=0, progress=False, **OPTIONS)
    with tempfile.TemporaryDirectory() as scratch:
        training = train_head(CACHE, "all", out=Path(scratch, "run"), progress=False)
        shot = Path(scratch, "shot.png")
        subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
                        f"--user-data-dir={Path(scratch, 'profile')}", f"--window-size={WIDTH},{HEIGHT}",
                        f"--screenshot={shot}", training.report.as_uri()], check=True, capture_output=True, timeout=300)
        with Image.open(shot) as image:
            image = image.convert("RGB")
            image.resize((SHOWN_WIDTH, round(image.height * SHOWN_WIDTH / image.width)), Image.Resampling.LANCZOS) \
                .quantize(256, method=Image.Quantize.FASTOCTREE).save(target, optimize=True)  # a palette: a quarter of the size
    print(f"{target}: the top of {training.report.name} after train-head --head all on {CACHE}")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

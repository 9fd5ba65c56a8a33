"""Write the bad-input corpus in tests/corpus/ (committed; run again only to change it).

    python tests/make_corpus.py

Every file is small. The expectations live in tests/test_corpus.py.
"""

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).parent / "corpus"


def picture(size=(48, 36), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(blocks).resize(size, Image.Resampling.NEAREST)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def main() -> None:
    HERE.mkdir(exist_ok=True)
    picture(seed=1).convert("CMYK").save(HERE / "cmyk.jpg")
    Image.fromarray((np.arange(48 * 36).reshape(36, 48) * 37).astype(np.uint16)).save(HERE / "deep16.png")
    rgba = picture(seed=2).convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(rgba.size))
    rgba.save(HERE / "rgba_transparent.png")
    picture(seed=3).convert("L").save(HERE / "gray.png")
    picture(seed=4).convert("P", palette=Image.Palette.ADAPTIVE).save(HERE / "palette.gif")
    frames = [picture(seed=5 + i).convert("P") for i in range(3)]
    frames[0].save(HERE / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    picture(seed=8).save(HERE / "webp_named.jpeg", format="WEBP")
    picture(seed=9).save(HERE / "ünïcödé-猫.png")
    picture(size=(3, 3), seed=10).save(HERE / "tiny_3x3.png")
    picture(size=(4000, 30), seed=11).save(HERE / "panorama_4000x30.png")
    exif = Image.Exif()
    exif[0x0112] = 6
    picture(seed=12).transpose(Image.Transpose.ROTATE_90).save(HERE / "exif_rotated.jpg", exif=exif)
    picture(size=(64, 64), seed=13).save(HERE / "truncated.jpg", quality=90)
    data = (HERE / "truncated.jpg").read_bytes()
    (HERE / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (HERE / "empty.jpg").write_bytes(b"")
    (HERE / "text.jpg").write_text("This is a text file with an image name.\n")
    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)  # 400 megapixels claimed, none stored
    (HERE / "bomb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IEND", b""))
    (HERE / "document.png").write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << >>\n%%EOF\n")
    (HERE / "notes.txt").write_text("Not an image by name: skipped, and counted.\n")


if __name__ == "__main__":
    main()

"""Stage 2: heads trained on the features cached by `extract` (classify imports extract,
never the reverse).

    from classify import train_head, load_head
    training = train_head("cache/features.h5", head="logreg")
    head = load_head(training.folder)

Modules: `heads` (the registry of scikit-learn estimators), `keras_head` (the blog recipe's
dense head as one of them), `finetune` (VGG16's block5 tuned with it, from cached block4_pool maps), `sgd_head` (linear heads that stream), `data` (`Rows`: labeled
rows in memory or read from the cache a window at a time), `splits` (a cache's rows split
for training), `training` (fitting, search, cross-validation, the leaderboard),
`evaluation` (sklearn.metrics scores and plots), `artifacts` (head folders, checked
loading), `report` (report.html), `scoring` (new images -> predictions), `export` (backbone +
head as one Keras model), `check` (check-data: reads a cache, `nearest`), `findings` (label issues, duplicates,
outliers on arrays; `Check`), `neighbours` (the nearest-neighbour graph), `check_page` (check.html), `train_cli`,
`score_cli` and `check_cli` (the commands).
"""

from classify.artifacts import LoadedHead, load_head
from classify.check import Neighbour, check_data, nearest
from classify.findings import Check
from classify.export import export_model
from classify.scoring import ScoreRow, score_images
from classify.heads import HEADS
from classify.finetune import KerasFinetuneClassifier
from classify.keras_head import KerasMLPClassifier
from classify.training import HeadResult, HeadWarning, Training, train_head

__all__ = [
    "HEADS", "Check", "HeadResult", "HeadWarning", "KerasFinetuneClassifier", "KerasMLPClassifier", "LoadedHead",
    "Neighbour", "ScoreRow", "Training", "check_data", "export_model", "load_head", "nearest", "score_images", "train_head",
]

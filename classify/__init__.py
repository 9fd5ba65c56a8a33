"""Stage 2: heads trained on the features cached by `extract` (classify imports extract,
never the reverse)."""

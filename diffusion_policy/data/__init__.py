"""The Push-T demonstration dataset: download, verification, windows for training."""

"""Tools that plan or show a run: the memory plan of `--dry-run`, the training curves."""

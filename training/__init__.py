"""Training orchestration for train.py: the run folder and resume (`folders`), what a run records
(`record`), the Lightning pieces from the config (`trainer`) and what goes into and beside its
checkpoints (`checkpoints`)."""

"""Training orchestration for train.py: run folders and records, resume, loggers, callbacks and the
learning rate, composed into a Lightning run."""

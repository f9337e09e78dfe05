"""Evaluation: the test.py runner, its input planning, result tables, and the demo's comparisons."""

"""Shared command-line conventions of the entry points (train.py, test.py, ...)."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the module docstring's line breaks (its example commands)."""

"""Skipping batches whose loss is not finite, so that one bad batch never reaches the weights."""

from __future__ import annotations

import logging

import pytorch_lightning as pl
import torch

log = logging.getLogger(__name__)


class NonFiniteLossGuard:
    """Decides, identically on every rank, whether a batch's loss may update the weights.

    A non-finite loss (on any rank) skips the batch: no backward, no optimiser step, no EMA
    update. The skips are counted (`train/skipped_batches`) and training stops with a clear
    error after `max_in_a_row` consecutive ones.
    """

    def __init__(self, max_in_a_row: int = 20):
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.total = 0

    def ok(self, module: pl.LightningModule, trainer, *losses: torch.Tensor) -> bool:
        """Whether `losses` are finite on every rank (`trainer`: the module's, None outside
        one); logs and counts a skip otherwise."""
        finite = all(bool(torch.isfinite(loss).all()) for loss in losses)
        if trainer is not None:  # all ranks take the same decision (DDP stays in step)
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.total += 1
        module.log("train/skipped_batches", float(self.total), rank_zero_only=True)
        log.warning("non-finite loss: batch skipped (%d in a row)", self.in_a_row)
        if self.in_a_row >= self.max_in_a_row:
            raise FloatingPointError(
                f"{self.in_a_row} non-finite losses in a row: lower the learning rate, train in "
                "fp32 (precision: 32-true), or resume from an earlier checkpoint"
            )
        return False

    def state_dict(self) -> dict:
        return {"in_a_row": self.in_a_row, "total": self.total}

    def load_state_dict(self, state: dict) -> None:
        self.in_a_row, self.total = int(state["in_a_row"]), int(state["total"])

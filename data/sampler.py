"""One-scale-per-batch sampling: every batch shares one SR scale s ~ U(min_scale, max_scale).

The batch sampler yields `[(index, scale), ...]`; the training dataset reads the scale from each
item, so all crops of a batch have the same shapes (ARCHITECTURE.md section 1).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler


class ScaleBatchSampler(Sampler[list[tuple[int, float]]]):
    """Batches of `(index, scale)` pairs with one uniformly drawn scale per batch.

    Indices come from a `DistributedSampler` over `range(dataset_len)` kept as `self.sampler`, so
    Lightning finds it and calls `set_epoch` at each epoch. Under DDP every rank gets its own share
    of indices (same permutation, seeded by `seed + epoch`, sharded by rank) while the scales come
    from a generator seeded by `(seed, epoch)` only, so all ranks use the same scale at each step.
    Lightning must not replace this sampler: train with `Trainer(use_distributed_sampler=False)`.

    Args:
        dataset_len: number of items in the dataset.
        batch_size: items per batch (per rank).
        min_scale, max_scale: scale range, 1 <= min_scale <= max_scale.
        shuffle: shuffle indices each epoch.
        drop_last: drop the last incomplete batch (and the tail that does not split evenly
            across ranks); otherwise the tail is padded by repeating indices.
        seed: base seed of the index permutation and the scale stream.
        rank, num_replicas: DDP rank and world size; default to torch.distributed's when it is
            initialised, else 0 and 1.
    """

    def __init__(
        self,
        dataset_len: int,
        batch_size: int,
        min_scale: float,
        max_scale: float,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        rank: int | None = None,
        num_replicas: int | None = None,
    ) -> None:
        if not 1.0 <= min_scale <= max_scale:
            raise ValueError(f"need 1 <= min_scale <= max_scale, got {min_scale}, {max_scale}")
        if batch_size < 1 or dataset_len < 1:
            raise ValueError(f"need batch_size, dataset_len >= 1, got {batch_size}, {dataset_len}")
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        self.batch_size, self.drop_last, self.seed = batch_size, drop_last, seed
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.sampler = DistributedSampler(
            range(dataset_len), num_replicas, rank, shuffle=shuffle, seed=seed, drop_last=drop_last
        )

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: it seeds both the index permutation and the scale stream."""
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def scales(self) -> np.ndarray:
        """The scale of every batch of the current epoch, float64 [len(self)], same on all ranks."""
        rng = np.random.default_rng([self.seed, self.epoch])
        return rng.uniform(self.min_scale, self.max_scale, size=len(self))

    def __iter__(self) -> Iterator[list[tuple[int, float]]]:
        indices = list(self.sampler)
        for step, scale in enumerate(self.scales().tolist()):
            batch = indices[step * self.batch_size : (step + 1) * self.batch_size]
            yield [(index, scale) for index in batch]

    def state_dict(self) -> dict[str, int]:
        """Epoch and seed, enough to resume the same index and scale stream."""
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = self.sampler.seed = int(state["seed"])
        self.set_epoch(int(state["epoch"]))

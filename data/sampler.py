"""One-scale-per-batch sampling: every batch shares one SR scale s ~ U(min_scale, max_scale).

The batch sampler yields `[(index, scale, item_seed), ...]`; the training dataset reads the scale
from each item, so all crops of a batch have the same shapes (data protocol, one scale per batch),
and seeds its random crop and flips with `item_seed`. An epoch is either the whole dataset or a
fixed number of samples (`data_length`, the authors' stage-1 epoch of 4000 samples).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler


class EpochIndices(DistributedSampler):
    """`DistributedSampler` whose epoch holds `data_length` indices of a `dataset_len` dataset.

    Each epoch draws fresh permutations of `range(dataset_len)` from a generator seeded by
    `seed + epoch` and concatenates as many as `data_length` needs (several when the dataset is
    smaller), keeping the first `data_length`: a different random subset every epoch. With
    `data_length == dataset_len` this is exactly `DistributedSampler`'s permutation. The epoch's
    indices are then truncated (or padded) to a multiple of the world size and sharded by rank.
    """

    def __init__(
        self,
        dataset_len: int,
        data_length: int,
        num_replicas: int,
        rank: int,
        shuffle: bool,
        seed: int,
        drop_last: bool,
    ) -> None:
        # DistributedSampler sizes its shards from len(dataset): give it the epoch length.
        super().__init__(range(data_length), num_replicas, rank, shuffle, seed, drop_last)
        self.dataset_len, self.data_length = dataset_len, data_length

    def epoch_indices(self) -> list[int]:
        """The indices of the current epoch for all ranks, [total_size] (before sharding)."""
        n, length = self.dataset_len, self.data_length
        if self.shuffle:
            g = torch.Generator()
            g.manual_seed(self.seed + self.epoch)
            perms = [torch.randperm(n, generator=g) for _ in range(math.ceil(length / n))]
            indices = torch.cat(perms)[:length].tolist()
        else:
            indices = [i % n for i in range(length)]
        if self.drop_last:
            return indices[: self.total_size]
        padding = self.total_size - len(indices)
        return indices + (indices * math.ceil(padding / len(indices)))[:padding]

    def __iter__(self) -> Iterator[int]:
        return iter(self.epoch_indices()[self.rank : self.total_size : self.num_replicas])


class ScaleBatchSampler(Sampler[list[tuple[int, float, int]]]):
    """Batches of `(index, scale, item_seed)` with one uniformly drawn scale per batch.

    Indices come from an `EpochIndices` (a `DistributedSampler`) kept as `self.sampler`, so
    Lightning finds it and calls `set_epoch` at each epoch. Under DDP every rank gets its own share
    of indices (same permutation, seeded by `seed + epoch`, sharded by rank) while the scales come
    from a generator seeded by `(seed, epoch)` only, so all ranks use the same scale at each step.
    Item seeds are drawn from `(seed, epoch)` per position in the epoch, so an item's crop does not
    depend on the DataLoader worker that loads it. Lightning must not replace this sampler: train
    with `Trainer(use_distributed_sampler=False)`.

    `start_at(k)` makes the next iteration skip the epoch's first `k` batches (a mid-epoch resume):
    the remaining batches keep their indices, scales and item seeds.

    Args:
        dataset_len: number of items in the dataset.
        batch_size: items per batch (per rank).
        min_scale, max_scale: scale range, 1 <= min_scale <= max_scale.
        shuffle: shuffle indices each epoch.
        drop_last: drop the last incomplete batch (and the tail that does not split evenly
            across ranks); otherwise the tail is padded by repeating indices.
        seed: base seed of the index permutation, the scale stream and the item seeds.
        rank, num_replicas: DDP rank and world size; default to torch.distributed's when it is
            initialised, else 0 and 1.
        data_length: samples per epoch over all ranks (e.g. 4000 = 1000 batches of 4 on one
            device), drawn as a fresh random subset each epoch and repeating images when the
            dataset is smaller; None = every item once per epoch.
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
        data_length: int | None = None,
    ) -> None:
        if not 1.0 <= min_scale <= max_scale:
            raise ValueError(f"need 1 <= min_scale <= max_scale, got {min_scale}, {max_scale}")
        if batch_size < 1 or dataset_len < 1:
            raise ValueError(f"need batch_size, dataset_len >= 1, got {batch_size}, {dataset_len}")
        if data_length is not None and data_length < 1:
            raise ValueError(f"data_length must be >= 1 or null (whole dataset), got {data_length}")
        distributed = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if distributed else 1
        if rank is None:
            rank = dist.get_rank() if distributed else 0
        self.batch_size, self.drop_last, self.seed = batch_size, drop_last, seed
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        self.sampler = EpochIndices(
            dataset_len, data_length or dataset_len, num_replicas, rank, shuffle, seed, drop_last
        )
        self._start = 0

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch: it seeds the index permutation, the scales and the item seeds."""
        self.sampler.set_epoch(epoch)

    def start_at(self, batch: int) -> None:
        """Make the next iteration (only) begin at batch `batch` of the epoch (0 = its start)."""
        if not 0 <= batch <= len(self):
            raise ValueError(f"start batch {batch} is outside this epoch's 0..{len(self)} batches")
        self._start = batch

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def scales(self) -> np.ndarray:
        """The scale of every batch of the current epoch, float64 [len(self)], same on all ranks."""
        rng = np.random.default_rng([self.seed, self.epoch])
        return rng.uniform(self.min_scale, self.max_scale, size=len(self))

    def item_seeds(self) -> np.ndarray:
        """A seed per position of the epoch on this rank, int64 [len(self.sampler)]."""
        seeds = np.random.default_rng([self.seed, self.epoch, 1]).integers(
            2**62, size=self.sampler.total_size
        )
        return seeds[self.sampler.rank :: self.sampler.num_replicas]

    def __iter__(self) -> Iterator[list[tuple[int, float, int]]]:
        start, self._start = self._start, 0
        indices, seeds = list(self.sampler), self.item_seeds().tolist()
        for step, scale in enumerate(self.scales().tolist()):
            if step < start:
                continue
            batch = range(step * self.batch_size, min((step + 1) * self.batch_size, len(indices)))
            yield [(indices[i], scale, seeds[i]) for i in batch]

    def state_dict(self) -> dict[str, int]:
        """Epoch and seed, enough to restart the same index, scale and item-seed stream."""
        return {"epoch": self.epoch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = self.sampler.seed = int(state["seed"])
        self.set_epoch(int(state["epoch"]))

"""Lightning DataModule: builds the datasets of the `data` config block and their loaders.

A dataset `root` that is relative is joined to `data_root` when that is set, so one override points
every split at a dataset: `python train.py --config ... data.params.data_root=/path/to/AID`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from data.datasets import MultiScaleTrainDataset
from data.sampler import ScaleBatchSampler
from utils.config import instantiate_from_config

_STAGES = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",)}


class ResumableLoader(DataLoader):
    """DataLoader over a `ScaleBatchSampler` that Lightning checkpoints and restores mid-epoch.

    Lightning saves `state_dict()` of a train loader that has one (in the fit loop's checkpoint
    state) and calls `load_state_dict()` when it resumes a run. The state is the sampler's epoch
    and seed plus the number of batches this loader has handed out in that epoch (counted here,
    not in the sampler, which worker processes read ahead of training), so a resumed run gets the
    remaining batches of the interrupted epoch in the same order with the same scales and item
    seeds. Each iteration takes its epoch from `current_epoch()` (the trainer's epoch counter)
    rather than from Lightning's `set_epoch`, whose argument runs one epoch ahead after a resume
    from a checkpoint saved when `max_steps` stopped a run mid-epoch.

    Args:
        dataset, batch_sampler, kwargs: as for `DataLoader`.
        current_epoch: returns the epoch to iterate over, or None to keep the sampler's.
    """

    batch_sampler: ScaleBatchSampler

    def __init__(
        self,
        dataset: Dataset,
        batch_sampler: ScaleBatchSampler,
        current_epoch: Callable[[], int | None] = lambda: None,
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self.current_epoch = current_epoch
        self._resume: tuple[int, int] | None = None  # (epoch, batches already trained on)
        self._yielded = 0

    def __iter__(self) -> Iterator[Any]:
        # A generator: this runs at the first `next()`, after Lightning has set up the epoch.
        sampler = self.batch_sampler
        epoch = self.current_epoch()
        sampler.set_epoch(sampler.epoch if epoch is None else epoch)
        resume, self._resume = self._resume, None
        self._yielded = resume[1] if resume is not None and resume[0] == sampler.epoch else 0
        sampler.start_at(self._yielded)
        for batch in super().__iter__():
            self._yielded += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """The sampler's epoch and seed, and `batches`: how many of its batches were handed out."""
        return {**self.batch_sampler.state_dict(), "batches": self._yielded}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from `state`: the next iteration skips the batches already trained on."""
        self.batch_sampler.load_state_dict(state)
        self._resume = (int(state["epoch"]), int(state.get("batches", 0)))


class DataModule(pl.LightningDataModule):
    """Train/validation/test datasets from `{target, params}` configs.

    The train loader of a `MultiScaleTrainDataset` is a `ResumableLoader` over a
    `ScaleBatchSampler` (one scale per batch, `data_length` samples per epoch, seeded by the seed
    of `pl.seed_everything`); Lightning saves its position in checkpoints, so a run resumes
    mid-epoch exactly. Validation and test loaders use batch size 1 (image sizes differ) in order.
    `setup` checks every image header and size, so bad files are listed before training starts.

    Reproducibility: training crops are seeded per item by the sampler, and the train loader has
    its own seeded generator, so loading draws nothing from the global RNGs that the models use.

    Args:
        batch_size: training batch size per device.
        data_length: training samples per epoch over all devices (the authors': 4000 in stage 1,
            8000 in stage 2), a fresh random subset of the images each epoch (images repeat when
            the folder is smaller); null iterates over every training image once per epoch.
        num_workers: DataLoader worker processes.
        train, validation, test: `{target, params}` dataset configs, or None.
        data_root: folder that relative dataset roots are resolved against; None keeps them
            relative to the working directory.
    """

    def __init__(
        self,
        batch_size: int,
        num_workers: int = 0,
        train: Mapping | None = None,
        validation: Mapping | None = None,
        test: Mapping | None = None,
        data_root: str | None = None,
        data_length: int | None = None,
    ) -> None:
        super().__init__()
        self.batch_size, self.num_workers, self.data_length = batch_size, num_workers, data_length
        self.data_root = Path(data_root).expanduser() if data_root is not None else None
        self.configs = {"train": train, "validation": validation, "test": test}
        self.datasets: dict[str, Dataset] = {}
        self.train_sampler: ScaleBatchSampler | None = None
        self._sampler_state: dict | None = None

    def build_dataset(self, name: str) -> Dataset:
        """Instantiate and validate the dataset of config `name` ("train", "validation", "test")."""
        config = self.configs[name]
        if config is None:
            raise ValueError(f"data.params.{name} is not set in the config; add a dataset block")
        params = dict(config.get("params") or {})
        root = params.get("root")
        if self.data_root is not None and root is not None and not Path(root).is_absolute():
            params["root"] = str(self.data_root / root)
        dataset = instantiate_from_config({"target": config["target"], "params": params})
        if hasattr(dataset, "validate"):
            dataset.validate()
        return dataset

    def setup(self, stage: str | None = None) -> None:
        names = _STAGES.get(stage, tuple(self.configs))
        for name in names:
            if name not in self.datasets and self.configs[name] is not None:
                self.datasets[name] = self.build_dataset(name)

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        workers = self.num_workers
        return DataLoader(dataset, num_workers=workers, persistent_workers=workers > 0, **kwargs)

    def train_dataloader(self) -> DataLoader:
        if "train" not in self.datasets:
            self.datasets["train"] = self.build_dataset("train")
        dataset = self.datasets["train"]
        if not isinstance(dataset, MultiScaleTrainDataset):
            return self._loader(dataset, batch_size=self.batch_size, shuffle=True, drop_last=True)
        self._check_distributed_sampler()
        # Same seed on every rank: the one pl.seed_everything exports (0 when it was not called).
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        self.train_sampler = ScaleBatchSampler(
            len(dataset),
            self.batch_size,
            dataset.min_scale,
            dataset.max_scale,
            seed=seed,
            data_length=self.data_length,
        )
        if self._sampler_state is not None:
            self.train_sampler.load_state_dict(self._sampler_state)
        # Its own generator: creating an iterator must not draw from the global torch RNG.
        generator = torch.Generator().manual_seed(seed)
        workers = self.num_workers
        return ResumableLoader(
            dataset,
            batch_sampler=self.train_sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            generator=generator,
            current_epoch=lambda: self.trainer.current_epoch if self.trainer else None,
        )

    def val_dataloader(self) -> DataLoader | list:
        dataset = self.datasets.get("validation")
        return self._loader(dataset, batch_size=1, shuffle=False) if dataset is not None else []

    def test_dataloader(self) -> DataLoader | list:
        dataset = self.datasets.get("test")
        return self._loader(dataset, batch_size=1, shuffle=False) if dataset is not None else []

    def _check_distributed_sampler(self) -> None:
        # Lightning would try to put a DistributedSampler into the batch sampler and fail with an
        # unclear TypeError; ScaleBatchSampler shards indices per rank itself.
        trainer = self.trainer
        connector = getattr(trainer, "_accelerator_connector", None)
        if trainer is not None and trainer.world_size > 1:
            if getattr(connector, "use_distributed_sampler", False):
                raise ValueError(
                    "multi-device training with ScaleBatchSampler needs "
                    "Trainer(use_distributed_sampler=False) "
                    "(config: lightning.trainer.use_distributed_sampler=false): the sampler gives "
                    "each rank its share of indices and the same scale per step itself"
                )

    def state_dict(self) -> dict[str, Any]:
        """Saved in Lightning checkpoints: the train sampler's epoch and seed."""
        return {"train_sampler": self.train_sampler.state_dict()} if self.train_sampler else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the sampler state; applied when the train loader is (re)built."""
        self._sampler_state = state_dict.get("train_sampler")
        if self.train_sampler is not None and self._sampler_state is not None:
            self.train_sampler.load_state_dict(self._sampler_state)

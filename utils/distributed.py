"""Several processes sharing one evaluation or inference run (test.py, super_resolve.py): which
process this is, its shard of the work, and gathering results on rank 0.

    torchrun --nproc_per_node 8 test.py --checkpoint CKPT --datasets AID --scales 4
    srun --ntasks 16 --gpus-per-task 1 python super_resolve.py scenes/ --checkpoint CKPT -o out/

Ranks come from torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or SLURM's srun (SLURM_PROCID,
SLURM_STEP_NUM_TASKS, SLURM_LOCALID: the job step's tasks, so a plain `python test.py` in an
sbatch script of --ntasks N stays one process); without either the run is one process and
nothing here talks to another process. Work item k goes to rank k mod world size, so every item
is done exactly once (test.py's batches, super_resolve.py's inputs, and the blocks of one large
GeoTIFF: scenes/blocks.py).
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from utils.cli import pick_device

# A rank may wait at a collective while another one finishes a long shard (a huge scene).
TIMEOUT = datetime.timedelta(hours=12)


@dataclass(frozen=True)
class World:
    """This process's place among `size` processes; `World()` is a single-process run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    group: object = field(default=None, compare=False)  # gloo group for Python objects

    @property
    def main(self) -> bool:
        """True on rank 0, the process that merges results and writes the run's tables."""
        return self.rank == 0

    def shard(self, items: Sequence) -> list:
        """This rank's items: `items[rank::size]` (all of them in a single process)."""
        return list(items[self.rank :: self.size])

    def unshard(self, shards: Sequence[Sequence]) -> list:
        """Inverse of `shard`: the per-rank lists (in rank order) back in the original order."""
        merged = [None] * sum(len(s) for s in shards)
        for rank, part in enumerate(shards):
            merged[rank :: self.size] = part
        return merged

    def all_gather(self, obj) -> list:
        """`obj` of every rank, in rank order, on every rank (picklable objects)."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def gather(self, obj, dst: int = 0) -> list | None:
        """`obj` of every rank, in rank order, on rank `dst`; None on the other ranks."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst, group=self.group)
        return out

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def barrier(self) -> None:
        """Waits until every rank gets here (e.g. after checks, before anyone writes)."""
        if self.size > 1:
            dist.barrier(group=self.group)


def _env_int(env, *names: str) -> int | None:
    for name in names:
        if env.get(name, "").strip():
            return int(env[name])
    return None


def world_from_env(env=None) -> World:
    """The rank, world size and local rank torchrun or srun gave this process (else 0, 1, 0)."""
    env = os.environ if env is None else env
    if _env_int(env, "WORLD_SIZE") is not None:  # torchrun (also set by many SLURM scripts)
        names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    else:
        names = ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID")
    rank, size, local = (_env_int(env, name) for name in names)
    if size is None or size <= 1:
        return World()
    if rank is None or not 0 <= rank < size:
        raise ValueError(f"{names[0]}={rank} is not a rank of {names[1]}={size}")
    return World(rank, size, local or 0)


def init_world(device_name: str, error: Callable[[str], Exception] = ValueError):
    """`(world, device)` for a `--device` flag: one process, or the process group of torchrun /
    srun (gloo on CPU, NCCL on CUDA, with a gloo group for Python objects) and the device
    cuda:LOCAL_RANK. srun on several nodes needs MASTER_ADDR (the first node's host name)."""
    world, device = world_from_env(), pick_device(device_name, error)
    if world.size == 1:
        return world, device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if "MASTER_ADDR" not in os.environ:
        if int(os.environ.get("SLURM_NNODES", "1")) > 1:
            raise error(
                "srun over several nodes: export MASTER_ADDR=$(scontrol show hostnames "
                '"$SLURM_JOB_NODELIST" | head -n 1) (and MASTER_PORT) before srun'
            )
        os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ.setdefault("MASTER_PORT", "29500")
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, rank=world.rank, world_size=world.size, timeout=TIMEOUT)
    atexit.register(dist.destroy_process_group)
    group = dist.new_group(backend="gloo", timeout=TIMEOUT) if backend == "nccl" else None
    return World(world.rank, world.size, world.local_rank, group), device

"""test.py and super_resolve.py across processes (utils/distributed.py): two CPU processes with
gloo under torchrun give one process's files and tables, each image once, FID over all images,
--samples' uncertainty maps and calibration; a run with a killed rank finishes with
--skip-existing; one GeoTIFF's blocks are shared by the ranks (scenes/blocks.py), each computed
once, the file byte-identical, and a failed block fails the scene on every rank."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

import super_resolve
import test as evaluate_cli
from evaluation.uncertainty import Calibration
from scenes.blocks import BlockShare, BlockWindow, SharedSceneError
from tests.conftest import ROOT, SHARED
from tests.helpers import write_random_weights
from utils.distributed import World, world_from_env

RUN_TIMEOUT = 300  # s per torchrun launch: generous for a busy 2-core machine, never a speed check
KILL_TIMEOUT = 120  # s to wait for the first SR image before killing a rank
NAMES = [f"im{i}.png" for i in range(7)]  # 5 of 48x48 and 2 of 48x40: batches of two sizes
SAMPLES = ("--samples", "2")  # uncertainty maps, Spearman column, calibration curve


pytestmark = pytest.mark.usefixtures("one_thread")


def _hr_images(folder: Path) -> Path:
    """Crops of real holdout images when ../shared is there, else generated scenes."""
    from PIL import Image

    from data.synthetic import generate_scene

    folder.mkdir(parents=True)
    real = sorted((SHARED / "data" / "holdout").glob("*.tif"))
    for i, name in enumerate(NAMES):
        image = Image.open(real[i]).convert("RGB") if len(real) > i else generate_scene(64, (0, i))
        image.crop((0, 0, 48, 40 if i % 3 == 2 else 48)).save(folder / name)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_sr_checkpoint):
    """Data root, TORCH_HOME with random Inception weights, and the one-process reference run."""
    root = tmp_path_factory.mktemp("dist")
    _hr_images(root / "data" / "HOLD" / "test" / "HR")
    write_random_weights(root / "torch_home", ["inception"])
    argv = ["--checkpoint", tiny_sr_checkpoint, "--data-root", root / "data", "--datasets"]
    argv += ["HOLD", "--scales", "2,3", "--metrics", "psnr,ssim,fid", "--fid-dims", "64"]
    argv = [str(a) for a in argv + ["--batch-size", "2", "--device", "cpu", "--no-report"]]
    os.environ["TORCH_HOME"], previous = str(root / "torch_home"), os.environ.get("TORCH_HOME")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the launched processes: the same arithmetic (FID to the bit)
    try:
        evaluate_cli.main([*argv, "--out-dir", str(root / "one")])
        evaluate_cli.main([*argv, *SAMPLES, "--out-dir", str(root / "one_samples")])
    finally:
        torch.set_num_threads(threads)
        os.environ.pop("TORCH_HOME") if previous is None else os.environ.update(TORCH_HOME=previous)
    return root, argv


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(script: str, *args, torch_home: Path | None = None) -> subprocess.Popen:
    """Two processes of `script` under torchrun (gloo on the CPU), output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_HOME": str(torch_home or "")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(_free_port()), script, *map(str, args)]
    pipe = dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, **pipe)


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    out, _ = process.communicate(timeout=RUN_TIMEOUT)
    return process.returncode, out


def _csv(path: Path, drop=("runtime_s",)) -> list[dict]:
    with path.open() as f:
        return [{k: v for k, v in row.items() if k not in drop} for row in csv.DictReader(f)]


def _summary(run: Path) -> list[dict]:
    drop = ("runtime_s_per_image", "peak_memory_mib")  # measurements, not results
    rows = json.loads((run / "summary.json").read_text())["rows"]
    return [{k: v for k, v in row.items() if k not in drop} for row in rows]


def _assert_same_run(one: Path, two: Path, samples: bool = False) -> None:
    """Same images (and uncertainty maps, calibration) byte for byte, same tables."""
    files = sorted(p.relative_to(one) for p in one.rglob("*.*") if p.suffix != ".csv")
    assert files == sorted(p.relative_to(two) for p in two.rglob("*.*") if p.suffix != ".csv")
    pngs = [path for path in files if path.suffix == ".png"]  # (sr, bicubic) x 2 scales
    assert len(pngs) == 2 * 2 * len(NAMES) + samples * 2 * (len(NAMES) + 1)  # maps, curves
    for path in (p for p in files if p.suffix in (".png", ".tif")):
        assert (one / path).read_bytes() == (two / path).read_bytes(), path
    for scale in ("x2", "x3"):
        assert _csv(one / "HOLD" / scale / "per_image.csv") == _csv(
            two / "HOLD" / scale / "per_image.csv"
        )
        if samples:
            calibration = [_csv(run / "HOLD" / scale / "calibration.csv") for run in (one, two)]
            assert calibration[0] == calibration[1] and len(calibration[0]) == 10
    rows = _summary(one)
    assert rows == _summary(two) and all(r["fid"] is not None for r in rows)
    ldcsr = [r for r in rows if r["method"] == "LDCSR"]
    assert ldcsr and all((r["unc_err_spearman"] is not None) == samples for r in ldcsr)


def test_two_processes_give_one_process_results_each_image_once(setup):
    """With --samples 2: each rank's uncertainty maps, Spearman values and calibration pixels
    merge on rank 0 into one process's tables and curve."""
    root, argv = setup
    code, out = _finish(_torchrun("test.py", *argv, *SAMPLES, "--out-dir", root / "two",
                                  torch_home=root / "torch_home"))  # fmt: skip
    assert code == 0, out[-3000:]
    _assert_same_run(root / "one_samples", root / "two", samples=True)
    done = re.findall(r"rank (\d): (x[\d.]+) batch \d+: ([^\n]+)", out)
    assert {rank for rank, _, _ in done} == {"0", "1"}  # both processes worked
    for scale in ("x2", "x3"):
        names = [n for _, s, batch in done if s == scale for n in batch.split(", ")]
        assert sorted(names) == NAMES  # every image exactly once


def test_killed_rank_then_skip_existing_finishes_the_run(setup):
    root, argv = setup
    out_dir, th = root / "killed", root / "torch_home"
    process = _torchrun("test.py", *argv, "--out-dir", out_dir, torch_home=th)
    deadline = time.monotonic() + KILL_TIMEOUT
    while not any((out_dir / "HOLD" / "x2" / "sr").glob("*.png")):
        assert time.monotonic() < deadline and process.poll() is None, "no SR image was written"
        time.sleep(0.01)
    os.kill(_rank_pid(process.pid, 1), signal.SIGKILL)  # before the scale's results are merged
    code, out = _finish(process)
    assert code != 0 and not (out_dir / "summary.json").exists(), out[-3000:]
    code, out = _finish(_torchrun("test.py", *argv, "--out-dir", out_dir, "--skip-existing",
                                  torch_home=th))  # fmt: skip
    assert code == 0, out[-3000:]
    _assert_same_run(root / "one", out_dir)
    rows = _csv(out_dir / "HOLD" / "x2" / "per_image.csv", drop=())
    timed = [row["runtime_s"] != "" for row in rows if row["method"] == "LDCSR"]
    assert any(timed) and not all(timed)  # saved batches were read back, the rest were run


def _rank_pid(parent: int, rank: int) -> int:
    """The pid of the torchrun worker of `rank` among the descendants of `parent`."""
    for _ in range(500):
        for pid in _descendants(parent):
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in env and b"TORCHELASTIC_RUN_ID" in b"".join(env):
                return pid
        time.sleep(0.01)
    raise AssertionError(f"no worker process of rank {rank} under pid {parent}")


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


def test_super_resolve_two_processes_write_one_process_files(setup, tiny_sr_checkpoint):
    root, _ = setup
    inputs, one, two = root / "data" / "HOLD" / "test" / "HR", root / "sr_one", root / "sr_two"
    args = [inputs, "--checkpoint", tiny_sr_checkpoint, "--scale", "2", "--no-progress"]
    assert super_resolve.main([str(a) for a in [*args, "-o", one, "--device", "cpu"]]) == 0
    code, out = _finish(_torchrun("super_resolve.py", *args, "-o", two, "--device", "cpu"))
    assert code == 0, out[-3000:]
    for name in NAMES:
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
        assert len(re.findall(rf"wrote \S*/{re.escape(name)}\n", out)) == 1  # once, by one rank


def _geotiffs(folder: Path) -> None:
    """scene.tif (96 x 192, 16-pixel DEFLATE tiles: 2 x 3 blocks of 64) and broken.tif, the same
    with one tile corrupted that only block 5 reads (rank 1 of 2)."""
    from data.synthetic import generate_scene

    folder.mkdir()
    rgb = np.moveaxis(np.asarray(generate_scene((96, 192), seed=0)), -1, 0)
    tiles = dict(tiled=True, blockxsize=16, blockysize=16, compress="deflate")
    for name in ("scene.tif", "broken.tif"):
        with rasterio.open(folder / name, "w", driver="GTiff", count=3, height=96, width=192,
                           dtype="uint8", **tiles) as dst:  # fmt: skip
            dst.write(rgb)
    with rasterio.open(folder / "broken.tif") as src:  # tile (row 5, col 11): LR 80:96, 176:192
        offset, size = (int(src.get_tag_item(f"BLOCK_{k}_11_5", "TIFF", bidx=1))
                        for k in ("OFFSET", "SIZE"))  # fmt: skip
    with (folder / "broken.tif").open("r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * size)


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_one_geotiff_shared_by_two_processes(setup, tiny_sr_checkpoint):
    """Two ranks compute disjoint blocks of each GeoTIFF (each once), one writes: the file of one
    process, byte for byte. A block that fails on rank 1 fails that scene on both ranks: no
    output or partial file, the error reported once, exit code 1 on both."""
    root, _ = setup
    scenes, one, two = root / "scenes", root / "geo_one", root / "geo_two"
    _geotiffs(scenes)
    args = [scenes, "--checkpoint", tiny_sr_checkpoint, "--scale", "2", "--block", "64"]
    args = [str(a) for a in [*args, "--device", "cpu", "--no-progress"]]
    assert super_resolve.main([*args, "-o", str(one)]) == 1  # broken.tif fails in one process
    code, out = _finish(_torchrun("super_resolve.py", *args, "-o", two))
    assert code != 0 and "rank 1: done, exit code 1" in out, out[-3000:]
    assert (one / "scene.tif").read_bytes() == (two / "scene.tif").read_bytes()
    assert [p.name for p in two.iterdir()] == ["scene.tif"]  # nothing of broken.tif
    blocks = re.findall(r"rank (\d): \S*scene\.tif block (\d) of 6\n", out)
    assert sorted(int(k) for _, k in blocks) == list(range(6))  # each block once
    assert all(int(k) % 2 == int(rank) for rank, k in blocks)  # block k on rank k mod 2
    errors = re.findall(r"ERROR super_resolve: \S*broken\.tif: (.*)\n", out)
    assert len(errors) == 1 and "block 5 of 6" in errors[0] and "(rank 1)" in errors[0], out
    assert len(re.findall(r"wrote \S*scene\.tif\n", out)) == 1


def test_block_seeds_do_not_depend_on_the_order():
    """Block seeds come from the scene's seed and the block's position only: the origin block
    keeps the seed (a one-block scene is the PNG's draw), the others differ from each other and
    from the seeds of other samples (seed + n)."""
    window = partial(BlockWindow, (100, 100), (200, 200), rows=(0, 1), cols=(0, 1))
    offsets = [(0, 0), (0, 32), (32, 0), (32, 32)]
    seeds = [window(offset=o).seed(7) for o in offsets]
    assert seeds[0] == 7 and len(set(seeds)) == 4 and not set(seeds[1:]) & set(range(100))
    assert seeds == [window(offset=o).seed(7) for o in offsets]
    assert window(offset=(0, 32)).seed(8) != seeds[1]


class ThreadWorld:
    """Rank `rank` of `size` threads of this process, exchanging objects as the gloo group does
    (`World.all_gather` / `gather`): enough to run `BlockShare`'s rounds without launching."""

    def __init__(self, rank: int, size: int, slots: list, barrier: threading.Barrier):
        self.rank, self.size, self.slots, self.barrier = rank, size, slots, barrier

    def all_gather(self, obj) -> list:
        self.slots[self.rank] = obj
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out

    def gather(self, obj, dst: int = 0) -> list | None:
        out = self.all_gather(obj)
        return out if self.rank == dst else None


@pytest.mark.parametrize("fail", ["write 2", "write 4", "compute 3"])
def test_a_failed_block_or_write_stops_every_rank_with_one_error(fail):
    """Five blocks on two ranks (writer 0): the blocks reach the writer in order, each computed
    once; a failure on either side (the writer's write of block 2, of the last block, rank 1's
    block 3) makes both ranks raise the same SharedSceneError, recorded by the writer only."""
    step, at = fail.split()
    slots, barrier = [None, None], threading.Barrier(2, timeout=30)  # a protocol bug: no hang
    computed, consumed, raised = [], [], {}

    def compute(k):
        if step == "compute" and k == int(at):
            raise RuntimeError("out of memory")
        computed.append(k)
        return np.full(2, k)

    def consume(k, block):
        if step == "write" and k == int(at):
            raise OSError("disk full")
        consumed.append((k, int(block[0])))

    def rank(r):
        share = BlockShare(ThreadWorld(r, 2, slots, barrier), writer=0, name="scene.tif")
        try:
            share.run(5, compute, consume if r == 0 else None)
        except SharedSceneError as err:
            raised[r] = (str(err), err.recorded)

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert raised[0][0] == raised[1][0] and (raised[0][1], raised[1][1]) == (True, False)
    reason = "disk full (rank 0)" if step == "write" else "block 3 of 5: out of memory (rank 1)"
    assert reason in raised[0][0]
    assert sorted(computed) == list(range(len(computed)))  # each block at most once, in rounds
    assert consumed == [(k, k) for k in range(int(at) if step == "write" else 2)]


def test_block_flag_below_twice_the_overlap_is_refused(tmp_path, capsys):
    argv = [str(tmp_path / "in.tif"), "--checkpoint", "CKPT", "-o", str(tmp_path), "--block", "32"]
    assert super_resolve.main(argv) == 2  # before any input or model is read
    assert "--block 32: use >= 64 LR pixels" in capsys.readouterr().err


def test_calibration_parts_merge_in_one_process_order():
    """Ranks' calibration pixels, keyed by batch, merge into one process's bins, also where tied
    uncertainties make the equal-count bins depend on the pixels' order."""
    rng = np.random.default_rng(0)
    maps = [(rng.integers(0, 4, 300) / 4, rng.uniform(0, 1, 300)) for _ in range(5)]  # ties
    one, ranks, merged = Calibration(bins=7), [Calibration(), Calibration()], Calibration(bins=7)
    for batch, (unc, err) in enumerate(maps):
        one.add(unc, err, key=batch)
        ranks[batch % 2].add(unc, err, key=batch)
    merged.merge(ranks[1].parts + ranks[0].parts)
    assert merged.bins() == one.bins() and sum(b["pixels"] for b in one.bins()) == 1500


def test_world_from_torchrun_and_slurm_variables_and_shards():
    assert world_from_env({}) == World()
    torchrun = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "SLURM_PROCID": "0"}
    assert world_from_env(torchrun) == World(3, 4, 1)
    srun = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1"}
    assert world_from_env(srun) == World(5, 8, 1)
    assert world_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "8"}) == World()  # sbatch script
    with pytest.raises(ValueError, match="RANK=4"):
        world_from_env({"RANK": "4", "WORLD_SIZE": "4"})
    items = list(range(11))
    shards = [World(r, 3).shard(items) for r in range(3)]
    assert sorted(sum(shards, [])) == items and World(0, 3).unshard(shards) == items

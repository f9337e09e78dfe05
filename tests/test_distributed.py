"""test.py and super_resolve.py across processes (utils/distributed.py): two CPU processes with
gloo under torchrun give one process's files and tables, each image once, FID over all images;
a run with a killed rank finishes with --skip-existing."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import super_resolve
import test as evaluate_cli
from tests.conftest import ROOT, SHARED
from tests.helpers import write_random_weights
from utils.distributed import World, world_from_env

RUN_TIMEOUT = 300  # s per torchrun launch: generous for a busy 2-core machine, never a speed check
KILL_TIMEOUT = 120  # s to wait for the first SR image before killing a rank
NAMES = [f"im{i}.png" for i in range(7)]  # 5 of 48x48 and 2 of 48x40: batches of two sizes


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


def _assert_same_run(one: Path, two: Path) -> None:
    pngs = sorted(p.relative_to(one) for p in one.rglob("*.png"))
    assert len(pngs) == 2 * 2 * len(NAMES)  # (sr, bicubic) x 2 scales
    assert pngs == sorted(p.relative_to(two) for p in two.rglob("*.png"))
    for path in pngs:
        assert (one / path).read_bytes() == (two / path).read_bytes(), path
    for scale in ("x2", "x3"):
        assert _csv(one / "HOLD" / scale / "per_image.csv") == _csv(
            two / "HOLD" / scale / "per_image.csv"
        )
    rows = _summary(one)
    assert rows == _summary(two) and all(r["fid"] is not None for r in rows)


def test_two_processes_give_one_process_results_each_image_once(setup):
    root, argv = setup
    code, out = _finish(_torchrun("test.py", *argv, "--out-dir", root / "two",
                                  torch_home=root / "torch_home"))  # fmt: skip
    assert code == 0, out[-3000:]
    _assert_same_run(root / "one", root / "two")
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

"""Result tables of an evaluation: per-image and summary CSV, summary JSON and Markdown."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch

SUMMARY_COLUMNS = (
    "method", "dataset", "scale", "psnr", "ssim", "lpips", "fid", "runtime_s_per_image",
    "peak_memory_mib", "memory", "images", "failed", "datatype", "unc_err_spearman", "niqe",
    "brisque", "protocol",
)  # fmt: skip
IMAGE_COLUMNS = (
    "method", "file", "scale", "lr_height", "lr_width", "out_height", "out_width", "psnr", "ssim",
    "lpips", "runtime_s", "status", "unc_err_spearman", "niqe", "brisque", "protocol",
)  # fmt: skip
_MARKDOWN = (
    ("Method", "method", "{}"), ("Dataset", "dataset", "{}"), ("Scale", "scale", "{:g}"),
    ("PSNR", "psnr", "{:.2f}"), ("SSIM", "ssim", "{:.4f}"), ("LPIPS", "lpips", "{:.4f}"),
    ("FID", "fid", "{:.2f}"), ("NIQE", "niqe", "{:.3f}"), ("BRISQUE", "brisque", "{:.2f}"),
    ("Runtime (s/img)", "runtime_s_per_image", "{:.3f}"),
    ("Peak mem (MiB)", "peak_memory_mib", "{:.0f}"), ("Images", "images", "{}"),
)  # fmt: skip
_OPTIONAL = ("niqe", "brisque")  # Markdown columns shown only when some row has a value
_MEMORY_NOTES = {
    "cuda_max_allocated": "torch.cuda.max_memory_allocated during the call",
    "process_peak_rss": "peak resident memory of the whole process so far (CPU run)",
}


def memory_kind(device: torch.device) -> str:
    """What the peak memory column measures on `device` (see `_MEMORY_NOTES`)."""
    return "cuda_max_allocated" if device.type == "cuda" else "process_peak_rss"


def _plain(value):
    return None if isinstance(value, float) and math.isnan(value) else value


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict]) -> None:
    """Rows as CSV with `columns` (missing values empty)."""
    with Path(path).open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows({k: _plain(r.get(k)) for k in columns} for r in rows)


def markdown_table(rows: Sequence[dict]) -> str:
    """Method | Dataset | Scale | PSNR | SSIM | LPIPS | FID | [NIQE | BRISQUE |] runtime | peak
    memory | images, then the protocol and what peak memory measures."""
    cell = lambda v, fmt: "-" if _plain(v) is None else fmt.format(v)  # noqa: E731
    shown = [
        c for c in _MARKDOWN if c[1] not in _OPTIONAL or any(_plain(r.get(c[1])) for r in rows)
    ]
    lines = ["| " + " | ".join(title for title, _, _ in shown) + " |"]
    lines.append("|" + "|".join("---" for _ in shown) + "|")
    lines += ["| " + " | ".join(cell(r.get(k), f) for _, k, f in shown) + " |" for r in rows]
    if protocols := sorted({r.get("protocol") for r in rows} - {None}):
        lines.append(f"\nProtocol: {', '.join(protocols)} (docs/departures.md).")
    notes = "; ".join(_MEMORY_NOTES[k] for k in sorted({r.get("memory") for r in rows} - {None}))
    return "\n".join(lines) + (f"\n\nPeak memory: {notes}.\n" if notes else "\n")


def write_summary(rows: Sequence[dict], out_dir: str | Path, settings: dict | None = None) -> str:
    """Writes `summary.csv`, `summary.json` (`{"settings", "rows"}`) and `summary.md`; returns
    the Markdown table."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "summary.csv", SUMMARY_COLUMNS, rows)
    plain = [{k: _plain(r.get(k)) for k in SUMMARY_COLUMNS} for r in rows]
    text = json.dumps({"settings": settings or {}, "rows": plain}, indent=2, default=str)
    (out / "summary.json").write_text(text + "\n")
    (out / "summary.md").write_text(table := markdown_table(rows))
    return table

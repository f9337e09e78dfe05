"""The paper's three result tables, filled from the summary rows of a run (any datasets, scales
and methods), as Markdown, CSV and LaTeX; a cell that was not run stays blank.

1. `table1_x2_x4_x8`: one row per method and metric (PSNR, LPIPS, FID), columns
   <dataset> x2 / x4 / x8 (the paper: AID, DOTA, DIOR).
2. `table2_continuous_scales`: one row per dataset, method and metric (FID, LPIPS), columns the
   scales x2.0, 2.6, 3.0, 3.4, 4.0, 6.0, 8.0, 10.0.
3. `table3_x4`: one row per dataset and method, columns PSNR, SSIM, FID, LPIPS, NIQE, BRISQUE at
   x4.
Datasets come in the paper's order (AID, DOTA, DIOR, then the others as run), methods as run.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

PAPER_DATASETS = ("AID", "DOTA", "DIOR")
TABLE1_SCALES = (2.0, 4.0, 8.0)
TABLE2_SCALES = (2.0, 2.6, 3.0, 3.4, 4.0, 6.0, 8.0, 10.0)
TABLE3_METRICS = ("psnr", "ssim", "fid", "lpips", "niqe", "brisque")
TITLES = {"psnr": "PSNR", "ssim": "SSIM", "fid": "FID", "lpips": "LPIPS", "niqe": "NIQE"}
TITLES["brisque"] = "BRISQUE"
FORMATS = {"psnr": "{:.2f}", "ssim": "{:.4f}", "fid": "{:.2f}", "lpips": "{:.4f}"}
FORMATS.update(niqe="{:.4f}", brisque="{:.2f}")

Table = tuple[list[str], list[list[str]]]  # header, rows of cells ("" = not run)


def _ordered(values) -> list:
    return list(dict.fromkeys(values))


def _lookup(rows: Sequence[dict]):
    """`(dataset, method, scale, metric) -> formatted value or ""`."""
    index = {(r["dataset"], r["method"], round(float(r["scale"]), 3)): r for r in rows}

    def value(dataset: str, method: str, scale: float, metric: str) -> str:
        v = index.get((dataset, method, round(scale, 3)), {}).get(metric)
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        return FORMATS[metric].format(v)

    return value


def paper_tables(rows: Sequence[dict]) -> dict[str, Table]:
    """The three layouts (module docstring) of `rows` (summary rows: method, dataset, scale,
    metrics) -> {table name: (header, rows)}."""
    run = _ordered(r["dataset"] for r in rows)
    datasets = [d for d in PAPER_DATASETS if d in run] + [d for d in run if d not in PAPER_DATASETS]
    methods, value = _ordered(r["method"] for r in rows), _lookup(rows)
    header1 = ["Method", "Metric"] + [f"{d} x{s:g}" for d in datasets for s in TABLE1_SCALES]
    table1 = [
        [m, TITLES[k]] + [value(d, m, s, k) for d in datasets for s in TABLE1_SCALES]
        for m in methods
        for k in ("psnr", "lpips", "fid")
    ]
    header2 = ["Dataset", "Method", "Metric"] + [f"x{s:.1f}" for s in TABLE2_SCALES]
    table2 = [
        [d, m, TITLES[k]] + [value(d, m, s, k) for s in TABLE2_SCALES]
        for d in datasets
        for m in methods
        for k in ("fid", "lpips")
    ]
    header3 = ["Dataset", "Method"] + [TITLES[k] for k in TABLE3_METRICS]
    table3 = [
        [d, m] + [value(d, m, 4.0, k) for k in TABLE3_METRICS] for d in datasets for m in methods
    ]
    return {
        "table1_x2_x4_x8": (header1, table1),
        "table2_continuous_scales": (header2, table2),
        "table3_x4": (header3, table3),
    }


def to_markdown(table: Table, note: str = "") -> str:
    """A Markdown table; blank cells stay empty."""
    header, body = table
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines) + (f"\n\n{note}\n" if note else "\n")


def _tex(text: str) -> str:
    return text.replace("\\", "\\textbackslash{}").replace("_", "\\_").replace("&", "\\&")


def to_latex(table: Table, note: str = "") -> str:
    """A `tabular` (booktabs rules); blank cells stay empty."""
    header, body = table
    lines = [f"% {note}"] if note else []
    lines += ["\\begin{tabular}{" + "l" * len(header) + "}"]
    lines += ["\\toprule", " & ".join(_tex(h) for h in header) + " \\\\", "\\midrule"]
    lines += [" & ".join(_tex(c) for c in row) + " \\\\" for row in body]
    return "\n".join(lines + ["\\bottomrule", "\\end{tabular}"]) + "\n"


def write_paper_tables(rows: Sequence[dict], out_dir: str | Path) -> list[Path]:
    """Writes `<out_dir>/paper_tables/<name>.{md,csv,tex}` for the three layouts; returns the
    paths. A note (Markdown, LaTeX) or a last column (CSV) names the protocol of the rows."""
    folder = Path(out_dir) / "paper_tables"
    folder.mkdir(parents=True, exist_ok=True)
    protocols = ", ".join(sorted({str(r.get("protocol")) for r in rows if r.get("protocol")}))
    note = f"Protocol: {protocols or 'unknown'}; blank: not run."
    written = []
    for name, table in paper_tables(rows).items():
        column = ["Protocol"] + [protocols] * len(table[1])
        paths = [folder / f"{name}.{ext}" for ext in ("md", "csv", "tex")]
        paths[0].write_text(to_markdown(table, note))
        with paths[1].open("w", newline="") as f:  # the protocol as a last column
            csv.writer(f).writerows([r + [p] for r, p in zip([table[0], *table[1]], column)])
        paths[2].write_text(to_latex(table, note))
        written += paths
    return written

"""The browsable page of an evaluation, `report.html` beside test.py's tables: the summary, a
sortable per-image table per dataset and scale, and a viewer whose panels (LR, each method's
output, HR) pan and zoom together, with a before/after slider and |SR - HR| / uncertainty
overlays.

The page is static and works offline from the results folder (file://, no server): its data is
JSON embedded in the HTML (Chromium does not let file:// pages fetch local files), its images
are the run's PNGs plus `report_assets/` (thumbnails, LR and HR copies, error maps), and
full-size images load only for the selected row. The HTML/CSS/JS lives in report_template.html.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from evaluation.pairs import REFERENCE_DATATYPES, Item, Source, load_batch, plan_items
from utils.image_io import IMAGE_EXTENSIONS, load_image
from utils.metrics import quantize

log = logging.getLogger(__name__)

REPORT_NAME = "report.html"
ASSETS = "report_assets"
TEMPLATE = Path(__file__).with_name("report_template.html")
THUMB_SIDE = 160  # px, longest side of the table's thumbnails
ERROR_GAIN = 4.0  # an |SR - HR| of 1/4 of the range is drawn at the colour map's top
ERROR_LEVELS = 16  # colours of the error map: a 4-bit PNG, half the size of an 8-bit one
BASELINE = "Bicubic"
# per_image.csv columns that describe the image or the run, not its quality
NOT_METRICS = {"method", "file", "scale", "lr_height", "lr_width", "out_height", "out_width"}
NOT_METRICS |= {"runtime_s", "status"}
HIGHER_IS_WORSE = ("lpips", "fid", "niqe", "brisque")  # others (PSNR, SSIM, ...) worst when low
DELTA_METRICS = ("psnr", "ssim", "lpips")  # shown as the difference to bicubic
UNCERTAINTY = "unc_err_spearman"  # per_image.csv column of the method that has maps (--samples)
LABELS = {UNCERTAINTY: "ρ(unc, err)"}  # column titles other than the upper-case name
# colour map of the error overlay: black -> purple -> orange -> yellow (inferno-like)
Folder = str | Path | Callable[[str, float], Path]  # a method's images (`write_report`)
_ANCHORS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]])


def _palette() -> list[int]:
    """`ERROR_LEVELS` RGB entries interpolated between `_ANCHORS`, flattened for putpalette."""
    x = np.linspace(0, len(_ANCHORS) - 1, ERROR_LEVELS)
    channels = [np.interp(x, np.arange(len(_ANCHORS)), _ANCHORS[:, c]) for c in range(3)]
    return np.round(np.stack(channels, 1)).astype(np.uint8).ravel().tolist()


def error_map(sr: Image.Image, hr: Image.Image) -> Image.Image:
    """|SR - HR| (uint8 images) averaged over RGB, times `ERROR_GAIN`, in `ERROR_LEVELS` steps
    as a palette image (the colour map above; index 0 = no error)."""
    diff = np.abs(np.asarray(sr, np.int16) - np.asarray(hr, np.int16)).mean(axis=2)
    steps = diff * ERROR_GAIN * ERROR_LEVELS / 256
    index = np.clip(np.ceil(steps), 0, ERROR_LEVELS - 1).astype(np.uint8)  # [H, W]
    image = Image.fromarray(index, mode="P")
    image.putpalette(_palette())
    return image


def _to_pil(x01) -> Image.Image:
    return Image.fromarray(quantize(x01).permute(1, 2, 0).numpy())  # [3, H, W] -> uint8


def _number(text: str | None) -> float | None:
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def read_per_image(path: Path) -> tuple[list[str], list[str], dict[str, dict], int]:
    """per_image.csv -> (methods, metric columns, {file: {"size": [h, w], method: {metric: v}}},
    number of failed rows) for the images every method evaluated, in file order."""
    with path.open(newline="") as f:
        every = list(csv.DictReader(f))
    rows = [r for r in every if r.get("status", "ok") == "ok" and r.get("method")]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    metrics = [
        k for k in (rows[0] if rows else {})
        if k not in NOT_METRICS and any(_number(r.get(k)) is not None for r in rows)
    ]  # fmt: skip
    images: dict[str, dict] = {}
    for row in rows:
        image = images.setdefault(row["file"], {})
        image["size"] = [int(row["out_height"]), int(row["out_width"])]
        image[row["method"]] = {k: _number(row.get(k)) for k in metrics}
    complete = {name: i for name, i in images.items() if all(m in i for m in methods)}
    return methods, metrics, complete, len(every) - len(rows)


def table_columns(methods: Sequence[str], metrics: Sequence[str]) -> list[dict]:
    """The per-image table's value columns, per method: its metrics, then their difference to
    bicubic (`delta`); `worst` is the sort order that puts the worst images first."""
    columns = []
    for method in methods:
        columns += [{"method": method, "metric": k, "key": f"{method}|{k}"} for k in metrics]
        if BASELINE in methods and method != BASELINE:
            columns += [
                {"method": method, "metric": k, "key": f"{method}|Δ{k}", "delta": True}
                for k in metrics
                if k in DELTA_METRICS
            ]
    for column in columns:
        name = LABELS.get(column["metric"], column["metric"].upper())
        column["label"] = f"Δ{name}" if column.get("delta") else name
        column["worst"] = "desc" if column["metric"] in HIGHER_IS_WORSE else "asc"
    return columns


def _values(image: dict, columns: Sequence[dict]) -> list[float | None]:
    out = []
    for column in columns:
        value = image[column["method"]].get(column["metric"])
        if column.get("delta"):
            base = image[BASELINE].get(column["metric"])
            value = None if value is None or base is None else value - base
        out.append(value)
    return out


class _Writer:
    """Writes the assets of one dataset and scale under report_assets/ and lists each image's."""

    def __init__(self, out: Path, dataset: str, scale: float, panels: list[dict]):
        self.out, self.panels = out, panels
        self.scale_dir = out / dataset / f"x{scale:g}"
        self.assets = out / ASSETS / dataset / f"x{scale:g}"
        for panel in (p for p in panels if p["kind"] == "method"):
            folder = panel["folder"]
            panel["dir"] = folder(dataset, scale) if callable(folder) else self.scale_dir / folder
            files = sorted(panel["dir"].glob("*")) if panel["dir"].is_dir() else []
            panel["stems"] = {f.stem: f for f in files if f.suffix.lower() in IMAGE_EXTENSIONS}

    def save(self, image: Image.Image, kind: str, name: str, **options) -> str:
        """Writes `image` as report_assets/<dataset>/x<s>/<kind>/<name>; returns its page path."""
        path = self.assets / kind / name
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, **({"compress_level": 1} if path.suffix == ".png" else {}), **options)
        return path.relative_to(self.out).as_posix()

    def copy(self, source: Path | None, kind: str, name: str) -> str | None:
        """Copies an 8-bit RGB or grey PNG/JPEG input as it is (smaller and faster than writing
        it again; exact for the page); None for other files, which the caller re-encodes."""
        if source is None:
            return None
        with Image.open(source) as img:
            if img.format not in ("PNG", "JPEG") or img.mode not in ("RGB", "L"):
                return None
        path = self.assets / kind / f"{Path(name).stem}{source.suffix.lower()}"
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, path)
        return path.relative_to(self.out).as_posix()

    def link(self, path: Path, kind: str) -> str | None:
        """The page path of an existing file, copied under report_assets/ when outside the run
        folder (the page reads nothing outside it); None when absent."""
        if not path.is_file():
            return None
        if path.resolve().is_relative_to(self.out.resolve()):
            return path.resolve().relative_to(self.out.resolve()).as_posix()
        copied = self.copy(path, kind, path.name)
        return copied or self.save(load_image(path), kind, f"{path.stem}.png")

    def uncertainty(self, panel: dict, name: str) -> str | None:
        """`<stem>_uncertainty.png` beside the method's output, or in `<dataset>/x<s>/uncertainty/`
        (test.py --samples) for the panel marked `maps`."""
        stem = f"{Path(name).stem}_uncertainty.png"
        beside = self.link(panel["dir"] / stem, f"{panel['slug']}_unc")
        if beside or not panel.get("maps"):
            return beside
        return self.link(self.scale_dir / "uncertainty" / stem, "unc")

    def image(self, name: str, inputs: dict) -> dict:
        """Writes one image's LR, HR, error maps and thumbnail -> the page paths of its panels'
        images, error and uncertainty maps (None where absent) and of its thumbnail. `inputs`:
        the decoded "lr" and "hr" images and their "lr_file" and "hr_file" (None if absent)."""
        hr, sources, errors, uncertainty = inputs.get("hr"), [], [], []
        for panel in self.panels:
            kind, src, err, unc = panel["kind"], None, None, None
            if kind == "method":
                path = panel["stems"].get(Path(name).stem, panel["dir"] / name)  # any extension
                src = self.link(path, panel["slug"])
                err = self.error(panel, src, hr, name) if src and hr else None
                unc = self.uncertainty(panel, name)
            elif (image := inputs.get(kind)) is not None:
                src = self.copy(inputs[f"{kind}_file"], kind, name) or self.save(image, kind, name)
            sources, errors, uncertainty = sources + [src], errors + [err], uncertainty + [unc]
        shown = next((s for s in reversed(sources) if s), None)  # HR if there is one
        thumb = None
        if shown:
            small = Image.open(self.out / shown).convert("RGB")
            small.thumbnail((THUMB_SIDE, THUMB_SIDE), Image.BICUBIC)
            thumb = self.save(small, "thumbs", f"{Path(name).stem}.jpg", quality=85)
        return {"src": sources, "err": errors, "unc": uncertainty, "thumb": thumb}

    def error(self, panel: dict, src: str, hr: Image.Image, name: str) -> str | None:
        """Writes the |SR - HR| map of a method's output (`error_map`); None on a size mismatch."""
        sr = Image.open(self.out / src).convert("RGB")
        if sr.size != hr.size:
            log.warning("no error map for %s: SR %s vs HR %s", src, sr.size, hr.size)
            return None
        return self.save(error_map(sr, hr), f"{panel['slug']}_error", name, bits=4)


def _panels(methods: Sequence[str], folders: Mapping[str, Folder], maps: str | None):
    """LR (nearest), bicubic, each method's output, HR: the viewer's panels, in that order;
    `maps` names the method that the uncertainty/ folder's maps belong to."""
    ordered = [m for m in methods if m == BASELINE] + [m for m in methods if m != BASELINE]
    panels = [{"label": "LR (nearest)", "kind": "lr"}]
    panels += [
        {"label": m, "kind": "method", "folder": folders[m], "slug": re.sub(r"\W+", "_", m),
         "maps": m == maps}
        for m in ordered if m in folders
    ]  # fmt: skip
    return panels + [{"label": "HR", "kind": "hr"}]


def _decode(item: Item | None, datatype: str) -> dict:
    """The LR and HR of an item as `load_batch` makes them, and the files they come from (None
    where computed: the bicubic LR of hr-downsample)."""
    decoded, lr, hr, _ = load_batch([item], datatype) if item else ([], None, None, [])
    if not decoded:
        return {}
    reference = datatype in REFERENCE_DATATYPES
    lr_file = item.lr_path if datatype == "paired" else None if reference else item.path
    return {
        "lr": _to_pil(lr[0]), "lr_file": lr_file,
        "hr": _to_pil(hr[0]) if reference else None, "hr_file": item.path if reference else None,
    }  # fmt: skip


def _inputs(source: Source | None, datatype: str, scale: float) -> dict:
    """{output name: Item} of a source at a scale, for its LR and HR images."""
    if source is None:
        return {}
    items, _ = plan_items(source, datatype, scale)
    return {item.name: item for item in items}


def build_group(out: Path, dataset: str, scale: float, source, datatype, folders) -> dict | None:
    """One dataset and scale: writes its assets; returns the page's data (None: no CSV)."""
    csv_path = out / dataset / f"x{scale:g}" / "per_image.csv"
    if not csv_path.is_file():
        return None
    methods, metrics, images, failed = read_per_image(csv_path)
    scored = [m for m in methods if any(i[m].get(UNCERTAINTY) is not None for i in images.values())]
    panels = _panels(methods, folders, (scored or methods or [None])[0])
    columns, writer = table_columns(methods, metrics), _Writer(out, dataset, scale, panels)
    inputs, rows = _inputs(source, datatype, scale), []
    for name, image in images.items():
        row = {"name": name, "size": image["size"], "values": _values(image, columns)}
        rows.append({**row, **writer.image(name, _decode(inputs.get(name), datatype))})
    panels, columns = _drop_empty(rows, panels, columns)
    return {
        "dataset": dataset, "scale": scale, "methods": methods, "columns": columns,
        "panels": [{k: p[k] for k in ("label", "kind")} for p in panels], "images": rows,
        "failed": failed,
    }  # fmt: skip


def _drop_empty(rows: list[dict], panels: list[dict], columns: list[dict]) -> tuple[list, list]:
    """Leaves out (in place in `rows`) the panels no image has (e.g. LR and HR without the
    dataset at hand) and the columns without a value (e.g. a correlation only LDCSR has)."""
    keep = [i for i in range(len(panels)) if any(r["src"][i] for r in rows)]
    used = [c for c in range(len(columns)) if any(r["values"][c] is not None for r in rows)]
    for row in rows:
        row.update({key: [row[key][i] for i in keep] for key in ("src", "err", "unc")})
        row["values"] = [row["values"][c] for c in used]
    return [panels[i] for i in keep], [columns[c] for c in used]


def protocol_text(settings: Mapping, rows: Sequence[Mapping]) -> str:
    """The evaluation settings in words: the protocol (test.py --protocol), metrics, channel,
    datatype and seed, as far as summary.json records them."""
    named = settings.get("protocol") or ", ".join(
        sorted({str(r["protocol"]) for r in rows if r.get("protocol")})
    )
    metrics = settings.get("metrics")
    parts = [f"protocol {named}"] if named else []
    if metrics is not None:
        parts.append(f"metrics {', '.join(metrics)}" if metrics else "no metrics")
    parts += ["PSNR/SSIM on Y"] if settings.get("test_y") else []
    datatype = settings.get("datatype") or (rows[0].get("datatype") if rows else None)
    parts += [f"datatype {datatype}"] if datatype else []
    parts += [f"seed {settings['seed']}"] if settings.get("seed") is not None else []
    return "; ".join(parts)


def render(data: dict) -> str:
    """The template with `data` embedded as JSON (`</` escaped so no string closes the tag)."""
    text = json.dumps(data, allow_nan=False, default=str, separators=(",", ":"))
    return TEMPLATE.read_text().replace("__REPORT_DATA__", text.replace("</", "<\\/"))


def write_report(
    out_dir: str | Path,
    folders: Mapping[str, Folder],
    sources: Sequence[Source] = (),
    datatype: str | None = None,
) -> Path:
    """Writes `<out_dir>/report.html` and `<out_dir>/report_assets/` from the tables test.py wrote
    (`summary.json`, `<dataset>/x<s>/per_image.csv`) and the images beside them.

    Args:
        out_dir: the run folder.
        folders: {method: its images}: a folder name under `<dataset>/x<s>/` (`Method.folder`
            of `evaluation.runner`), or `(dataset, scale) -> folder` anywhere (e.g. --sr-dir's
            `sr_folders.scale_folder`), whose images are then copied; files match by stem.
        sources: the evaluated datasets; their LR and HR images (as `evaluation.pairs` loads them)
            are copied as PNGs for the LR and HR panels and the error maps. Without them those
            panels are left out.
        datatype: of the run (default: the one summary.json records).

    Returns:
        The path of report.html. An earlier report_assets/ is replaced.
    """
    out = Path(out_dir)
    summary = json.loads((out / "summary.json").read_text())
    settings, rows = summary.get("settings", {}), summary.get("rows", [])
    datatype = datatype or settings.get("datatype") or "hr-downsample"
    by_name = {source.name: source for source in sources}
    shutil.rmtree(out / ASSETS, ignore_errors=True)
    groups = []
    for dataset, scale in dict.fromkeys((r["dataset"], float(r["scale"])) for r in rows):
        source = by_name.get(dataset)
        group = build_group(out, dataset, scale, source, datatype, folders)
        groups += [group] if group else []
    title = f"LDCSR evaluation: {out.resolve().name}"
    data = {
        "title": title, "protocol": protocol_text(settings, rows), "summary": rows,
        "settings": {k: v for k, v in settings.items() if not isinstance(v, (dict, list))},
        "groups": groups, "higher_is_worse": HIGHER_IS_WORSE,
    }  # fmt: skip
    path = out / REPORT_NAME
    partial = path.with_name(f".{REPORT_NAME}.{os.getpid()}.partial")
    partial.write_text(render(data), encoding="utf-8")
    partial.replace(path)  # a reader never sees half a page
    return path

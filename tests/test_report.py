"""test.py's report.html (evaluation/report.py) from a real run on a tiny checkpoint, and the
page itself in a real headless Chromium (Debian's `chromium`, driven by Playwright): offline,
one row per image, sorting, the viewer's synchronised panels, its slider and its overlays.

The browser tests skip with the reason when Chromium or Playwright is missing, except under
CI=true, where they fail (.ci/run installs both). A screenshot of the viewer is written to
$TEST_ARTIFACTS_DIR (default: the test's tmp_path).
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation.report import (
    ASSETS,
    THUMB_SIDE,
    error_map,
    read_per_image,
    table_columns,
    write_report,
)
from evaluation.report import UNCERTAINTY as UNC
from tests.conftest import ROOT

_spec = importlib.util.spec_from_file_location("ldcsr_test_cli", ROOT / "test.py")
cli = importlib.util.module_from_spec(_spec)  # `import test` could give the stdlib package
_spec.loader.exec_module(cli)

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
# (H, W) of the test images; tiny.png is below the tiny model's 16-px minimum output: it fails
SIZES = {"a.png": (40, 40), "b.png": (40, 40), "c.png": (32, 48), "tiny.png": (8, 8)}


def _write_scene(path: Path, h: int, w: int, seed: int) -> None:
    """Colour ramps, a darker block and pixel noise: detail that LR, SR and HR show differently."""
    y, x = np.mgrid[0:h, 0:w]
    rng = np.random.default_rng(seed)
    arr = np.stack([(x * 5 + 60 * seed) % 256, y * 6 % 256, (x + y) * 3 % 256], axis=2)
    arr[rng.integers(0, h) :, rng.integers(0, w) :] //= 2
    arr = np.clip(arr + rng.integers(-40, 41, arr.shape), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr.astype(np.uint8)).save(path)


def _run(checkpoint, root: Path, out: Path, *args: str) -> list[dict]:
    argv = ["--checkpoint", str(checkpoint), "--data-root", str(root), "--datasets", "SYN"]
    return cli.main([*argv, "--out-dir", str(out), "--metrics", "psnr,ssim", *args])


@pytest.fixture(scope="module")
def results(tiny_sr_checkpoint, tmp_path_factory) -> Path:
    """A test.py run (report on by default) at x2 and x4 on four small images, one too small,
    with LDCSR's uncertainty maps (--samples 2)."""
    root = tmp_path_factory.mktemp("report")
    for seed, (name, (h, w)) in enumerate(SIZES.items()):
        _write_scene(root / "data" / "SYN" / "test" / "HR" / name, h, w, seed)
    args = ("--scales", "2", "4", "--samples", "2")
    _run(tiny_sr_checkpoint, root / "data", root / "results", *args)
    return root / "results"


def page_data(report: Path) -> dict:
    """The JSON the page embeds."""
    pattern = r'<script id="report-data" type="application/json">(.*?)</script>'
    return json.loads(re.search(pattern, report.read_text(), re.S).group(1))


def _ok_files(per_image: Path) -> list[str]:
    with per_image.open() as f:
        rows = list(csv.DictReader(f))
    return list(dict.fromkeys(r["file"] for r in rows if r["status"] == "ok"))


def test_report_lists_each_evaluated_image_with_files_inside_the_folder(results):
    data = page_data(results / "report.html")
    assert [(g["dataset"], g["scale"]) for g in data["groups"]] == [("SYN", 2.0), ("SYN", 4.0)]
    assert data["protocol"].startswith("protocol paper; metrics psnr, ssim; datatype hr-downsample")
    for group in data["groups"]:
        names = [i["name"] for i in group["images"]]
        assert names == _ok_files(results / "SYN" / f"x{group['scale']:g}" / "per_image.csv")
        assert sorted(names) == ["a.png", "b.png", "c.png"] and group["failed"] == 1
        assert [p["label"] for p in group["panels"]] == ["LR (nearest)", "Bicubic", "LDCSR", "HR"]
        keys = [c["key"] for c in group["columns"]]
        assert keys == [*(f"LDCSR|{k}" for k in ("psnr", "ssim", UNC, "Δpsnr", "Δssim")),
                        "Bicubic|psnr", "Bicubic|ssim"]  # fmt: skip
        for image in group["images"]:
            assert image["unc"][2] and not any(image["unc"][:2] + image["unc"][3:])  # LDCSR's
            paths = [image["thumb"], *image["src"], *filter(None, image["err"]), image["unc"][2]]
            assert len(paths) == 1 + 4 + 2 + 1  # thumbnail, 4 panels, 2 error maps, uncertainty
            for path in paths:
                assert not Path(path).is_absolute() and ".." not in path
                assert (results / path).is_file(), path
            with Image.open(results / image["thumb"]) as thumb:
                assert max(thumb.size) <= THUMB_SIDE
            h, w = SIZES[image["name"]]
            lr = Image.open(results / image["src"][0])
            assert lr.size == (int(w / group["scale"]), int(h / group["scale"]))
            assert Image.open(results / image["src"][-1]).size == (w, h)


def test_outputs_outside_the_run_are_copied_in_and_the_inputs_are_optional(results, tmp_path):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    shutil.copytree(results, run, ignore=shutil.ignore_patterns(ASSETS, "report.html", "x4"))
    summary = json.loads((run / "summary.json").read_text())
    summary["rows"] = [r for r in summary["rows"] if r["scale"] == 2]
    (run / "summary.json").write_text(json.dumps(summary))
    shutil.move(run / "SYN" / "x2" / "sr", elsewhere)
    asked = []  # a folder per dataset and scale, as test.py passes for --sr-dir
    folder = lambda dataset, scale: asked.append((dataset, scale)) or elsewhere  # noqa: E731
    write_report(run, {"LDCSR": folder, "Bicubic": "bicubic"})  # no sources: no LR, HR
    assert asked == [("SYN", 2.0)]
    (group,) = page_data(run / "report.html")["groups"]
    assert [p["label"] for p in group["panels"]] == ["Bicubic", "LDCSR"]
    for image in group["images"]:
        bicubic, ldcsr = image["src"]
        assert bicubic == f"SYN/x2/bicubic/{image['name']}" and not any(image["err"])
        assert ldcsr == f"{ASSETS}/SYN/x2/LDCSR/{image['name']}"
        assert (run / ldcsr).read_bytes() == (elsewhere / image["name"]).read_bytes()


def test_no_report_writes_neither_page_nor_assets(tiny_sr_checkpoint, results, tmp_path):
    root = results.parent / "data"
    _run(tiny_sr_checkpoint, root, tmp_path / "out", "--scales", "2", "--no-report")
    assert (tmp_path / "out" / "summary.json").is_file()
    assert not (tmp_path / "out" / "report.html").exists()
    assert not (tmp_path / "out" / ASSETS).exists()


def test_per_image_columns_new_metrics_and_worst_first(tmp_path):
    path = tmp_path / "per_image.csv"
    header = "method,file,scale,out_height,out_width,psnr,lpips,unc_err_spearman,runtime_s,status"
    path.write_text(
        f"{header}\nLDCSR,a.png,4,8,8,30.0,0.2,0.5,1.0,ok\nBicubic,a.png,4,8,8,28.5,0.3,,0.1,ok\n"
        "LDCSR,b.png,4,8,8,25.0,0.4,0.1,1.0,ok\nBicubic,b.png,4,8,8,26.0,0.35,,0.1,ok\n"
        "LDCSR,c.png,4,,,,,,,failed: unreadable\n"
    )
    methods, metrics, images, failed = read_per_image(path)
    assert methods == ["LDCSR", "Bicubic"] and list(images) == ["a.png", "b.png"] and failed == 1
    assert metrics == ["psnr", "lpips", "unc_err_spearman"]  # runtime is not a quality column
    assert images["b.png"]["LDCSR"] == {"psnr": 25.0, "lpips": 0.4, "unc_err_spearman": 0.1}
    columns = {c["key"]: c for c in table_columns(methods, metrics)}
    assert list(columns) == [
        "LDCSR|psnr", "LDCSR|lpips", "LDCSR|unc_err_spearman", "LDCSR|Δpsnr", "LDCSR|Δlpips",
        "Bicubic|psnr", "Bicubic|lpips", "Bicubic|unc_err_spearman",
    ]  # fmt: skip
    assert columns["LDCSR|lpips"]["worst"] == "desc" and columns["LDCSR|Δlpips"]["worst"] == "desc"
    assert columns["LDCSR|psnr"]["worst"] == "asc" and columns["LDCSR|Δpsnr"]["delta"]


def test_error_map_is_zero_where_equal_and_bright_where_not():
    hr = Image.fromarray(np.full((6, 8, 3), 100, np.uint8))
    sr = np.full((6, 8, 3), 100, np.uint8)
    sr[2:4, 5:] = 180  # an error of 80: x gain 4 > 255, the top colour
    sr[0, 0] = 101  # the smallest error still shows
    errors = error_map(Image.fromarray(sr), hr)
    index = np.asarray(errors)
    assert errors.mode == "P" and index.shape == (6, 8)
    assert index[2:4, 5:].min() == 15 and index[0, 0] == 1 and index.sum() == 15 * 6 + 1
    rgb = np.asarray(errors.convert("RGB"))
    assert rgb[1, 1].sum() < 30 and rgb[2, 5].sum() > 500  # black for no error, bright yellow


# --- the page in a real browser ---------------------------------------------------------------


def _require(ok: bool, reason: str) -> None:
    if ok:
        return
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"{reason}; CI=true, so the browser test must run (.ci/run installs it)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    _require(CHROMIUM.is_file(), f"{CHROMIUM} is missing (apt-get install chromium)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _require(False, "playwright is missing (pip install -r requirements-test.txt)")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def _open(browser, results: Path):
    """The report in a fresh page -> (page, problems): console errors, page errors and requests
    that leave the results folder (those are aborted)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems, folder = [], results.resolve().as_uri() + "/"

    def route(route):
        if route.request.url.startswith(folder):
            route.continue_()
        else:
            problems.append(f"request leaving the folder: {route.request.url}")
            route.abort()

    page.route("**/*", route)
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda err: problems.append(f"page error: {err}"))
    page.goto((results / "report.html").resolve().as_uri())
    page.wait_for_load_state("load")
    _wait_for_images(page)
    return page, problems


def _wait_for_images(page) -> None:
    page.wait_for_function(
        "[...document.querySelectorAll('#viewer img')].every((i) => i.complete)", timeout=10_000
    )


def _column(page, key: str) -> list[float]:
    index = page.eval_on_selector_all(
        "#per-image thead tr:last-child th", f"ths => ths.findIndex(t => t.dataset.key === '{key}')"
    )
    assert index >= 0, key
    cells = page.eval_on_selector_all(
        "#per-image tbody tr", f"rows => rows.map(r => r.cells[{index} + 3].dataset.value)"
    )  # 3 leading cells: rank, thumbnail, name
    return [float(v) for v in cells]


def _boxes(page) -> list[dict]:
    """Screen boxes of the main image of each viewer panel and of the compare view's left image."""
    return page.eval_on_selector_all(
        "#panels .stage img:first-child, #compare .layer.a img",
        "imgs => imgs.map(i => { const r = i.getBoundingClientRect(); "
        "return {x: r.x, y: r.y, w: r.width}; })",
    )


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.float32)


def test_page_loads_offline_with_one_row_per_image_and_sorts(browser, results):
    page, problems = _open(browser, results)
    assert page.locator("#summary-paper tbody tr").count() == 2  # LDCSR and Bicubic
    rows = _ok_files(results / "SYN" / "x2" / "per_image.csv")
    assert page.locator("#per-image tbody tr").count() == len(rows) == 3
    page.click('#per-image th[data-key="LDCSR|psnr"]')  # worst first: ascending PSNR
    ascending = _column(page, "LDCSR|psnr")
    assert ascending == sorted(ascending) and len(set(ascending)) == 3
    page.click('#per-image th[data-key="LDCSR|psnr"]')
    assert _column(page, "LDCSR|psnr") == sorted(ascending, reverse=True)
    page.click("#groups button:nth-child(2)")  # x4: its own rows
    assert page.locator("#per-image tbody tr").count() == 3
    assert "1/3" in page.inner_text("#current")
    assert problems == []


def test_viewer_panels_zoom_pan_slider_and_keys(browser, results, tmp_path):
    page, problems = _open(browser, results)
    row = page.locator("#per-image tbody tr").nth(1)
    name = row.locator("td.name").inner_text()
    row.click()
    _wait_for_images(page)
    assert name in page.inner_text("#current")
    images = page.eval_on_selector_all(
        "#viewer img", "imgs => imgs.map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])"
    )
    assert len(images) == 4 + 2  # LR, Bicubic, LDCSR, HR panels + the two compared images
    assert all(src.endswith("/" + name) and done and width > 0 for src, done, width in images)

    before = _boxes(page)
    box = page.locator("#panels .panel").nth(2).bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.mouse.wheel(0, -400)  # zoom in on the LDCSR panel
    first_image = "document.querySelector('#panels .stage img')"
    page.wait_for_function(f"{first_image}.getBoundingClientRect().width > {before[0]['w']}")
    zoomed = _boxes(page)
    ratios = [z["w"] / b["w"] for z, b in zip(zoomed, before)]
    assert min(ratios) > 1.5 and max(ratios) - min(ratios) < 1e-3, ratios  # every panel zoomed

    box = page.locator("#panels .panel").nth(0).bounding_box()
    page.mouse.move(box["x"] + 50, box["y"] + 50)
    page.mouse.down()
    page.mouse.move(box["x"] + 90, box["y"] + 70, steps=4)  # drag the LR panel
    page.mouse.up()
    panned = _boxes(page)
    shifts = [(p["x"] - z["x"]) / z["w"] for p, z in zip(panned, zoomed)]  # in image widths
    assert min(shifts) > 0 and max(shifts) - min(shifts) < 1e-3, shifts

    page.select_option("#cmp-a", label="LR (nearest)")
    page.select_option("#cmp-b", label="HR")
    page.focus("#slider")
    page.keyboard.press("Home")  # the right image (HR) everywhere
    right = _pixels(page.locator("#compare").screenshot())
    page.keyboard.press("End")  # the left image (LR) everywhere
    left = _pixels(page.locator("#compare").screenshot())
    changed = (np.abs(right - left).max(axis=2) > 8).mean()
    assert changed > 0.2, changed  # the blocky LR replaced the HR, not just the divider moved

    page.select_option("#overlay", "err")
    _wait_for_images(page)
    overlays = page.eval_on_selector_all("#panels img.overlay", "o => o.map(i => i.naturalWidth)")
    assert len(overlays) == 2 and min(overlays) > 0  # the |SR - HR| maps of Bicubic and LDCSR
    page.select_option("#overlay", "unc")
    _wait_for_images(page)
    overlays = page.eval_on_selector_all("#panels img.overlay", "o => o.map(i => i.naturalWidth)")
    assert len(overlays) == 1 and min(overlays) > 0  # LDCSR's uncertainty map
    page.select_option("#overlay", "err")

    artifacts = Path(os.environ.get("TEST_ARTIFACTS_DIR") or tmp_path)
    artifacts.mkdir(parents=True, exist_ok=True)
    shot = _pixels(page.locator("#viewer").screenshot(path=artifacts / "report_viewer.png"))
    assert shot.std() > 20 and len(np.unique(shot.reshape(-1, 3), axis=0)) > 200  # not blank

    page.click("#current")  # focus leaves the slider: arrow keys move between images
    order = page.eval_on_selector_all("#per-image td.name", "tds => tds.map(t => t.textContent)")
    page.keyboard.press("ArrowDown")
    assert order[order.index(name) + 1] in page.inner_text("#current")
    page.keyboard.press("ArrowUp")
    assert name in page.inner_text("#current")
    assert problems == []

"""Metrics (utils/metrics.py) against independent references, and the weights helpers."""

import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers import write_random_weights
from utils.metrics import (
    crop_border_for,
    fid_statistics,
    frechet_distance,
    lpips_distance,
    psnr,
    psnr_pyiqa,
    quantize,
    ssim,
    ssim_pyiqa,
)
from utils.weights import (
    FID_WEIGHTS_URL,
    WEIGHTS,
    MissingPackageError,
    MissingWeightsError,
    build_inception,
    build_lpips,
    build_pyiqa_metric,
    missing_weights_message,
    pyiqa_weights_path,
    weights_available,
)

skimage_metrics = pytest.importorskip("skimage.metrics", reason="scikit-image is test-only")
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
HOLDOUT = SHARED / "data" / "holdout"
IMAGES = ("00001.jpg", "P1888.png", "agricultural00.tif")
SCALE = 3.5


@pytest.fixture(scope="module")
def pairs():
    """(sr, hr) float [3, 150, 201] in [0, 1]: HR crops and their Pillow bicubic down/up copies."""
    if not all((HOLDOUT / name).is_file() for name in IMAGES):
        pytest.skip(f"real test images {IMAGES} not found in {HOLDOUT}")
    out = []
    for name in IMAGES:
        hr = Image.open(HOLDOUT / name).convert("RGB").crop((20, 30, 221, 180))  # 201 x 150
        lr = hr.resize((int(201 / SCALE), int(150 / SCALE)), Image.BICUBIC)
        sr = lr.resize(hr.size, Image.BICUBIC)
        out.append(tuple(torch.from_numpy(np.array(im)).permute(2, 0, 1) / 255 for im in (sr, hr)))
    return out


@pytest.fixture(scope="module")
def random_torch_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("torch_home")
    write_random_weights(home, ["alexnet", "inception"])
    return home


@pytest.fixture
def torch_home(random_torch_home, monkeypatch):
    """TORCH_HOME with random AlexNet/Inception weights; downloads fail."""
    monkeypatch.setenv("TORCH_HOME", str(random_torch_home))
    assert torch.hub.get_dir() == str(random_torch_home / "hub")
    monkeypatch.setattr(torch.hub, "download_url_to_file", _blocked_download)
    return random_torch_home


def _blocked_download(*args, **kwargs):
    raise urllib.error.URLError("network disabled in tests")


def _uint8_hwc(x, border):
    """The uint8 HWC array the metrics see: quantised, then border-cropped."""
    return quantize(x).permute(1, 2, 0).numpy()[border:-border, border:-border]


def _y(u8):
    """BT.601 Y in [16, 235] from uint8 RGB (BasicSR's rgb2ycbcr(y_only=True)), float64."""
    return 16.0 + u8.astype(np.float64) @ np.array([65.481, 128.553, 24.966]) / 255.0


def test_quantize_and_crop_border():
    x = torch.tensor([-0.1, 0.0, 0.2, 1.0, 1.3, 0.3])
    assert quantize(x).tolist() == [0, 0, 51, 255, 255, 76]
    assert quantize(x).dtype == torch.uint8
    assert [crop_border_for(s) for s in (2, 3.5, 4.0, 8)] == [2, 4, 4, 8]


@pytest.mark.parametrize("test_y", [False, True])
def test_psnr_ssim_match_scikit_image(pairs, test_y):
    border = crop_border_for(SCALE)
    for sr, hr in pairs:
        sr_u8, hr_u8 = _uint8_hwc(sr, border), _uint8_hwc(hr, border)
        if test_y:
            hr_ref, sr_ref, channel_axis = _y(hr_u8), _y(sr_u8), None
        else:
            hr_ref, sr_ref, channel_axis = hr_u8, sr_u8, 2
        ref_psnr = skimage_metrics.peak_signal_noise_ratio(hr_ref, sr_ref, data_range=255)
        # skimage filters the full image (reflect padding) and then averages the map after
        # dropping (win_size - 1) // 2 = 5 px per side: exactly the positions whose 11x11 window
        # lies inside the image, i.e. our 'valid' map, so no extra cropping is needed. Its
        # truncate=3.5 gives radius int(3.5 * 1.5 + 0.5) = 5, the same 11-tap window.
        ref_ssim = skimage_metrics.structural_similarity(
            hr_ref,
            sr_ref,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=255,
            channel_axis=channel_axis,
        )
        assert abs(psnr(sr, hr, border, test_y).item() - ref_psnr) < 1e-6
        assert abs(ssim(sr, hr, border, test_y).item() - ref_ssim) < 1e-6
        assert 15 < ref_psnr < 45 and 0.1 < ref_ssim < 1.0  # a real degradation, not a no-op


def test_batched_metrics_equal_per_image(pairs):
    sr, hr = (torch.stack(t) for t in zip(*pairs))
    assert psnr(sr, hr, 4).shape == (len(pairs),) and ssim(sr, hr, 4).shape == (len(pairs),)
    for i, (sr_i, hr_i) in enumerate(pairs):
        assert psnr(sr, hr, 4)[i].item() == pytest.approx(psnr(sr_i, hr_i, 4).item(), abs=1e-12)
        assert ssim(sr, hr, 4)[i].item() == pytest.approx(ssim(sr_i, hr_i, 4).item(), abs=1e-12)
    assert psnr(hr, hr, 4).isinf().all() and torch.allclose(ssim(hr, hr, 4), torch.ones(3).double())
    with pytest.raises(ValueError, match="sr and hr"):
        psnr(sr[:, :, :-1], hr, 4)


def test_lpips_matches_direct_call(torch_home):
    net = build_lpips("alex")
    torch.manual_seed(0)
    hr = torch.rand(2, 3, 64, 64)
    sr = (hr + 0.1 * torch.randn_like(hr)).clamp(0, 1)
    values = lpips_distance(sr, hr, net)
    with torch.no_grad():
        direct = net(sr * 2 - 1, hr * 2 - 1).flatten()
        normalized = net(sr, hr, normalize=True).flatten()  # lpips' own [0, 1] -> [-1, 1]
    assert values.shape == (2,) and torch.all(values > 0)
    assert torch.allclose(values, direct, rtol=0, atol=1e-7)
    assert torch.allclose(values, normalized, rtol=0, atol=1e-7)
    assert lpips_distance(sr[0], hr[0], net).item() == pytest.approx(values[0].item(), abs=1e-6)


def _write_images(folder, seed, smooth):
    folder.mkdir()
    rng = np.random.default_rng(seed)
    for i in range(6):
        img = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        if smooth:
            img = ((img.astype(np.uint16) + np.roll(img, 1, axis=1)) // 2).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i}.png")
    return folder


def test_fid_matches_pytorch_fid(torch_home, tmp_path):
    from pytorch_fid.fid_score import calculate_fid_given_paths

    sr_dir = _write_images(tmp_path / "sr", 0, smooth=True)
    hr_dir = _write_images(tmp_path / "hr", 1, smooth=False)
    # 64-d features (first Inception block) keep sqrtm fast; the code path is the 2048-d one's
    ref = calculate_fid_given_paths([str(sr_dir), str(hr_dir)], 4, "cpu", 64, num_workers=0)
    ours = frechet_distance(*(fid_statistics(d, batch_size=4, dims=64) for d in (sr_dir, hr_dir)))
    model = build_inception(64)
    injected = frechet_distance(*(fid_statistics(d, model, 4, dims=64) for d in (sr_dir, hr_dir)))
    assert ref > 0 and abs(ours - ref) < 1e-6 and abs(injected - ref) < 1e-6


def test_fid_from_cached_statistics_is_the_same(torch_home, tmp_path):
    """An HR fit computed once and reused gives the FID that fitting both folders again gives."""
    sr_dir = _write_images(tmp_path / "sr", 0, smooth=True)
    hr_dir = _write_images(tmp_path / "hr", 1, smooth=False)
    model = build_inception(64)
    sr_stats, hr_stats = (fid_statistics(d, model, 4, "cpu", 64) for d in (sr_dir, hr_dir))
    assert hr_stats[0].shape == (64,) and hr_stats[1].shape == (64, 64)
    cached = [frechet_distance(sr_stats, hr_stats) for _ in range(2)]  # the fit is not altered
    fresh = frechet_distance(*(fid_statistics(d, model, 4, "cpu", 64) for d in (sr_dir, hr_dir)))
    assert cached[0] > 0 and cached[0] == cached[1] and abs(cached[0] - fresh) < 1e-6
    with pytest.raises(FileNotFoundError, match="no image"):
        fid_statistics(tmp_path, model, dims=64)


def test_weights_registry_matches_libraries():
    import pytorch_fid.inception
    import torchvision

    assert FID_WEIGHTS_URL == pytorch_fid.inception.FID_WEIGHTS_URL
    assert WEIGHTS["alexnet"].url == torchvision.models.AlexNet_Weights.IMAGENET1K_V1.url
    assert WEIGHTS["vgg16"].url == torchvision.models.VGG16_Weights.IMAGENET1K_V1.url
    for entry in WEIGHTS.values():
        assert entry.url.endswith("/" + entry.file_name)


def test_missing_weights_error_names_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    assert torch.hub.get_dir() == str(tmp_path / "hub")
    monkeypatch.setattr(torch.hub, "download_url_to_file", _blocked_download)
    folder = str(tmp_path / "hub" / "checkpoints")
    assert not weights_available("alexnet")
    for build, name in ((lambda: build_lpips("alex"), "alexnet"), (build_inception, "inception")):
        with pytest.raises(MissingWeightsError) as info:
            build()
        assert WEIGHTS[name].file_name in str(info.value) and folder in str(info.value)
        assert WEIGHTS[name].url in missing_weights_message(name)
    write_random_weights(tmp_path, ["alexnet"])
    assert weights_available("alexnet")


def test_paper_psnr_is_rgb_psnr_without_crop(pairs):
    """pyiqa's psnr = 10 log10(1 / (mse + 1e-8)) on k/255 values: the plain RGB PSNR of the
    whole uint8 image up to the 1e-8 (80 dB for identical images, not inf)."""
    for sr, hr in pairs:
        a, b = (quantize(x).double().numpy() for x in (sr, hr))
        plain = 10 * np.log10(255.0**2 / np.mean((a - b) ** 2))
        assert abs(psnr_pyiqa(sr, hr).item() - plain) < 1e-3
        assert abs(psnr_pyiqa(sr, hr).item() - psnr(sr, hr, crop_border_for(SCALE)).item()) > 1e-3
    sr, hr = pairs[0]
    assert psnr_pyiqa(hr, hr).item() == pytest.approx(80.0)
    luma = np.array([0.299, 0.587, 0.114])
    a, b = (quantize(x).permute(1, 2, 0).double().numpy() / 255 @ luma for x in (sr, hr))
    y_psnr = 10 * np.log10(1 / (np.mean((a - b) ** 2) + 1e-8))
    assert psnr_pyiqa(sr, hr, test_y=True).item() == pytest.approx(y_psnr, abs=1e-5)
    batch = [torch.stack(x) for x in zip(*pairs)]
    assert torch.allclose(psnr_pyiqa(*batch), torch.stack([psnr_pyiqa(*p) for p in pairs]))
    assert torch.allclose(ssim_pyiqa(*batch), torch.stack([ssim_pyiqa(*p) for p in pairs]))
    assert ssim_pyiqa(hr, hr).item() == pytest.approx(1.0)


@pytest.mark.parametrize("name", ["psnr", "psnry", "ssim"])
def test_paper_metrics_equal_pyiqa(pairs, name):
    """Our pure-compute `paper` metrics against pyiqa's own (they need no weights)."""
    pyiqa = pytest.importorskip("pyiqa", reason="pyiqa is optional (see README, Evaluation)")
    metric = pyiqa.create_metric(name, device="cpu")
    ours = {"psnr": psnr_pyiqa, "psnry": lambda a, b: psnr_pyiqa(a, b, True), "ssim": ssim_pyiqa}
    for sr, hr in pairs:
        sr8, hr8 = (quantize(x).float()[None] / 255 for x in (sr, hr))  # the uint8 files' values
        assert ours[name](sr, hr).item() == pytest.approx(metric(sr8, hr8).item(), abs=1e-5)


def test_pyiqa_metrics_without_pyiqa_name_the_install(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "pyiqa", None)  # as if not installed
    with pytest.raises(MissingPackageError, match=r"niqe.*pip install --no-deps pyiqa"):
        build_pyiqa_metric("niqe")


def test_pyiqa_weights_offline_message(tmp_path, monkeypatch):
    pytest.importorskip("pyiqa", reason="pyiqa is optional (see README, Evaluation)")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", _blocked_download)
    assert pyiqa_weights_path("brisque") == tmp_path / "hub" / "pyiqa" / "brisque_svm_weights.pth"
    with pytest.raises(MissingWeightsError) as err:
        build_pyiqa_metric("brisque")
    message = str(err.value)
    assert "brisque_svm_weights.pth" in message and str(tmp_path / "hub" / "pyiqa") in message
    assert "huggingface.co/chaofengc/IQA-PyTorch-Weights" in message

"""Memory of a whole-scene run: the estimates of the untiled run, of its whole stages and of the
render (from the networks' widths), the automatic budget from the memory available, and glibc
heap tuning (keep freed blocks for reuse in untiled runs, return them to the OS between tiles)."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools

import torch

MEMORY_MARGIN = 0.75  # share of the available memory that the automatic budget uses
OUTPUT_MAPS = 6  # output-sized float maps held next to the stages (result, its conversions)


def available_memory(device: torch.device) -> int | None:
    """Bytes that a computation on `device` may still take: the free memory of a CUDA device
    (`torch.cuda.mem_get_info`), else the kernel's MemAvailable (Linux); None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None


def output_bytes(out_size, batch: int = 1) -> int:
    """Bytes of the output-sized float maps a run holds besides its stages' activations: the
    result and the copies its conversions make (`OUTPUT_MAPS` of them)."""
    return 4 * OUTPUT_MAPS * batch * int(out_size[0]) * int(out_size[1])


def estimate_peak(stage_elements, out_size, batch: int = 1) -> int:
    """Rough peak memory of an untiled run: the largest of its stages' float activations
    (`stage_elements`, counts) plus `output_bytes`."""
    return 4 * max(stage_elements) + output_bytes(out_size, batch)


def networks(model) -> tuple:
    """(the encoder of the run's input, the autoencoder) of `model`: for an `LDCSR` its
    condition encoder and its first stage; for an `AutoencoderKL` (stage 1's `reconstruct`)
    its own encoder (None for the SR-only baseline) and itself."""
    if hasattr(model, "first_stage_model"):  # LDCSR
        return model.cond_stage_model, model.first_stage_model
    return (model.encoder if model.use_latent else None), model


def peak_bytes(model, lr_size, out_size, batch: int = 1) -> int:
    """Rough peak activation memory of an untiled run (`LDCSR.super_resolve` and
    `super_resolve_condition`, `AutoencoderKL.reconstruct`) from the model's widths: the larger
    of the encoder's (`networks`) and the decoder's float activations, plus `output_bytes`.

    Args:
        model: an `LDCSR` or an `AutoencoderKL`.
        lr_size: (h, w) of the LR input [B, 3, h, w].
        out_size: (H, W) of the output [B, 3, H, W].
        batch: B.

    Returns:
        Bytes.
    """
    encoder, autoencoder = networks(model)
    encoded = 0 if encoder is None else encoder.peak_elements(out_size, batch)
    decoded = autoencoder.decoder.peak_elements(lr_size, out_size, batch)
    return estimate_peak((encoded, decoded), out_size, batch)


def stage_bytes(model, lr_size, out_size, batch: int = 1) -> dict[str, int]:
    """Rough activation memory of each whole-scene stage whose normalisation statistics span
    the scene (the pipeline runs those that fit its budget whole).

    Args:
        model: an `LDCSR` or an `AutoencoderKL`.
        lr_size: (h, w) of the LR input [B, 3, h, w].
        out_size: (H, W) of the output [B, 3, H, W].
        batch: B.

    Returns:
        Bytes per stage: "condition" (the encoder of `networks`: the condition encoder, or stage
        1's encoder; 0 without latent), "latent" (the decoder's latent branch, on stage 1's
        latent [B, embed, H/f, W/f]), "sr" (the decoder's SR branch) and, for an `LDCSR`, "unet"
        (on the condition's latent).
    """
    encoder, autoencoder = networks(model)
    # Stage 1's downsampling; without latent any value: "latent" is 0 then.
    f = autoencoder.encoder.downsampling() if autoencoder.use_latent else 8
    elements = {
        "condition": 0 if encoder is None else encoder.peak_elements(out_size, batch),
        "latent": autoencoder.decoder.latent_elements(latent_size(out_size, f), batch),
        "sr": autoencoder.decoder.sr_branch_elements(lr_size, batch),
    }
    if model is not autoencoder:  # LDCSR
        latent = latent_size(out_size, encoder.downsampling())
        elements["unet"] = model.model.diffusion_model.peak_elements(latent, batch)
    return {k: 4 * v for k, v in elements.items()}


def latent_size(out_size, f: int) -> tuple[int, int]:
    """(H // f, W // f): the latent of an output (H, W) through an encoder downsampling by f."""
    return int(out_size[0]) // f, int(out_size[1]) // f


def render_bytes(autoencoder, lr_size, out_size, batch: int = 1) -> int:
    """Rough activation memory of `AutoencoderKL.render` (the decoder's upsampler) on SR features
    [B, ch, *lr_size] to [B, 3, *out_size].

    Args:
        autoencoder: an `AutoencoderKL`.
        lr_size: (h, w) of the SR features (a render tile with its context).
        out_size: (H, W) of the rendered output.
        batch: B.

    Returns:
        Bytes.
    """
    return 4 * autoencoder.decoder.upsampler.peak_elements(lr_size, out_size, batch)


def memory_budget(max_memory, device: torch.device) -> float | None:
    """The memory budget in GB: `max_memory` itself (a number, or None = unbounded), or for
    "auto" `MEMORY_MARGIN` of `available_memory(device)` (2 GB when that is unknown)."""
    if max_memory != "auto":
        return None if max_memory is None else float(max_memory)
    free = available_memory(device)
    return 2.0 if free is None else MEMORY_MARGIN * free / 2**30


# glibc mallopt parameters (malloc.h), and the values set after `retained_heap`: the default
# mmap limit, and the thresholds where glibc's own adjustment ends in a process that frees large
# blocks (32 MiB for mapping, twice that for trimming).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4
AFTER = {M_MMAP_MAX: 65536, M_MMAP_THRESHOLD: 32 << 20, M_TRIM_THRESHOLD: 64 << 20}


@functools.cache
def glibc_library():
    """The C library when it is glibc (it has `mallopt` and `malloc_trim`), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") else None


def release_memory() -> None:
    """Return freed heap memory to the OS (glibc `malloc_trim`; a no-op elsewhere), so that the
    resident size of a long tiled run follows what is alive rather than its fragmented high-water
    marks."""
    libc = glibc_library()
    if libc is not None:
        libc.malloc_trim(0)


@contextlib.contextmanager
def retained_heap(device: torch.device):
    """Keep freed CPU memory in the process's heap for reuse during the block (glibc only; used
    for untiled runs).

    By default glibc maps every large block (a full-size activation) fresh from the OS and
    unmaps it on free, so each new activation pays a page fault per 4 KiB on first touch: about
    2 s of a 12 s x4 600x600 run on one thread (measured). Inside the block large
    blocks come from the heap and freed memory is not trimmed; on exit it is returned to the OS
    (`release_memory`). Setting these parameters turns off glibc's dynamic adjustment of its mmap
    and trim thresholds for the rest of the process, so on exit they are set to the values that
    adjustment reaches in a process freeing large blocks (`AFTER`): blocks of 32 MiB and more are
    mapped. No effect on CUDA tensors' memory or on other C libraries.
    """
    libc = glibc_library() if device.type == "cpu" else None
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    try:
        yield
    finally:
        for param, value in AFTER.items():
            libc.mallopt(param, value)
        release_memory()

"""JPEG decode and resize on the GPU (nvJPEG through torchvision), for CUDA encoders.

CPU decode workers still read the bytes and check the header (bad items, bombs), but the pixel
work moves to the GPU, which decodes a batch of JPEGs far faster than a few CPU cores. Any batch
the GPU cannot decode falls back to the CPU path item by item, so results never depend on it.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F


@functools.cache
def _decode_jpeg() -> Callable[..., Any] | None:
    """torchvision's batched (nvJPEG on CUDA) decoder to RGB, imported once: importing it under
    warnings.catch_warnings() on every batch would swap process-wide warning state while decode
    threads run."""
    try:
        with warnings.catch_warnings():  # torchvision 0.29 deprecates io in favour of torchcodec
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    return functools.partial(decode_jpeg, mode=ImageReadMode.RGB)


def gpu_decode_supported(device: torch.device, preprocessing: dict[str, Any]) -> bool:
    # DIFFICULTY_GPU_JPEG=0 forces CPU decode (benchmarks compare the two paths).
    if device.type != "cuda" or os.environ.get("DIFFICULTY_GPU_JPEG", "1") == "0":
        return False
    return (
        _decode_jpeg() is not None
        and preprocessing.get("resize_mode", "shortest") == "shortest"
        and bool(preprocessing.get("mean"))
        and bool(preprocessing.get("std"))
        and preprocessing.get("interpolation") in ("bicubic", "bilinear")
    )


def decode_batch_on_gpu(
    jpegs: list[bytes], preprocessing: dict[str, Any], device: torch.device
) -> torch.Tensor:
    """JPEG bytes -> (n, 3, H, W) float32 normalised tensor on ``device``.

    Same steps as the CPU transform: resize the shorter side (antialiased), centre crop,
    scale to [0, 1], normalise. Images of the same size are resized together."""
    decode_jpeg = _decode_jpeg()
    if decode_jpeg is None:
        raise RuntimeError("torchvision.io.decode_jpeg is not available")
    encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in jpegs]
    images = decode_jpeg(encoded, device=device)
    crop_h, crop_w = preprocessing["crop"]
    resize = int(preprocessing["resize"])
    mode = preprocessing["interpolation"]
    mean = torch.tensor(preprocessing["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(preprocessing["std"], device=device).view(1, 3, 1, 1)
    out = torch.empty((len(images), 3, crop_h, crop_w), device=device, dtype=torch.float32)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(images):
        by_size.setdefault(tuple(image.shape[-2:]), []).append(i)
    for (h, w), index in by_size.items():
        scale = resize / min(h, w)
        new_h, new_w = max(crop_h, round(h * scale)), max(crop_w, round(w * scale))
        batch = torch.stack([images[i] for i in index]).float()
        if (new_h, new_w) != (h, w):
            batch = F.interpolate(batch, size=(new_h, new_w), mode=mode, antialias=True, align_corners=False)
        top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
        batch = batch[:, :, top : top + crop_h, left : left + crop_w].clamp_(0, 255) / 255.0
        out[torch.tensor(index, device=device)] = (batch - mean) / std
    return out

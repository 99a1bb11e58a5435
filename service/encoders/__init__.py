"""Encoders: ``open_clip:<model>:<tag|path|random>``, ``efficientnet-lite0``, and the record for
uploaded (precomputed) features. ``load_encoder`` is the only constructor callers need."""

from __future__ import annotations

from service.encoders.base import (
    Encoder,
    EncoderError,
    PrecomputedEncoder,
    TorchEncoder,
    cpu_has_fast_bf16,
    resolve_device,
)

PRECOMPUTED_PREFIX = "precomputed:"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def load_encoder(name: str, device: str = "auto", precision: str = "auto") -> Encoder:
    """Build the encoder called ``name`` on ``device`` ('auto' = CUDA when present).

    ``precision='auto'``: bf16 autocast on CUDA; on CPU a bf16 cast for open_clip towers where
    the CPU computes bf16 natively, fp32 otherwise (EfficientNet-Lite0's depthwise convolutions
    gain nothing from bf16 on CPU). Raises :class:`EncoderError` with a message a person can act on.
    """
    if not isinstance(name, str) or not name.strip():
        raise EncoderError("encoder name is empty; use e.g. 'efficientnet-lite0' or 'open_clip:ViT-B-16:openai'")
    if precision not in PRECISIONS:
        raise EncoderError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    name = name.strip()
    if name.startswith(PRECOMPUTED_PREFIX):
        raise EncoderError(
            f"{name!r} names uploaded features; it is recorded with the upload and has no model "
            "to load. Use service.encoders.PrecomputedEncoder to describe such features."
        )
    resolved = resolve_device(device)
    if name == "efficientnet-lite0":
        from service.encoders.efficientnet import load_efficientnet_lite0

        if precision == "auto":
            precision = "bf16" if resolved.type == "cuda" else "fp32"
        return load_efficientnet_lite0(resolved, precision)
    if name.startswith("open_clip:"):
        from service.encoders.openclip import default_precision, load_open_clip

        if precision == "auto":
            precision = default_precision(resolved, cpu_has_fast_bf16())
        return load_open_clip(name, resolved, precision)
    raise EncoderError(
        f"unknown encoder {name!r}: use 'efficientnet-lite0' (offline ImageNet backbone) or "
        "'open_clip:<model>:<pretrained tag or checkpoint path>', e.g. 'open_clip:ViT-B-16:openai' "
        "or 'open_clip:ViT-B-16:/path/to/open_clip_pytorch_model.bin'"
    )


def precomputed_encoder(name: str, dim: int, weights_sha256: str = "") -> PrecomputedEncoder:
    return PrecomputedEncoder(name if name.startswith(PRECOMPUTED_PREFIX) else PRECOMPUTED_PREFIX + name, dim, weights_sha256)


__all__ = [
    "Encoder",
    "EncoderError",
    "PrecomputedEncoder",
    "TorchEncoder",
    "load_encoder",
    "precomputed_encoder",
]

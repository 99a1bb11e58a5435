"""Encoders: ``open_clip:<model>:<tag|path|random>`` and ``efficientnet-lite0``; uploaded
features carry a name of their own and no model. ``load_encoder`` is the only constructor callers
need. The name rules (``names``) import without torch; the models are imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from service.encoders.names import (
    DEFAULT_ENCODER,
    EFFICIENTNET_LITE0,
    EXAMPLES,
    OPEN_CLIP_PREFIX,
    EncoderError,
    check_encoder_name,
    is_image_encoder,
    require_image_encoder,
)

if TYPE_CHECKING:
    from service.encoders.base import Encoder, TorchEncoder

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def load_encoder(name: str, device: str = "auto", precision: str = "auto") -> Encoder:
    """Build the image encoder called ``name`` on ``device`` ('auto' = CUDA when present).

    ``precision='auto'``: bf16 autocast on CUDA; on CPU a bf16 cast for open_clip towers where
    the CPU computes bf16 natively, fp32 otherwise (EfficientNet-Lite0's depthwise convolutions
    gain nothing from bf16 on CPU). Raises :class:`EncoderError` with a message a person can act on.
    """
    if not isinstance(name, str) or not name.strip():
        raise EncoderError("encoder name is empty; use e.g. 'efficientnet-lite0' or 'open_clip:ViT-B-16:openai'")
    if precision not in PRECISIONS:
        raise EncoderError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    name = name.strip()
    check_encoder_name(name)
    if not is_image_encoder(name):
        raise EncoderError(
            f"unknown encoder {name[:80]!r}: use {EXAMPLES}; other names label uploaded features, "
            "which have no model to load"
        )
    from service.encoders.base import cpu_has_fast_bf16, resolve_device

    resolved = resolve_device(device)
    if name == EFFICIENTNET_LITE0:
        from service.encoders.efficientnet import load_efficientnet_lite0

        if precision == "auto":
            precision = "bf16" if resolved.type == "cuda" else "fp32"
        return load_efficientnet_lite0(resolved, precision)
    from service.encoders.openclip import default_precision, load_open_clip

    if precision == "auto":
        precision = default_precision(resolved, cpu_has_fast_bf16())
    return load_open_clip(name, resolved, precision)


def __getattr__(name: str) -> Any:
    # The torch-backed classes, imported only when asked for.
    if name in ("Encoder", "TorchEncoder"):
        from service.encoders import base

        return getattr(base, name)
    raise AttributeError(name)


__all__ = [
    "DEFAULT_ENCODER",
    "EFFICIENTNET_LITE0",
    "OPEN_CLIP_PREFIX",
    "Encoder",
    "EncoderError",
    "TorchEncoder",
    "check_encoder_name",
    "is_image_encoder",
    "load_encoder",
    "require_image_encoder",
]

"""``open_clip:<model>:<pretrained tag | checkpoint path | random>``: any open_clip config.

Pretrained tags download where there is internet (and are found in the local Hugging Face cache
without it); local ``.pt/.bin/.safetensors`` checkpoints load offline; ``random`` builds the
architecture with seeded random weights (benchmarks only: its features mean nothing).
Only the image tower is kept; the text tower is dropped after loading.
"""

from __future__ import annotations

import os

import torch

from service.encoders.base import TorchEncoder, sha256_file, sha256_state_dict
from service.encoders.names import OPEN_CLIP_PREFIX, EncoderError, parse_open_clip_name

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def _how_to_supply(model: str, hf_hub: str | None) -> str:
    where = f" (Hugging Face repo {hf_hub.rstrip('/')})" if hf_hub else ""
    return (
        f"Without internet, download the checkpoint for {model}{where} on a machine that has it, "
        f"copy it here and pass its path: 'open_clip:{model}:/path/to/open_clip_pytorch_model.bin' "
        "(.pt, .bin and .safetensors load offline)"
    )


def load_open_clip(name: str, device: torch.device, precision: str) -> TorchEncoder:
    try:
        import open_clip
    except ImportError as exc:
        raise EncoderError("open_clip encoders need the package open_clip_torch (pip install open_clip_torch)") from exc
    model_name, pretrained = parse_open_clip_name(name)
    if open_clip.get_model_config(model_name) is None:
        known = ", ".join(open_clip.list_models()[:12])
        raise EncoderError(f"unknown open_clip model {model_name!r}; known models include: {known}, ...")

    checkpoint: str | None = None
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) if pretrained != "random" else {}
    if pretrained == "random":
        pass
    elif tag_cfg:
        try:
            checkpoint = open_clip.download_pretrained(tag_cfg)
        except Exception as exc:  # hub/network errors come in many types
            raise EncoderError(
                f"could not get the weights of open_clip {model_name} tag {pretrained!r}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}. "
                + _how_to_supply(model_name, tag_cfg.get("hf_hub"))
            ) from None
        if not checkpoint:
            raise EncoderError(
                f"open_clip {model_name} tag {pretrained!r} has no downloadable weights. "
                + _how_to_supply(model_name, tag_cfg.get("hf_hub"))
            )
    elif os.path.isfile(pretrained):
        checkpoint = pretrained
    elif pretrained.lower().endswith(CHECKPOINT_SUFFIXES) or "/" in pretrained or os.sep in pretrained:
        raise EncoderError(f"checkpoint file not found: {pretrained}. " + _how_to_supply(model_name, None))
    else:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        raise EncoderError(
            f"{pretrained!r} is neither a pretrained tag of open_clip {model_name} "
            f"(known tags: {tags or 'none'}) nor an existing checkpoint file. "
            + _how_to_supply(model_name, None)
        )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # 'random' weights are the same on every run and machine
        try:
            model, _, transform = open_clip.create_model_and_transforms(
                model_name, pretrained=checkpoint, device="cpu", weights_only=True
            )
        except Exception as exc:
            raise EncoderError(
                f"could not load open_clip {model_name} from {checkpoint or 'random init'}: "
                f"{type(exc).__name__}: {str(exc)[:300]}. The checkpoint must be an open_clip "
                f"state dict for this exact architecture."
            ) from None
    visual = model.visual
    del model  # frees the text tower
    cfg = dict(getattr(visual, "preprocess_cfg", {}) or {})
    size = cfg.get("size", getattr(visual, "image_size", 224))
    size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
    preprocessing = {
        "resize": int(min(size)),
        "resize_mode": cfg.get("resize_mode", "shortest"),
        "crop": list(size),
        "interpolation": cfg.get("interpolation", "bicubic"),
        "mean": list(cfg.get("mean", ())),
        "std": list(cfg.get("std", ())),
        "mode": cfg.get("mode", "RGB"),
        "library": f"open_clip {getattr(open_clip, '__version__', '?')}",
    }
    sha = sha256_file(checkpoint) if checkpoint else sha256_state_dict(visual)
    resolved_name = f"{OPEN_CLIP_PREFIX}{model_name}:{pretrained}"
    return TorchEncoder(
        name=resolved_name,
        model=visual,
        transform=transform,
        preprocessing=preprocessing,
        weights_sha256=sha,
        device=device,
        precision=precision,
        decode_size=int(min(size)) if preprocessing["resize_mode"] == "shortest" else None,
        input_size=size,
    )


def default_precision(device: torch.device, cpu_bf16: bool) -> str:
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_bf16 else "fp32"


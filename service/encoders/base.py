"""The one encoder interface: PIL image -> tensor (in decode workers), batch -> float32 features.

An :class:`Encoder` wraps a frozen image tower in eval mode. ``preprocess`` is the encoder's own
preprocessing and is safe to call from many threads at once (PIL and torch release the GIL);
``embed`` runs the forward pass on the encoder's device and returns unnormalised float32 numpy.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from service.encoders.names import EncoderError


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise EncoderError(f"unknown device {device!r}: use 'auto', 'cpu' or 'cuda[:N]'") from exc
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise EncoderError(f"device {device!r} requested but CUDA is not available; use 'cpu'")
    return resolved


def cpu_has_fast_bf16() -> bool:
    # oneDNN runs bf16 GEMMs natively on AVX512-BF16/AMX CPUs; elsewhere bf16 is emulated and slow.
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def sha256_file(path: str | Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_state_dict(module: torch.nn.Module) -> str:
    """Digest of parameter names and bytes, for weights that exist only in memory."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        t = tensor.detach().cpu().contiguous()
        digest.update(str(t.dtype).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


class Encoder:
    """Base class. Subclasses set the attributes and implement :meth:`preprocess` and
    :meth:`embed`."""

    name: str
    dim: int
    weights_sha256: str
    preprocessing: dict[str, Any]
    device: torch.device
    # Shortest side the preprocessing resizes to: decoders may shrink large JPEGs to it early.
    decode_size: int | None = None

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, batch: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """What an embedding set records about how it was made (JSON-able)."""
        return {
            "name": self.name,
            "dim": self.dim,
            "weights_sha256": self.weights_sha256,
            "preprocessing": self.preprocessing,
        }


class TorchEncoder(Encoder):
    """A torch image tower plus a PIL transform.

    Precision: on CUDA the forward runs under bf16 (or fp16) autocast with channels_last input;
    on CPU the model may be cast to bf16 (measured ~2.8x faster for ViTs on AMX CPUs, cosine
    >= 0.9999 to fp32) when ``precision='bf16'``.
    """

    def __init__(
        self,
        *,
        name: str,
        model: torch.nn.Module,
        transform: Callable[[Image.Image], torch.Tensor],
        preprocessing: dict[str, Any],
        weights_sha256: str,
        device: torch.device,
        precision: str,
        decode_size: int | None,
        input_size: tuple[int, int],
        freeze_on_cpu: bool = False,
    ) -> None:
        self.name = name
        self.device = device
        self.transform = transform
        self.decode_size = decode_size
        self.weights_sha256 = weights_sha256
        model = model.eval().requires_grad_(False)
        self._autocast_dtype: torch.dtype | None = None
        self._cast_dtype = torch.float32
        if device.type == "cuda" and precision in ("bf16", "fp16"):
            self._autocast_dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        elif device.type == "cpu" and precision == "bf16":
            self._cast_dtype = torch.bfloat16
            model = model.to(torch.bfloat16)
        self.model = model.to(device=device, memory_format=torch.channels_last)
        self.preprocessing = {**preprocessing, "precision": precision}
        probe = torch.zeros((1, 3, *input_size), dtype=torch.float32)
        if freeze_on_cpu and device.type == "cpu" and precision == "fp32":
            # TorchScript freezing folds BatchNorm into the convolutions and prepacks oneDNN
            # weights: measured ~1.5x faster for EfficientNet-Lite0 on CPU, max abs diff ~1e-5.
            with torch.inference_mode(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                example = torch.zeros((2, 3, *input_size)).contiguous(memory_format=torch.channels_last)
                self.model = torch.jit.freeze(torch.jit.trace(self.model, example))
        self.dim = int(self.embed(probe).shape[1])

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor) -> np.ndarray:
        x = batch.to(self.device, non_blocking=True)
        x = x.to(dtype=self._cast_dtype).contiguous(memory_format=torch.channels_last)
        if self._autocast_dtype is not None:
            with torch.autocast(device_type="cuda", dtype=self._autocast_dtype):
                out = self.model(x)
        else:
            out = self.model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.float().reshape(out.shape[0], -1).cpu().numpy()

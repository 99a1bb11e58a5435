"""Real image files for the embedding tests: valid ones of every awkward kind, and bad ones.

Imported by tests/test_ingest*.py, test_encoders*.py, test_pipeline*.py, test_offline_images*.py.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (200, 40, 40), "green": (40, 190, 60), "blue": (40, 60, 200)}


def jpeg_bytes(rgb: tuple[int, int, int], size: int = 48, seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(rgb) + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    if mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def png_bytes(image: Image.Image, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def write_image_folder(root: Path, per_class: int = 4, size: int = 48) -> list[str]:
    """``root/<colour>/<i>.jpg``; returns the sample IDs in sorted order."""
    ids = []
    for c, (name, rgb) in enumerate(sorted(COLOURS.items())):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (root / name / f"{i:03d}.jpg").write_bytes(jpeg_bytes(rgb, size, seed=100 * c + i))
            ids.append(f"{name}/{i:03d}.jpg")
    return sorted(ids)


# -- awkward but valid ----------------------------------------------------------------------


def zip_folder(root: Path, extra: dict[str, bytes] | None = None) -> bytes:
    """A zip of every file under ``root`` (member names relative to it), plus ``extra`` members."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(root).as_posix())
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return buffer.getvalue()


def sixteen_bit_png() -> bytes:
    ramp = (np.linspace(0, 65535, 32 * 32).reshape(32, 32)).astype(np.uint16)
    return png_bytes(Image.fromarray(ramp))  # opens as I;16 / I: PIL's convert would clip it


def cmyk_jpeg() -> bytes:
    return jpeg_bytes((30, 120, 220), 32, seed=7, mode="CMYK")


def palette_png(transparent: bool = True) -> bytes:
    image = Image.new("P", (32, 32))  # index 0 everywhere, then red and green stripes
    image.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 9))
    image.paste(1, (10, 0, 20, 32))
    image.paste(2, (20, 0, 32, 32))
    return png_bytes(image, transparency=0) if transparent else png_bytes(image)


def rgba_png() -> bytes:
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:8, :, 3] = 255  # top half opaque red, bottom half transparent
    return png_bytes(Image.fromarray(rgba, "RGBA"))


# -- bad --------------------------------------------------------------------------------------


def truncated_jpeg() -> bytes:
    data = jpeg_bytes((90, 90, 90), 64, seed=3)
    return data[: len(data) // 2]


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def corrupt_png() -> bytes:
    """A valid header (16x16 RGB) followed by pixel data that is not a zlib stream."""
    header = struct.pack(">IIBBBBB", 16, 16, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"this is not deflate data" * 4)
        + _png_chunk(b"IEND", b"")
    )


def decompression_bomb_png(side: int = 20000) -> bytes:
    """A small PNG that declares side x side pixels (a few KB on disk, 400 megapixels decoded)."""

    chunk = _png_chunk
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    rows = zlib.compress(b"\x00" * (side + 1) * 64)  # only a few rows of real data
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


BAD_ITEMS = {
    "bad/empty.jpg": (b"", "empty"),
    "bad/text.jpg": (b"this is not an image at all\n", "not an image"),
    "bad/truncated.jpg": (truncated_jpeg(), "truncated"),
    "bad/corrupt.png": (corrupt_png(), "corrupt"),
    "bad/bomb.png": (decompression_bomb_png(), "decompression bomb"),
}

ODD_BUT_VALID = {
    "odd/sixteen.png": sixteen_bit_png(),
    "odd/cmyk.jpg": cmyk_jpeg(),
    "odd/palette.png": palette_png(),
    "odd/rgba.png": rgba_png(),
}


# -- a tiny open_clip model -------------------------------------------------------------------

TINY_CLIP = "TinyTest-ViT"
TINY_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1},
}


def register_tiny_clip(directory: Path) -> None:
    import open_clip

    config = Path(directory) / f"{TINY_CLIP}.json"
    if not config.exists():
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(json.dumps(TINY_CONFIG))
    open_clip.add_model_config(config)


def save_tiny_clip_checkpoint(directory: Path, suffix: str = ".bin", seed: int = 1) -> Path:
    """A random-weight checkpoint of the tiny config, saved the way open_clip saves one."""
    import open_clip
    import torch

    register_tiny_clip(directory)
    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_CLIP, pretrained=None)
    path = Path(directory) / f"tiny_open_clip{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    else:
        torch.save(model.state_dict(), path)
    return path

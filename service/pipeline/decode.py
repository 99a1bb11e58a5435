"""Bytes -> RGB PIL image, robust to what users actually upload.

Valid but unusual images are decoded (16-bit greyscale, CMYK, palette, alpha, EXIF rotation,
animations: first frame); anything else raises :class:`BadImage` with a reason a person can act
on (empty, not an image, truncated/corrupt, decompression bomb, too large).
"""

from __future__ import annotations

import contextlib
import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.ingest.sample import MAX_ITEM_BYTES, Sample

# Decoded size limit. A 64-megapixel RGB image is ~200 MB decoded; a "bomb" is a small file
# that declares far more. Checked from the header, before any pixel is decoded.
MAX_PIXELS = 64_000_000


class BadImage(Exception):
    """An item that cannot be turned into an image; ``str(exc)`` is the reason."""


def read_sample_bytes(sample: Sample) -> bytes:
    if sample.error is not None:
        raise BadImage(sample.error)
    if sample.data is not None:
        return sample.data
    if sample.path is None:
        raise BadImage("sample has neither bytes nor a path")
    try:
        with open(sample.path, "rb") as fh:
            data = fh.read(MAX_ITEM_BYTES + 1)
    except FileNotFoundError:
        raise BadImage(f"file not found: {sample.path}") from None
    except IsADirectoryError:
        raise BadImage(f"is a directory: {sample.path}") from None
    except OSError as exc:
        raise BadImage(f"unreadable file: {exc.strerror or exc}") from None
    if len(data) > MAX_ITEM_BYTES:
        raise BadImage(f"file too large (over {MAX_ITEM_BYTES} bytes)")
    return data


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Parse the header only and apply the size checks; pixels are decoded later."""
    if len(data) == 0:
        raise BadImage("empty file (0 bytes)")
    # No warnings.catch_warnings() here: it swaps process-wide state and this runs in many
    # threads. PIL only warns above its MAX_IMAGE_PIXELS (~89M), which our own limit refuses.
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as exc:
        raise BadImage(f"decompression bomb: {exc}") from None
    except Exception as exc:  # PIL raises many types for a malformed header
        raise BadImage(f"corrupt image header: {type(exc).__name__}: {exc}") from None
    width, height = image.size
    if width < 1 or height < 1:
        raise BadImage(f"image has no pixels ({width}x{height})")
    if width * height > max_pixels:
        raise BadImage(
            f"decompression bomb: {width}x{height} = {width * height} pixels exceeds the "
            f"limit of {max_pixels}"
        )
    return image


def decode_image(data: bytes, draft_size: int | None = None, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode to an RGB image. ``draft_size``: let the JPEG decoder downscale by 1/2..1/8 in the
    DCT while keeping the shorter side >= draft_size (large photos decode several times faster;
    the encoder's resize follows)."""
    image = open_image(data, max_pixels)
    if draft_size and image.format == "JPEG":
        image.draft("RGB", (draft_size, draft_size))
    try:
        image.load()
    except Exception as exc:  # truncated data raises OSError; others raise SyntaxError etc.
        reason = str(exc) or type(exc).__name__
        raise BadImage(f"truncated or corrupt image data: {reason}") from None
    with contextlib.suppress(Exception):  # a malformed EXIF block must not cost the image
        ImageOps.exif_transpose(image, in_place=True)  # the default copies every image
    try:
        return to_rgb(image)
    except Exception as exc:
        raise BadImage(f"unsupported image mode {image.mode!r}: {exc}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I") or mode == "F":
        return _high_bit_depth_to_rgb(image)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        # Transparent pixels hold arbitrary colours; show them on white, as viewers do.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _high_bit_depth_to_rgb(image: Image.Image) -> Image.Image:
    # PIL's convert("RGB") clips 16-bit values at 255 (a white image); rescale instead.
    array = np.asarray(image)
    if array.ndim == 3:  # e.g. 16-bit RGB opened as a multi-channel array
        array = array[..., :3]
    if array.dtype.kind == "f":
        finite = np.nan_to_num(array.astype(np.float64))
        lo, hi = float(finite.min()), float(finite.max())
        scaled = (finite - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(finite)
    else:
        peak = 65535.0 if array.max(initial=0) > 255 or image.mode.startswith("I;16") else 255.0
        scaled = np.clip(array.astype(np.float64), 0, peak) * (255.0 / peak)
    eight = np.round(scaled).astype(np.uint8)
    return Image.fromarray(eight).convert("RGB")

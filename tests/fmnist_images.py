"""A few real Fashion-MNIST images (Debian package dataset-fashion-mnist) as PNG files."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


def load_fmnist(split: str = "train", limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(FMNIST_DIR / f"{prefix}-images-idx3-ubyte.gz") as fh:
        images = np.frombuffer(fh.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FMNIST_DIR / f"{prefix}-labels-idx1-ubyte.gz") as fh:
        labels = np.frombuffer(fh.read(), dtype=np.uint8, offset=8)
    return images[:limit], labels[:limit]


def write_fmnist_folder(root: Path, n: int, classes: int = 3) -> list[str]:
    """``root/<class>/<index>.png`` for the first ``n`` images of the first ``classes`` classes."""
    images, labels = load_fmnist("train", limit=20 * n)
    keep = np.flatnonzero(labels < classes)[:n]
    ids = []
    for i in keep:
        sample_id = f"{CLASSES[labels[i]]}/{i:05d}.png"
        (root / CLASSES[labels[i]]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(root / sample_id)
        ids.append(sample_id)
    return sorted(ids)

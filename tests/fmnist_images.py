"""Real Fashion-MNIST images (Debian package dataset-fashion-mnist) as PNG files in ImageFolder
layout. The IDX files are read by ``trainer.fmnist`` (the repo's one reader), which raises
FileNotFoundError, with the install hint, when the package is missing. Also used by
benchmarks/bench_ray.py, so nothing here depends on pytest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from trainer.fmnist import load_fashion_mnist

# Folder names: the class names without spaces or slashes.
CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")


def write_png_folder(root: Path, images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> list[str]:
    """``root/<class>/<index>.png`` for each index; returns the sample IDs in the given order."""
    ids = []
    for i in indices:
        sample_id = f"{CLASSES[labels[i]]}/{i:05d}.png"
        (root / CLASSES[labels[i]]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[i]).save(root / sample_id)
        ids.append(sample_id)
    return ids


def write_fmnist_folder(root: Path, n: int, classes: int = 3) -> list[str]:
    """The first ``n`` training images of the first ``classes`` classes; sorted sample IDs."""
    images, labels = load_fashion_mnist("train")
    keep = np.flatnonzero(labels < classes)[:n]
    return sorted(write_png_folder(root, images, labels, keep))

"""Fashion-MNIST from the IDX files of the Debian package ``dataset-fashion-mnist``.

Sample IDs: the row index as text (``"0"`` .. ``"59999"`` for the training split), the
service's default IDs for uploaded embeddings; scores for Fashion-MNIST are joined on them.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def fashion_mnist_dir() -> Path:
    return Path(os.environ.get("FASHION_MNIST_DIR", DEFAULT_DIR))


def _open(path: Path) -> bytes:
    for candidate in (path.with_name(path.name + ".gz"), path):
        if candidate.exists():
            opener = gzip.open if candidate.suffix == ".gz" else open
            with opener(candidate, "rb") as handle:
                return handle.read()
    raise FileNotFoundError(
        f"{path}(.gz) not found; install the Debian package dataset-fashion-mnist or set "
        "FASHION_MNIST_DIR to a folder holding the IDX files"
    )


def read_idx(data: bytes) -> np.ndarray:
    """Parse an IDX file (big-endian header: magic 0x0000 0x08 ndim, then dims)."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError("not an unsigned-byte IDX file")
    ndim = data[3]
    dims = np.frombuffer(data, dtype=">u4", count=ndim, offset=4).astype(int)
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(
            f"IDX file truncated: header says {tuple(dims)}, body has {body.size} bytes"
        )
    return body.reshape(tuple(dims))


def load_fashion_mnist(
    split: str = "train", root: str | os.PathLike[str] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 28, 28), labels int64 (N,))`` of ``split`` ("train" or "test")."""
    if split not in FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(root) if root is not None else fashion_mnist_dir()
    images_name, labels_name = FILES[split]
    images = read_idx(_open(folder / images_name))
    labels = read_idx(_open(folder / labels_name)).astype(np.int64)
    if images.shape[0] != labels.shape[0]:
        raise ValueError("Fashion-MNIST images and labels differ in count")
    return images, labels

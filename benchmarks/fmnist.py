"""Fashion-MNIST helpers for the evidence benchmarks and the real-data test.

Images come from the Debian package ``dataset-fashion-mnist`` through ``trainer.fmnist`` (one
IDX reader in the repo). Here: turning images into pipeline samples, label noise, corruptions,
the kNN baseline and AUROC. Import as ``fmnist`` from benchmarks/ scripts, or by path.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageFilter

from service.ingest import Sample
from trainer.fmnist import CLASSES, load_fashion_mnist
from trainer.metrics import auroc as metrics_auroc

__all__ = [
    "CLASSES",
    "NOISE_SIGMAS",
    "BLUR_SIGMAS",
    "CONFUSIONS",
    "auroc",
    "corrupt",
    "flip_labels",
    "flip_labels_confusion",
    "knn_disagreement",
    "knn_neighbours",
    "load_fashion_mnist",
    "png_samples",
    "stratified_subset",
]

# Severities 1..5. Gaussian noise as in ImageNet-C (std in [0, 1] pixel units); blur radii
# scaled to 28-pixel images (ImageNet-C's 1..6 px are for 224-pixel images).
NOISE_SIGMAS = (0.08, 0.12, 0.18, 0.26, 0.38)
BLUR_SIGMAS = (0.5, 0.75, 1.0, 1.5, 2.0)


def stratified_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """``n`` indices with (near) equal class counts, sorted."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = n // len(classes)
    picks = [rng.choice(np.flatnonzero(labels == c), per, replace=False) for c in classes]
    return np.sort(np.concatenate(picks))


def flip_labels(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy labels and the mask of flipped ones: ``fraction`` of labels moved to another class."""
    rng = np.random.default_rng(seed)
    n_classes = int(labels.max()) + 1
    flipped = np.zeros(labels.shape[0], bool)
    flipped[rng.choice(labels.shape[0], int(round(fraction * labels.shape[0])), replace=False)] = (
        True
    )
    noisy = labels.copy()
    shift = rng.integers(1, n_classes, size=int(flipped.sum()))
    noisy[flipped] = (labels[flipped] + shift) % n_classes
    return noisy, flipped


# Realistic label noise for class-conditional flips: for each class, the classes an annotator
# confuses it with and the share of its flips that go to each (rows sum to 1). Classes as in
# trainer.fmnist.CLASSES: 0 T-shirt/top, 1 Trouser, 2 Pullover, 3 Dress, 4 Coat, 5 Sandal,
# 6 Shirt, 7 Sneaker, 8 Bag, 9 Ankle boot.
CONFUSIONS: dict[int, dict[int, float]] = {
    0: {6: 0.6, 3: 0.2, 2: 0.2},  # t-shirt/top -> shirt, dress, pullover
    1: {3: 1.0},  # trouser -> dress
    2: {4: 0.5, 6: 0.5},  # pullover -> coat, shirt
    3: {4: 0.4, 0: 0.3, 1: 0.3},  # dress -> coat, t-shirt/top, trouser
    4: {2: 0.5, 6: 0.3, 3: 0.2},  # coat -> pullover, shirt, dress
    5: {7: 0.7, 9: 0.3},  # sandal -> sneaker, ankle boot
    6: {0: 0.5, 2: 0.25, 4: 0.25},  # shirt -> t-shirt/top, pullover, coat
    7: {9: 0.6, 5: 0.4},  # sneaker -> ankle boot, sandal
    8: {6: 0.5, 2: 0.5},  # bag -> shirt, pullover
    9: {7: 0.7, 5: 0.3},  # ankle boot -> sneaker, sandal
}


def flip_labels_confusion(
    labels: np.ndarray, fraction: float, seed: int, confusions: dict[int, dict[int, float]] = CONFUSIONS
) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`flip_labels`, but each flipped label moves to a class it is plausibly
    confused with (``confusions[c]``: target -> probability), not to a uniform other class."""
    rng = np.random.default_rng(seed)
    flipped = np.zeros(labels.shape[0], bool)
    flipped[rng.choice(labels.shape[0], int(round(fraction * labels.shape[0])), replace=False)] = (
        True
    )
    noisy = labels.copy()
    for i in np.flatnonzero(flipped):
        targets = confusions[int(labels[i])]
        noisy[i] = rng.choice(list(targets), p=list(targets.values()))
    return noisy, flipped


def png_samples(images: np.ndarray, labels: list[str] | np.ndarray, ids: list[str]) -> list[Sample]:
    """Encoded PNG bytes, as an upload would carry them (the pipeline decodes them)."""
    out = []
    for image, label, sample_id in zip(images, labels, ids, strict=True):
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG")
        out.append(Sample(str(sample_id), str(label), data=buffer.getvalue()))
    return out


def corrupt(image: np.ndarray, kind: str, severity: int, seed: int) -> np.ndarray:
    """``kind`` in {"noise", "blur"}, ``severity`` in 1..5; uint8 in, uint8 out."""
    if kind == "noise":
        rng = np.random.default_rng(seed)
        x = image.astype(np.float64) / 255.0
        x = x + rng.normal(0.0, NOISE_SIGMAS[severity - 1], x.shape)
        return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)
    if kind == "blur":
        blurred = Image.fromarray(image).filter(ImageFilter.GaussianBlur(BLUR_SIGMAS[severity - 1]))
        return np.asarray(blurred)
    raise ValueError(f"unknown corruption {kind!r}")


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """:func:`trainer.metrics.auroc` (Mann-Whitney, ties count half), refusing a one-class mask
    instead of returning NaN: an evidence number must not silently vanish."""
    value = metrics_auroc(scores, positives)
    if np.isnan(value):
        raise ValueError("AUROC needs both positives and negatives")
    return value


def knn_neighbours(features: np.ndarray, k: int = 10, block: int = 2048) -> np.ndarray:
    """(N, k) indices of each sample's k nearest neighbours (cosine, itself excluded; order
    within a row unspecified)."""
    x = features / np.linalg.norm(features, axis=1, keepdims=True)
    x = x.astype(np.float32)
    out = np.empty((x.shape[0], k), dtype=np.int64)
    for start in range(0, x.shape[0], block):
        sims = x[start : start + block] @ x.T  # (block, N): never N x N at once
        rows = np.arange(sims.shape[0])
        sims[rows, start + rows] = -np.inf
        out[start : start + block] = np.argpartition(-sims, k, axis=1)[:, :k]
    return out


def knn_disagreement(
    features: np.ndarray, labels: np.ndarray, k: int = 10, block: int = 2048
) -> np.ndarray:
    """Fraction of each sample's k nearest neighbours (cosine, itself excluded) whose label
    differs from its own: the standard label-noise baseline on the same features."""
    neighbours = knn_neighbours(features, k, block)
    return (labels[neighbours] != labels[:, None]).mean(axis=1)

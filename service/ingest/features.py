"""Readers for precomputed features: an .npy matrix, labels (.npy ints or text lines), IDs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.errors import InvalidInput


class InputError(InvalidInput):
    """The caller's input is unusable; the message says what is wrong and how to fix it."""


def load_embeddings(path: Path) -> np.ndarray:
    """An N x D float matrix from ``.npy``, memory-mapped (not loaded whole), validated."""
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic != b"\x93NUMPY":
        # np.load would also accept .npz archives and pickles; only a plain .npy is a matrix.
        raise InputError("embeddings must be a .npy file (numpy.save of an N x D float array)")
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:  # numpy raises several types for a bad header
        raise InputError(f"embeddings must be a .npy file of floats: {exc}") from None
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise InputError(f"embeddings must be a non-empty 2-d array (N x D), got shape {array.shape}")
    if array.dtype.kind not in "fiu":
        raise InputError(f"embeddings must be numeric, got dtype {array.dtype}")
    bad_rows = _non_finite_rows(array)
    if bad_rows.size:
        raise InputError(
            f"embeddings contain NaN or inf in {bad_rows.size} rows (first rows: {bad_rows[:5].tolist()})"
        )
    return array


def _non_finite_rows(array: np.ndarray, block: int = 65536) -> np.ndarray:
    if array.dtype.kind != "f":
        return np.zeros(0, dtype=np.int64)
    bad = [
        start + np.flatnonzero(~np.isfinite(array[start : start + block]).all(axis=1))
        for start in range(0, array.shape[0], block)
    ]
    return np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)


def load_labels(path: Path) -> list[str]:
    """Labels as strings: a ``.npy`` of ints/strings, or a UTF-8 text file of one per line."""
    raw = Path(path).read_bytes()
    if raw[:6] == b"\x93NUMPY":
        try:
            array = np.load(path, allow_pickle=False)
        except Exception as exc:
            raise InputError(f"labels .npy could not be read: {exc}") from None
        if array.ndim != 1:
            raise InputError(f"labels must be 1-d, got shape {array.shape}")
        if array.dtype.kind == "f":
            if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
                raise InputError("labels .npy holds non-integer floats; use ints or strings")
            array = array.astype(np.int64)
        if array.dtype.kind not in "iuUS":
            raise InputError(f"labels must be integers or strings, got dtype {array.dtype}")
        return [x.decode() if isinstance(x, bytes) else str(x) for x in array.tolist()]
    return _lines(raw, "labels")


def load_ids(path: Path) -> list[str]:
    ids = _lines(Path(path).read_bytes(), "ids")
    seen: set[str] = set()
    duplicates = [i for i in ids if i in seen or seen.add(i)]  # type: ignore[func-returns-value]
    if duplicates:
        raise InputError(f"ids contain {len(duplicates)} duplicates (first: {duplicates[:3]})")
    return ids


def _lines(raw: bytes, what: str) -> list[str]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{what} must be UTF-8 text (one per line) or .npy") from None
    lines = text.splitlines()
    while lines and lines[-1] == "":
        lines.pop()
    empty = [i for i, line in enumerate(lines) if not line.strip()]
    if empty:
        raise InputError(f"{what} has {len(empty)} empty lines (first at line {empty[0] + 1})")
    return [line.strip() for line in lines]


def check_lengths(n_features: int, labels: list[str], ids: list[str] | None) -> None:
    if len(labels) != n_features:
        raise InputError(f"{n_features} embeddings but {len(labels)} labels: counts must match")
    if ids is not None and len(ids) != n_features:
        raise InputError(f"{n_features} embeddings but {len(ids)} ids: counts must match")

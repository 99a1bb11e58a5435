"""Readers for precomputed features: an .npy matrix, labels (.npy ints or text lines), IDs."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.errors import InvalidInput
from service.ingest.sample import MAX_LABEL_LENGTH, MAX_SAMPLE_ID_LENGTH, text_problem


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
            f"embeddings contain NaN, inf or values beyond float32's range (|x| > {FLOAT32_MAX:.3g}) in "
            f"{bad_rows.size} rows (first rows: {bad_rows[:5].tolist()}); the store holds float32"
        )
    return array


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _non_finite_rows(array: np.ndarray, block: int = 65536) -> np.ndarray:
    # Rows the store (float32) could not hold: NaN, inf, and float64 values beyond float32's
    # range (they would become inf in the store and fail every later fit of the dataset).
    if array.dtype.kind != "f":
        return np.zeros(0, dtype=np.int64)
    wide = array.dtype.itemsize > 4
    bad = []
    for start in range(0, array.shape[0], block):
        part = array[start : start + block]
        ok = np.isfinite(part)
        if wide:
            ok &= np.abs(part) <= FLOAT32_MAX
        bad.append(start + np.flatnonzero(~ok.all(axis=1)))
    return np.concatenate(bad) if bad else np.zeros(0, dtype=np.int64)


def load_labels(path: Path, max_count: int | None = None) -> list[str]:
    """Labels as strings: a ``.npy`` of ints/strings, or a UTF-8 text file of one per line.

    ``max_count`` (the number of embeddings): reading stops one past it, so a huge file is never
    read whole. Every label is at most MAX_LABEL_LENGTH characters of valid UTF-8 without NUL."""
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if magic == b"\x93NUMPY":
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            raise InputError(f"labels .npy could not be read: {exc}") from None
        if array.ndim != 1:
            raise InputError(f"labels must be 1-d, got shape {array.shape}")
        if max_count is not None and array.shape[0] > max_count:
            raise InputError(f"{max_count} embeddings but {array.shape[0]} labels: counts must match")
        if array.dtype.kind in "US" and array.dtype.itemsize > 4 * MAX_LABEL_LENGTH:
            raise InputError(
                f"labels .npy holds strings of dtype {array.dtype}: a label exceeds the limit of "
                f"{MAX_LABEL_LENGTH} characters"
            )
        array = np.asarray(array)
        if array.dtype.kind == "f":
            if not np.all(np.isfinite(array)) or not np.all(array == np.round(array)):
                raise InputError("labels .npy holds non-integer floats; use ints or strings")
            array = array.astype(np.int64)
        if array.dtype.kind not in "iuUS":
            raise InputError(f"labels must be integers or strings, got dtype {array.dtype}")
        labels = []
        for i, value in enumerate(array.tolist()):
            if isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    raise InputError(f"label at row {i} is not valid UTF-8 (byte strings must be UTF-8)") from None
            labels.append(_checked(str(value), "label", MAX_LABEL_LENGTH, i))
        return labels
    return _lines(path, "labels", MAX_LABEL_LENGTH, max_count)


def load_ids(path: Path, max_count: int | None = None) -> list[str]:
    ids = _lines(path, "ids", MAX_SAMPLE_ID_LENGTH, max_count)
    seen: set[str] = set()
    duplicates = [i for i in ids if i in seen or seen.add(i)]  # type: ignore[func-returns-value]
    if duplicates:
        raise InputError(f"ids contain {len(duplicates)} duplicates (first: {duplicates[:3]})")
    return ids


def _checked(value: str, what: str, limit: int, row: int) -> str:
    problem = text_problem(value, what, limit)
    if problem is not None:
        raise InputError(f"{problem} (row {row})")
    return value


def _lines(path: Path, what: str, limit: int, max_count: int | None) -> list[str]:
    """One entry per line, read line by line: a line is read at most to its limit (4 bytes per
    character, UTF-8's widest) and reading stops one line past ``max_count``."""
    out: list[str] = []
    first_empty: int | None = None
    with open(path, "rb") as fh:
        for number, raw in enumerate(iter(lambda: fh.readline(4 * limit + 3), b""), start=1):
            if not raw.endswith(b"\n") and len(raw) > 4 * limit + 2:
                raise InputError(f"{what} line {number} is longer than the limit of {limit} characters")
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise InputError(f"{what} must be UTF-8 text (one per line) or .npy (line {number} is not)") from None
            if not line:
                first_empty = number if first_empty is None else first_empty
                continue
            if first_empty is not None:
                raise InputError(f"{what} has empty lines (first at line {first_empty})")
            out.append(_checked(line, what.rstrip("s"), limit, number - 1))
            if max_count is not None and len(out) > max_count:
                raise InputError(f"{max_count} embeddings but more {what} than that: counts must match")
    return out


def check_lengths(n_features: int, labels: list[str], ids: list[str] | None) -> None:
    if len(labels) != n_features:
        raise InputError(f"{n_features} embeddings but {len(labels)} labels: counts must match")
    if ids is not None and len(ids) != n_features:
        raise InputError(f"{n_features} embeddings but {len(ids)} ids: counts must match")

"""Fitting a chunked store: equals a one-shot fit, and refits reuse cached statistics."""

from __future__ import annotations

import numpy as np
import pytest

from service.pipeline.fitting import SCORE_COLUMNS, fit_store, labelled_statistics
from service.statistics import SufficientStatistics, fit_gaussians, normalize_features
from service.storage.embeddings import EmbeddingStore


def make(rng, n=900, d=6, k=3):
    means = rng.normal(scale=2.0, size=(k, d))
    y = rng.integers(0, k, size=n)
    return (means[y] + rng.normal(size=(n, d))).astype(np.float32), [f"c{v}" for v in y]


def write(store, x, labels, ids, chunk=200, start_index=0):
    for i, s in enumerate(range(0, len(ids), chunk)):
        store.write_chunk(start_index + i, ids[s : s + chunk], labels[s : s + chunk], x[s : s + chunk])


@pytest.mark.parametrize("normalize", [True, False])
def test_store_fit_equals_one_shot(tmp_path, normalize):
    rng = np.random.default_rng(0)
    x, labels = make(rng)
    ids = [f"img/{i}.png" for i in range(len(x))]
    store = EmbeddingStore(tmp_path / "emb")
    write(store, x, labels, ids)
    result = fit_store(store, normalize=normalize, shrinkage="auto")
    assert tuple(result.scores.column_names) == SCORE_COLUMNS
    feats = normalize_features(x.astype(np.float64)) if normalize else x
    direct = fit_gaussians(SufficientStatistics(dim=6, normalized=normalize).update(feats, labels, ids), "auto")
    expected = direct.score(x, labels)
    np.testing.assert_allclose(result.scores.column("rmd").to_numpy(), expected["rmd"], rtol=1e-7, atol=1e-9)
    assert result.scores.column("sample_id").to_pylist() == ids


def test_refit_after_append_reads_only_new_chunks(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    x, labels = make(rng, n=1000)
    ids = [str(i) for i in range(1000)]
    store = EmbeddingStore(tmp_path / "emb")
    write(store, x[:600], labels[:600], ids[:600])
    labelled_statistics(store, normalize=True)
    write(store, x[600:], labels[600:], ids[600:], start_index=store.next_index())

    read = []
    original = store.read_chunk
    monkeypatch.setattr(store, "read_chunk", lambda i: read.append(i) or original(i))
    stats = labelled_statistics(store, normalize=True)
    assert read == [3, 4]  # chunks 0-2 came from the cached statistics
    # The longer prefix supersedes the shorter one, which is removed (each is F x D x D).
    assert sorted(p.name for p in store.directory.glob("stats-*")) == ["stats-normalized-upto-000005.npz"]
    full = SufficientStatistics(dim=6).update(normalize_features(x.astype(np.float64)), labels, ids)
    np.testing.assert_allclose(
        fit_gaussians(stats, 0.1).covariance, fit_gaussians(full, 0.1).covariance, rtol=1e-9, atol=1e-13
    )


def test_unlabelled_rows_are_not_fitted_or_scored(tmp_path):
    rng = np.random.default_rng(2)
    x, labels = make(rng, n=400)
    labels = [lab if i % 4 else None for i, lab in enumerate(labels)]
    store = EmbeddingStore(tmp_path / "emb")
    store.write_chunk(0, [str(i) for i in range(400)], labels, x)
    seen = []
    result = fit_store(store, shrinkage=0.1, progress=lambda done, total: seen.append((done, total)))
    assert result.scores.num_rows == 300
    assert result.model.count == 300
    assert seen[-1] == (300, 300)  # progress counts the scored (labelled) rows and ends at the total


def test_streamed_statistics_feed_the_fit_without_reading_features(tmp_path, monkeypatch):
    """embed_source caches the statistics it streamed; the fit then reads no chunk for them,
    and they equal statistics recomputed from the stored features. An append extends them."""
    from imagedata import TINY_CLIP, save_tiny_clip_checkpoint, write_image_folder

    from service.encoders import load_encoder
    from service.ingest import open_source
    from service.pipeline.embedding import embed_source

    encoder = load_encoder(f"open_clip:{TINY_CLIP}:{save_tiny_clip_checkpoint(tmp_path / 'w')}", device="cpu", precision="fp32")
    write_image_folder(tmp_path / "images", per_class=6)
    store = EmbeddingStore(tmp_path / "store")
    embed_source(open_source(tmp_path / "images"), encoder, store, chunk_size=5)
    write_image_folder(tmp_path / "images" / "more", per_class=2)  # label "more", 6 new images
    embed_source(open_source(tmp_path / "images"), encoder, store, chunk_size=5)

    read = []
    original = store.read_chunk
    monkeypatch.setattr(store, "read_chunk", lambda i: read.append(i) or original(i))
    streamed = labelled_statistics(store, normalize=True)
    assert read == []
    x = store.features().astype(np.float64)
    chunks = list(store.iter_chunks())
    labels = [str(v) for c in chunks for v in c.labels]
    ids = [str(v) for c in chunks for v in c.sample_ids]
    direct = SufficientStatistics(dim=x.shape[1]).update(normalize_features(x), labels, ids)
    assert streamed.count == direct.count == 24
    m1, m2 = fit_gaussians(streamed, 0.1), fit_gaussians(direct, 0.1)
    np.testing.assert_allclose(m1.covariance, m2.covariance, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(m1.means, m2.means, rtol=1e-9, atol=1e-12)

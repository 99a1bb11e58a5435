"""embed_source / embed_chunk: batches, bad items, resume, failures on disk, statistics."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from imagedata import (
    BAD_ITEMS,
    ODD_BUT_VALID,
    TINY_CLIP,
    cmyk_jpeg,
    jpeg_bytes,
    palette_png,
    rgba_png,
    save_tiny_clip_checkpoint,
    sixteen_bit_png,
    write_image_folder,
)
from PIL import Image

from service.encoders import EncoderError, load_encoder
from service.ingest import Sample, open_source
from service.pipeline.decode import BadImage, decode_image
from service.pipeline.embedding import embed_chunk, embed_source
from service.pipeline.fitting import labelled_statistics
from service.pipeline.gpu_decode import decode_batch_on_gpu
from service.storage.embeddings import EmbeddingStore


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory):
    path = save_tiny_clip_checkpoint(tmp_path_factory.mktemp("tiny"))
    return load_encoder(f"open_clip:{TINY_CLIP}:{path}", device="cpu", precision="fp32")


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    write_image_folder(root, per_class=5)
    return root


def _features_by_id(store: EmbeddingStore) -> dict[str, np.ndarray]:
    return dict(zip(store.sample_ids().tolist(), store.features(), strict=True))


def test_embeds_every_image_like_a_plain_loop(encoder, folder: Path, tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path / "store")
    seen: list[tuple[int, int | None]] = []
    source = open_source(folder)
    report = embed_source(
        source, encoder, store, total=source.count(), chunk_size=4, batch_size=3, num_workers=2,
        progress=lambda d, t: seen.append((d, t)),
    )
    assert (report.embedded, report.failures, report.skipped_existing, report.stopped) == (15, [], 0, False)
    assert store.chunk_indices() == [0, 1, 2, 3] and store.count() == 15
    assert seen[-1] == (15, 15) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    chunk = store.read_chunk(0)
    assert chunk.labels.tolist() == ["blue"] * 4
    # The naive loop: PIL open + the encoder's preprocessing + one forward per image.
    for sample_id, feature in _features_by_id(store).items():
        image = Image.open(folder / sample_id).convert("RGB")
        expected = encoder.embed(encoder.preprocess(image)[None])[0]
        np.testing.assert_allclose(feature, expected, rtol=1e-4, atol=1e-5)
    record = store.encoder_record()
    assert record["name"] == encoder.name and record["weights_sha256"] == encoder.weights_sha256
    assert record["preprocessing"]["crop"] == [32, 32]


def test_bad_items_are_skipped_listed_and_persisted(encoder, tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write_image_folder(root, per_class=2)
    for name, (data, _) in BAD_ITEMS.items():
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(data)
    for name, data in ODD_BUT_VALID.items():
        (root / name).parent.mkdir(exist_ok=True)
        (root / name).write_bytes(data)
    store = EmbeddingStore(tmp_path / "store")
    report = embed_source(open_source(root), encoder, store, chunk_size=5, batch_size=2)
    assert report.embedded == 6 + len(ODD_BUT_VALID)
    reasons = dict(report.failures)
    assert set(reasons) == set(BAD_ITEMS)
    for name, (_, fragment) in BAD_ITEMS.items():
        assert fragment in reasons[name], (name, reasons[name])
    assert set(store.sample_ids().tolist()) >= set(ODD_BUT_VALID)
    # Persisted: a restarted service lists the same items without the report.
    assert sorted(store.failures()) == sorted(report.failures)
    # A rerun does not retry them and does not list them twice.
    again = embed_source(open_source(root), encoder, store)
    assert again.embedded == 0 and again.failures == []
    assert again.skipped_existing == report.embedded + len(BAD_ITEMS)
    assert len(store.failures()) == len(BAD_ITEMS)


def test_reader_errors_and_all_bad_chunks(encoder, tmp_path: Path) -> None:
    samples = [
        Sample("broken", "a", error="unreadable archive member: bad CRC"),
        Sample("gone", "a", path=str(tmp_path / "missing.jpg")),
        Sample("nothing", "a"),
    ]
    store = EmbeddingStore(tmp_path / "store")
    report = embed_source(samples, encoder, store, chunk_size=2)
    assert report.embedded == 0 and len(report.failures) == 3
    assert dict(report.failures)["gone"].startswith("file not found")
    assert store.count() == 0 and len(store.failures()) == 3


def test_resume_after_stop_gives_the_same_embeddings(encoder, folder: Path, tmp_path: Path) -> None:
    whole = EmbeddingStore(tmp_path / "whole")
    embed_source(open_source(folder), encoder, whole, chunk_size=4, batch_size=2)

    store = EmbeddingStore(tmp_path / "resumed")
    polls = {"n": 0}

    def stop_after_some() -> bool:
        polls["n"] += 1
        return polls["n"] > 5  # mid-way through the third chunk

    first = embed_source(open_source(folder), encoder, store, chunk_size=4, batch_size=2, should_stop=stop_after_some)
    assert first.stopped and first.embedded == 8 and store.chunk_indices() == [0, 1]
    second = embed_source(open_source(folder), encoder, store, chunk_size=4, batch_size=2)
    assert not second.stopped and second.skipped_existing == 8 and second.embedded == 7
    a, b = _features_by_id(whole), _features_by_id(store)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)


def test_resume_after_a_crash_mid_chunk(encoder, folder: Path, tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path / "store")

    def crash(done: int, total: int | None) -> None:
        if done >= 6:
            raise KeyboardInterrupt  # the process dies in the middle of chunk 1

    with pytest.raises(KeyboardInterrupt):
        embed_source(open_source(folder), encoder, store, chunk_size=4, batch_size=2, progress=crash)
    assert store.chunk_indices() == [0]  # no partial chunk
    report = embed_source(open_source(folder), encoder, store, chunk_size=4, batch_size=2)
    assert report.skipped_existing == 4 and report.embedded == 11 and store.count() == 15
    assert len(set(store.sample_ids().tolist())) == 15


def test_orphan_failures_file_is_ignored(encoder, folder: Path, tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path / "store")
    # A crash between writing failures-000000.json and chunk-000000.npz leaves this behind.
    store.directory.mkdir(parents=True)
    store.failures_path(0).write_text(json.dumps([["red/000.jpg", "stale"]]))
    assert store.failures() == []
    report = embed_source(open_source(folder), encoder, store)
    assert report.embedded == 15 and store.failures() == []


def test_duplicates_unlabelled_and_encoder_mismatch(encoder, tmp_path: Path) -> None:
    data = jpeg_bytes((10, 200, 10), 32)
    samples = [Sample("x", "cls", data=data), Sample("x", "cls", data=data), Sample("y", None, data=data)]
    store = EmbeddingStore(tmp_path / "store")
    report = embed_source(samples, encoder, store)
    assert report.embedded == 2 and report.failures == [("x", "duplicate sample id (first occurrence kept)")]
    assert store.read_chunk(0).labels.tolist() == ["cls", ""]
    other = load_encoder("open_clip:" + TINY_CLIP + ":random", device="cpu", precision="fp32")
    with pytest.raises(EncoderError, match="mix feature"):
        embed_source([Sample("z", "cls", data=data)], other, store)


def test_chunk_statistics_merge_to_the_stored_statistics(encoder, folder: Path, tmp_path: Path) -> None:
    store = EmbeddingStore(tmp_path / "store")
    report = embed_source(open_source(folder), encoder, store, chunk_size=4)
    from_store = labelled_statistics(store, normalize=True)
    assert report.statistics is not None
    assert report.statistics.class_counts == from_store.class_counts
    merged_total = report.statistics.second_moments.sum(0) + 0.0
    assert merged_total.shape == (32, 32)
    # Same mean and covariance (the references differ, the statistics must not).
    def mean_cov(s):
        n = s.counts.sum()
        total = s.sums.sum(axis=(0, 1))
        mean = s.reference + total / n
        second = s.second_moments.sum(0) / n - np.outer(total / n, total / n)
        return mean, second

    for x, y in zip(mean_cov(report.statistics), mean_cov(from_store), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-6)


def test_embed_chunk_is_a_plain_function(encoder) -> None:
    samples = [Sample(f"s{i}", "a" if i % 2 else None, data=jpeg_bytes((i * 20, 50, 90), 32, seed=i)) for i in range(5)]
    samples.append(Sample("bad", "a", data=b""))
    result = embed_chunk(samples, encoder, batch_size=2, num_workers=1)
    assert result.sample_ids == [f"s{i}" for i in range(5)]
    assert result.labels == ["", "a", "", "a", ""]
    assert result.features.shape == (5, 32) and result.features.dtype == np.float32
    assert result.failures == [("bad", "empty file (0 bytes)")]
    assert result.statistics is not None and result.statistics.count == 2
    stopped = embed_chunk(samples, encoder, batch_size=2, should_stop=lambda: True)
    assert stopped.stopped and stopped.sample_ids == []


def test_decode_awkward_images() -> None:
    sixteen = np.asarray(decode_image(sixteen_bit_png()))
    assert sixteen.shape == (32, 32, 3) and sixteen.min() == 0 and sixteen.max() == 255
    assert 100 < np.median(sixteen) < 155  # a ramp, not clipped to white
    cmyk = np.asarray(decode_image(cmyk_jpeg())).reshape(-1, 3).mean(0)
    assert cmyk[2] > cmyk[0]  # still blue
    palette = np.asarray(decode_image(palette_png()))
    assert tuple(palette[0, 0]) == (255, 255, 255)  # transparent index -> white
    assert tuple(palette[0, 15]) == (255, 0, 0) and tuple(palette[0, 25]) == (0, 255, 0)
    rgba = np.asarray(decode_image(rgba_png()))
    assert tuple(rgba[0, 0]) == (255, 0, 0) and tuple(rgba[15, 0]) == (255, 255, 255)
    for data, _fragment in BAD_ITEMS.values():
        with pytest.raises(BadImage):
            decode_image(data)


def test_jpeg_draft_keeps_the_short_side() -> None:
    big = Image.fromarray(np.full((900, 1200, 3), 128, np.uint8))
    buffer = io.BytesIO()
    big.save(buffer, format="JPEG")
    image = decode_image(buffer.getvalue(), draft_size=224)
    assert min(image.size) >= 224 and image.size[0] < 1200


def test_tensor_decode_path_matches_the_pil_path(encoder) -> None:
    # The GPU path's code runs on the CPU too; it must agree with the PIL transform.
    jpegs = [jpeg_bytes((30 * i, 100, 200 - 30 * i), 40 + 8 * i, seed=i) for i in range(4)]
    tensor = decode_batch_on_gpu(jpegs, encoder.preprocessing, torch.device("cpu"))
    reference = torch.stack([encoder.preprocess(decode_image(b)) for b in jpegs])
    assert tensor.shape == reference.shape
    assert (tensor - reference).abs().mean() < 0.05
    a, b = encoder.embed(tensor), encoder.embed(reference)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.99


def test_gpu_jpeg_route_keeps_order_and_bad_items(encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    # The CUDA route (headers checked in workers, JPEGs decoded as a batch by decode_batch_on_gpu,
    # other formats through PIL, then merged back in input order) forced on the CPU.
    import service.pipeline.embedding as embedding

    monkeypatch.setattr(embedding, "gpu_decode_supported", lambda device, preprocessing: True)
    samples = [
        Sample("j0", "a", data=jpeg_bytes((200, 10, 10), 40, seed=0)),
        Sample("p1", "a", data=palette_png()),
        Sample("bad", "a", data=b"junk"),
        Sample("j2", "b", data=jpeg_bytes((10, 10, 200), 48, seed=2)),
        Sample("c3", "b", data=cmyk_jpeg()),  # CMYK JPEG: not for nvJPEG, goes through PIL
        Sample("j4", "b", data=jpeg_bytes((10, 200, 10), 56, seed=4)),
    ]
    routed = embed_chunk(samples, encoder, batch_size=4, num_workers=2)
    monkeypatch.undo()
    plain = embed_chunk(samples, encoder, batch_size=4, num_workers=2)
    assert routed.sample_ids == plain.sample_ids == ["j0", "p1", "j2", "c3", "j4"]
    assert routed.failures == plain.failures == [("bad", "not an image (unrecognised format)")]
    a, b = routed.features, plain.features
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.99


def test_gpu_jpeg_route_leaves_exif_rotated_jpegs_to_the_cpu(encoder) -> None:
    # nvJPEG does not apply EXIF orientation; the CPU path does. A rotated photo must take it.
    from service.pipeline.embedding import _prepare

    image = Image.new("RGB", (64, 32), (200, 20, 20))
    upright, rotated = io.BytesIO(), io.BytesIO()
    image.save(upright, format="JPEG")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image.save(rotated, format="JPEG", exif=exif)
    assert _prepare(Sample("u", "a", data=upright.getvalue()), encoder, gpu_jpeg=True)[0] == "gpu-jpeg"
    route, tensor = _prepare(Sample("r", "a", data=rotated.getvalue()), encoder, gpu_jpeg=True)
    assert route == "ok"
    assert decode_image(rotated.getvalue()).size == (32, 64)  # the CPU path turned it upright
    assert isinstance(tensor, torch.Tensor)

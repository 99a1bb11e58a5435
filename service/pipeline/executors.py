"""Choose where the embedding pipeline runs: ``local`` (default, in this process) or ``ray``.

Both have the contract of :func:`service.pipeline.embedding.embed_source` and leave the same
store behind. Ray is imported only when the ``ray`` executor is chosen, so the embedded default
never needs it installed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from service.ingest.sample import Sample
from service.pipeline.embedding import EmbedReport, embed_source
from service.storage.embeddings import EmbeddingStore

EXECUTORS = ("local", "ray")


def embed_with(
    executor: str,
    samples: Iterable[Sample],
    encoder_name: str,
    store: EmbeddingStore,
    *,
    device: str = "auto",
    total: int | None = None,
    chunk_size: int = 1024,
    batch_size: int | None = None,
    num_workers: int | None = None,
    ray_address: str | None = None,
    ray_actors: int | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> EmbedReport:
    if executor == "ray":
        from service.pipeline.ray_executor import RaySettings, embed_source_ray

        return embed_source_ray(
            samples, encoder_name, store, total=total, chunk_size=chunk_size,
            batch_size=batch_size or 256, num_workers=num_workers, device=device,
            settings=RaySettings(address=ray_address, num_actors=ray_actors),
            progress=progress, should_stop=should_stop,
        )
    if executor != "local":
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    from service.encoders import load_encoder

    encoder = load_encoder(encoder_name, device=device)
    if batch_size is None:
        batch_size = 256 if encoder.device.type == "cuda" else 64
    return embed_source(
        samples, encoder, store, total=total, chunk_size=chunk_size, batch_size=batch_size,
        num_workers=num_workers, progress=progress, should_stop=should_stop,
    )

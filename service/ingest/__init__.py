"""Readers: an ImageFolder directory, a zip or tar(.gz) archive, a manifest, WebDataset shards.

Each yields :class:`Sample` (sample_id, label, bytes or path) lazily; none loads a dataset into
memory. ``open_source`` picks the reader from the location.
"""

from service.ingest.detect import open_source
from service.ingest.sample import MAX_ITEM_BYTES, ReaderError, Sample, SampleSource

__all__ = ["MAX_ITEM_BYTES", "ReaderError", "Sample", "SampleSource", "open_source"]

"""What the use cases share in one server process: settings, the database, and caches."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import sessionmaker

from service.pipeline.neighbors import IndexCache
from service.settings import Settings
from service.statistics import GaussianModel
from service.storage.fits import FitFiles

MODELS_KEPT = 8


@dataclass
class AppContext:
    settings: Settings
    db: sessionmaker
    indexes: IndexCache = field(init=False)  # sized by the settings (__post_init__)
    _models: OrderedDict[str, GaussianModel] = field(default_factory=OrderedDict)
    _encoders: dict[str, Any] = field(default_factory=dict)
    _upload_locks: dict[str, threading.Lock] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _encoder_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.indexes = IndexCache(self.settings.neighbor_index_max_bytes)

    def upload_lock(self, dataset_id: str) -> threading.Lock:
        # Serialises uploads to one dataset in this process (duplicate-ID checks, encoder switch).
        with self._lock:
            return self._upload_locks.setdefault(dataset_id, threading.Lock())

    def encoder(self, name: str) -> Any:
        """One loaded image encoder per name, kept for later scoring requests (raises
        ``EncoderError``)."""
        from service.encoders import load_encoder

        # Its own lock: loading weights takes seconds, and uploads and model lookups (which take
        # self._lock) must not wait behind it.
        with self._encoder_lock:
            if name not in self._encoders:
                self._encoders.clear()  # at most one model in memory
                self._encoders[name] = load_encoder(name, device=self.settings.device)
            return self._encoders[name]

    def model(self, dataset_id: str, fit_id: str) -> GaussianModel:
        with self._lock:
            if fit_id in self._models:
                return self._models[fit_id]
        model = GaussianModel.from_arrays(FitFiles.of(self.settings.data_dir, dataset_id, fit_id).model_arrays())
        with self._lock:
            self._models[fit_id] = model
            while len(self._models) > MODELS_KEPT:
                self._models.popitem(last=False)
        return model

"""The models the daemon serves: one generation model, optionally an embedding model and the retrieval store
built with it; held together, and swapped between requests (a fleet update, a SIGHUP reload)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from edgellm.daemon.engine.generate import Generator
from edgellm.daemon.engine.model import LoadedModel
from edgellm.daemon.engine.prefix_cache import PrefixCache
from edgellm.daemon.errors import EdgeError
from edgellm.daemon.retrieval.embedder import Embedder
from edgellm.daemon.retrieval.store import RetrievalStore
from edgellm.daemon.serve.replies import ModelInfo
from edgellm.daemon.serve.settings import Settings


@dataclass(frozen=True)
class Served:
    """One consistent set; a request keeps the set it started with, so a swap never changes it mid-way."""

    generator: Generator
    embedder: Embedder | None
    store: RetrievalStore | None = None
    loaded_at: float = field(default_factory=time.time)  # when the generation model was loaded (/api/ps)

    @property
    def model_info(self) -> ModelInfo:
        m = self.generator.model.manifest
        return ModelInfo(m.name, m.version)

    @property
    def adapters(self) -> list[str]:
        """The LoRA adapters loaded beside the generation model (daemon/engine/adapters.py)."""
        slots = self.generator.model.decoder.adapters
        return sorted(slots.adapters) if slots is not None else []

    def require_embedder(self) -> Embedder:
        if self.embedder is None:
            raise EdgeError("model_unavailable", "no embedding model is configured on this device (embedding.path)")
        return self.embedder

    def require_store(self) -> RetrievalStore:
        if self.store is None:
            raise EdgeError("model_unavailable", "no retrieval store is configured on this device (store.path)")
        return self.store


class ServedModels:
    """Holds the current Served set for the worker and the transports."""

    def __init__(self, served: Served):
        self._served = served
        self._lock = threading.Lock()

    @property
    def served(self) -> Served:
        with self._lock:
            return self._served

    def swap(self, served: Served) -> Served:
        with self._lock:
            old, self._served = self._served, served
        return old

    def swap_generator(self, generator: Generator) -> None:
        """A new generation model, same embedder and store; requests already running keep the old one."""
        with self._lock:
            self._served = replace(self._served, generator=generator, loaded_at=time.time())


def load_generator(settings: Settings, folder: Path) -> Generator:
    """`folder` may be a model name from the local library (edgellm/daemon/library.py)."""
    from edgellm.daemon.library import resolve_model

    folder = resolve_model(folder)
    m = settings.model
    prefix_cache = PrefixCache(m.prefix_cache_mb << 20) if m.prefix_cache_mb else None
    return Generator(LoadedModel.load(folder, threads=m.threads), prefix_cache, batch_rows=m.batch_size,
                     batch_context=m.batch_context, speculative=m.speculative)


def load_served(settings: Settings) -> Served:
    """The models and store the settings name; the store needs the embedding model that built it."""
    if settings.model.path is None:
        raise EdgeError("model_unavailable", "model.path is not set: set EDGELLM_MODEL__PATH, [model] path in the "
                        "config file, or --model")
    generator = load_generator(settings, settings.model.path)
    e = settings.embedding
    embedder = Embedder(e.path, threads=e.threads) if e.path else None
    store = None
    if settings.store.path:
        if embedder is None:
            raise EdgeError("model_unavailable", "store.path needs embedding.path: the store's vectors come from it")
        store = RetrievalStore(settings.store.path, embedder)
    return Served(generator, embedder, store)

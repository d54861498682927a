"""What the daemon serves: one generation model and optionally one embedding model, swappable between requests."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from daemon.embedder import Embedder
from daemon.errors import EdgeError
from daemon.generate import Generator
from daemon.model import LoadedModel


@dataclass(frozen=True)
class Served:
    """One consistent pair; a request keeps the pair it started with, so a swap never changes it mid-way."""

    generator: Generator
    embedder: Embedder | None

    @property
    def model_info(self) -> dict[str, str]:
        m = self.generator.model.manifest
        return {"name": m.name, "version": m.version}


class Engine:
    def __init__(self, served: Served):
        self._served = served
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model_path: Path, threads: int = 0, embedding_path: Path | None = None,
             embedding_threads: int = 1) -> Engine:
        return cls(load_served(model_path, threads, embedding_path, embedding_threads))

    @property
    def served(self) -> Served:
        with self._lock:
            return self._served

    def swap(self, served: Served) -> Served:
        with self._lock:
            old, self._served = self._served, served
        return old


def load_served(model_path: Path, threads: int = 0, embedding_path: Path | None = None,
                embedding_threads: int = 1) -> Served:
    if model_path is None:
        raise EdgeError("model_unavailable", "model.path is not set: set EDGELLM_MODEL__PATH, [model] path in the "
                        "config file, or --model")
    generator = Generator(LoadedModel.load(model_path, threads=threads))
    embedder = Embedder(embedding_path, threads=embedding_threads) if embedding_path else None
    return Served(generator, embedder)

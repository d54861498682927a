"""Host batch jobs on Dask, for when one machine is not enough: evaluation, embedding a corpus into a
retrieval store, and model-written invoice variants.

A LocalCluster of processes is the default; `scheduler` connects to an existing cluster instead (its workers
need edgellm installed). Each worker loads the model once, through a worker plugin, and keeps it for every
task; tasks carry only their batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from distributed import Client, LocalCluster, WorkerPlugin, get_worker

PLUGIN = "edgellm-model"
PARAPHRASE_PROMPT = ("Rewrite this invoice with a different layout and wording, in the same language. Keep the "
                     "vendor, invoice number, date, amounts and currency exactly as they are.\n\n{text}")


class ModelOnWorker(WorkerPlugin):
    """Loads a model folder when a worker starts (or joins); tasks find it with `worker_model()`."""

    name = PLUGIN

    def __init__(self, folder: str, kind: str, threads: int = 1):
        self.folder, self.kind, self.threads = folder, kind, threads
        self.model = None

    def setup(self, worker) -> None:
        if self.kind == "embedding":
            from edgellm.daemon.retrieval.embedder import Embedder

            self.model = Embedder(self.folder, threads=self.threads)
        else:
            from edgellm.daemon.engine.generate import Generator
            from edgellm.daemon.engine.model import LoadedModel

            self.model = Generator(LoadedModel.load(self.folder, threads=self.threads))


def worker_model():
    return get_worker().plugins[PLUGIN].model


@contextmanager
def cluster(scheduler: str | None, workers: int, threads: int = 1) -> Iterator[Client]:
    """A client on `scheduler`, or on a LocalCluster of `workers` processes with `threads` threads each."""
    if scheduler:
        with Client(scheduler) as client:
            yield client
        return
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      silence_logs=40) as local, Client(local) as client:
        yield client


def _batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


# -- tasks (run on workers) ---------------------------------------------------------------------------
def _extract(examples: list[dict], schema: dict, max_tokens: int) -> list[tuple[dict | None, float]]:
    from edgellm.models.tuning.evaluate import extract

    return extract(worker_model(), examples, schema, max_tokens)


def _embed(texts: list[str]):
    return worker_model().embed(texts)


def _paraphrase(examples: list[dict], variants: int, seed: int, max_tokens: int) -> list[dict]:
    from edgellm.daemon.engine.params import GenerationParams

    generator = worker_model()
    out = []
    for i, ex in enumerate(examples):
        for v in range(variants):
            params = GenerationParams(temperature=0.8, top_p=0.95, max_tokens=max_tokens, seed=seed + 1000 * i + v)
            r = generator.generate(generator.prompt_ids(PARAPHRASE_PROMPT.format(text=ex["text"])), params)
            out.append({**ex, "text": r.text.strip(), "origin": "paraphrase", "finish_reason": r.finish_reason})
    return out


# -- jobs (run on the client) -------------------------------------------------------------------------
def _gather(client: Client, futures: list, sizes: list[int], description: str) -> list:
    """The futures' results in order, with a bar that counts items as batches finish anywhere on the cluster."""
    from distributed import as_completed

    from edgellm.models.progress import counting

    size_of = {f.key: n for f, n in zip(futures, sizes, strict=True)}
    with counting(description, sum(sizes)) as done:
        for future in as_completed(futures):
            done(size_of[future.key])
    return client.gather(futures)


def batch_eval(client: Client, model_dir: Path, examples: list[dict], schema: dict, max_tokens: int = 200,
               batch_size: int = 4, threads: int = 1) -> dict:
    from edgellm.daemon.engine.manifest import load_manifest
    from edgellm.models.tuning.evaluate import report_for

    client.register_plugin(ModelOnWorker(str(model_dir), "generation", threads))
    batches = _batches(examples, batch_size)
    futures = client.map(_extract, batches, schema=schema, max_tokens=max_tokens, pure=False)
    results = [r for batch in _gather(client, futures, list(map(len, batches)), "Evaluating") for r in batch]
    report = report_for(load_manifest(model_dir).name, examples, results, schema)
    report["workers"] = len(client.scheduler_info()["workers"])
    return report


def batch_embed(client: Client, model_dir: Path, texts: list[str], batch_size: int = 32, threads: int = 1):
    import numpy as np

    client.register_plugin(ModelOnWorker(str(model_dir), "embedding", threads))
    batches = _batches(texts, batch_size)
    futures = client.map(_embed, batches, pure=False)
    parts = _gather(client, futures, list(map(len, batches)), "Embedding chunks")
    return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)


def batch_ingest(client: Client, model_dir: Path, store_path: Path, paths: list[Path], collection: str,
                 threads: int = 1):
    """Chunk here, embed on the cluster, write here in one transaction (SQLite has one writer)."""
    from edgellm.daemon.retrieval.documents import collect
    from edgellm.daemon.retrieval.embedder import Embedder
    from edgellm.daemon.retrieval.store import RetrievalStore

    store = RetrievalStore(store_path, Embedder(model_dir, threads=1))
    try:
        docs = collect(paths, collection).documents
        return store.ingest(docs, embed_all=lambda texts: batch_embed(client, model_dir, texts, threads=threads))
    finally:
        store.close()


def batch_paraphrase(client: Client, model_dir: Path, examples: list[dict], variants: int = 1, seed: int = 0,
                     max_tokens: int = 300, threads: int = 1) -> tuple[list[dict], list[dict]]:
    """(kept, written): model-written variants, kept only where they are faithful (`faithful`)."""
    client.register_plugin(ModelOnWorker(str(model_dir), "generation", threads))
    batches = _batches(examples, 2)
    futures = client.map(_paraphrase, batches, variants=variants, seed=seed, max_tokens=max_tokens, pure=False)
    written = [v for batch in _gather(client, futures, list(map(len, batches)), "Paraphrasing") for v in batch]
    return [v for v in written if faithful(v)], written


def faithful(variant: dict) -> bool:
    """A variant the model finished (one cut off at max_tokens is often a loop that repeats the values, as
    SmolLM2-135M's are: README, "Paraphrases were measured") and from which every gold value still reads back."""
    from edgellm.models.tuning.invoices import values_present

    return (variant.get("finish_reason") == "stop"
            and values_present(variant["text"], variant["gold"], variant.get("lang", "en")))

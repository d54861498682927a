"""Dask batch jobs on a real LocalCluster with 2 worker processes: the answers match a single-process run."""

from __future__ import annotations

import pytest

from edgellm.models.tuning.invoices import SCHEMA, generate

pytestmark = pytest.mark.slow  # see the README's development section


@pytest.fixture(scope="module")
def client():
    from edgellm.models.tuning.batch import cluster

    with cluster(None, workers=2) as c:
        yield c


@pytest.fixture(scope="module")
def tiny_int4(tiny_sources, tmp_path_factory):
    from tests.conftest import build

    return build(tiny_sources["llama"], tmp_path_factory.mktemp("batch") / "tiny-int4", "int4")


def test_batch_eval_on_two_workers_matches_the_local_evaluation(client, tiny_int4):
    from edgellm.models.tuning.batch import batch_eval
    from edgellm.models.tuning.evaluate import evaluate_model

    examples = [{"lang": i.lang, "text": i.text, "gold": i.gold} for i in generate(6, 5)]
    distributed = batch_eval(client, tiny_int4, examples, SCHEMA, max_tokens=40, batch_size=2)
    local = evaluate_model(tiny_int4, examples, SCHEMA, threads=1, max_tokens=40)
    assert distributed["workers"] == 2
    for key in ("field_accuracy", "json_valid_rate", "per_language", "per_field", "n"):
        assert distributed[key] == local[key], key
    processed = client.run(lambda dask_worker: dask_worker.plugins["edgellm-model"].model is not None)
    assert len(processed) == 2 and all(processed.values())  # each worker loaded the model once, at setup


def test_batch_embed_fills_a_store_that_finds_the_passage(client, minilm_int8, tmp_path):
    from edgellm.daemon.retrieval.embedder import Embedder
    from edgellm.daemon.retrieval.store import RetrievalStore
    from edgellm.models.tuning.batch import batch_ingest

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("The warranty on the pump lasts two years from delivery.")
    (docs / "b.txt").write_text("La factura vence el 12 de marzo de 2026.")
    report = batch_ingest(client, minilm_int8, tmp_path / "store.db", [docs], "default")
    assert report.documents == 2
    store = RetrievalStore(tmp_path / "store.db", Embedder(minilm_int8))
    hits = store.search("how long is the pump warranty?", k=1)
    assert hits[0].source.endswith("a.txt")
    local = Embedder(minilm_int8).embed(["The warranty on the pump lasts two years from delivery."])
    stored = store.conn.execute("SELECT embedding FROM chunks_vec WHERE chunk_id = ?", (hits[0].chunk_id,)
                                ).fetchone()[0]
    import numpy as np

    assert np.allclose(np.frombuffer(stored, dtype=np.float32), local[0], atol=1e-5)


def test_paraphrase_writes_seeded_variants_and_keeps_only_faithful_ones(client, tiny_int4):
    from edgellm.models.tuning.batch import batch_paraphrase, faithful
    from edgellm.models.tuning.invoices import values_present

    examples = [{"lang": i.lang, "text": i.text, "gold": i.gold} for i in generate(4, 6)]
    kept, written = batch_paraphrase(client, tiny_int4, examples, variants=2, seed=3, max_tokens=30)
    _, again = batch_paraphrase(client, tiny_int4, examples, variants=2, seed=3, max_tokens=30)
    assert len(written) == 8 and written == again  # seeded: the same variants on any worker
    assert len({v["text"] for v in written}) > 1
    assert all(values_present(v["text"], v["gold"], v["lang"]) and v["finish_reason"] == "stop" for v in kept)
    # the filter itself: a faithful text passes; one with a changed value, or cut off at max_tokens, does not
    ex = examples[0]
    finished = {**ex, "finish_reason": "stop"}
    assert faithful(finished)
    assert not faithful({**finished, "text": ex["text"].replace(ex["gold"]["invoice_number"], "X-1")})
    assert not faithful({**finished, "finish_reason": "length"})


def test_cli_runs_on_an_existing_scheduler(client, tiny_int4, tmp_path):
    """`--scheduler ADDRESS` joins a running cluster (here the LocalCluster above) instead of starting one."""
    import json
    import subprocess

    from edgellm.models.tuning.invoices import write_jsonl
    from tests.harness import EDGELLM, ROOT

    write_jsonl(generate(4, 8), tmp_path / "test.jsonl")
    out = subprocess.run([*EDGELLM, "batch", "eval", "--model", str(tiny_int4), "--data",
                          str(tmp_path / "test.jsonl"), "--scheduler", client.scheduler.address, "--max-tokens", "30",
                          "--report", str(tmp_path / "r.json")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["workers"] == 2 and report["n"] == 4 and "2 workers" in out.stdout
    assert "Evaluating" in out.stderr and "4/4" in out.stderr  # progress as batches finish on the cluster

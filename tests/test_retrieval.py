"""The retrieval store on real sqlite-vec and FTS5, with the real MiniLM embedder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from edgellm.daemon.errors import EdgeError
from edgellm.daemon.retrieval.chunking import chunk_text
from edgellm.daemon.retrieval.embedder import Embedder
from edgellm.daemon.retrieval.store import DocumentInput, RetrievalStore
from tests.data.corpus import DOCUMENTS, QUESTIONS
from tests.harness import ROOT


@pytest.fixture(scope="module")
def embedder(minilm_int8):
    return Embedder(minilm_int8)


@pytest.fixture
def store(tmp_path, embedder):
    s = RetrievalStore(tmp_path / "store.db", embedder)
    lang = {"en": "en", "fr": "fr", "es": "es"}
    s.ingest([DocumentInput(name, [text], collection="policies", metadata={"lang": lang[name[:2]]})
              for name, text in DOCUMENTS.items()])
    s.ingest([DocumentInput("eval.txt", [(ROOT / "models/data/eval_en.txt").read_text()], collection="other")])
    yield s
    s.close()


def test_recall_at_5_on_english_french_and_spanish_questions(store):
    found = [target in [h.source for h in store.search(q, k=5)] for q, target in QUESTIONS]
    recall = sum(found) / len(found)
    assert recall >= 0.9, [q for (q, _), ok in zip(QUESTIONS, found, strict=True) if not ok]


def test_bit_search_with_float_rerank_finds_the_same_top_hit(store):
    for q, _target in QUESTIONS[:8]:
        assert store.search(q, k=5, mode="bit")[0].source == store.search(q, k=5, mode="float")[0].source


def test_collection_and_metadata_filters(store):
    hits = store.search("invoices payment", k=10, collection="policies", filters={"lang": "es"})
    assert hits and all(h.source.startswith("es/") and h.collection == "policies" for h in hits)
    assert all(h.collection == "other" for h in store.search("invoices", k=5, collection="other"))
    with pytest.raises(EdgeError, match="filter"):
        store.search("x", filters={"la'ng": "es"})


def test_hits_point_back_into_the_source(store):
    hit = store.search("How long is the pump under warranty?", k=1)[0]
    assert DOCUMENTS[hit.source][hit.start:hit.end] == hit.text and hit.page == 1
    assert "24 months" in hit.text and hit.similarity > 0.3


def test_reingest_replaces_and_delete_removes(store):
    before = store.count()
    report = store.ingest([DocumentInput("en/pump.md", [DOCUMENTS["en/pump.md"]], collection="policies",
                                         metadata={"lang": "en"})])
    assert (report.documents, report.unchanged) == (0, 1) and store.count() == before
    store.ingest([DocumentInput("en/pump.md", ["# Warranty\n\nThe pump warranty is now 36 months."],
                                collection="policies")])
    hits = store.search("pump warranty months", k=3, collection="policies")
    assert any("36 months" in h.text for h in hits) and not any("24 months" in h.text for h in hits)
    assert store.count()["documents"] == before["documents"]
    assert store.delete("en/pump.md", "policies") >= 1
    assert all(h.source != "en/pump.md" for h in store.search("pump warranty", k=10))
    assert store.count()["documents"] == before["documents"] - 1


@pytest.mark.slow
def test_a_store_refuses_another_embedding_model(tmp_path, store, minilm_int8):
    from edgellm.models.building.embedding_build import build_embedding
    from edgellm.models.building.options import BuildOptions
    from edgellm.models.building.quantize import QuantSpec

    other = build_embedding("minilm", tmp_path / "fp32", BuildOptions(QuantSpec("fp32"), show_progress=False))
    with pytest.raises(EdgeError, match="built with embedding model all-MiniLM-L6-v2-int8"):
        RetrievalStore(store.path, Embedder(tmp_path / "fp32"))
    assert other.name == "all-MiniLM-L6-v2-fp32"
    with pytest.raises(EdgeError, match="dimension 10"):
        store._check_vectors(np.zeros((1, 10), dtype=np.float32))


def test_chunks_respect_headings_size_and_overlap(embedder):
    text = ("# One\n\n" + " ".join(f"Sentence {i} about invoices and payment terms." for i in range(60))
            + "\n\n# Two\n\nA short section.")
    count = lambda t: len(embedder.tokenizer.encode(t, add_special_tokens=False).ids)  # noqa: E731
    chunks = chunk_text(text, count, max_tokens=64, overlap=16)
    assert all(c.tokens <= 64 for c in chunks) and len(chunks) > 4
    assert text[chunks[-1].start:].startswith("# Two")  # a heading starts a chunk
    assert any(a.end > b.start for a, b in zip(chunks, chunks[1:], strict=False))  # overlap
    assert text[chunks[0].start:chunks[0].end].startswith("# One")


@pytest.mark.slow
def test_a_crash_mid_ingest_leaves_the_store_as_it_was(tmp_path, embedder, minilm_int8):
    db = tmp_path / "crash.db"
    s = RetrievalStore(db, embedder)
    s.ingest([DocumentInput("keep.md", ["# Keep\n\nThis document was stored before the crash."])])
    s.close()
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "crash_ingest.py"), str(db), str(minilm_int8)],
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr  # it died inside the write transaction
    s = RetrievalStore(db, embedder)
    assert s.count() == {"documents": 1, "chunks": 1}
    assert s.search("stored before the crash", k=1)[0].source == "keep.md"
    s.ingest([DocumentInput("after.md", ["Written after the crash."])])  # and it still takes writes
    assert s.count()["documents"] == 2


def minimal_pdf(pages: list[str]) -> bytes:
    """A valid PDF with one line of Helvetica text per page, written by hand (no PDF writer needed)."""
    objects = ["<< /Type /Catalog /Pages 2 0 R >>", None, "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for text in pages:
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET"
        objects.append(f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream")
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {len(objects)} 0 R "
                       "/Resources << /Font << /F1 3 0 R >> >> >>")
        kids.append(f"{len(objects)} 0 R")
    objects[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    out, offsets = b"%PDF-1.4\n", []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n".encode()
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += "".join(f"{o:010d} 00000 n \n" for o in offsets).encode()
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return out


def test_pdf_pages_html_headings_and_unreadable_files(tmp_path, embedder):
    from edgellm.daemon.retrieval.documents import find_files, read_pages

    (tmp_path / "contract.pdf").write_bytes(minimal_pdf(["Parties and scope of the contract.",
                                                         "Termination requires ninety days notice."]))
    (tmp_path / "policy.html").write_text("<html><head><style>p {color: red}</style></head><body>"
                                          "<h1>Refunds</h1><p>Refunds are paid within 14 days.</p></body></html>")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    files = find_files([tmp_path])
    assert [f.name for f in files] == ["contract.pdf", "policy.html"]
    pages = read_pages(tmp_path / "contract.pdf")
    assert len(pages) == 2 and "ninety days" in pages[1]
    assert read_pages(tmp_path / "policy.html") == ["# Refunds\n\nRefunds are paid within 14 days."]
    store = RetrievalStore(tmp_path / "s.db", embedder)
    store.ingest([DocumentInput(str(f), read_pages(f)) for f in files])
    hit = store.search("How much notice to terminate?", k=1)[0]
    assert hit.source.endswith("contract.pdf") and hit.page == 2
    with pytest.raises(EdgeError, match="cannot read .png"):
        read_pages(tmp_path / "image.png")
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 garbage")
    with pytest.raises(EdgeError, match="not a readable PDF"):
        read_pages(tmp_path / "broken.pdf")


def test_html_navigation_header_and_footer_are_not_text():
    from edgellm.daemon.retrieval.documents import html_to_text

    page = ("<html><head><title>t</title></head><body><header><a href='/'>Home</a> | <a>About</a></header>"
            "<nav><ul><li>Contracts</li><li>Invoices</li></ul></nav><main><h1>Lease</h1>"
            "<p>The lease ends on 30 June 2027.</p></main><footer>© 2026 Example &amp; Co</footer></body></html>")
    assert html_to_text(page) == "# Lease\n\nThe lease ends on 30 June 2027."


@pytest.mark.slow
def test_grounded_answers_are_copied_from_the_cited_sentence_or_refused_in_the_question_language(
        tmp_path, embedder, smollm2_int4):
    """The default for a 135M model: the best sentence, a span the grammar copies out of it, its citation;
    and 'the documents do not say' when no sentence shares the question's words."""
    from edgellm.daemon.engine.generate import Generator
    from edgellm.daemon.engine.model import LoadedModel
    from edgellm.daemon.engine.params import GenerationParams
    from edgellm.daemon.retrieval.rag import answer_mode, ask
    from tests.data.rag_eval import ANSWERABLE, MORE_DOCUMENTS, is_right

    s = RetrievalStore(tmp_path / "grounded.db", embedder)
    corpus = {**DOCUMENTS, **MORE_DOCUMENTS}
    s.ingest([DocumentInput(name, [text]) for name, text in corpus.items()])
    generator = Generator(LoadedModel.load(smollm2_int4, threads=2))
    assert answer_mode(generator) == "grounded"
    params = GenerationParams(max_tokens=48, temperature=0.7)  # grounded answers copy greedily whatever this says
    picked = [ANSWERABLE[i] for i in (0, 20, 22, 34, 47, 56)]  # two per language
    for question, _lang, golds, source in picked:
        a = ask(generator, s, question, params)
        cited = [c for c in a.citations if c["cited"]]
        assert is_right(a.answer, golds), (question, a.answer)
        assert len(cited) == 1 and cited[0]["source"] == source and is_right(cited[0]["text"], golds)
        assert a.answer in corpus[source][cited[0]["start"]:cited[0]["end"]]  # copied, word for word
    for question, said in [("What is the guest Wi-Fi password?", "The documents do not say."),
                           ("Qui dirige le service marketing ?", "Les documents ne le disent pas."),
                           ("¿Quién es el director financiero?", "Los documentos no lo dicen.")]:
        a = ask(generator, s, question, params)
        assert (a.answer, a.citations) == (said, [])
    free = ask(generator, s, picked[0][0], GenerationParams(max_tokens=16, temperature=0.0), mode="free")
    assert free.citations and all("text" in c for c in free.citations)  # whole passages, free text
    s.close()

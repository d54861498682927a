"""ingest, search, ask and delete over MQTT, and the retrieval CLI's machine-readable output."""

from __future__ import annotations

import json
import os
import random
import shlex
import subprocess
import time
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.data.corpus import DOCUMENTS
from tests.harness import EDGELLM, ROOT, Broker, DaemonProcess, examples, rpc, wait_until

TOPIC = "edgellm/v1/rag1/rpc/"


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("allowed")
    for name, text in DOCUMENTS.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    return folder


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """An allowed folder holding a PDF whose one stream inflates to 300 MB, and a FIFO (which would block)."""
    folder = tmp_path_factory.mktemp("hostile")
    (folder / "bomb.pdf").write_bytes(pdf_with_stream(b"BT (A) Tj ET\n" + b" " * (300 << 20)))
    os.mkfifo(folder / "pipe.txt")
    with open(folder / "huge.txt", "wb") as f:  # sparse: 2 MB of NULs, over this daemon's 1 MB limit
        f.truncate(2 << 20)
    (folder / "binary.txt").write_bytes(random.Random(7).randbytes(64 << 10))
    return folder


@pytest.fixture(scope="module")
def linked(tmp_path_factory):
    """An allowed folder with a link to a file outside every allowed folder, and a link back to itself."""
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.txt").write_text("The vault combination is seven nine three.")
    folder = tmp_path_factory.mktemp("linked")
    (folder / "sub").mkdir()
    (folder / "ok.txt").write_text("Visitors sign in at the front desk.")
    (folder / "sub" / "evil.txt").symlink_to(outside / "secret.txt")
    (folder / "sub" / "loop").symlink_to(folder)
    return folder


def pdf_with_stream(content: bytes) -> bytes:
    data = zlib.compress(content, 9)
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d /Filter /FlateDecode >>\nstream\n" % len(data) + data + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1) + b"".join(b"%010d 00000 n \n" % o
                                                                             for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


@pytest.fixture(scope="module")
def client(tmp_path_factory, smollm2_int4, minilm_int8, docs, hostile, linked):
    folder = tmp_path_factory.mktemp("rag-daemon")
    broker = Broker(folder).start()
    d = DaemonProcess(folder, broker.port, smollm2_int4, device="rag1", env={
        "EDGELLM_EMBEDDING__PATH": str(minilm_int8), "EDGELLM_STORE__PATH": str(folder / "store.db"),
        "EDGELLM_STORE__INGEST_DIRS": json.dumps([str(docs), str(hostile), str(linked)]),
        "EDGELLM_STORE__MAX_FILE_MB": "1"}).start()
    with rpc(broker.port) as c:
        yield c
    assert d.stop() == 0
    broker.stop()


def test_ingest_a_folder_then_ask_with_citations(client, docs):
    r = client.call(TOPIC + "ingest", {"path": str(docs), "collection": "policies", "metadata": {"site": "hq"}})
    assert r["ok"] and r["documents"] == len(DOCUMENTS), r
    r = client.call(TOPIC + "ask", {"question": "How long is the pump under warranty?", "temperature": 0,
                                    "max_tokens": 60, "collection": "policies"})
    assert r["ok"], r
    assert r["citations"] and r["citations"][0]["source"] == str(docs / "en/pump.md")
    first = r["citations"][0]
    assert "24 months" in first["text"] and first["page"] == 1 and first["end"] > first["start"]
    assert "24 months" in r["answer"] and first["cited"]  # grounded (the default): copied from that sentence
    assert r["answer"] in DOCUMENTS["en/pump.md"][first["start"]:first["end"]]


@pytest.mark.slow
def test_a_long_ask_does_not_hold_up_search(client):
    """The answer is generated outside the store's lock: a search is served while an ask is still writing."""
    done, replies = client.send(TOPIC + "ask", {"question": "How long is the pump under warranty?",
                                                "temperature": 0, "max_tokens": 400, "ignore_eos": True,
                                                "collection": "policies", "mode": "free"})
    # retrieval is over once the answer decodes (400 tokens take seconds): search while it does
    wait_until(lambda: client.call(TOPIC + "status", {})["sequences"].get("decoding"), 60, "the answer's decoding")
    r = client.call(TOPIC + "search", {"query": "pump warranty", "collection": "policies"})
    assert r["ok"] and r["hits"]
    assert not done.is_set(), "the search waited for the whole answer"
    assert done.wait(120) and replies[0]["ok"], replies
    assert replies[0]["usage"]["completion_tokens"] == 400 and replies[0]["citations"]


def test_an_ask_past_its_deadline_stops_generating(client):
    started = time.monotonic()
    r = client.call(TOPIC + "ask", {"question": "How long is the pump under warranty?", "temperature": 0,
                                    "max_tokens": 2000, "ignore_eos": True, "collection": "policies",
                                    "deadline_ms": 1500, "mode": "free"})
    # 2000 tokens take 6 s or more even on a fast core
    assert (r.get("error") or {}).get("code") == "deadline_exceeded", r
    assert time.monotonic() - started < 3.5


def test_ask_without_relevant_passages_says_so(client):
    r = client.call(TOPIC + "ask", {"question": "What is the boiling point of mercury in kelvin?",
                                    "collection": "policies"})
    assert r["ok"] and r["citations"] == [] and r["answer"] == "The documents do not say."
    r = client.call(TOPIC + "ask", {"question": "¿Cuál es el punto de ebullición del mercurio?",
                                    "collection": "policies"})
    assert r["ok"] and r["citations"] == [] and r["answer"] == "Los documentos no lo dicen."


def test_inline_ingest_search_filter_and_delete(client):
    r = client.call(TOPIC + "ingest", {"text": "The parking garage closes at 22:00 on weekdays.",
                                       "source": "memo-7", "collection": "memos", "metadata": {"year": 2026}})
    assert r["ok"] and r["chunks"] == 1
    r = client.call(TOPIC + "search", {"query": "when does the parking close", "collection": "memos",
                                       "filter": {"year": 2026}})
    assert r["ok"] and r["hits"][0]["source"] == "memo-7" and r["hits"][0]["metadata"] == {"year": 2026}
    assert client.call(TOPIC + "search", {"query": "parking", "collection": "memos",
                                          "filter": {"year": 2025}})["hits"] == []
    assert client.call(TOPIC + "delete", {"source": "memo-7", "collection": "memos"})["deleted_chunks"] == 1
    assert client.call(TOPIC + "search", {"query": "parking", "collection": "memos"})["hits"] == []


def test_paths_outside_the_allowed_folders_are_refused(client, tmp_path):
    (tmp_path / "secret.txt").write_text("the root password")
    for path in (str(tmp_path / "secret.txt"), "/etc/passwd", str(ROOT / ".." / ".." / "etc")):
        r = client.call(TOPIC + "ingest", {"path": path})
        assert r["error"]["code"] == "bad_request" and "store.ingest_dirs" in r["error"]["message"]
    r = client.call(TOPIC + "ingest", {"text": "no source"})
    assert r["error"]["code"] == "bad_request" and "source" in r["error"]["message"]


def test_hostile_files_get_specific_errors(client, hostile):
    r = client.call(TOPIC + "ingest", {"path": str(hostile / "bomb.pdf")})
    assert r["error"]["code"] == "too_large" and "decompresses past the limit" in r["error"]["message"], r
    r = client.call(TOPIC + "ingest", {"path": str(hostile / "pipe.txt")}, timeout=30)
    assert r["error"]["code"] == "bad_request" and "FIFO" in r["error"]["message"], r
    r = client.call(TOPIC + "ingest", {"path": str(hostile / "huge.txt")})
    assert r["error"]["code"] == "too_large" and "store.max_file_mb" in r["error"]["message"], r
    r = client.call(TOPIC + "ingest", {"path": str(hostile / "binary.txt")})
    assert r["error"]["code"] == "unsupported_media" and "not text" in r["error"]["message"], r
    r = client.call(TOPIC + "ingest", {"path": str(hostile) + "/a\u0000b.txt"})
    assert r["error"]["code"] == "bad_request" and r["error"]["param"] == "path" and "NUL" in r["error"]["message"]
    r = client.call(TOPIC + "ingest", {"path": str(hostile), "collection": "hostile"})  # the folder: reported
    assert r["ok"] and r["documents"] == 0, r
    assert {(Path(x["path"]).name, x["code"]) for x in r["refused"]} == {
        ("bomb.pdf", "too_large"), ("huge.txt", "too_large"), ("binary.txt", "unsupported_media")}, r
    assert client.call(TOPIC + "status", {})["ok"]


def test_a_link_out_of_an_allowed_folder_is_not_followed(client, linked):
    r = client.call(TOPIC + "ingest", {"path": str(linked), "collection": "linked"})
    assert r["ok"] and r["documents"] == 1, r
    [refused] = r["refused"]
    assert refused["path"] == str(linked / "sub" / "evil.txt") and "outside the folders" in refused["reason"]
    r = client.call(TOPIC + "search", {"query": "vault combination", "collection": "linked"})
    assert r["ok"] and all("vault" not in h["text"] for h in r["hits"]), r
    r = client.call(TOPIC + "ingest", {"path": str(linked / "sub" / "evil.txt")})
    assert r["error"]["code"] == "bad_request" and "store.ingest_dirs" in r["error"]["message"], r


@pytest.mark.slow
def test_the_cli_refuses_huge_files_before_reading_them_and_keeps_to_its_ingest_dirs(tmp_path, minilm_int8,
                                                                                     linked):
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as f:  # 300 MB, sparse: reading it whole once took 15.9 GB of RSS
        f.truncate(300 << 20)

    def edgellm(*args):
        return subprocess.run([*EDGELLM, "ingest", *args, "--store", str(tmp_path / "s.db"),
                               "--embedding-model", str(minilm_int8)], cwd=ROOT, capture_output=True, text=True,
                              timeout=120)

    r = edgellm(str(huge))
    assert r.returncode == 1 and "300.0 MB; files over 32 MB are not ingested (store.max_file_mb)" in r.stderr
    r = edgellm(str(linked), "--ingest-dir", str(linked))
    assert r.returncode == 0 and "ingested 1 document(s)" in r.stdout and "1 file(s) left out" in r.stdout, r
    assert f"left out {linked / 'sub' / 'evil.txt'}" in r.stderr


@pytest.mark.slow
def test_cli_search_and_ask_json_carry_source_paths(tmp_path, minilm_int8, smollm2_int4, docs):
    def edgellm(*args):
        return subprocess.run([*EDGELLM, *args, "--store", str(tmp_path / "s.db"),
                               "--embedding-model", str(minilm_int8)], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)

    r = edgellm("ingest", str(docs / "fr"), str(docs / "es"))
    assert r.returncode == 0 and "ingested 12 document(s)" in r.stdout, r.stderr
    r = edgellm("search", "Quand le bail prend-il fin ?", "--json", "--k", "3")
    hits = json.loads(r.stdout)
    assert hits[0]["source"] == str(docs / "fr/bail.md") and len(hits) == 3
    table = edgellm("search", "Quand le bail prend-il fin ?", "--k", "1").stdout  # both scores, each labelled
    assert table.startswith(f"rank {hits[0]['score']:.4f}  cosine {hits[0]['similarity']:.2f}  "), table
    r = edgellm("ask", "¿Cuánto cuesta el alquiler del almacén?", "--json", "--model", str(smollm2_int4),
                "--temperature", "0", "--max-tokens", "40")
    out = json.loads(r.stdout)
    assert out["citations"][0]["source"] == str(docs / "es/alquiler.md")
    r = edgellm("search", "x", "--filter", "novalue")
    assert r.returncode == 2 and "--filter" in r.stderr
    # a reader that stops before the output comes (`| head`, here `| true`) ends the command quietly
    cmd = [*EDGELLM, "search", "bail", "--json", "--k", "5", "--store", str(tmp_path / "s.db"),
           "--embedding-model", str(minilm_int8)]
    piped = subprocess.run(" ".join(map(shlex.quote, cmd)) + " | true",
                           shell=True, executable="/bin/bash", cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert "Traceback" not in piped.stderr and "BrokenPipe" not in piped.stderr, piped.stderr


@pytest.mark.slow
def test_the_same_folder_from_another_directory_is_stored_once(tmp_path, minilm_int8, docs):
    """Sources are absolute paths; a store written when they were relative is adopted, not doubled."""
    from edgellm.daemon.retrieval.embedder import Embedder
    from edgellm.daemon.retrieval.store import DocumentInput, RetrievalStore

    store = tmp_path / "s.db"
    old = RetrievalStore(store, Embedder(minilm_int8))  # as the CLI stored it before: the path as typed
    old.ingest([DocumentInput("fr/bail.md", [(docs / "fr/bail.md").read_text()], "default", {})])
    old.close()

    def ingest(cwd, path):
        r = subprocess.run([*EDGELLM, "ingest", path, "--store", str(store), "--embedding-model", str(minilm_int8)],
                           cwd=cwd, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        return r.stdout

    first = ingest(docs, "fr")
    assert "1 unchanged" in first and "store now holds 6 documents" in first, first
    again = ingest(docs.parent, f"{docs.name}/fr")
    assert "ingested 0 document(s)" in again and "store now holds 6 documents" in again, again
    hits = subprocess.run([*EDGELLM, "search", "bail", "--json", "--store", str(store), "--embedding-model",
                           str(minilm_int8)], capture_output=True, text=True, timeout=300)
    assert {h["source"] for h in json.loads(hits.stdout)} <= {str(p) for p in (docs / "fr").glob("*.md")}


ANSWERS = {"ok", "bad_request", "too_large", "unsupported_media"}


@st.composite
def ingest_paths(draw, roots: list[Path]) -> str:
    """Named hostile files, and junk under the allowed folders: NUL, control characters, '..', links, loops."""
    root = str(draw(st.sampled_from(roots)))
    named = ["huge.txt", "binary.txt", "bomb.pdf", "pipe.txt", "sub/evil.txt", "sub/loop", "sub/loop/sub/evil.txt",
             "../../../etc/passwd", "", "ok.txt/..", "nope.txt"]
    tail = draw(st.sampled_from(named) | st.text(max_size=30))
    return root + "/" + tail


def test_fuzzed_ingest_paths_get_one_specific_answer_each(client, hostile, linked, docs):
    @settings(max_examples=examples(120), deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(path=ingest_paths([hostile, linked, docs / "en"]))
    def one(path: str) -> None:
        r = client.call(TOPIC + "ingest", {"path": path, "collection": "fuzzed"}, timeout=60)
        assert r["ok"] or r["error"]["code"] in ANSWERS, (path, r)
        for refused in r.get("refused", []):
            assert refused["code"] in ANSWERS, (path, refused)

    one()
    hits = client.call(TOPIC + "search", {"query": "vault combination seven nine three", "collection": "fuzzed"})
    assert hits["ok"] and all("vault" not in h["text"] for h in hits["hits"]), hits
    assert client.call(TOPIC + "status", {})["errors"].get("internal", 0) == 0

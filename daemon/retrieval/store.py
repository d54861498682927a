"""The local retrieval store: one SQLite file (apsw + sqlite-vec) with documents, chunks, FTS5 and vectors.

Every ingest is one transaction: a crash leaves the store exactly as it was (WAL). The embedding model's
identity is recorded on creation, and a store refuses vectors from any other model.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import apsw
import numpy as np
import sqlite_vec

from edgellm.daemon.errors import EdgeError
from edgellm.daemon.retrieval.chunking import chunk_text
from edgellm.daemon.retrieval.embedder import Embedder

RRF_K = 60
BIT_SEARCH_ABOVE = 20_000  # chunks; below this a float scan is fast enough
RERANK = 50  # bit candidates re-scored in float (recall@5 0.92 at 100k: docs/measured-facts.md, "sqlite-vec")


@dataclass
class DocumentInput:
    source: str
    pages: list[str]
    collection: str = "default"
    metadata: dict = field(default_factory=dict)


@dataclass
class Hit:
    chunk_id: int
    source: str
    collection: str
    page: int
    start: int
    end: int
    text: str
    score: float  # reciprocal rank fusion
    similarity: float | None  # cosine to the query, where the vector search found it
    keyword_rank: int | None  # rank in the BM25 list, where the keyword search found it
    metadata: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: v for k, v in vars(self).items()}


@dataclass
class IngestReport:
    documents: int = 0
    unchanged: int = 0
    chunks: int = 0
    refused: list[dict] = field(default_factory=list)  # files a folder held that were left out: path, code, reason


SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS documents(
    id INTEGER PRIMARY KEY, collection TEXT NOT NULL, source TEXT NOT NULL, sha256 TEXT NOT NULL,
    metadata TEXT NOT NULL DEFAULT '{{}}', pages INTEGER NOT NULL, UNIQUE(collection, source));
CREATE TABLE IF NOT EXISTS chunks(
    id INTEGER PRIMARY KEY, document_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
    seq INTEGER NOT NULL, page INTEGER NOT NULL, start INTEGER NOT NULL, end INTEGER NOT NULL, text TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_by_document ON chunks(document_id);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(text, tokenize='unicode61 remove_diacritics 2');
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_terms USING fts5vocab('chunks_fts', 'row');
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_vec USING vec0(
    chunk_id INTEGER PRIMARY KEY, collection TEXT PARTITION KEY, embedding float[{dim}] distance_metric=cosine);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_bits USING vec0(
    chunk_id INTEGER PRIMARY KEY, collection TEXT PARTITION KEY, embedding bit[{dim}]);
"""


def connect(path: Path) -> apsw.Connection:
    conn = apsw.Connection(str(path))
    conn.enable_load_extension(True)
    conn.load_extension(sqlite_vec.loadable_path())
    conn.enable_load_extension(False)
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON", "mmap_size=1073741824",
                   "busy_timeout=5000"):
        conn.execute(f"PRAGMA {pragma}").fetchall()  # apsw runs a statement only as its rows are read
    return conn


# A term in more than 5% of chunks (and more than 50) says little (low BM25 IDF) and costs a long posting-list
# scan: at 100k chunks, keeping terms up to 20% made keyword search 15 ms of a 27 ms query.
MAX_TERM_SHARE = 0.05
MIN_TERM_LIMIT = 50


def query_terms(text: str) -> list[str]:
    """Words as FTS5's unicode61 tokenizer with remove_diacritics indexes them."""
    folded = "".join(c for c in unicodedata.normalize("NFKD", text.lower()) if not unicodedata.combining(c))
    return list(dict.fromkeys(w for w in re.findall(r"\w+", folded) if len(w) > 2))


class RetrievalStore:
    def __init__(self, path: str | Path, embedder: Embedder):
        self.path = Path(path)
        self.embedder = embedder
        self._term_docs: dict[str, int] = {}  # document frequency per query term, valid until the next write
        self.conn = connect(self.path)
        identity = {"embedding_model": embedder.name, "embedding_dimension": str(embedder.dimension),
                    "embedding_sha256": embedder.manifest.files["model.onnx"].sha256}
        with self.conn:
            self.conn.execute(SCHEMA.format(dim=embedder.dimension)).fetchall()
            stored = dict(self.conn.execute("SELECT key, value FROM meta").fetchall())
            if not stored:
                self.conn.executemany("INSERT INTO meta VALUES (?, ?)", list(identity.items()))
        if stored and stored != identity:
            raise EdgeError("bad_request", f"{self.path} was built with embedding model {stored['embedding_model']} "
                            f"({stored['embedding_dimension']}-d); this one is {embedder.name} "
                            f"({embedder.dimension}-d). Use that model, or ingest into a new store")

    def close(self) -> None:
        self.conn.close()

    def count(self) -> dict[str, int]:
        docs, chunks = self.conn.execute("SELECT (SELECT count(*) FROM documents), (SELECT count(*) FROM chunks)"
                                         ).fetchone()
        return {"documents": docs, "chunks": chunks}

    # -- writing --------------------------------------------------------------------------------------
    def _check_vectors(self, vectors: np.ndarray) -> None:
        if vectors.ndim != 2 or vectors.shape[1] != self.embedder.dimension:
            raise EdgeError("bad_request", f"vectors have dimension {vectors.shape[-1]}; this store holds "
                            f"{self.embedder.dimension}-d vectors of {self.embedder.name}")

    def ingest(self, docs: list[DocumentInput], max_tokens: int = 200, overlap: int = 32,
               progress: Callable[[int, int], None] | None = None,
               embed_all: Callable[[list[str]], np.ndarray] | None = None) -> IngestReport:
        """Chunk, embed, then write everything in one transaction. `progress(done, total)` counts chunks.
        `embed_all` replaces the local embedder for the chunk texts (e.g. a Dask cluster, `edgellm batch embed`);
        its vectors must come from the same model, which the store checks by dimension."""
        report = IngestReport()
        tokenizer = self.embedder.tokenizer

        def count(text: str) -> int:
            return len(tokenizer.encode(text, add_special_tokens=False).ids)

        planned = []
        for doc in docs:
            digest = hashlib.sha256("\f".join(doc.pages).encode()).hexdigest()
            self._adopt_relative(doc, digest)
            row = self.conn.execute("SELECT sha256 FROM documents WHERE collection = ? AND source = ?",
                                    (doc.collection, doc.source)).fetchone()
            if row and row[0] == digest:
                report.unchanged += 1
                continue
            spans = [(page, span) for page, text in enumerate(doc.pages, 1)
                     for span in chunk_text(text, count, max_tokens, overlap)]
            planned.append((doc, digest, spans))
        texts = [doc.pages[page - 1][s.start:s.end] for doc, _, spans in planned for page, s in spans]
        vectors = np.zeros((0, self.embedder.dimension), dtype=np.float32)
        if texts and embed_all is not None:
            vectors = np.asarray(embed_all(texts), dtype=np.float32)
        elif texts:
            parts = []
            for i in range(0, len(texts), 64):
                parts.append(self.embedder.embed(texts[i:i + 64]))
                if progress:
                    progress(min(i + 64, len(texts)), len(texts))
            vectors = np.concatenate(parts)
        self._check_vectors(vectors)
        i = 0
        self._term_docs.clear()
        with self.conn:  # one transaction: all of it lands, or none
            for doc, digest, spans in planned:
                self._delete(doc.source, doc.collection)
                doc_id = self.conn.execute(
                    "INSERT INTO documents(collection, source, sha256, metadata, pages) VALUES (?, ?, ?, ?, ?) "
                    "RETURNING id", (doc.collection, doc.source, digest, json.dumps(doc.metadata), len(doc.pages))
                ).fetchone()[0]
                for seq, (page, s) in enumerate(spans):
                    text = doc.pages[page - 1][s.start:s.end]
                    chunk_id = self.conn.execute(
                        "INSERT INTO chunks(document_id, seq, page, start, end, text) VALUES (?, ?, ?, ?, ?, ?) "
                        "RETURNING id", (doc_id, seq, page, s.start, s.end, text)).fetchone()[0]
                    self.conn.execute("INSERT INTO chunks_fts(rowid, text) VALUES (?, ?)", (chunk_id, text))
                    blob = vectors[i].tobytes()
                    self.conn.execute("INSERT INTO chunks_vec(chunk_id, collection, embedding) VALUES (?, ?, ?)",
                                      (chunk_id, doc.collection, blob))
                    self.conn.execute("INSERT INTO chunks_bits(chunk_id, collection, embedding) "
                                      "VALUES (?, ?, vec_quantize_binary(vec_f32(?)))",
                                      (chunk_id, doc.collection, blob))
                    i += 1
                report.documents += 1
                report.chunks += len(spans)
        return report

    def _adopt_relative(self, doc: DocumentInput, digest: str) -> None:
        """Stores written before sources were absolute hold paths as typed (`docs/a.md`). A document now
        ingested as `/srv/docs/a.md` with the same text takes over such a row instead of being stored twice."""
        if not doc.source.startswith("/"):
            return
        with self.conn:
            for row_id, source in self.conn.execute(
                    "SELECT id, source FROM documents WHERE collection = ? AND sha256 = ? AND source NOT LIKE '/%'",
                    (doc.collection, digest)).fetchall():
                tail = "/" + "/".join(part for part in Path(source).parts if part != ".")
                if doc.source.endswith(tail) and not self.conn.execute(
                        "SELECT 1 FROM documents WHERE collection = ? AND source = ?",
                        (doc.collection, doc.source)).fetchone():
                    self.conn.execute("UPDATE documents SET source = ? WHERE id = ?", (doc.source, row_id))
                    return

    def _delete(self, source: str, collection: str) -> int:
        ids = [r[0] for r in self.conn.execute(
            "SELECT c.id FROM chunks c JOIN documents d ON d.id = c.document_id "
            "WHERE d.source = ? AND d.collection = ?", (source, collection))]
        for table in ("chunks_fts", "chunks_vec", "chunks_bits"):
            key = "rowid" if table == "chunks_fts" else "chunk_id"
            self.conn.executemany(f"DELETE FROM {table} WHERE {key} = ?", [(i,) for i in ids])
        self.conn.executemany("DELETE FROM chunks WHERE id = ?", [(i,) for i in ids])
        self.conn.execute("DELETE FROM documents WHERE source = ? AND collection = ?", (source, collection))
        return len(ids)

    def delete(self, source: str, collection: str = "default") -> int:
        """Remove a document and its chunks; returns how many chunks went."""
        self._term_docs.clear()
        with self.conn:
            return self._delete(source, collection)

    # -- reading --------------------------------------------------------------------------------------
    def _candidates(self, collection: str | None, filters: dict | None) -> str | None:
        """JSON list of chunk ids passing the metadata filter, or None for no filter."""
        if not filters:
            return None
        where, args = [], []
        for key, value in filters.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]+", str(key)):
                raise EdgeError("bad_request", f"filter: key '{key}' may only use letters, digits, '_', '.', '-'")
            where.append(f"json_extract(d.metadata, '$.{key}') = ?")
            args.append(value)
        if collection:
            where.append("d.collection = ?")
            args.append(collection)
        ids = [r[0] for r in self.conn.execute(
            f"SELECT c.id FROM chunks c JOIN documents d ON d.id = c.document_id WHERE {' AND '.join(where)}", args)]
        return json.dumps(ids)

    @staticmethod
    def _scope(where: list[str], args: list, collection: str | None, ids: str | None, collection_column: str,
               id_column: str) -> None:
        """Add the collection and metadata-filter (chunk ids) conditions to a query being built."""
        if collection:
            where.append(f"{collection_column} = ?")
            args.append(collection)
        if ids is not None:
            where.append(f"{id_column} IN (SELECT value FROM json_each(?))")
            args.append(ids)

    def _vector_search(self, query: np.ndarray, n: int, collection: str | None, ids: str | None,
                       mode: str) -> list[tuple[int, float]]:
        where, args = ["embedding MATCH ?", "k = ?"], [query.tobytes(), n]
        self._scope(where, args, collection, ids, "collection", "chunk_id")
        if mode == "auto":
            mode = "bit" if self.count()["chunks"] > BIT_SEARCH_ABOVE else "float"
        if mode == "float":
            rows = self.conn.execute(f"SELECT chunk_id, distance FROM chunks_vec WHERE {' AND '.join(where)}", args)
            return [(cid, 1.0 - dist) for cid, dist in rows]
        where[0] = "embedding MATCH vec_quantize_binary(vec_f32(?))"
        args[1] = max(n, RERANK)
        found = [cid for cid, _ in self.conn.execute(
            f"SELECT chunk_id, distance FROM chunks_bits WHERE {' AND '.join(where)}", args)]
        if not found:
            return []
        # point lookups: vec0 answers `chunk_id IN (...)` with a full scan (22 ms at 100k), `=` in ~8 µs
        rows = [(cid, self.conn.execute("SELECT embedding FROM chunks_vec WHERE chunk_id = ?", (cid,)).fetchone()[0])
                for cid in found]
        matrix = np.stack([np.frombuffer(blob, dtype=np.float32) for _, blob in rows])
        sims = matrix @ query / (np.linalg.norm(matrix, axis=1) * np.linalg.norm(query) + 1e-12)
        order = np.argsort(-sims)[:n]
        return [(rows[i][0], float(sims[i])) for i in order]

    def _informative_terms(self, text: str) -> list[str]:
        terms = query_terms(text)
        missing = [t for t in terms if t not in self._term_docs]
        if missing:  # fts5vocab counts by walking posting lists: remember counts until the next write
            counts = dict(self.conn.execute("SELECT term, doc FROM chunks_terms WHERE term IN "
                                            "(SELECT value FROM json_each(?))", (json.dumps(missing),)).fetchall())
            self._term_docs.update({t: counts.get(t, 0) for t in missing})
        limit = max(MIN_TERM_LIMIT, MAX_TERM_SHARE * self.count()["chunks"])
        return [t for t in terms if 0 < self._term_docs[t] <= limit]

    def _keyword_search(self, text: str, n: int, collection: str | None, ids: str | None) -> list[int]:
        terms = self._informative_terms(text)
        if not terms:
            return []
        where, args = ["chunks_fts MATCH ?"], [" OR ".join(f'"{t}"' for t in terms)]
        self._scope(where, args, collection, ids, "d.collection", "f.rowid")
        sql = (f"SELECT f.rowid FROM chunks_fts f JOIN chunks c ON c.id = f.rowid JOIN documents d "
               f"ON d.id = c.document_id WHERE {' AND '.join(where)} ORDER BY bm25(chunks_fts) LIMIT ?")
        return [r[0] for r in self.conn.execute(sql, [*args, n])]

    def search(self, query: str, k: int = 5, collection: str | None = None, filters: dict | None = None,
               mode: str = "auto") -> list[Hit]:
        """Hybrid search: vector KNN and FTS5 BM25, merged by reciprocal rank fusion."""
        if not query.strip():
            raise EdgeError("bad_request", "query: is empty")
        if mode not in ("auto", "float", "bit"):
            raise EdgeError("bad_request", "mode: use auto, float or bit")
        n = max(4 * k, 20)
        ids = self._candidates(collection, filters)
        vector = self.embedder.embed([query])[0]
        by_vector = self._vector_search(vector, n, collection, ids, mode)
        by_keyword = self._keyword_search(query, n, collection, ids)
        scores: dict[int, float] = {}
        for rank, (cid, _) in enumerate(by_vector):
            scores[cid] = scores.get(cid, 0.0) + 1.0 / (RRF_K + rank + 1)
        for rank, cid in enumerate(by_keyword):
            scores[cid] = scores.get(cid, 0.0) + 1.0 / (RRF_K + rank + 1)
        best = sorted(scores, key=scores.get, reverse=True)[:k]
        similarity = dict(by_vector)
        keyword_rank = {cid: r for r, cid in enumerate(by_keyword)}
        rows = {r[0]: r for r in self.conn.execute(
            "SELECT c.id, d.source, d.collection, c.page, c.start, c.end, c.text, d.metadata FROM chunks c "
            "JOIN documents d ON d.id = c.document_id WHERE c.id IN (SELECT value FROM json_each(?))",
            (json.dumps(best),))}
        return [Hit(cid, *rows[cid][1:7], score=round(scores[cid], 6), similarity=similarity.get(cid),
                    keyword_rank=keyword_rank.get(cid), metadata=json.loads(rows[cid][7])) for cid in best]

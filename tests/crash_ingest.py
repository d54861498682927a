"""Run by test_retrieval: an ingest whose process SIGKILLs itself inside the write transaction."""

import os
import signal
import sys

from edgellm.daemon.retrieval.embedder import Embedder
from edgellm.daemon.retrieval.store import DocumentInput, RetrievalStore


class DiesMidTransaction:
    """The real connection, except that the process kills itself after the 100th vector is written."""

    def __init__(self, conn):
        self.conn, self.vectors = conn, 0

    def __getattr__(self, name):
        return getattr(self.conn, name)

    def __enter__(self):
        return self.conn.__enter__()

    def __exit__(self, *exc):
        return self.conn.__exit__(*exc)

    def execute(self, sql, *args):
        if sql.startswith("INSERT INTO chunks_vec"):
            self.vectors += 1
            if self.vectors == 100:
                os.kill(os.getpid(), signal.SIGKILL)
        return self.conn.execute(sql, *args)


if __name__ == "__main__":
    store = RetrievalStore(sys.argv[1], Embedder(sys.argv[2]))
    store.conn = DiesMidTransaction(store.conn)
    paragraphs = lambda i: "\n\n".join(f"Paragraph {j} of document {i}: invoice {i}-{j} is due." for j in range(40))  # noqa: E731
    store.ingest([DocumentInput(f"d{i}.md", [paragraphs(i)]) for i in range(100)])

"""Local retrieval: documents read and chunked, embedded, stored in SQLite (apsw + sqlite-vec + FTS5),
searched, and answered from with citations."""

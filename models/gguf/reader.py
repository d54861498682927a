"""One parsed GGUF per file, however many parts of a build read it.

gguf's GGUFReader parses the metadata field by field in Python: about 4 s for SmolLM2's 49k-token vocabulary
on this machine, and a build reads the same file in six places (the source check, the architecture check,
preflight, the header, the block import, the weights). The cache is keyed by the file's identity (path, size,
modification time), so a file rewritten in place is parsed again; readers are only read from.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path


def gguf_reader(path: str | Path):
    path = Path(path).resolve()
    stat = path.stat()
    return _parsed(path, stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=4)
def _parsed(path: Path, size: int, mtime_ns: int):
    from gguf import GGUFReader

    return GGUFReader(path)

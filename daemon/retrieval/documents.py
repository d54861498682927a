"""Read what users ingest: plain text, Markdown, HTML and PDF (pypdf), as pages of text.

Everything read here may be hostile: a folder may hold links out of it, a file may be huge, or binary
named `.txt`. So a walk resolves every file it reaches and keeps only those inside the allowed folders, a
file over the size limit is refused before it is read, and text that is mostly invalid UTF-8 or control
characters is refused rather than stored as junk chunks.
"""

from __future__ import annotations

import html
import re
import stat
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from edgellm.daemon.errors import EdgeError
from edgellm.daemon.retrieval.store import DocumentInput

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".csv", ".log", ""}
HTML_SUFFIXES = {".html", ".htm"}
SUPPORTED = TEXT_SUFFIXES | HTML_SUFFIXES | {".pdf"}
MAX_FILE_BYTES = 32 * 2**20  # store.max_file_mb's default
NOT_TEXT_SHARE = 0.10  # invalid UTF-8 and control characters above this share: not text
_CONTROL = re.compile("[\x00-\x08\x0e-\x1f\x7f\ufffd]")  # tab, newlines, form feed and vertical tab are text


class _HTMLText(HTMLParser):
    """Visible text with block breaks; headings become Markdown headings so chunking breaks at them."""

    BLOCKS = {"p", "div", "section", "article", "li", "tr", "br", "table", "ul", "ol", "blockquote", "pre"}
    # not text: code and styling, and the page's chrome ("Home | About" would become a chunk of its own)
    SKIPPED = {"script", "style", "head", "noscript", "nav", "header", "footer"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIPPED:
            self._skip += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self.parts.append("\n\n" + "#" * int(tag[1]) + " ")
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in self.SKIPPED:
            self._skip = max(0, self._skip - 1)
        elif re.fullmatch(r"h[1-6]", tag) or tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(re.sub(r"[ \t\r\n]+", " ", data))


def html_to_text(source: str) -> str:
    parser = _HTMLText()
    parser.feed(source)
    text = html.unescape("".join(parser.parts))
    return re.sub(r"\n[ \t]+", "\n", re.sub(r"\n{3,}", "\n\n", text)).strip()


def read_pages(path: Path, max_bytes: int = MAX_FILE_BYTES) -> list[str]:
    """The document's text, one string per page (one page for everything but PDF). A file over `max_bytes`
    is refused (`too_large`) before a byte of it is read."""
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED:
        raise EdgeError("bad_request", f"{path}: cannot read {suffix} files; supported: .txt, .md, .html, .pdf")
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise EdgeError("too_large", f"{path}: {size / 2**20:.1f} MB; files over {max_bytes / 2**20:g} MB are "
                            "not ingested (store.max_file_mb)")
        if suffix == ".pdf":
            from pypdf import PdfReader
            from pypdf.errors import LimitReachedError, PyPdfError

            try:
                return [page.extract_text() or "" for page in PdfReader(path).pages]
            except LimitReachedError as e:  # a stream that would inflate past pypdf's limit (75 MB): a zip bomb
                raise EdgeError("too_large", f"{path}: a stream in this PDF decompresses past the limit "
                                f"({e})") from None
            except PyPdfError as e:
                raise EdgeError("bad_request", f"{path}: not a readable PDF ({e})") from None
        with path.open("rb") as f:
            raw = decode_text(f.read(max_bytes + 1), str(path))
    except OSError as e:
        raise EdgeError("bad_request", f"{path}: {e.strerror}") from None
    return [html_to_text(raw) if suffix in HTML_SUFFIXES else raw]


def decode_text(data: bytes, name: str) -> str:
    """UTF-8, or Windows-1252 for a legacy file whose bytes are not UTF-8; refused (`unsupported_media`) when
    too many of its characters are neither text nor valid: random binary scores about 60% here, a Latin-1
    letter read as UTF-8 about 3%."""
    text = data.decode("utf-8", errors="replace")
    bad = len(_CONTROL.findall(text))
    if text and bad / len(text) > NOT_TEXT_SHARE:
        raise EdgeError("unsupported_media", f"{name}: not text ({bad / len(text):.0%} of its characters are "
                        "invalid UTF-8 or control characters)")
    if "\ufffd" in text:
        legacy = data.decode("cp1252", errors="replace")
        if len(_CONTROL.findall(legacy)) < bad:
            return legacy
    return text


@dataclass
class Refused:
    path: str
    code: str
    reason: str


@dataclass
class Collected:
    """What a request's paths hold: the documents to ingest, and the files of its folders that were not read."""

    documents: list[DocumentInput] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)


def collect(paths: list[Path], collection: str = "default", metadata: dict | None = None,
            allowed: list[Path] | None = None, max_bytes: int = MAX_FILE_BYTES) -> Collected:
    """The documents under `paths`, named by their absolute paths (the same folder ingested from another
    directory is the same documents). With `allowed`, a path named outside those folders is refused, and a
    file a folder's walk reaches through a link out of them is left out and reported. A named file that
    cannot be read fails the request; a file in a folder that cannot be read is left out and reported."""
    roots = [d.resolve() for d in allowed] if allowed is not None else None
    out = Collected()
    for p in paths:
        named = resolved(p)
        if roots is not None and not inside(named, roots):
            raise EdgeError("bad_request", f"path: {p} is outside the folders this device may ingest "
                            "(store.ingest_dirs)", param="path")
        walked = named.is_dir()
        for f in find_files([named]):
            real = f.resolve()
            try:
                if roots is not None and not inside(real, roots):
                    raise EdgeError("bad_request", f"{f} links to {real}, outside the folders this device may "
                                    "ingest (store.ingest_dirs)")
                out.documents.append(DocumentInput(str(f), read_pages(real, max_bytes), collection,
                                                   dict(metadata or {})))
            except EdgeError as e:
                if not walked:
                    raise
                out.refused.append(Refused(str(f), e.code, e.message))
    return out


def resolved(p: Path) -> Path:
    try:
        return Path(p).resolve()
    except (ValueError, OSError) as e:  # a NUL byte, a link loop
        raise EdgeError("bad_request", f"path: {str(p)!r} is not a usable path ({e})", param="path") from None


def inside(path: Path, roots: list[Path]) -> bool:
    return any(path == d or path.is_relative_to(d) for d in roots)


def find_files(paths: list[Path]) -> list[Path]:
    """Files named, and supported files under folders named, in a stable order. Only regular files are read:
    opening a FIFO or a device would block or never end."""
    found: list[Path] = []
    for p in paths:
        try:
            mode = p.stat().st_mode
        except FileNotFoundError:
            raise EdgeError("bad_request", f"{p}: no such file or folder") from None
        except OSError as e:
            raise EdgeError("bad_request", f"{p}: {e.strerror}") from None
        if stat.S_ISDIR(mode):
            found.extend(sorted(f for f in p.rglob("*") if f.suffix.lower() in SUPPORTED and f.is_file()
                                and not any(part.startswith(".") for part in f.relative_to(p).parts)))
        elif stat.S_ISREG(mode):
            found.append(p)
        else:
            raise EdgeError("bad_request", f"{p}: is a {_kind(mode)}, not a regular file or a folder; only files "
                            "are ingested")
    return found


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"

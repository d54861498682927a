"""Read what users ingest: plain text, Markdown, HTML and PDF (pypdf), as pages of text."""

from __future__ import annotations

import html
import re
import stat
from html.parser import HTMLParser
from pathlib import Path

from edgellm.daemon.errors import EdgeError

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".csv", ".log", ""}
HTML_SUFFIXES = {".html", ".htm"}
SUPPORTED = TEXT_SUFFIXES | HTML_SUFFIXES | {".pdf"}


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


def read_pages(path: Path) -> list[str]:
    """The document's text, one string per page (one page for everything but PDF)."""
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED:
        raise EdgeError("bad_request", f"{path}: cannot read {suffix} files; supported: .txt, .md, .html, .pdf")
    try:
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
        raw = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise EdgeError("bad_request", f"{path}: {e.strerror}") from None
    return [html_to_text(raw) if suffix in HTML_SUFFIXES else raw]


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
            found.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUPPORTED
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

"""Downloads for the update agent over poor links: HTTP Range resume, retries with backoff, a bandwidth cap,
and a sha256 check of every chunk. A `file://` store (air-gapped sites, USB sticks) goes through the same path.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from edgellm.daemon import __version__
from edgellm.daemon.engine.manifest import sha256_file

log = logging.getLogger("edgellm.fetch")
BLOCK = 64 << 10


class FetchError(Exception):
    """A download that failed for good, after its retries; the message says which file and why."""


class Stopped(Exception):
    """The daemon is shutting down; the partial file stays for the next run to resume."""


@dataclass
class FetchOptions:
    retries: int = 5
    backoff: float = 1.0  # seconds, doubled per attempt, capped at 30
    timeout: float = 30.0
    max_bytes_per_second: int | None = None


class Fetcher:
    def __init__(self, base_url: str, options: FetchOptions, stop: threading.Event,
                 on_bytes: Callable[[int], None] = lambda n: None):
        self.base_url = base_url.rstrip("/")
        self.options = options
        self.stop = stop
        self.on_bytes = on_bytes
        self.transferred = 0
        self._window_start = time.monotonic()
        self._window_bytes = 0

    def get_bytes(self, rel: str, limit: int = 16 << 20) -> bytes:
        """A small file (manifest, signature), whole, with retries."""
        return self._retrying(rel, lambda: self._read_all(rel, limit))

    def get_chunk(self, rel: str, dest: Path, sha256: str, size: int) -> None:
        """Fetch into dest (resuming dest.part), check size and sha256, then rename into place."""
        part = dest.with_name(dest.name + ".part")

        def attempt() -> None:
            self._download(rel, part, size)
            digest = sha256_file(part)
            if part.stat().st_size != size or digest != sha256:
                part.unlink()
                raise _Corrupt(f"{rel}: the downloaded bytes do not match their sha256 (got {digest[:12]}…, "
                               f"want {sha256[:12]}…): the store or the link altered them")
            os.replace(part, dest)

        self._retrying(rel, attempt)

    # -- internals ------------------------------------------------------------------------------------
    def _retrying(self, rel: str, attempt: Callable):
        delay = self.options.backoff
        for n in range(self.options.retries + 1):
            if self.stop.is_set():
                raise Stopped()
            try:
                return attempt()
            except (OSError, urllib.error.URLError, _Corrupt) as e:
                if isinstance(e, urllib.error.HTTPError) and e.code == 404:
                    raise FetchError(f"{rel}: not in the store ({self.base_url}): HTTP 404") from None
                if n == self.options.retries:
                    raise FetchError(f"{rel}: {e} (after {n + 1} attempts)") from None
                log.warning("%s: %s; retrying in %.1f s", rel, e, delay)
                if self.stop.wait(delay):
                    raise Stopped() from None
                delay = min(delay * 2, 30.0)

    def _open(self, rel: str, offset: int = 0):
        """(stream, resumed) for the file at rel, from offset if the server honours Range."""
        url = f"{self.base_url}/{rel}"
        if urlparse(url).scheme == "file":
            f = open(unquote(urlparse(url).path), "rb")  # noqa: SIM115 (closed by the caller)
            f.seek(offset)
            return f, True
        request = urllib.request.Request(url, headers={"User-Agent": f"edgellm/{__version__}"})
        if offset:
            request.add_header("Range", f"bytes={offset}-")
        response = urllib.request.urlopen(request, timeout=self.options.timeout)  # noqa: S310 (http(s) only)
        return response, response.status == 206

    def _read_all(self, rel: str, limit: int) -> bytes:
        stream, _ = self._open(rel)
        with stream:
            data = stream.read(limit + 1)
        if len(data) > limit:
            raise FetchError(f"{rel}: larger than {limit} bytes; refusing it")
        self._count(len(data))
        return data

    def _download(self, rel: str, part: Path, size: int) -> None:
        have = part.stat().st_size if part.exists() else 0
        if have > size:
            part.unlink()
            have = 0
        if have == size:
            return
        stream, resumed = self._open(rel, have)
        with stream, open(part, "ab" if resumed else "wb") as out:
            while block := stream.read(BLOCK):
                if self.stop.is_set():
                    raise Stopped()
                out.write(block)
                out.flush()  # a kill -9 keeps what arrived, for the Range request of the next run
                self._count(len(block))

    def _count(self, n: int) -> None:
        self.transferred += n
        self.on_bytes(n)
        limit = self.options.max_bytes_per_second
        if limit:
            self._window_bytes += n
            ahead = self._window_bytes / limit - (time.monotonic() - self._window_start)
            if ahead > 0 and self.stop.wait(ahead):
                raise Stopped()


class _Corrupt(Exception):
    pass


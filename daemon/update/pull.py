"""`edgellm pull STORE_URL`: a signed bundle into the model library, on a device, without torch.

The same parts as an over-the-air update (edgellm/daemon/update/agent.py): the manifest's signature is
checked against the keys the caller trusts before anything else is fetched, chunks come over HTTP Range
with resume (or file://), every assembled file must match its sha256, and the model appears under its
library name only once it is whole. A URL names one bundle (`.../bundles/NAME/VERSION`) or a store, whose
`latest.json` then says which.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from edgellm.daemon.errors import CommandError, EdgeError
from edgellm.daemon.update.bundle import BUNDLE_FILE, BundleManifest, chunk_path, fetch_signed, load_public_key
from edgellm.daemon.update.fetch import Fetcher, FetchError, FetchOptions
from edgellm.daemon.update.slots import SlotStore, fsync_dir

SCHEMES = ("http://", "https://", "file://")


@dataclass(frozen=True)
class BundleAddress:
    store_url: str
    name: str | None  # None: the store's latest.json says
    version: str | None


def is_store_url(source: str) -> bool:
    return source.startswith(SCHEMES)


def parse_address(url: str) -> BundleAddress:
    """`http://host/store/bundles/NAME/VERSION[/bundle.json]`, or a store's base URL."""
    parts = url.rstrip("/").removesuffix(f"/{BUNDLE_FILE}").split("/")
    if len(parts) >= 3 and parts[-3] == "bundles":
        return BundleAddress("/".join(parts[:-3]) + "/", parts[-2], parts[-1])
    return BundleAddress(url.rstrip("/") + "/", None, None)


def pull_bundle(url: str, keys: list[Path], library_folder, force: bool = False,
                options: FetchOptions | None = None) -> tuple[BundleManifest, Path]:
    """Fetch, verify and assemble the bundle at `url` into `library_folder(name)` (name from --name or the
    bundle's own); returns its manifest and folder."""
    if not keys:
        raise CommandError("--key: a store URL needs the release's public key (the KEY.pub `edgellm keygen` "
                           "wrote); a bundle is only installed once its signature checks out")
    trusted = []
    for key in keys:
        try:
            trusted.append(load_public_key(Path(key).read_text()))
        except OSError as e:
            raise CommandError(f"--key: cannot read {key}: {e.strerror}") from None
    address = parse_address(url)
    fetcher = Fetcher(address.store_url, options or FetchOptions(retries=2, backoff=0.5), threading.Event())
    try:
        name, version = address.name, address.version
        if name is None:
            latest = json.loads(fetcher.get_bytes("latest.json"))
            name, version = latest["name"], latest["version"]
        manifest, body, signature = fetch_signed(fetcher.get_bytes, name, version, trusted)
    except FetchError as e:
        raise EdgeError("model_unavailable", f"{url}: {e}") from None
    except (ValueError, KeyError, TypeError):
        raise EdgeError("bad_request", f"{url}: latest.json is not a store's {{name, version}}") from None
    dest = library_folder(manifest.name)
    if dest.exists() and not force:
        raise CommandError(f"{manifest.name} is already in the library ({dest}); --force replaces it")
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = SlotStore(dest.parent / f".pull-{manifest.name}")  # kept on failure: the next pull resumes
    for sha, size in work.missing_chunks(manifest).items():
        try:
            fetcher.get_chunk(chunk_path(sha), work.downloads / sha, sha, size)
        except FetchError as e:
            raise EdgeError("model_unavailable", f"{url}: {e}") from None
    try:
        slot = work.assemble(manifest, body, signature)
    except ValueError as e:
        raise EdgeError("bad_request", f"{url}: {e}") from None
    _replace(dest, slot)
    shutil.rmtree(work.root, ignore_errors=True)
    return manifest, dest


def _replace(dest: Path, new: Path) -> None:
    """Put the assembled folder where the library looks, the old one (with --force) removed only after."""
    old = dest.with_name(f".old-{dest.name}")
    if dest.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dest, old)
    os.replace(new, dest)
    fsync_dir(dest.parent)
    shutil.rmtree(old, ignore_errors=True)

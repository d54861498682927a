"""The fleet bundle format, shared by the host that signs bundles and the devices that verify them.

A store is static files, so any web server (or a plain folder, for air-gapped sites) can serve it:

    chunks/ab/abcdef...            content-addressed: the name is the sha256 of the bytes
    deltas/ab/abcdef....BASE.zst   a changed chunk as its XOR with the parent's chunk BASE, zstd (optional)
    bundles/NAME/VERSION/bundle.json       the manifest (these exact bytes are signed)
    bundles/NAME/VERSION/bundle.json.sig   {"key_id", "signature"}: Ed25519, base64
    latest.json                            the last bundle built into this store

A model file is the concatenation of its chunks, in order. Chunks are cut where tensors start (host side),
so a tensor that did not change yields the same chunk and a device that holds it does not fetch it again.
A LoRA update's tuned weights may also come with a recipe (`remerge`): the device computes their chunks from
the parent's blocks and the LoRA's factors (edgellm/daemon/update/remerge.py) and fetches only the factors.
"""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Callable
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_serializer

from edgellm.daemon.errors import EdgeError
from edgellm.daemon.formats import NAME_PATTERN, StrictModel

BUNDLE_FILE = "bundle.json"
SIGNATURE_FILE = "bundle.json.sig"
FORMAT = "edgellm-bundle/1"
SHA256 = r"^[0-9a-f]{64}$"



def _without_none(out: dict, key: str) -> dict:
    """A serialized model without an optional field it does not use, so older manifests keep their bytes."""
    if out.get(key) is None:
        out.pop(key, None)
    return out


class Delta(StrictModel):
    """The chunk is also in the store as a delta (edgellm/daemon/update/delta.py) against `base`, the chunk at
    the same place in the parent version: a device that holds `base` fetches `size` bytes instead."""

    base: str = Field(pattern=SHA256)
    size: int = Field(gt=0)


class Piece(StrictModel):
    """`size` bytes at `offset` inside chunk `sha256` of the parent version."""

    sha256: str = Field(pattern=SHA256)
    offset: int = Field(ge=0)
    size: int = Field(gt=0)


class RowChange(StrictModel):
    """LoRA factors (tensors `up` and `down` of the remerge file) added to rows from `start`."""

    start: int = Field(ge=0)
    up: str
    down: str


class RemergedWeight(StrictModel):
    """A node's 4-bit weight as the parent's blocks of the same node with some rows merged and rounded again
    (edgellm/daemon/update/remerge.py): `base` locates the parent's q, scales and offsets; `at` says where the
    new ones start in `file`. A device holding the base computes these bytes instead of fetching them."""

    rows: int = Field(gt=0)
    cols: int = Field(gt=0)
    block: int = Field(32, gt=0)
    base: dict[Literal["q", "scales", "offsets"], list[Piece]]
    file: str
    at: dict[Literal["q", "scales", "offsets"], int]
    changes: list[RowChange] = Field(min_length=1)


class Remerge(StrictModel):
    factors: str = Field(description="the bundle file holding the LoRA factors")
    weights: list[RemergedWeight]


class Chunk(StrictModel):
    sha256: str = Field(pattern=SHA256)
    size: int = Field(gt=0)
    delta: Delta | None = None

    @model_serializer(mode="wrap")
    def _without_empty_delta(self, handler):  # most chunks have none: keep the manifest as it was
        return _without_none(handler(self), "delta")


class BundleFile(StrictModel):
    path: str = Field(pattern=r"^[A-Za-z0-9_.-][A-Za-z0-9_./-]*$", max_length=255,
                      description="relative to the slot; no '..', '.' or empty segments")
    size: int = Field(ge=0)
    sha256: str = Field(pattern=SHA256)
    chunks: list[Chunk]

    @field_validator("path")
    @classmethod
    def _inside_the_slot(cls, path: str) -> str:
        """A signed manifest still must not write outside its slot: refuse it before anything is fetched."""
        if any(part in ("", ".", "..") for part in path.split("/")):
            raise ValueError(f"{path!r} must be a plain relative path: no '..', '.' or empty segments")
        return path


class GoldenPrompt(StrictModel):
    """A prompt the device must answer as the host did, greedily: exactly, or with schema-valid JSON."""

    prompt: str
    raw: bool = Field(False, description="skip the chat template")
    max_tokens: int = Field(24, gt=0, le=512)
    expected: str | None = None
    json_schema: dict | None = None


class SmokeTest(StrictModel):
    golden: list[GoldenPrompt] = Field(default_factory=list)
    eval_file: str | None = Field(None, description="bundle file whose perplexity is measured on the device")
    max_perplexity: float | None = Field(None, gt=0)


class Lineage(StrictModel):
    base_model: str | None = None
    source_sha256: str | None = None
    adapter: dict | None = None
    training_data_sha256: str | None = None
    training: dict | None = None
    evaluation: dict | None = None
    license: str | None = None


class BundleManifest(StrictModel):
    format: Literal["edgellm-bundle/1"] = FORMAT
    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=NAME_PATTERN)
    parent: str | None = Field(None, description="the version this one was built to replace")
    created_at: float = Field(default_factory=time.time)
    files: list[BundleFile]
    smoke: SmokeTest = SmokeTest()
    lineage: Lineage = Lineage()
    remerge: Remerge | None = Field(None, description="tuned weights a device holding the parent computes")

    @model_serializer(mode="wrap")
    def _without_empty_remerge(self, handler):  # most bundles have none: keep the manifest as it was
        return _without_none(handler(self), "remerge")

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def unique_chunks(self) -> dict[str, int]:
        return {c.sha256: c.size for f in self.files for c in f.chunks}

    def deltas(self) -> dict[str, Delta]:
        return {c.sha256: c.delta for f in self.files for c in f.chunks if c.delta is not None}


class Signature(StrictModel):
    key_id: str
    signature: str = Field(description="base64 Ed25519 signature of the bundle.json bytes")


class DesiredState(StrictModel):
    """What a group (or one device) should run; published retained by `edgellm bundle publish`."""

    id: str = Field(pattern=NAME_PATTERN, description="one per publication; a device acts on each id once")
    store_url: str = Field(description="http(s):// or file:// base of the bundle store")
    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=NAME_PATTERN)
    percent: float = Field(100.0, ge=0, le=100)
    published_at: float = Field(default_factory=time.time)
    allow_downgrade: Signature | None = Field(None, description="a release key's signature of downgrade_statement"
                                              "(): this publication may replace a newer version with this one")


def downgrade_statement(desired: DesiredState) -> bytes:
    """What a release key signs to allow one publication to go back to an older version. It names the
    publication's id, so the permission cannot be moved to another publication."""
    return f"edgellm-allow-downgrade/1\n{desired.id}\n{desired.name}\n{desired.version}\n".encode()


def is_older(candidate: BundleManifest, active: BundleManifest) -> bool:
    """Whether `candidate` would take the device back in its bundle's history. Versions made by `bundle build`
    are numbers; other version strings are ordered by the signed creation time."""
    if candidate.name != active.name or candidate.version == active.version:
        return False
    if candidate.version.isdigit() and active.version.isdigit():
        return int(candidate.version) < int(active.version)
    return candidate.created_at < active.created_at


def bundle_path(name: str, version: str, file: str = BUNDLE_FILE) -> str:
    return f"bundles/{name}/{version}/{file}"


def delta_path(sha256: str, base: str) -> str:
    return f"deltas/{sha256[:2]}/{sha256}.{base[:16]}.zst"


def chunk_path(sha256: str) -> str:
    return f"chunks/{sha256[:2]}/{sha256}"


def key_id(public_raw: bytes) -> str:
    return hashlib.sha256(public_raw).hexdigest()[:16]


def rollout_bucket(device_id: str) -> float:
    """A stable place in [0, 100) for a device: percent P reaches the devices below P, and raising P only adds."""
    return int.from_bytes(hashlib.sha256(device_id.encode()).digest()[:8], "big") / 2**64 * 100


def in_rollout(device_id: str, percent: float) -> bool:
    return percent >= 100 or rollout_bucket(device_id) < percent


def load_public_key(text: str):
    """An Ed25519 public key from PEM, or from the raw 32 bytes in base64."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    text = text.strip()
    if text.startswith("-----BEGIN"):
        key = load_pem_public_key(text.encode())
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("not an Ed25519 public key")
        return key
    return Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))


def public_raw(key) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def verify_signature(data: bytes, sig: Signature, trusted: list, what: str = "bundle.json") -> None:
    """Raise EdgeError unless `sig` is a trusted key's signature of `data`."""
    from cryptography.exceptions import InvalidSignature

    try:
        raw_sig = base64.b64decode(sig.signature, validate=True)
    except ValueError as e:
        raise EdgeError("bad_request", f"signature: unreadable signature of {what}: {e}") from None
    keys = {key_id(public_raw(k)): k for k in trusted}
    if sig.key_id not in keys:
        raise EdgeError("bad_request", f"signature: {what} is signed by key {sig.key_id}, which is not among this "
                        f"device's trusted keys ({', '.join(sorted(keys)) or 'none configured'})")
    try:
        keys[sig.key_id].verify(raw_sig, data)
    except InvalidSignature:
        raise EdgeError("bad_request", f"signature: {what} does not match its signature by key {sig.key_id}: "
                        "it was altered after signing") from None


def verify_bundle(manifest_bytes: bytes, signature_bytes: bytes, trusted: list) -> BundleManifest:
    """The manifest, parsed only once its signature checks out against one of the trusted public keys."""
    try:
        sig = Signature.model_validate_json(signature_bytes)
    except ValidationError as e:
        raise EdgeError("bad_request", f"signature: unreadable signature file: {e}") from None
    verify_signature(manifest_bytes, sig, trusted)
    try:
        return BundleManifest.model_validate_json(manifest_bytes)
    except ValidationError as e:
        raise EdgeError("bad_request", f"bundle.json: signed but not a valid manifest: {e}") from None
def fetch_signed(get_bytes: Callable[[str], bytes], name: str, version: str,
                 trusted: list) -> tuple[BundleManifest, bytes, bytes]:
    """A store's bundle.json for NAME VERSION and its signature, verified before anything else is fetched, and
    signed for that name and version (a validly signed manifest of another bundle is refused too). What the
    update agent and `edgellm pull URL` both start with; `get_bytes` fetches a store path."""
    body = get_bytes(bundle_path(name, version))
    signature = get_bytes(bundle_path(name, version, SIGNATURE_FILE))
    manifest = verify_bundle(body, signature, trusted)
    if (manifest.name, manifest.version) != (name, version):
        raise EdgeError("bad_request", f"bundle.json: signed for {manifest.name} {manifest.version}, not for "
                        f"{name} {version}")
    return manifest, body, signature

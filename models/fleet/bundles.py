"""Host side of fleet updates: Ed25519 keys, chunked signed bundles in a static store, publishing desired state.

Chunking: an ONNX model's external data file is cut where each tensor starts (small neighbours grouped,
big tensors split), so a LoRA merge that rewrites only q/v projections changes only their chunks. Every other
file is cut every CHUNK_MAX bytes.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import os
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from edgellm.daemon.engine.manifest import MANIFEST_NAME, load_manifest
from edgellm.daemon.update.bundle import (
    BUNDLE_FILE,
    SIGNATURE_FILE,
    BundleFile,
    BundleManifest,
    Chunk,
    Delta,
    DesiredState,
    GoldenPrompt,
    Lineage,
    Signature,
    SmokeTest,
    bundle_path,
    chunk_path,
    delta_path,
    downgrade_statement,
    key_id,
    public_raw,
)
from edgellm.daemon.update.slots import write_atomic
from edgellm.models.errors import BuildError

CHUNK_MAX = 4 << 20
DELTA_MAX_SHARE = 0.8  # a delta is kept only where it saves a fifth of the chunk or more
CHUNK_MIN = 4 << 10  # tensors smaller than this (norms, biases) share a chunk with their neighbours
SMOKE_FILE = "smoke_eval.txt"
SMOKE_TOKENS = 256
DEFAULT_GOLDEN = ["The capital of France is", "List three colours:"]


# -- keys -------------------------------------------------------------------------------------------
def keygen(private_path: Path, force: bool = False) -> str:
    """Write an Ed25519 private key (PEM, mode 0600) and KEY.pub beside it; returns the key id."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

    private_path = Path(private_path)
    public_path = private_path.with_name(private_path.name + ".pub")
    if not force and (private_path.exists() or public_path.exists()):
        raise BuildError(f"--out: {private_path} or its .pub exists; pass --force to replace the key pair "
                         "(devices trusting the old public key will refuse bundles signed by the new one)")
    key = Ed25519PrivateKey.generate()
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
    public_path.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    return key_id(public_raw(key.public_key()))


def load_private_key(path: Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError) as e:
        raise BuildError(f"--key: cannot read an Ed25519 private key from {path}: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BuildError(f"--key: {path} is not an Ed25519 key; make one with `edgellm keygen`")
    return key


def sign(manifest_bytes: bytes, key) -> bytes:
    sig = Signature(key_id=key_id(public_raw(key.public_key())),
                    signature=base64.b64encode(key.sign(manifest_bytes)).decode())
    return sig.model_dump_json().encode()


# -- chunking ---------------------------------------------------------------------------------------
@dataclass
class Boundaries:
    """Where tensors start and end in one external data file (and where each stacked matrix's rows start)."""

    starts: set[int] = field(default_factory=set)
    ends: set[int] = field(default_factory=set)


def tensor_boundaries(folder: Path) -> dict[str, Boundaries]:
    """Per external data file of every ONNX model in the folder: offsets where each tensor begins and ends, and
    inside a weight that stacks several matrices (the fused graph's q/k/v and gate/up, ROW_SLICES_KEY), where
    each matrix's rows begin."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    from edgellm.models.building.fused_graph import ROW_SLICES_KEY

    found: dict[str, Boundaries] = {}
    for model_path in folder.glob("*.onnx"):
        model = onnx.load(str(model_path), load_external_data=False)
        meta = {p.key: p.value for p in model.metadata_props}
        slices: dict[str, list[int]] = json.loads(meta.get(ROW_SLICES_KEY, "{}"))
        for tensor in model.graph.initializer:
            if uses_external_data(tensor):
                info = ExternalDataInfo(tensor)
                offset, length = int(info.offset or 0), int(info.length or 0)
                b = found.setdefault(info.location, Boundaries())
                b.starts.add(offset)
                if length:
                    b.ends.add(offset + length)
                rows = slices.get(tensor.name.rsplit("/", 1)[0])
                if rows and tensor.dims and tensor.dims[0] == sum(rows) and length:
                    row_bytes = length // sum(rows)
                    b.starts.update(offset + row_bytes * r for r in itertools.accumulate(rows[:-1]))
    return found


def cut_points(size: int, b: Boundaries) -> list[int]:
    """Chunk boundaries at tensor starts and ends, grouping small tensors, splitting big ones every CHUNK_MAX.
    Alignment padding between two tensors is a chunk of its own, so neither tensor's chunk changes with what
    comes after or before it (and a device can compute a tensor's chunks, edgellm/daemon/update/remerge.py)."""
    points = [0]
    for point in sorted(p for p in b.starts | b.ends | {size} if 0 < p <= size):
        while point - points[-1] > CHUNK_MAX:
            points.append(points[-1] + CHUNK_MAX)
        padding = points[-1] in b.ends and point in b.starts
        if point - points[-1] >= CHUNK_MIN or point == size or padding:
            points.append(point)
    return points if points[-1] == size else [*points, size]


def chunk_file(path: Path, boundaries: Boundaries, store: Path, name: str | None = None) -> BundleFile:
    """Write the file's chunks into the store (each once, by content) and describe the file as `name` (its
    path in the model folder, e.g. adapters/NAME/adapter_model.safetensors; default its file name)."""
    size = path.stat().st_size
    whole = hashlib.sha256()
    chunks = []
    with open(path, "rb") as f:
        points = cut_points(size, boundaries) if size else [0]
        for begin, end in zip(points, points[1:], strict=False):
            data = f.read(end - begin)
            whole.update(data)
            digest = hashlib.sha256(data).hexdigest()
            write_once(store / chunk_path(digest), data)
            chunks.append(Chunk(sha256=digest, size=len(data)))
    return BundleFile(path=name or path.name, size=size, sha256=whole.hexdigest(), chunks=chunks)


def add_deltas(files: list[BundleFile], parent: BundleManifest, store: Path) -> None:
    """For each chunk the parent does not have, a delta against the parent's chunk at the same place in the
    same file, where that is much smaller than the chunk (edgellm/daemon/update/delta.py)."""
    from edgellm.daemon.update.delta import make_delta

    have = parent.unique_chunks()
    for f in files:
        old = next((p for p in parent.files if p.path == f.path), None)
        if old is None:
            continue
        at = {}
        offset = 0
        for c in old.chunks:
            at[(offset, c.size)] = c.sha256
            offset += c.size
        offset = 0
        for c in f.chunks:
            base = at.get((offset, c.size))
            offset += c.size
            if c.sha256 in have or base is None:
                continue
            delta = make_delta((store / chunk_path(c.sha256)).read_bytes(), (store / chunk_path(base)).read_bytes())
            if len(delta) < DELTA_MAX_SHARE * c.size:
                write_once(store / delta_path(c.sha256, base), delta)
                c.delta = Delta(base=base, size=len(delta))


def write_once(path: Path, data: bytes) -> None:
    """Content-addressed files never change: write one only if it is missing."""
    if not path.exists():
        write_atomic(path, data)


# -- building ---------------------------------------------------------------------------------------
@dataclass
class BundleOptions:
    name: str | None = None
    version: str | None = None
    parent: str | None = None
    golden: Path | None = None
    evaluation: Path | None = None
    ppl_tolerance: float = 0.02


def build_bundle(model_dir: Path, store: Path, key_path: Path, options: BundleOptions) -> BundleManifest:
    model_dir, store = Path(model_dir), Path(store)
    model = load_manifest(model_dir, verify_hashes=True)
    key = load_private_key(key_path)
    name = options.name or model.name
    version = options.version or _next_version(store, name)
    if (store / bundle_path(name, version)).exists():
        raise BuildError(f"--version: bundle {name} {version} is already in {store}; bundles never change, "
                         "choose a new version")
    parent = options.parent or _latest_version(store, name)
    smoke, smoke_text = _smoke_test(model_dir, options)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / SMOKE_FILE).write_text(smoke_text)
        boundaries = tensor_boundaries(model_dir)
        files = [chunk_file(model_dir / n, boundaries.get(n, Boundaries()), store, n)
                 for n in [*model.files, MANIFEST_NAME]]
        files.append(chunk_file(Path(tmp) / SMOKE_FILE, Boundaries(), store))
    remerge = None
    if parent and (store / bundle_path(name, parent)).is_file():
        from edgellm.models.fleet.bundle_remerge import remerge_recipe

        parent_manifest = read_bundle(store, name, parent)
        add_deltas(files, parent_manifest, store)
        remerge = remerge_recipe(model_dir, parent_manifest, store)
    manifest = BundleManifest(name=name, version=version, parent=parent, files=files, smoke=smoke,
                              lineage=_lineage(model, options), remerge=remerge)
    body = manifest.model_dump_json(indent=2).encode() + b"\n"
    folder = store / bundle_path(name, version, "")
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / SIGNATURE_FILE, sign(body, key))
    write_atomic(folder / BUNDLE_FILE, body)  # last: a bundle.json without its signature never appears
    write_atomic(store / "latest.json", json.dumps({"name": name, "version": version}).encode() + b"\n")
    return manifest


def _versions(store: Path, name: str) -> list[str]:
    folder = store / "bundles" / name
    found = [p.name for p in folder.iterdir() if (p / BUNDLE_FILE).is_file()] if folder.is_dir() else []
    return sorted(found, key=lambda v: (0, int(v), "") if v.isdigit() else (1, 0, v))


def _latest_version(store: Path, name: str) -> str | None:
    versions = _versions(store, name)
    return versions[-1] if versions else None


def _next_version(store: Path, name: str) -> str:
    numbers = [int(v) for v in _versions(store, name) if v.isdigit()]
    return str(max(numbers, default=0) + 1)


def _smoke_test(model_dir: Path, options: BundleOptions) -> tuple[SmokeTest, str]:
    """Golden prompts (expected outputs filled in from this model where none are given) and a perplexity
    bound, both measured here with the device's own engine so the device can be held to them."""
    from edgellm.daemon.engine.generate import Generator
    from edgellm.daemon.engine.model import LoadedModel
    from edgellm.daemon.engine.params import GenerationParams
    from edgellm.daemon.engine.perplexity import perplexity
    from edgellm.models.building.options import eval_text

    golden = _read_golden(options.golden) if options.golden else [GoldenPrompt(prompt=p) for p in DEFAULT_GOLDEN]
    generator = Generator(LoadedModel.load(model_dir))
    for g in golden:
        if g.expected is None and g.json_schema is None:
            params = GenerationParams(max_tokens=g.max_tokens, temperature=0)
            # solo, as the device's smoke test computes it (daemon/update/smoke.py): no prefix, no draft
            result = generator.generate(generator.prompt_ids(g.prompt, raw=g.raw), params, solo=True)
            g.expected = result.text
    ids = generator.model.encode(eval_text())[:SMOKE_TOKENS]
    text = generator.model.tokenizer.decode(ids, skip_special_tokens=True)
    ppl, _ = perplexity(generator.model, text)
    return SmokeTest(golden=golden, eval_file=SMOKE_FILE,
                     max_perplexity=round(ppl * (1 + options.ppl_tolerance), 4)), text


def _read_golden(path: Path) -> list[GoldenPrompt]:
    from pydantic import ValidationError

    golden = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                golden.append(GoldenPrompt.model_validate_json(line))
            except ValidationError as e:
                raise BuildError(f"--golden: line {n} of {path}: {e}") from None
    return golden


def _lineage(model, options: BundleOptions) -> Lineage:
    trained = model.lineage or {}
    evaluation = json.loads(Path(options.evaluation).read_text()) if options.evaluation else None
    if evaluation is None and model.quality is not None:
        evaluation = {"perplexity": model.quality.model_dump()}
    training = trained.get("training") or {}
    return Lineage(base_model=trained.get("base") or model.source.ref, source_sha256=model.source.sha256,
                   adapter=trained.get("adapter"), training_data_sha256=training.get("data_sha256"),
                   training=training or None, evaluation=evaluation, license=model.license or trained.get("license"))


# -- publishing -------------------------------------------------------------------------------------
def desired_state(store: Path, store_url: str, name: str | None, version: str | None, percent: float,
                  downgrade_key: Path | None = None) -> DesiredState:
    """The desired state for a bundle in the store (default: the latest built). With `downgrade_key`, it
    carries that release key's permission to replace a newer version on the devices (a deliberate rollback)."""
    store = Path(store)
    if name is None or version is None:
        latest_path = store / "latest.json"
        if not latest_path.is_file():
            raise BuildError(f"--store: {store} holds no bundle yet; build one with `edgellm bundle build`")
        latest = json.loads(latest_path.read_text())
        name, version = name or latest["name"], version or (latest["version"] if name in (None, latest["name"])
                                                             else _latest_version(store, name))
    if not (store / bundle_path(name, version)).is_file():
        raise BuildError(f"--version: {store} has no bundle {name} {version}")
    desired = DesiredState(id=uuid.uuid4().hex[:16], store_url=store_url.rstrip("/"), name=name, version=version,
                           percent=percent)
    return _allowing_downgrade(desired, downgrade_key)


def reissue(desired: DesiredState, downgrade_key: Path | None = None) -> DesiredState:
    """The same desired state as a new publication (a new id, so every device acts on it again): how an
    aborted rollout puts a group back. With `downgrade_key`, devices that moved past it may go back."""
    again = desired.model_copy(update={"id": uuid.uuid4().hex[:16], "published_at": time.time(),
                                       "allow_downgrade": None})
    return _allowing_downgrade(again, downgrade_key)


def _allowing_downgrade(desired: DesiredState, downgrade_key: Path | None) -> DesiredState:
    if downgrade_key is not None:
        desired.allow_downgrade = Signature.model_validate_json(sign(downgrade_statement(desired),
                                                                     load_private_key(downgrade_key)))
    return desired


def read_bundle(store: Path, name: str, version: str) -> BundleManifest:
    return BundleManifest.model_validate_json((Path(store) / bundle_path(name, version)).read_bytes())

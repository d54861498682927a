"""The host half of re-merged updates (edgellm/daemon/update/remerge.py): a bundle's recipe for the tuned
weights a device computes from its parent's blocks and the LoRA's factors instead of fetching them.

`model build` of a LoRA merge of a GGUF base writes the factors (remerge.safetensors) and names the nodes
(REMERGE_KEY in the graph). Here each node's initializers are located in the new model's data file and in the
parent bundle's chunks, and the recipe is run on the parent's bytes as a device will run it: a weight whose
result is not byte for byte the built one is left out of the recipe (devices then fetch it as before).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from edgellm.daemon.engine.model import MODEL_FILE
from edgellm.daemon.update.bundle import (
    BundleManifest,
    Piece,
    Remerge,
    RemergedWeight,
    RowChange,
    chunk_path,
)
from edgellm.daemon.update.remerge import compute_weight, factor_name, load_factors
from edgellm.models.building.fused_graph import REMERGE_FILE, REMERGE_KEY

log = logging.getLogger("edgellm.bundle")
Span = tuple[str, int, int]  # (external data file, offset, length)


def remerge_recipe(model_dir: Path, parent: BundleManifest, store: Path) -> Remerge | None:
    import onnx

    if not (model_dir / REMERGE_FILE).is_file():
        return None
    model = onnx.load(str(model_dir / MODEL_FILE), load_external_data=False)
    nodes: dict[str, list[int]] = json.loads({p.key: p.value for p in model.metadata_props}.get(REMERGE_KEY, "{}"))
    old_graph = next((f for f in parent.files if f.path == MODEL_FILE), None)
    if not nodes or old_graph is None:
        return None
    old_model = onnx.load_from_string(b"".join((store / chunk_path(c.sha256)).read_bytes() for c in old_graph.chunks))
    new_at, old_at = _spans(model), _spans(old_model)
    factors = load_factors((model_dir / REMERGE_FILE).read_bytes())
    weights = []
    for node, first_rows in nodes.items():
        roles = {"q": f"{node}/q4", "scales": f"{node}/scales", "offsets": f"{node}/offsets"}
        new = {role: new_at[name][0] for role, name in roles.items() if name in new_at}
        old = {role: old_at[name][0] for role, name in roles.items() if name in old_at}
        pieces = {role: _pieces(parent, span) for role, span in old.items()}
        stored = {"q", "scales"} <= new.keys() and {"q", "scales"} <= old.keys()  # (a tiny tensor is inline)
        if not stored or len({s[0] for s in new.values()}) != 1 or None in pieces.values():
            log.info("remerge: %s has no matching weight in %s %s; devices fetch it", node, parent.name, parent.version)
            continue
        rows, blocks, half = new_at[roles["q"]][1]
        weight = RemergedWeight(
            rows=rows, cols=blocks * half * 2, block=half * 2, base=pieces, file=new["q"][0],
            at={role: span[1] for role, span in new.items()},
            changes=[RowChange(start=s, up=factor_name(node, s, "up"), down=factor_name(node, s, "down"))
                     for s in first_rows])
        try:
            computed = compute_weight(weight, factors, lambda p: _piece_bytes(store, p))
        except (KeyError, ValueError) as e:
            log.warning("remerge: %s: %s; devices fetch it", node, e)
            continue
        if computed != {role: _read(model_dir, span) for role, span in new.items()}:
            log.warning("remerge: %s computed from %s %s is not the built weight; devices fetch it", node,
                        parent.name, parent.version)
            continue
        weights.append(weight)
    return Remerge(factors=REMERGE_FILE, weights=weights) if weights else None


def _spans(model) -> dict[str, tuple[Span, list[int]]]:
    """initializer name -> (where its bytes are, its dims), for those in external data files."""
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    found = {}
    for tensor in model.graph.initializer:
        if uses_external_data(tensor):
            info = ExternalDataInfo(tensor)
            found[tensor.name] = ((info.location, int(info.offset or 0), int(info.length or 0)), list(tensor.dims))
    return found


def _pieces(parent: BundleManifest, span: Span) -> list[Piece] | None:
    """The parent's chunks that hold `span` of one of its files, as pieces; None if it has no such file."""
    file = next((f for f in parent.files if f.path == span[0]), None)
    if file is None:
        return None
    begin, end = span[1], span[1] + span[2]
    pieces, offset = [], 0
    for c in file.chunks:
        lo, hi = max(begin, offset), min(end, offset + c.size)
        if lo < hi:
            pieces.append(Piece(sha256=c.sha256, offset=lo - offset, size=hi - lo))
        offset += c.size
    return pieces if sum(p.size for p in pieces) == span[2] else None


def _piece_bytes(store: Path, piece: Piece) -> bytes:
    with open(store / chunk_path(piece.sha256), "rb") as f:
        f.seek(piece.offset)
        return f.read(piece.size)


def _read(folder: Path, span: Span) -> bytes:
    with open(folder / span[0], "rb") as f:
        f.seek(span[1])
        return f.read(span[2])

"""LoRA adapters applied at run time: one base model, several adapters, chosen per request.

A model built with `--adapter-slots q_proj,v_proj` has, beside each of those projections, a low-rank branch
y += (x down) up whose factors are graph inputs of shape [batch, K, rank] and [batch, rank, N]. Each row of
a batch is fed its own adapter's factors (zeros for a request without one), so requests for different
adapters share a batched decode step, as vLLM's multi-LoRA and llama-server's per-request `lora` do.

An adapter is a peft folder (adapter_config.json + adapter_model.safetensors, what `edgellm lora train`
writes): lora_A [r, K] and lora_B [N, r] per module, scaled by lora_alpha / r (/ sqrt(r) with rsLoRA).
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgellm.daemon.errors import EdgeError

ADAPTER_SLOTS_KEY = "edgellm.adapter_slots"  # model metadata: {node: {"in", "down", "up", "modules"}}
ADAPTERS_FOLDER = "adapters"  # inside a model folder: one peft folder per adapter, named by its folder
PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Slot:
    """One adapted node of the graph: its input width, its two inputs, and the modules whose rows it stacks."""

    node: str
    k: int
    down: str
    up: str
    modules: tuple[tuple[str, int], ...]  # (module, rows), e.g. ("model.layers.0.self_attn.q_proj", 576)

    @property
    def n(self) -> int:
        return sum(rows for _, rows in self.modules)


@dataclass(frozen=True)
class Adapter:
    name: str
    factors: dict[str, tuple[np.ndarray, np.ndarray]]  # node -> (down [K, r], up [r, N]), the scale folded in


class AdapterSlots:
    """The slots of one model and the adapters loaded for it."""

    def __init__(self, slots: list[Slot]):
        self.slots = slots
        self.adapters: dict[str, Adapter] = {}
        self._by_module = {m: (slot, i) for slot in slots for i, (m, _) in enumerate(slot.modules)}
        self._feeds: dict[tuple, dict[str, np.ndarray]] = {}  # the last few row layouts' stacked inputs
        self._lock = threading.Lock()

    @classmethod
    def from_metadata(cls, metadata: dict[str, str]) -> AdapterSlots | None:
        raw = metadata.get(ADAPTER_SLOTS_KEY)
        if not raw:
            return None
        return cls([Slot(node, s["in"], s["down"], s["up"], tuple((m, int(r)) for m, r in s["modules"]))
                    for node, s in json.loads(raw).items()])

    @property
    def modules(self) -> list[str]:
        return sorted({m.rsplit(".", 1)[-1] for slot in self.slots for m, _ in slot.modules})

    # -- loading ------------------------------------------------------------------------------------------
    def load(self, name: str, folder: Path) -> Adapter:
        """Read a peft adapter folder and check it against the slots; raises EdgeError naming the problem."""
        from safetensors.numpy import load_file

        folder = Path(folder)
        where = f"adapter {name!r} ({folder})"
        try:
            config = json.loads((folder / "adapter_config.json").read_text())
            tensors = load_file(str(folder / "adapter_model.safetensors"))
        except (OSError, ValueError) as e:
            raise EdgeError("model_unavailable", f"{where}: not a peft LoRA adapter folder "
                            f"(adapter_config.json + adapter_model.safetensors): {e}") from None
        if config.get("use_dora") or config.get("peft_type", "LORA") != "LORA":
            raise EdgeError("model_unavailable", f"{where}: only plain LoRA adapters run beside the base (not DoRA "
                            "or other peft types); merge it with `edgellm lora merge` instead")
        pairs: dict[str, dict[str, np.ndarray]] = {}
        for key, value in tensors.items():
            for part in ("lora_A", "lora_B"):
                if f".{part}." in key:
                    module = key.removeprefix(PEFT_PREFIX).split(f".{part}.")[0]
                    pairs.setdefault(module, {})[part] = value.astype(np.float32)
        unknown = sorted(m for m in pairs if m not in self._by_module)
        if unknown or not pairs:
            raise EdgeError("model_unavailable", f"{where}: adapts {', '.join(unknown[:3]) or 'nothing'}, but this "
                            f"model takes adapters on {', '.join(self.modules)} only; rebuild it with "
                            "`--adapter-slots` naming the adapter's target modules")
        factors: dict[str, tuple[list, list]] = {}
        for module, ab in sorted(pairs.items()):
            slot, index = self._by_module[module]
            a, b = ab.get("lora_A"), ab.get("lora_B")
            rows = slot.modules[index][1]
            if a is None or b is None or a.shape[1] != slot.k or b.shape != (rows, a.shape[0]):
                raise EdgeError("model_unavailable", f"{where}: {module} has factors of shapes "
                                f"{None if a is None else a.shape} and {None if b is None else b.shape}; this "
                                f"model's {module} takes [r, {slot.k}] and [{rows}, r]: it was trained on "
                                "another base")
            r = a.shape[0]
            alpha = float(config.get("alpha_pattern", {}).get(module.rsplit(".", 1)[-1], config.get("lora_alpha", r)))
            scale = alpha / (math.sqrt(r) if config.get("use_rslora") else r)
            up = np.zeros((r, slot.n), np.float32)
            start = sum(n for _, n in slot.modules[:index])
            up[:, start:start + rows] = (b * scale).T
            downs, ups = factors.setdefault(slot.node, ([], []))
            downs.append(a.T)
            ups.append(up)
        merged = {node: (np.ascontiguousarray(np.concatenate(d, axis=1)), np.ascontiguousarray(np.concatenate(u)))
                  for node, (d, u) in factors.items()}
        adapter = Adapter(name, merged)
        with self._lock:
            self.adapters[name] = adapter
            self._feeds.clear()
        return adapter

    def load_folder(self, model_folder: Path) -> None:
        """Every adapter shipped in the model folder's adapters/ (a bundle can carry them)."""
        root = Path(model_folder) / ADAPTERS_FOLDER
        for folder in sorted(root.iterdir()) if root.is_dir() else []:
            if (folder / "adapter_config.json").is_file():
                self.load(folder.name, folder)

    def get(self, name: str | None) -> Adapter | None:
        if name is None:
            return None
        adapter = self.adapters.get(name)
        if adapter is None:
            raise EdgeError("bad_request", f"adapter: {name!r} is not loaded on this model; loaded: "
                            f"{', '.join(sorted(self.adapters)) or 'none'}", param="adapter")
        return adapter

    # -- feeding ------------------------------------------------------------------------------------------
    def feeds(self, rows: list[Adapter | None]) -> dict[str, np.ndarray]:
        """The slot inputs for a batch whose row i runs `rows[i]`; each node padded to its largest rank."""
        key = tuple(a.name if a else None for a in rows)
        with self._lock:
            cached = self._feeds.get(key)
        if cached is not None:
            return cached
        feeds: dict[str, np.ndarray] = {}
        for slot in self.slots:
            ranks = [a.factors[slot.node][0].shape[1] for a in rows if a and slot.node in a.factors]
            r = max(ranks, default=1)
            down = np.zeros((len(rows), slot.k, r), np.float32)
            up = np.zeros((len(rows), r, slot.n), np.float32)
            for i, a in enumerate(rows):
                if a and slot.node in a.factors:
                    d, u = a.factors[slot.node]
                    down[i, :, :d.shape[1]] = d
                    up[i, :u.shape[0]] = u
            feeds[slot.down], feeds[slot.up] = down, up
        with self._lock:
            if len(self._feeds) >= 8:
                self._feeds.pop(next(iter(self._feeds)))
            self._feeds[key] = feeds
        return feeds

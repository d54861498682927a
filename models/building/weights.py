"""Where a build reads its weights, one tensor at a time: a GGUF file or a folder of safetensors.

Both are memory-mapped and hand out tensors under transformers' names (`model.layers.3.mlp.down_proj.weight`),
so the fused graph has one way to ask. A GGUF hands out its quantized blocks as they are (models/gguf/blocks.py);
safetensors hand out float32. Neither imports torch: a device can build from a GGUF.
"""

from __future__ import annotations

import json
import math
import mmap
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgellm.models.building.spec import ModelSpec
from edgellm.models.errors import BuildError
from edgellm.models.gguf.blocks import Blocks, decode

Tensor = Blocks | np.ndarray

_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "model.final_layernorm": "output_norm",
           "lm_head": "output"}
_HF_NAME = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")


class GGUFWeights:
    """A GGUF file's tensors, under transformers' names (each architecture's table: models/building/
    architectures.py). Its q and k rows (Llama) are put back in transformers' order: llama.cpp's converter
    interleaves the rotary halves."""

    def __init__(self, path: Path):
        from edgellm.models.gguf.reader import gguf_reader

        self.path = Path(path)
        self.reader = gguf_reader(self.path)
        self.meta = {k: _field(f) for k, f in self.reader.fields.items() if not k.startswith("GGUF.")}
        self._tensors = {t.name: t for t in self.reader.tensors}
        freqs = self._tensors.get("rope_freqs.weight")
        self.spec = ModelSpec.from_gguf(self.meta, set(self._tensors),
                                        np.asarray(freqs.data, dtype=np.float32) if freqs is not None else None)
        self.rounded: list[str] = []  # tensors whose GGUF type has no exact form here

    def parameter_count(self) -> int:
        return sum(int(t.n_elements) for t in self.reader.tensors)

    def gguf_name(self, name: str) -> str | None:
        match = _HF_NAME.match(name)
        if match:
            layer, part, kind = match.groups()
            table = self.spec.arch.gguf_layer
            return f"blk.{layer}.{table[part]}.{kind}" if part in table else None
        stem, _, kind = name.rpartition(".")
        return f"{_GLOBAL[stem]}.{kind}" if stem in _GLOBAL else None

    def has(self, name: str) -> bool:
        gguf = self.gguf_name(name)
        if gguf in self._tensors:
            return True
        return self._split_qkv(name) is not None

    def get(self, name: str) -> Tensor | None:
        """The tensor transformers would hold under `name`: [out, in] matrices, 1-D vectors as float32."""
        gguf = self.gguf_name(name)
        if gguf not in self._tensors:
            return self._split_qkv(name)
        self._drop_pages()
        t = self._tensors[gguf]
        rows = int(t.shape[-1]) if len(t.shape) > 1 else 1
        value = decode(t.tensor_type.name, t.data, rows)
        if value is None:  # a type with no exact form (IQ*, Q2_K, Q3_K): de-quantize; the build rounds it again
            from gguf.quants import dequantize

            value = dequantize(np.asarray(t.data), t.tensor_type).reshape(rows, -1).astype(np.float32)
            self.rounded.append(f"{gguf} ({t.tensor_type.name})")
        if len(t.shape) == 1:
            return np.asarray(value, dtype=np.float32).reshape(-1)
        if self.spec.arch.gguf_permuted_qk and gguf.endswith(("attn_q.weight", "attn_k.weight")):
            heads = self.spec.heads if "attn_q" in gguf else self.spec.kv_heads
            order = unpermute_rows(rows, heads)
            value = value.rows(order) if isinstance(value, Blocks) else value[order]
        return value

    def _drop_pages(self) -> None:
        """Let go of the file pages earlier tensors touched, so a build's memory is one tensor's, not the file's
        (the mapping is read-only and shared: a page touched again is read again from the page cache)."""
        mapped = getattr(self.reader.data, "_mmap", None)  # numpy.memmap's mmap object
        if mapped is not None and hasattr(mmap, "MADV_DONTNEED"):
            mapped.madvise(mmap.MADV_DONTNEED)

    def dequantized(self, name: str) -> np.ndarray | None:
        """The float32 weight gguf's own de-quantizer gives (what transformers loads), in transformers' row order."""
        from gguf.quants import dequantize

        gguf = self.gguf_name(name)
        if gguf not in self._tensors:
            return None
        t = self._tensors[gguf]
        rows = int(t.shape[-1]) if len(t.shape) > 1 else 1
        value = dequantize(np.asarray(t.data), t.tensor_type).reshape(rows, -1).astype(np.float32)
        if self.spec.arch.gguf_permuted_qk and gguf.endswith(("attn_q.weight", "attn_k.weight")):
            value = value[unpermute_rows(rows, self.spec.heads if "attn_q" in gguf else self.spec.kv_heads)]
        return value

    def _split_qkv(self, name: str) -> Tensor | None:
        """Phi-2 GGUFs made from its first checkpoints hold one attn_qkv; transformers wants q, k and v."""
        match = _HF_NAME.match(name)
        if not match or match.group(2) not in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            return None
        fused = f"blk.{match.group(1)}.attn_qkv.{match.group(3)}"
        if fused not in self._tensors:
            return None
        whole = self.get(f"model.layers.{match.group(1)}.self_attn.qkv_proj.{match.group(3)}")
        s = self.spec
        sizes = [s.heads * s.head_dim, s.kv_heads * s.head_dim, s.kv_heads * s.head_dim]
        which = "qkv".index(match.group(2).split(".")[1][0])
        rows = np.arange(sum(sizes[:which]), sum(sizes[: which + 1]))
        if isinstance(whole, Blocks):
            return whole.rows(rows)
        return whole[rows]


def unpermute_rows(n: int, heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves the rotary halves of q/k rows; this is the row order that undoes it
    (transformers' `_reverse_permute_weights`, applied to row indices)."""
    dim = n // heads // 2
    return np.arange(n).reshape(heads, dim, 2).swapaxes(1, 2).reshape(n)


def _field(field):
    try:
        return field.contents()
    except Exception:  # a value type the gguf package cannot render: not one a build needs
        return None


# -- safetensors --------------------------------------------------------------------------------------------
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


class SafetensorsWeights:
    """A Hugging Face folder's *.safetensors, memory-mapped and read by hand (its header is JSON), so that bf16
    tensors need neither torch nor a float32 copy of the whole model."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        config = json.loads((self.folder / "config.json").read_text())
        self.spec = ModelSpec.from_config(config)
        self._index: dict[str, tuple[Path, dict, int]] = {}
        files = sorted(self.folder.glob("*.safetensors"))
        if not files:
            raise BuildError(f"SOURCE: {self.folder} has no *.safetensors files")
        for path in files:
            with open(path, "rb") as f:
                size = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(size))
            for name, info in header.items():
                if name != "__metadata__":
                    self._index[name] = (path, info, 8 + size)
        self.rounded: list[str] = []

    def has(self, name: str) -> bool:
        return name in self._index

    def parameter_count(self) -> int:
        return sum(math.prod(info["shape"]) for _path, info, _offset in self._index.values())

    def get(self, name: str) -> np.ndarray | None:
        if name not in self._index:
            return None
        path, info, start = self._index[name]
        if info["dtype"] not in _DTYPES:
            raise BuildError(f"SOURCE: {path.name}: tensor {name} is {info['dtype']}; expected float weights")
        begin, end = info["data_offsets"]
        raw = np.memmap(path, dtype=np.uint8, mode="r", offset=start + begin, shape=(end - begin,))
        if info["dtype"] == "BF16":
            values = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            values = raw.view(_DTYPES[info["dtype"]]).astype(np.float32)
        values = values.reshape(info["shape"])
        if self.spec.arch.hf_norm_offset and name.endswith("norm.weight"):  # Gemma's x * (1 + w), as GGUF holds it
            values = values + np.float32(self.spec.arch.hf_norm_offset)
        return values


@dataclass(frozen=True)
class LowRank:
    """A tuned weight as its base's exact blocks plus the tuning's change as a product of two thin float
    matrices: W = base + up @ down. A LoRA's change is smaller than a 4-bit step, so rounding the merged weight
    again loses much of it (docs/measured-facts.md, "A tuned model at 4 bits"); kept beside the base, none is lost."""

    base: Blocks
    down: np.ndarray  # float32 [rank, in]
    up: np.ndarray  # float32 [out, rank]

    @property
    def shape(self) -> tuple[int, int]:
        return self.base.shape


def low_rank(delta: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(up, down) with up @ down the best rank-`rank` approximation of `delta` (exact for a LoRA's change of
    that rank, up to float rounding)."""
    u, s, vt = np.linalg.svd(delta.astype(np.float64), full_matrices=False)
    root = np.sqrt(s[:rank])
    return (u[:, :rank] * root).astype(np.float32), (root[:, None] * vt[:rank]).astype(np.float32)


@dataclass(frozen=True)
class Remerged:
    """A tuned weight as its base's blocks plus the LoRA's change, for the plan to merge and round in the way a
    device can repeat (edgellm/daemon/update/remerge.py): an update then ships the factors, not the weight."""

    base: Blocks
    up: np.ndarray  # [out, rank], float16 values: what the bundle ships and both sides compute with
    down: np.ndarray  # [rank, in]
    merged: np.ndarray  # the merge's own float weight, for a plan that does not round it to 4 bits

    @property
    def shape(self) -> tuple[int, int]:
        return self.base.shape

    def blocks(self) -> Blocks:
        from edgellm.daemon.update.remerge import merge_and_round

        q, scales = merge_and_round(self.base.q, self.base.scales, self.base.offsets, self.up, self.down)
        return Blocks(4, self.base.block, q, scales, None, "LoRA re-merged")  # fused_graph.REMERGED


class MergedWeights:
    """A LoRA merge of a GGUF base (safetensors beside an edgellm-lineage.json naming the base): every weight the
    merge left exactly as it was is the base's own blocks. A changed one, where the lineage records the LoRA's
    rank, is the base's blocks plus the change at that rank: LowRank with `keep_base` (the change stays beside
    the blocks), else Remerged; without a rank it is the merged float weight, for the plan to round."""

    def __init__(self, merged: SafetensorsWeights, base: GGUFWeights, rank: int | None = None,
                 keep_base: bool = False):
        self.merged, self.base, self.spec = merged, base, merged.spec
        self.rank, self.keep_base = rank, keep_base
        self.rounded: list[str] = []

    def has(self, name: str) -> bool:
        return self.merged.has(name)

    def parameter_count(self) -> int:
        return self.merged.parameter_count()

    def get(self, name: str) -> Tensor | LowRank | None:
        value = self.merged.get(name)
        if value is None or value.ndim != 2 or not self.base.has(name):
            return value
        reference = self.base.dequantized(name)  # as transformers de-quantized the base before the merge
        if reference is None or reference.shape != value.shape:
            return value
        if np.array_equal(reference, value):
            return self.base.get(name)
        base = self.base.get(name)
        if not self.rank or not isinstance(base, Blocks) or name == "model.embed_tokens.weight":
            return value
        up, down = low_rank(value - reference, self.rank)
        if self.keep_base:
            return LowRank(base, down, up)
        if base.bits == 4 and base.block == 32:
            return Remerged(base, up.astype(np.float16), down.astype(np.float16), value)
        return value

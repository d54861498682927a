"""Refuse a build that cannot finish: estimate its disk and memory needs before loading anything.

The fused build (a GGUF, or safetensors) reads one tensor at a time: its peak is the memory-mapped pages it
touches, the largest tensor's decoded blocks and, at the end, onnxruntime checking the built model (about
the model's size again). optimum's export holds the model in fp32 several times over.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from edgellm.models.building.sources import Source
from edgellm.models.errors import BuildError

FP32 = 4
# optimum's export: peak copies of the fp32 weights: torch model + ONNX export + the edited graph (memory);
# saved HF folder + raw export + fp32 graph + quantized output, all beside the target (disk).
MEMORY_COPIES = 3
DISK_COPIES = 4
MEMORY_SLACK = 512 << 20
FUSED_BYTES_PER_PARAMETER = 1.25  # a fused int4 build's folder, measured: ~0.7 bytes a weight, 8-bit head
FUSED_MEMORY = 2.0  # x the folder: the final check's session (mapped weights and their prepacked copies)


@dataclass(frozen=True)
class Needs:
    parameters: int
    fused: bool = False

    @property
    def disk_bytes(self) -> int:
        if self.fused:
            return int(self.parameters * FUSED_BYTES_PER_PARAMETER * 1.2)
        return self.parameters * FP32 * DISK_COPIES

    @property
    def memory_bytes(self) -> int:
        if self.fused:
            return int(self.parameters * FUSED_BYTES_PER_PARAMETER * FUSED_MEMORY) + MEMORY_SLACK
        return self.parameters * FP32 * MEMORY_COPIES + MEMORY_SLACK


def count_parameters(source: Source) -> int | None:
    """Parameters from the GGUF header or the safetensors headers; None where only a download would tell."""
    if source.kind == "gguf":
        from edgellm.models.gguf.reader import gguf_reader

        return sum(int(t.n_elements) for t in gguf_reader(source.folder / source.gguf_file).tensors)
    if source.kind == "hf_folder":
        total = 0
        for f in source.folder.glob("*.safetensors"):
            with open(f, "rb") as fh:
                size = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(size))
            for name, t in header.items():
                if name != "__metadata__":
                    n = 1
                    for d in t["shape"]:
                        n *= d
                    total += n
        if total == 0:  # pytorch_model.bin: assume fp32 storage
            total = sum(f.stat().st_size for f in source.folder.glob("*.bin")) // FP32
        return total or None
    return None


def available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 1 << 62


def check_resources(source: Source, out: Path, fused: bool = False) -> Needs | None:
    params = count_parameters(source)
    if params is None:
        return None
    needs = Needs(params, fused)
    target = out.parent if out.parent.exists() else Path.cwd()
    free = shutil.disk_usage(target).free
    if free < needs.disk_bytes:
        raise BuildError(f"--out: {target} has {free / 1e6:.0f} MB free; building this {params / 1e6:.0f}M-parameter "
                         f"model needs about {needs.disk_bytes / 1e6:.0f} MB there. Free space or choose "
                         "another --out")
    memory = available_memory()
    if memory < needs.memory_bytes:
        raise BuildError(f"this {params / 1e6:.0f}M-parameter model needs about {needs.memory_bytes / 1e9:.1f} GB of "
                         f"memory to build; {memory / 1e9:.1f} GB is available. Build it on a larger host")
    return needs

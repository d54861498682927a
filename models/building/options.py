"""What every build shares, whichever graph it writes (build.py's fused graph, exported_build.py's optimum
export, embedding_build.py): its options, the file names of a built folder, the text perplexity is measured
on, and a LoRA merge's lineage. Kept apart so the builders import it and not each other."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

from edgellm.models.building.quantize import QuantSpec
from edgellm.models.building.sources import Source

EXTERNAL_DATA = "model.onnx.data"
CHAT_TEMPLATE = "chat_template.jinja"
EVAL_TEXT = "eval_en.txt"
# Positions a fused build serves unless told (--context): the trained context, at most this. Rotary tables cost
# memory per position (Gemma 3's four at its 32k: 67 MB); Ollama and llama-server also serve less than trained.
DEFAULT_CONTEXT = 8192


def eval_text() -> str:
    return files("edgellm.models").joinpath("data", EVAL_TEXT).read_text()


@dataclass
class BuildOptions:
    quant: QuantSpec
    name: str | None = None
    revision: str | None = None
    force: bool = False
    show_progress: bool = True
    gguf_import: bool = True  # a GGUF's quantized blocks are kept exactly (off: de-quantize and round again)
    fused: bool = True  # edgellm's fused graph where the architecture has one (off: optimum's export)
    keep_base: bool = False  # a LoRA merge of a GGUF: the base's blocks exact, the change beside them (low rank)
    adapter_slots: tuple[str, ...] = ()  # projections that take LoRA adapters at run time (daemon/engine/adapters.py)
    adapters: dict[str, Path] = field(default_factory=dict)  # peft adapter folders shipped in adapters/NAME/
    context: int | None = None  # positions served (None: the model's, at most DEFAULT_CONTEXT)
    kv_cache: str = "float32"  # or float16: half the KV memory, slower decode (docs/measured-facts.md)


def lineage(source: Source) -> dict | None:
    """`lora merge` leaves the base, adapter and training-data digests beside the merged weights."""
    from edgellm.models.tuning.lora import LINEAGE_FILE

    path = source.folder / LINEAGE_FILE if source.kind == "hf_folder" and source.folder else None
    return json.loads(path.read_text()) if path and path.is_file() else None

"""The model folder's manifest: what a device needs to trust and run a model it did not build."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationError, model_validator

from edgellm.daemon.errors import EdgeError
from edgellm.daemon.formats import StrictModel

MANIFEST_NAME = "manifest.json"
FORMAT = "edgellm-model/1"



class FileEntry(StrictModel):
    size: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class Quantization(StrictModel):
    scheme: Literal["fp32", "int8", "int4"]
    method: str = Field(description="how the weights were quantized, e.g. 'MatMulNBits RTN'")
    per_channel: bool | None = None
    bits: int | None = None
    block_size: int | None = None
    symmetric: bool | None = None
    accuracy_level: int | None = None
    output_head_bits: int | None = None
    eight_bit_layers: list[str] | None = Field(None, description="MatMuls kept at 8 bits in a 4-bit build")
    gguf_imported: dict[str, int] | None = Field(None, description="weights taken exactly from GGUF blocks, by type")
    rounded_weights: list[str] | None = Field(None, description="GGUF weights of a type with no exact form here, "
                                              "de-quantized and rounded again")
    kv_cache: Literal["float16", "float32"] | None = Field(None, description="the type the KV cache holds (fused "
                                                            "graph); None: float32")


class Source(StrictModel):
    kind: Literal["hf_folder", "gguf", "hub"]
    ref: str = Field(description="folder path, GGUF file path or hub id, as given")
    revision: str | None = None
    sha256: str | None = Field(default=None, description="digest of a single-file source (GGUF)")


class Generation(StrictModel):
    """Defaults the engine needs before it sees any request."""

    eos_token_ids: list[int]
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    context_length: int = Field(gt=0)
    chat_template: str | None = Field(default=None, description="file name of the Jinja chat template")


class Quality(StrictModel):
    eval_text: str = Field(description="name of the evaluation text kept in the repo")
    eval_text_sha256: str
    eval_tokens: int
    perplexity: float = Field(description="of this built model, measured with onnxruntime")
    source_perplexity: float | None = Field(default=None, description="of the source model, in PyTorch fp32")
    source_perplexity_skipped: str | None = Field(
        default=None, description="why the source's perplexity was not measured (an optional measurement)")


class Embedding(StrictModel):
    dimension: int = Field(gt=0)
    pooling: Literal["mean", "cls"] = "mean"
    normalize: bool = True
    max_length: int = Field(gt=0)
    pad_token_id: int = 0


class EmbeddingQuality(StrictModel):
    sentences: int
    cosine_mean: float = Field(description="cosine to the source model in PyTorch fp32")
    cosine_min: float


class ModelManifest(StrictModel):
    format: Literal["edgellm-model/1"] = FORMAT
    name: str
    version: str = "1"
    task: Literal["text-generation", "embedding"] = "text-generation"
    architecture: str = Field(description="transformers architecture, e.g. LlamaForCausalLM")
    model_type: str
    parameters: int | None = Field(None, description="weights of the source model, counted at build time "
                                   "(None in folders built before it was recorded)")
    quantization: Quantization
    graph: Literal["optimum", "fused"] = Field(
        "optimum",
        description="optimum's export, or edgellm's graph of fused onnxruntime ops (models/building/fused_graph.py)")
    source: Source
    license: str | None = None
    generation: Generation | None = None
    embedding: Embedding | None = None
    quality: Quality | EmbeddingQuality | None = None
    files: dict[str, FileEntry]
    built_with: dict[str, str] = Field(default_factory=dict)
    lineage: dict | None = Field(None, description="how the source was made: base, adapter, training data")

    @property
    def parameter_size(self) -> str:
        """'135M', '1.2B', as Ollama shows a model's size ('' when the build did not record it)."""
        if self.parameters is None:
            return ""
        n = self.parameters
        return f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"

    @model_validator(mode="after")
    def _task_section(self) -> ModelManifest:
        section = "generation" if self.task == "text-generation" else "embedding"
        if getattr(self, section) is None:
            raise ValueError(f"a {self.task} manifest needs a '{section}' section")
        return self


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def describe_files(folder: Path, names: list[str]) -> dict[str, FileEntry]:
    return {n: FileEntry(size=(folder / n).stat().st_size, sha256=sha256_file(folder / n)) for n in sorted(names)}


def load_manifest(folder: Path, verify_hashes: bool = False, task: str | None = None) -> ModelManifest:
    """Read and check a model folder's manifest; sizes always, digests on request (they cost a full read)."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise EdgeError("model_unavailable", f"{folder} is not an edgellm model folder: {MANIFEST_NAME} is missing "
                        "(build one with `edgellm model build SOURCE --out DIR`)")
    try:
        manifest = ModelManifest.model_validate_json(path.read_bytes())
    except ValidationError as e:
        raise EdgeError("model_unavailable", f"{path} is invalid: {e}") from None
    for name, entry in manifest.files.items():
        f = Path(folder) / name
        if not f.is_file():
            raise EdgeError("model_unavailable", f"{folder}: file {name} listed in the manifest is missing")
        if f.stat().st_size != entry.size:
            raise EdgeError("model_unavailable", f"{folder}: {name} is {f.stat().st_size} bytes, the manifest says "
                            f"{entry.size}: the folder is incomplete or damaged, rebuild or re-download it")
        if verify_hashes and sha256_file(f) != entry.sha256:
            raise EdgeError("model_unavailable", f"{folder}: {name} does not match its sha256 in the manifest")
    if task and manifest.task != task:
        raise EdgeError("model_unavailable", f"{folder} holds a {manifest.task} model; a {task} model is needed here")
    return manifest

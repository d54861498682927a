"""Load a source into transformers (fixing what GGUF conversion gets wrong) and export it with optimum."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

from edgellm.models.building.sources import Source, readme_license
from edgellm.models.errors import BuildError

TASK = "text-generation-with-past"


@dataclass
class HFModel:
    model: object  # transformers PreTrainedModel
    tokenizer: object  # PreTrainedTokenizerFast
    model_type: str
    architecture: str
    eos_token_ids: list[int]
    context_length: int
    license: str | None
    tokenizer_json: str | None = None  # a GGUF source's tokenizer as llama.cpp reads it: saved as is beside merges


def supported_model_types() -> list[str]:
    import optimum.exporters.onnx.model_configs  # noqa: F401  (registers the ONNX configs)
    from optimum.exporters.tasks import TasksManager

    table = TasksManager._SUPPORTED_MODEL_TYPE
    return sorted(t for t, exporters in table.items() if TASK in exporters.get("onnx", {}))


def _load_kwargs(source: Source) -> dict:
    kwargs: dict = {}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if source.revision and source.kind == "hub":
        kwargs["revision"] = source.revision
    return kwargs


def check_architecture(source: Source) -> str:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.load_path, **_load_kwargs(source))
    except (OSError, ValueError) as e:
        raise BuildError(f"SOURCE: cannot read the model config of {source.ref}: {e}") from None
    supported = supported_model_types()
    if config.model_type not in supported:
        raise BuildError(f"SOURCE: architecture '{config.model_type}' cannot be exported for text generation "
                         f"with a KV cache; supported: {', '.join(supported)}")
    return config.model_type


def _gguf_header(source: Source) -> dict:
    """The header fields the build needs, from one parse of the GGUF: EOS, license, and the tokenizer as
    llama.cpp reads it (edgellm/models/gguf/gguf_tokenizer.py)."""
    from edgellm.models.building.weights import _field
    from edgellm.models.gguf.gguf_tokenizer import tokenizer_json
    from edgellm.models.gguf.reader import gguf_reader

    fields = gguf_reader(source.folder / source.gguf_file).fields
    eos, license_ = fields.get("tokenizer.ggml.eos_token_id"), fields.get("general.license")
    meta = {k: _field(f) for k, f in fields.items() if k.startswith("tokenizer.")}
    return {"eos": int(eos.contents()) if eos is not None else None,
            "license": str(license_.contents()) if license_ is not None else None,
            "tokenizer_json": tokenizer_json(meta)}


def quiet_libraries() -> None:
    """transformers' and optimum's warnings and tqdm bars fight the build's own progress bar."""
    import logging

    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("optimum").setLevel(logging.ERROR)


def load_source(source: Source) -> HFModel:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_libraries()
    kwargs = _load_kwargs(source)
    tokenizer = AutoTokenizer.from_pretrained(source.load_path, **kwargs)
    if not tokenizer.is_fast:
        raise BuildError(f"SOURCE: {source.ref} has no fast tokenizer (tokenizer.json); devices need one")
    # Fp32 everywhere: Phi-2's attention overflows in fp16, and the source perplexity is the reference.
    model = AutoModelForCausalLM.from_pretrained(source.load_path, dtype=torch.float32, **kwargs)
    model.eval()
    config = model.config
    eos = config.eos_token_id
    eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
    license_ = readme_license(source.folder) if source.folder else None
    faithful = None
    if source.kind == "gguf":
        # transformers' GGUF tokenizer gets eos_token=<|im_start|> for SmolLM2; the GGUF header is right.
        header = _gguf_header(source)
        license_, gguf_eos = header["license"], header["eos"]
        # transformers' own GGUF conversion loses the split rules of `tokenizer.ggml.pre` (SmolLM2 writes each
        # digit as its own token; transformers' version merges "2024" into one): train and export with the
        # tokenizer the base model was trained with, the one a GGUF build and llama.cpp use
        from tokenizers import Tokenizer

        faithful = header["tokenizer_json"]
        tokenizer._tokenizer = Tokenizer.from_str(faithful)
        if gguf_eos is not None:
            eos_ids = [gguf_eos]
            tokenizer.eos_token = tokenizer.convert_ids_to_tokens(gguf_eos)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(tokenizer.eos_token_id)
    if not eos_ids:
        raise BuildError(f"SOURCE: {source.ref} names no end-of-sequence token in its config or tokenizer")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.convert_ids_to_tokens(eos_ids[0])
    config.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.eos_token_id = config.eos_token_id
        model.generation_config.pad_token_id = config.pad_token_id
    context = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions", "max_sequence_length")
                    if getattr(config, k, None)), 2048)
    architecture = (config.architectures or [type(model).__name__])[0]
    return HFModel(model, tokenizer, config.model_type, architecture, eos_ids, int(context), license_, faithful)


def export_onnx(hf: HFModel, work: Path) -> Path:
    """Save the fixed model as a plain HF folder and export it; returns the exported model.onnx."""
    from optimum.exporters.onnx import main_export

    saved = work / "hf"
    hf.model.save_pretrained(saved)
    hf.tokenizer.save_pretrained(saved)
    exported = work / "onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main_export(str(saved), str(exported), task=TASK, do_validation=False, device="cpu")
    return exported / "model.onnx"


def save_tokenizer(hf: HFModel, work: Path) -> Path:
    """The fixed tokenizer's tokenizer.json (what the optimum export would have copied beside its graph)."""
    folder = work / "tokenizer"
    hf.tokenizer.save_pretrained(folder)
    return folder / "tokenizer.json"


def source_perplexity(hf: HFModel, ids: list[int]) -> float:
    import numpy as np
    import torch

    from edgellm.daemon.engine.perplexity import token_nll

    with torch.no_grad():
        logits = hf.model(torch.tensor([ids])).logits[0].float().numpy()
    return float(np.exp(token_nll(logits[:-1], np.asarray(ids[1:])).mean()))

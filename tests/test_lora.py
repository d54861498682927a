"""LoRA training and merging on tiny random models: per-architecture targets, and a merge that changes
exactly the adapted layers."""

from __future__ import annotations

import json

import pytest

from edgellm.models.errors import BuildError
from edgellm.models.tuning.lora import TARGET_MODULES, LoraOptions, merge_lora, train_lora

pytestmark = pytest.mark.slow  # see the README's development section


def weights(folder):
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("arch", ["phi", "qwen2"])
def test_merge_changes_only_the_adapted_layers(arch, tiny_sources, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {w}.", "completion": w}) + "\n" for w in ["a", "b"] * 4))
    report = train_lora(str(tiny_sources[arch]), data, tmp_path / "adapter",
                        LoraOptions(epochs=1, batch_size=4, learning_rate=0.05, show_progress=False))
    assert report.steps == 2 and report.target_modules == TARGET_MODULES[arch]
    merge_lora(str(tiny_sources[arch]), tmp_path / "adapter", tmp_path / "merged")
    base, merged = weights(tiny_sources[arch]), weights(tmp_path / "merged")
    changed = {name for name in base if not (base[name] == merged[name]).all()}
    assert changed, "the merge changed nothing"
    targets = tuple(f"{m}.weight" for m in TARGET_MODULES[arch])
    assert all(name.endswith(targets) for name in changed), changed
    lineage = json.loads((tmp_path / "merged" / "edgellm-lineage.json").read_text())
    assert lineage["training"]["data_sha256"] and lineage["adapter"]["sha256"]


def test_bad_training_input_names_the_flag(tiny_sources, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"question": "no prompt here"}\n')
    with pytest.raises(BuildError, match="--data: line 1"):
        train_lora(str(tiny_sources["llama"]), data, tmp_path / "a", LoraOptions(show_progress=False))
    data.write_text('{"prompt": "x", "completion": "y"}\n')
    with pytest.raises(BuildError, match="--target-modules"):
        train_lora(str(tiny_sources["llama"]), data, tmp_path / "a",
                   LoraOptions(target_modules=["no_such_proj"], show_progress=False))
    with pytest.raises(BuildError, match="--adapter"):
        merge_lora(str(tiny_sources["llama"]), tmp_path, tmp_path / "m")


def test_training_on_a_gguf_base_tokenizes_as_the_base_model_and_its_build_do(smollm2_int4):
    """transformers' GGUF tokenizer merges "2024" into one token where SmolLM2 (and llama.cpp, and the GGUF
    build) write each digit alone; a LoRA trained on the former learns numbers in a form the model never saw."""
    from tokenizers import Tokenizer

    from edgellm.models.building.export import load_source
    from edgellm.models.building.sources import resolve_source

    hf = load_source(resolve_source("smollm2"))
    built = Tokenizer.from_file(str(smollm2_int4 / "tokenizer.json"))
    text = "Factura 2024/0871 del 05/03/2024: total 1.210,00 EUR"
    assert hf.tokenizer(text, add_special_tokens=False)["input_ids"] == built.encode(text).ids
    assert hf.tokenizer.tokenize("2024") == ["2", "0", "2", "4"]
    assert hf.tokenizer_json == (smollm2_int4 / "tokenizer.json").read_text()  # merges ship the same bytes

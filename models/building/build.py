"""`edgellm model build`: a source (GGUF file, Hugging Face folder or hub id) to a model folder a device runs.

Two ways, one result (edgellm/daemon/engine/manifest.py):
- **the fused graph** (the families models/building/architectures.py describes): read the weights one
  tensor at a time (a GGUF's blocks as they are, safetensors memory-mapped) and write the graph and its
  weights straight to the folder. No torch: a device can build from a GGUF, in memory about the size of
  one tensor plus the final check;
- **optimum's export** (other architectures, or --no-fuse): load the model in transformers, export, quantize.
  Only where the host toolchain is installed; without it, another architecture is refused by name.

The folder appears at --out only when complete: everything is staged beside it and renamed at the end, and a
build killed before that leaves a staging folder the next build removes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from edgellm.daemon.engine.manifest import Generation, ModelManifest, Quality, Quantization, describe_files
from edgellm.daemon.engine.manifest import Source as SourceRecord
from edgellm.daemon.engine.model import MODEL_FILE, TOKENIZER_FILE
from edgellm.models.building.options import (
    CHAT_TEMPLATE,
    DEFAULT_CONTEXT,
    EVAL_TEXT,
    EXTERNAL_DATA,
    BuildOptions,
    eval_text,
    lineage,
)
from edgellm.models.building.quantize import ACCURACY_LEVEL_INT8, QuantSpec
from edgellm.models.building.sources import Source, readme_license, resolve_source
from edgellm.models.building.staging import check_output, package_versions, staged_folder, write_manifest
from edgellm.models.errors import BuildError
from edgellm.models.progress import Steps


def build_model(source_ref: str, out: Path, options: BuildOptions) -> ModelManifest:
    from edgellm.models.building.preflight import check_resources

    out = Path(out)
    check_output(out, options.force)
    source = resolve_source(source_ref, options.revision)
    fused = options.fused and fused_source(source)
    if options.keep_base:
        _check_keep_base(source, options, fused)
    if (options.adapter_slots or options.adapters) and not fused:
        raise BuildError(f"--adapter-slots: run-time adapters need edgellm's fused graph, which {source.ref} does not "
                         "build into (not with --no-fuse)")
    if options.adapters and not options.adapter_slots:
        raise BuildError("--adapter: give --adapter-slots too, naming the projections the adapters train "
                         "(e.g. q_proj,v_proj)")
    if not fused:
        _check_exportable(source)
    check_resources(source, out, fused)
    steps = ["Reading the source", "Building the graph", "Writing the folder", "Measuring perplexity"]
    with staged_folder(out) as (staged, scratch), Steps(steps, enabled=options.show_progress) as progress:
        if fused:
            return _build_fused(source, staged, options, progress)
        from edgellm.models.building.exported_build import build_exported

        return build_exported(source, staged, scratch, options, progress)


def _check_exportable(source: Source) -> None:
    """The export needs torch, transformers and optimum: without them, say which architecture the fused graph
    lacks rather than fail on an import."""
    import importlib.util

    from edgellm.models.building.architectures import supported

    missing = [m for m in ("torch", "transformers", "optimum") if importlib.util.find_spec(m) is None]
    if not missing:
        return
    arch = _architecture(source)
    raise BuildError(f"SOURCE: {source.ref} is a '{arch}' model; the fused graph, which builds without the host "
                     f"toolchain, covers {supported()}. Other architectures go through optimum's export, which "
                     f"needs {', '.join(missing)} (pip install 'edgellm[host]')")


def _architecture(source: Source) -> str | None:
    if source.kind == "gguf":
        from edgellm.models.gguf.reader import gguf_reader

        field = gguf_reader(source.folder / source.gguf_file).fields.get("general.architecture")
        return field.contents() if field is not None else None
    if source.kind == "hf_folder" and (source.folder / "config.json").is_file():
        return json.loads((source.folder / "config.json").read_text()).get("model_type")
    return None


def _check_keep_base(source: Source, options: BuildOptions, fused: bool) -> None:
    if options.quant.bits is None:
        raise BuildError("--keep-base: an fp32 build has no base blocks to keep; use --quant int4")
    if not fused or not options.gguf_import or _gguf_base(source) is None:
        raise BuildError(f"--keep-base: {source.ref} is not a LoRA merge of a GGUF base that the fused graph can "
                         "build (`edgellm lora merge` of a .gguf or 'smollm2', the base still on this machine)")
    _keep_base_rank(source)


def fused_source(source: Source) -> bool:
    """Whether the fused graph can be built from this source without transformers."""
    from edgellm.models.building.spec import FUSED_TYPES, GGUF_ARCHS

    if source.kind == "gguf":
        return _architecture(source) in set(GGUF_ARCHS.values())
    if source.kind == "hf_folder" and any(source.folder.glob("*.safetensors")):
        return _architecture(source) in FUSED_TYPES
    return False


def plan_for(spec: QuantSpec, gguf_import: bool, adapter_slots: tuple[str, ...] = (), kv_cache: str = "float32"):
    from edgellm.models.building.fused_graph import Plan

    return Plan(bits=spec.bits, block_size=spec.block_size, symmetric=spec.symmetric, head_bits=spec.head_bits,
                eight_bit=spec.eight_bit, requantize=not gguf_import, adapter_slots=adapter_slots,
                kv_cache=kv_cache)


def _build_fused(source: Source, staged: Path, options: BuildOptions, progress: Steps) -> ModelManifest:
    import onnx

    from edgellm.models.building.fused_graph import build_fused_decoder
    from edgellm.models.building.onnx_writer import ExternalData

    progress.next()
    weights, meta = _weights(source, options)
    spec = served(weights.spec, options.context)
    progress.next()
    data = ExternalData(staged / EXTERNAL_DATA)
    try:
        plan = plan_for(options.quant, options.gguf_import, options.adapter_slots, options.kv_cache)
        graph, report = build_fused_decoder(spec, weights, plan, data)
    finally:
        data.close()
    onnx.save(graph, staged / MODEL_FILE)
    parameters = weights.parameter_count()
    del graph, weights  # the source's pages and the graph leave before the built model is loaded to measure it
    progress.next()
    generation, license_ = _write_tokenizer(source, meta, staged, spec.context)
    del meta
    names = [MODEL_FILE, EXTERNAL_DATA, TOKENIZER_FILE] + ([CHAT_TEMPLATE] if generation.chat_template else [])
    names += _copy_adapters(options.adapters, staged)
    if report.factors:  # what a bundle ships so that a device holding the base computes the tuned weights
        from safetensors.numpy import save_file

        from edgellm.models.building.fused_graph import REMERGE_FILE

        save_file(report.factors, str(staged / REMERGE_FILE))
        names.append(REMERGE_FILE)
    manifest = ModelManifest(
        name=options.name or f"{source.default_name()}-{options.quant.scheme}", architecture=spec.architecture,
        model_type=spec.model_type, parameters=parameters,
        quantization=_quantization(options.quant, report), graph="fused",
        source=SourceRecord(kind=source.kind, ref=source.ref, revision=source.revision, sha256=source.digest()),
        license=license_, generation=generation, files=describe_files(staged, names),
        built_with=package_versions("onnxruntime", "onnx", "gguf", "tokenizers"))
    manifest.lineage = lineage(source)
    write_manifest(staged, manifest)
    progress.next()
    _measure(source, staged, manifest)
    return manifest


def served(spec, context: int | None):
    """The spec with the context a device serves: --context, else the trained one capped at DEFAULT_CONTEXT."""
    import dataclasses

    if context is not None and context < 1:
        raise BuildError(f"--context: {context} positions; give a positive number")
    return dataclasses.replace(spec, context=context or min(spec.context, DEFAULT_CONTEXT))


def _weights(source: Source, options: BuildOptions):
    """The source's weights (and a GGUF's header). A LoRA merge of a GGUF base reuses the base's blocks for
    every weight the merge left exactly as it was, and with --keep-base for the changed ones too."""
    from edgellm.models.building.weights import GGUFWeights, MergedWeights, SafetensorsWeights

    if source.kind == "gguf":
        weights = GGUFWeights(source.folder / source.gguf_file)
        return weights, weights.meta
    weights = SafetensorsWeights(source.folder)
    base = _gguf_base(source)
    if base is not None:
        rank = _keep_base_rank(source) if options.keep_base else _lora_rank(source)
        weights = MergedWeights(weights, GGUFWeights(base), rank, options.keep_base)
    return weights, None


def _lora_rank(source: Source) -> int | None:
    rank = ((lineage(source) or {}).get("training") or {}).get("options", {}).get("rank")
    return rank if isinstance(rank, int) and rank >= 1 else None


def _keep_base_rank(source: Source) -> int:
    rank = _lora_rank(source)
    if rank is None:
        raise BuildError(f"--keep-base: {source.folder} does not record its LoRA's rank (edgellm-lineage.json, "
                         "written by `edgellm lora merge`); build it without --keep-base")
    return rank


def _gguf_base(source: Source) -> Path | None:
    base = (lineage(source) or {}).get("base")
    if not base:
        return None
    try:
        found = resolve_source(base)
    except Exception:  # the base may be gone or on another machine: then there is nothing to reuse
        return None
    return found.folder / found.gguf_file if found.kind == "gguf" else None


def _write_tokenizer(source: Source, meta: dict | None, staged: Path, context: int) -> tuple[Generation, str | None]:
    """tokenizer.json, the chat template and the ids the engine needs, from the GGUF header or the HF folder."""
    if meta is not None:
        from edgellm.models.gguf.gguf_tokenizer import tokenizer_json

        (staged / TOKENIZER_FILE).write_text(tokenizer_json(meta))
        template = meta.get("tokenizer.chat_template")
        eos = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in meta]
        bos, pad = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.padding_token_id")
        license_ = meta.get("general.license")
    else:
        folder = source.folder
        if not (folder / TOKENIZER_FILE).is_file():
            raise BuildError(f"SOURCE: {folder} has no tokenizer.json (a fast tokenizer); devices need one")
        shutil.copy(folder / TOKENIZER_FILE, staged / TOKENIZER_FILE)
        config = _read(folder / "config.json")
        tok_config = _read(folder / "tokenizer_config.json")
        gen = _read(folder / "generation_config.json")
        template = tok_config.get("chat_template")
        if (folder / CHAT_TEMPLATE).is_file():
            template = (folder / CHAT_TEMPLATE).read_text()
        vocab = json.loads((folder / TOKENIZER_FILE).read_text())
        token_ids = {t["content"]: t["id"] for t in vocab.get("added_tokens", [])}

        def token_id(key: str) -> int | None:
            value = tok_config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            return token_ids.get(value, (vocab.get("model", {}).get("vocab") or {}).get(value))

        eos = _ids(gen.get("eos_token_id", config.get("eos_token_id"))) + _ids(token_id("eos_token"))
        bos = gen.get("bos_token_id", config.get("bos_token_id"))
        pad = token_id("pad_token") if token_id("pad_token") is not None else config.get("pad_token_id")
        license_ = readme_license(folder)
    eos = list(dict.fromkeys(int(e) for e in eos))
    if not eos:
        raise BuildError(f"SOURCE: {source.ref} names no end-of-sequence token; devices could not stop")
    written = isinstance(template, str) and bool(template.strip())
    if written:
        (staged / CHAT_TEMPLATE).write_text(template)
    generation = Generation(eos_token_ids=eos, bos_token_id=bos, pad_token_id=pad if pad is not None else eos[0],
                            context_length=context, chat_template=CHAT_TEMPLATE if written else None)
    return generation, license_


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _copy_adapters(adapters: dict[str, Path], staged: Path) -> list[str]:
    """peft adapter folders into adapters/NAME/ (their two files only); loading the build checks each
    against the graph's slots."""
    from edgellm.daemon.engine.adapters import ADAPTERS_FOLDER

    names = []
    for name, folder in adapters.items():
        for file in ("adapter_config.json", "adapter_model.safetensors"):
            if not (Path(folder) / file).is_file():
                raise BuildError(f"--adapter {name}={folder}: no {file}; give a folder from `edgellm lora train`")
            target = staged / ADAPTERS_FOLDER / name / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(Path(folder) / file, target)
            names.append(f"{ADAPTERS_FOLDER}/{name}/{file}")
    return names


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _quantization(spec: QuantSpec, report) -> Quantization:
    imported = dict(report.imported)
    if spec.bits is None:
        return Quantization(scheme="fp32", method="none (fp32)", kv_cache=report.kv_cache)
    parts = []
    if imported:
        parts.append("GGUF blocks kept exactly (" + ", ".join(f"{n} {k}" for k, n in sorted(imported.items())) + ")")
    if report.quantized:
        parts.append(f"{report.quantized} float weights by onnxruntime's MatMulNBits quantizer, round to nearest")
    if report.low_rank:
        parts.append(f"{report.low_rank} tuned weights as their GGUF base's blocks plus the LoRA's change in fp32 "
                     "beside them (--keep-base)")
    if report.remerged:
        n = sum(len(rows) for rows in report.remerged.values())
        parts.append(f"{n} tuned weights as their GGUF base's blocks plus the LoRA's change, merged and rounded to "
                     "nearest the way a device holding the base repeats it (edgellm/daemon/update/remerge.py)")
    if report.requantized:
        parts.append(f"{report.requantized} GGUF weights de-quantized and rounded again (--no-gguf-import)")
    if report.rounded:
        parts.append(f"{len(report.rounded)} GGUF weights of types without an exact form rounded again: "
                     + ", ".join(report.rounded[:8]) + (" ..." if len(report.rounded) > 8 else ""))
    return Quantization(scheme=spec.scheme, method="; ".join(parts) or "none", bits=spec.bits,
                        block_size=spec.block_size, symmetric=spec.symmetric, accuracy_level=ACCURACY_LEVEL_INT8,
                        output_head_bits=max(spec.bits, spec.head_bits), eight_bit_layers=list(spec.eight_bit) or None,
                        gguf_imported=imported or None, rounded_weights=report.rounded or None,
                        kv_cache=report.kv_cache)


def _measure(source: Source, staged: Path, manifest: ModelManifest) -> None:
    """Perplexity of the build on the evaluation text (onnxruntime, as the device runs it), and of the source
    in PyTorch fp32 where the host toolchain is installed and the model fits in memory twice over."""
    from edgellm.daemon.engine.model import LoadedModel
    from edgellm.daemon.engine.perplexity import perplexity

    text = eval_text()
    model = LoadedModel.load(staged)
    built, n_tokens = perplexity(model, text)
    ids = model.encode(text)[: manifest.generation.context_length]
    del model
    reference, skipped = _source_perplexity(source, ids)
    manifest.quality = Quality(eval_text=EVAL_TEXT, eval_text_sha256=hashlib.sha256(text.encode()).hexdigest(),
                               eval_tokens=n_tokens, perplexity=round(built, 4), source_perplexity=reference,
                               source_perplexity_skipped=skipped)
    write_manifest(staged, manifest)


def _source_perplexity(source: Source, ids: list[int]) -> tuple[float | None, str | None]:
    """The source's perplexity in PyTorch fp32, or None and why not. It is optional: whatever stops it (no host
    toolchain, too little memory, an architecture transformers cannot load from a GGUF, e.g. phi2) is said in
    the manifest and never fails the build."""
    from edgellm.models.building.preflight import available_memory, count_parameters

    try:
        import torch  # noqa: F401  (the host toolchain)
        import transformers  # noqa: F401
    except ImportError:
        return None, "no host toolchain (torch, transformers)"
    params = count_parameters(source) or 0
    if params * 4 * 2 > available_memory():
        return None, "fp32 PyTorch would not fit in memory twice over"  # rather than swap
    from edgellm.models.building.export import load_source, source_perplexity

    try:
        return round(source_perplexity(load_source(source), ids), 4), None
    except Exception as e:  # e.g. "GGUF model with architecture phi2 is not supported yet"
        return None, f"transformers could not run the source: {type(e).__name__}: {str(e)[:200]}"

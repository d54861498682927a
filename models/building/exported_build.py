"""The build through optimum's ONNX export, for architectures without a fused graph (or --no-fuse): load the
model in transformers, export it, edit the graph, quantize it. Needs the host toolchain (torch)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from edgellm.daemon.engine.manifest import Generation, ModelManifest, Quality, Quantization, describe_files
from edgellm.daemon.engine.manifest import Source as SourceRecord
from edgellm.daemon.engine.model import MODEL_FILE, TOKENIZER_FILE
from edgellm.models.building.options import CHAT_TEMPLATE, EVAL_TEXT, EXTERNAL_DATA, BuildOptions, eval_text, lineage
from edgellm.models.building.quantize import ACCURACY_LEVEL_INT8
from edgellm.models.building.sources import Source, resolve_source
from edgellm.models.building.staging import package_versions, write_manifest
from edgellm.models.progress import Steps


def build_exported(source: Source, staged: Path, scratch: Path, options: BuildOptions,
                   progress: Steps) -> ModelManifest:
    import onnx
    from tokenizers import Tokenizer

    from edgellm.daemon.engine.model import LoadedModel
    from edgellm.daemon.engine.perplexity import perplexity
    from edgellm.models.building.export import check_architecture, export_onnx, load_source, source_perplexity
    from edgellm.models.building.graph_edits import (
        add_logit_positions,
        check_decoder_io,
        output_head_name,
        untie_output_head,
    )
    from edgellm.models.building.quantize import quantize

    progress.next()
    check_architecture(source)
    hf = load_source(source)
    progress.next()
    exported = export_onnx(hf, scratch)
    graph = onnx.load(exported)
    check_decoder_io(graph, hf.model_type)
    untie_output_head(graph)
    add_logit_positions(graph)
    record = lineage(source)
    gguf = _gguf_blocks(source, record) if options.quant.scheme == "int4" and options.gguf_import else None
    imported = None
    if gguf is not None:
        from edgellm.models.gguf.gguf_import import import_gguf

        config = hf.model.config
        heads = config.num_attention_heads
        imported = import_gguf(graph, gguf, heads, getattr(config, "num_key_value_heads", None) or heads,
                               output_head_name(graph), keep=options.quant.eight_bit)
    graph = quantize(graph, options.quant)
    progress.next()
    onnx.save(graph, staged / MODEL_FILE, save_as_external_data=True, location=EXTERNAL_DATA, size_threshold=1024)
    del graph
    shutil.copy(exported.parent / TOKENIZER_FILE, staged / TOKENIZER_FILE)
    template = hf.tokenizer.chat_template
    if isinstance(template, str) and template.strip():
        (staged / CHAT_TEMPLATE).write_text(template)
    manifest = _manifest(source, hf, options, staged, template_written=(staged / CHAT_TEMPLATE).exists())
    manifest.lineage = record
    if imported and (imported["q4_1"] or imported["q8_0"]):
        manifest.quantization.method = (f"GGUF blocks imported exactly ({imported['q4_1']} Q4_1 as MatMulNBits + "
                                        f"block-sum offsets, {imported['q8_0']} Q8_0 as 8-bit; {imported['partial']} "
                                        "packed weights in part, the rest of each rounded to nearest); "
                                        f"{imported['kept']} other weights by MatMulNBits, round to nearest")
        manifest.quantization.gguf_imported = {k: v for k, v in imported.items()}
    write_manifest(staged, manifest)
    progress.next()
    text = eval_text()
    ids = Tokenizer.from_file(str(staged / TOKENIZER_FILE)).encode(text).ids[: hf.context_length]
    source_ppl = source_perplexity(hf, ids)
    built_ppl, n_tokens = perplexity(LoadedModel.load(staged), text)
    manifest.quality = Quality(eval_text=EVAL_TEXT, eval_text_sha256=hashlib.sha256(text.encode()).hexdigest(),
                               eval_tokens=n_tokens, perplexity=round(built_ppl, 4),
                               source_perplexity=round(source_ppl, 4))
    write_manifest(staged, manifest)
    return manifest


def _manifest(source, hf, options: BuildOptions, staged: Path, template_written: bool) -> ModelManifest:
    spec = options.quant
    quantization = Quantization(scheme=spec.scheme, method="none (fp32)")
    if spec.bits:
        quantization = Quantization(
            scheme=spec.scheme, method="onnxruntime MatMulNBits, round to nearest", bits=spec.bits,
            block_size=spec.block_size, symmetric=spec.symmetric, accuracy_level=ACCURACY_LEVEL_INT8,
            output_head_bits=max(spec.bits, spec.head_bits), eight_bit_layers=list(spec.eight_bit) or None,
        )
    tokenizer = hf.tokenizer
    names = [MODEL_FILE, EXTERNAL_DATA, TOKENIZER_FILE] + ([CHAT_TEMPLATE] if template_written else [])
    return ModelManifest(
        name=options.name or f"{source.default_name()}-{spec.scheme}",
        architecture=hf.architecture,
        model_type=hf.model_type,
        parameters=hf.model.num_parameters(),
        quantization=quantization,
        graph="optimum",
        source=SourceRecord(kind=source.kind, ref=source.ref, revision=source.revision, sha256=source.digest()),
        license=hf.license,
        generation=Generation(eos_token_ids=hf.eos_token_ids, bos_token_id=tokenizer.bos_token_id,
                              pad_token_id=tokenizer.pad_token_id, context_length=hf.context_length,
                              chat_template=CHAT_TEMPLATE if template_written else None),
        files=describe_files(staged, names),
        built_with=package_versions("torch", "transformers", "optimum-onnx", "onnxruntime"),
    )


def _gguf_blocks(source, lineage: dict | None) -> Path | None:
    """The GGUF whose quantized blocks this build can reuse: the source itself, or the base a LoRA was merged
    into (its unchanged weights still equal the base's blocks; import_gguf checks each one)."""
    if source.kind == "gguf":
        return source.folder / source.gguf_file
    base = (lineage or {}).get("base")
    if base:
        try:
            base_source = resolve_source(base)
        except Exception:  # the base may be gone or on another machine: then there is nothing to reuse
            return None
        if base_source.kind == "gguf":
            return base_source.folder / base_source.gguf_file
    return None

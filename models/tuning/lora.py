"""LoRA fine-tuning with peft on the CPU, and merging the adapter back so the normal model build applies.

Training examples are (prompt, completion) pairs. The prompt is wrapped exactly as the device wraps a
`generate` prompt (the model's chat template, if it has one), and only the completion tokens carry loss,
so the tuned model learns to answer the prompts it will really be given.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgellm.models.errors import BuildError

LINEAGE_FILE = "edgellm-lineage.json"
# Per architecture: the attention projections peft should adapt by default.
TARGET_MODULES = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense"],
    "phi3": ["qkv_proj", "o_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
}


@dataclass
class LoraOptions:
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.0
    epochs: float = 1.0
    learning_rate: float = 1e-3
    batch_size: int = 4
    max_length: int = 512
    target_modules: list[str] | None = None
    seed: int = 0
    show_progress: bool = True


@dataclass
class TrainReport:
    base: str
    data_sha256: str
    examples: int
    steps: int
    seconds: float
    first_loss: float
    last_loss: float
    target_modules: list[str]
    options: dict = field(default_factory=dict)


def read_examples(path: Path) -> list[tuple[str, str]]:
    """JSONL lines of {"prompt", "completion"}, or invoices {"text", "gold"} (prompt = the instruction,
    a blank line and the invoice; completion = the gold JSON)."""
    from edgellm.models.tuning.invoices import INSTRUCTION

    examples = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as e:
        raise BuildError(f"--data: cannot read {path}: {e.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise BuildError(f"--data: line {n} of {path} is not JSON: {e}") from None
        if isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
            examples.append((row["prompt"], row["completion"]))
        elif isinstance(row, dict) and isinstance(row.get("text"), str) and isinstance(row.get("gold"), dict):
            examples.append((f"{INSTRUCTION}\n\n{row['text']}", json.dumps(row["gold"], ensure_ascii=False)))
        else:
            raise BuildError(f"--data: line {n} of {path} needs string 'prompt' and 'completion' fields "
                             "(or an invoice's 'text' and 'gold')")
    if not examples:
        raise BuildError(f"--data: {path} holds no examples")
    return examples


def encode_example(tokenizer, prompt: str, completion: str, eos_id: int, max_length: int) -> tuple[list, list]:
    """(input ids, labels): the prompt as the device renders it, masked out with -100."""
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        prompt_ids = tokenizer(prompt)["input_ids"]
    answer = tokenizer(completion, add_special_tokens=False)["input_ids"] + [eos_id]
    ids = (prompt_ids + answer)[:max_length]
    labels = ([-100] * len(prompt_ids) + answer)[:max_length]
    return ids, labels


def target_modules_for(model_type: str, requested: list[str] | None) -> list[str]:
    if requested:
        return requested
    if model_type not in TARGET_MODULES:
        raise BuildError(f"--target-modules: no default for architecture '{model_type}'; name the linear "
                         "layers to adapt, e.g. --target-modules q_proj,v_proj")
    return TARGET_MODULES[model_type]


def train_lora(base_ref: str, data: Path, out: Path, options: LoraOptions) -> TrainReport:
    import torch
    from peft import LoraConfig, get_peft_model

    from edgellm.models.building.export import load_source
    from edgellm.models.building.sources import resolve_source
    from edgellm.models.building.staging import check_output, staged_folder
    from edgellm.models.progress import training

    out = Path(out)
    check_output(out, force=False)
    examples = read_examples(data)
    source = resolve_source(base_ref)
    hf = load_source(source)
    modules = target_modules_for(hf.model_type, options.target_modules)
    missing = [m for m in modules if not any(name.endswith(m) for name, _ in hf.model.named_modules())]
    if missing:
        raise BuildError(f"--target-modules: {hf.architecture} has no layers named {', '.join(missing)}")
    torch.manual_seed(options.seed)
    config = LoraConfig(r=options.rank, lora_alpha=options.alpha, lora_dropout=options.dropout,
                        target_modules=modules, task_type="CAUSAL_LM")
    model = get_peft_model(hf.model, config)
    model.train()
    eos, pad = hf.eos_token_ids[0], hf.tokenizer.pad_token_id
    encoded = [encode_example(hf.tokenizer, p, c, eos, options.max_length) for p, c in examples]
    batches_per_epoch = -(-len(encoded) // options.batch_size)
    steps = max(1, round(batches_per_epoch * options.epochs))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=options.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / steps)
    rng = random.Random(options.seed)
    order: list[int] = []
    losses = []
    started = time.perf_counter()
    with training(steps, enabled=options.show_progress) as step_done:
        for _ in range(steps):
            if len(order) < options.batch_size:
                order += rng.sample(range(len(encoded)), len(encoded))
            batch, order = [encoded[i] for i in order[:options.batch_size]], order[options.batch_size:]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in batch])
            labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in batch])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            step_done(losses[-1])
    report = TrainReport(base=base_ref, data_sha256=hashlib.sha256(Path(data).read_bytes()).hexdigest(),
                         examples=len(examples), steps=steps, seconds=round(time.perf_counter() - started, 1),
                         first_loss=round(losses[0], 4), last_loss=round(losses[-1], 4), target_modules=modules,
                         options={k: v for k, v in asdict(options).items() if k != "show_progress"})
    with staged_folder(out) as (staged, _scratch):
        model.save_pretrained(staged, save_embedding_layers=False)
        lineage = {"base": base_ref, "base_sha256": source.digest(), "training": asdict(report)}
        (staged / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2) + "\n")
    return report


def merge_lora(base_ref: str, adapter: Path, out: Path, force: bool = False) -> dict:
    """Fold the adapter into the base weights (merge_and_unload) and save a plain HF folder to build from."""
    from peft import PeftModel

    from edgellm.models.building.export import load_source
    from edgellm.models.building.sources import resolve_source
    from edgellm.models.building.staging import check_output, staged_folder

    adapter, out = Path(adapter), Path(out)
    if not (adapter / "adapter_config.json").is_file():
        raise BuildError(f"--adapter: {adapter} is not a LoRA adapter folder (adapter_config.json is missing); "
                         "make one with `edgellm lora train`")
    check_output(out, force)
    hf = load_source(resolve_source(base_ref))
    merged = PeftModel.from_pretrained(hf.model, adapter).merge_and_unload()
    lineage_path = adapter / LINEAGE_FILE
    lineage = json.loads(lineage_path.read_text()) if lineage_path.is_file() else {"base": base_ref}
    lineage["adapter"] = {"path": str(adapter), "sha256": _folder_digest(adapter)}
    lineage["license"] = hf.license
    with staged_folder(out) as (staged, _scratch):
        merged.save_pretrained(staged)
        hf.tokenizer.save_pretrained(staged)
        if hf.tokenizer_json:  # the same bytes a build of the GGUF base writes: an update need not ship them
            (staged / "tokenizer.json").write_text(hf.tokenizer_json)
        if hf.license and not (staged / "README.md").exists():
            (staged / "README.md").write_text(f"---\nlicense: {hf.license}\n---\n")
        (staged / LINEAGE_FILE).write_text(json.dumps(lineage, indent=2) + "\n")
    return lineage


def _folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()

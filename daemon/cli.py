"""`edgellm`: a thin command line over the library. Host-side commands plug in through the
`edgellm.commands` entry point group, so this module never imports models/."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path
from typing import get_args

from pydantic import ValidationError

from edgellm.daemon import __version__
from edgellm.daemon.engine.params import GenerationParams
from edgellm.daemon.errors import CommandError, EdgeError
from edgellm.daemon.formats import AnswerMode
from edgellm.daemon.terminal.output import print_stream

HOST_PACKAGES = {"torch", "transformers", "optimum", "onnx", "onnx_ir", "gguf", "peft", "accelerate", "matplotlib",
                 "dask", "distributed"}
PARAM_FLAGS = {name: "--" + name.replace("_", "-") for name in GenerationParams.model_fields}  # field -> flag


def explain_validation(error: ValidationError, flags: dict[str, str]) -> str:
    lines = []
    for e in error.errors():
        field = str(e["loc"][0]) if e["loc"] else ""
        lines.append(f"{flags.get(field, field)}: {e['msg']}")
    return "; ".join(lines)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a model name from `edgellm models list`, or a model folder "
                   "(from `model build`)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")


def _add_param_args(p: argparse.ArgumentParser) -> None:
    """One flag per generation parameter, its help and default taken from GenerationParams."""
    for name, info in GenerationParams.model_fields.items():
        flag, help_text = PARAM_FLAGS[name], info.description or ""
        if info.annotation is bool:
            p.add_argument(flag, action="store_true", default=None, help=help_text)
        elif name == "stop":
            p.add_argument(flag, action="append", help=f"{help_text} (repeatable)")
        elif name == "speculative":
            p.add_argument(flag, type=_speculation_mode, help=help_text)
        elif name == "json_schema":
            p.add_argument(flag, type=Path, help=f"a file holding {help_text[0].lower()}{help_text[1:]}")
        else:
            kind = next(t for t in (int, float, str) if info.annotation in (t, t | None))
            default = f" (default {info.default:g})" if isinstance(info.default, int | float) else ""
            p.add_argument(flag, type=kind, help=help_text + default)
    p.add_argument("--verbose", action="store_true", help="print usage and timings to stderr")


def _speculation_mode(value: str) -> str | int:
    """--speculative takes auto, off or a number (GenerationParams checks its range)."""
    return int(value) if value.isdigit() else value


def params_from_args(args: argparse.Namespace) -> GenerationParams:
    values = {f: getattr(args, f) for f in PARAM_FLAGS if getattr(args, f, None) is not None}
    if "json_schema" in values:
        values["json_schema"] = _schema_file(values["json_schema"], "--json-schema")
    fmt = getattr(args, "format", None)  # run's --format, as ollama's: json, or a schema file
    if fmt is not None:
        values["json_schema"] = {"type": "object"} if fmt == "json" else _schema_file(Path(fmt), "--format")
    try:
        return GenerationParams(**values)
    except ValidationError as e:
        raise CommandError(explain_validation(e, PARAM_FLAGS)) from None


def _schema_file(path: Path, flag: str) -> dict:
    try:
        schema = json.loads(path.read_text())
    except OSError as e:
        raise CommandError(f"{flag}: cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise CommandError(f"{flag}: {path} is not JSON: {e}") from None
    if not isinstance(schema, dict):
        raise CommandError(f"{flag}: {path} must hold a JSON object (a JSON Schema)")
    return schema


def _load(args: argparse.Namespace):
    from edgellm.daemon.engine.generate import Generator
    from edgellm.daemon.engine.model import LoadedModel
    from edgellm.daemon.library import resolve_model

    if args.threads < 0:
        raise CommandError("--threads: must be 0 (all cores) or more")
    return Generator(LoadedModel.load(resolve_model(args.model), threads=args.threads))


def cmd_generate(args: argparse.Namespace) -> None:
    params = params_from_args(args)
    generator = _load(args)
    ids = generator.prompt_ids(prompt=args.prompt, raw=args.raw)
    print_stream(generator.stream(ids, params), args.verbose, as_json=args.json,
                 whole=params.json_schema is not None)


def cmd_chat(args: argparse.Namespace) -> None:
    from edgellm.daemon.terminal.backends import LocalBackend
    from edgellm.daemon.terminal.repl import ChatSession

    params = params_from_args(args)
    ChatSession(LocalBackend(_load(args)), params, args.system, args.verbose).run(sys.stdin.isatty())


def settings_from_args(args: argparse.Namespace):
    from edgellm.daemon.serve.settings import load_settings

    overrides: dict = {}
    if getattr(args, "device_id", None):
        overrides["device_id"] = args.device_id
    if getattr(args, "groups", None):
        overrides["groups"] = args.groups
    if getattr(args, "log_level", None):
        overrides["log_level"] = args.log_level
    if getattr(args, "log_format", None):
        overrides["log_format"] = args.log_format
    if getattr(args, "topic_root", None):
        overrides["topic_root"] = args.topic_root
    mqtt = {k: v for k, v in (("host", getattr(args, "mqtt_host", None)), ("port", getattr(args, "mqtt_port", None)))
            if v is not None}
    if mqtt:
        overrides["mqtt"] = mqtt
    if getattr(args, "model", None):
        overrides["model"] = {"path": args.model}
    if getattr(args, "http_port", None) is not None:
        overrides["http"] = {"enabled": True, "port": args.http_port}
    return load_settings(args.config, overrides)


def add_settings_args(p: argparse.ArgumentParser, mqtt: bool = True) -> None:
    """--config, and the broker's address for the commands that talk MQTT (local ones do not list it)."""
    p.add_argument("--config", type=Path, help="TOML file (default /etc/edgellm/edgellm.toml if present)")
    if mqtt:
        p.add_argument("--mqtt-host", help="the MQTT broker's host (mqtt.host)")
        p.add_argument("--mqtt-port", type=int, help="the MQTT broker's port (mqtt.port)")


def cmd_serve(args: argparse.Namespace) -> int:
    from edgellm.daemon.serve.daemon import serve

    settings = settings_from_args(args)
    return serve(settings, reload_settings=lambda: settings_from_args(args))


def cmd_request(args: argparse.Namespace) -> int:
    from edgellm.daemon.serve.client import RpcClient, rpc_topic

    try:
        payload = json.loads(args.payload)
    except json.JSONDecodeError as e:
        raise CommandError(f"JSON: the request payload is not JSON: {e}") from None
    if not isinstance(payload, dict):
        raise CommandError("JSON: the request payload must be a JSON object, e.g. '{\"prompt\": \"Hello\"}'")
    if args.stream:
        payload["stream"] = True
    settings = settings_from_args(args)
    topic = rpc_topic(settings, args.method, args.device, args.group)

    def show(delta: dict) -> None:
        sys.stdout.write(delta.get("text", ""))
        sys.stdout.flush()

    with RpcClient(settings) as client:
        reply = client.call(topic, payload, timeout=args.timeout, on_delta=show)
    if args.stream and reply.get("ok"):  # the text was printed as it came: the rest of the result, once
        sys.stdout.write("\n")
        print(json.dumps({k: v for k, v in reply.items() if k != "text"}, ensure_ascii=False), file=sys.stderr)
        return 0
    print(json.dumps(reply, ensure_ascii=False))
    return 0 if reply.get("ok") else 1


def _key_values(pairs: list[str] | None, flag: str) -> dict:
    out = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CommandError(f"{flag}: expected KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value) if value[:1] in "0123456789-tf[{\"" else value
        except json.JSONDecodeError:
            out[key] = value
    return out


def _open_store(args: argparse.Namespace):
    from edgellm.daemon.retrieval.embedder import Embedder
    from edgellm.daemon.retrieval.store import RetrievalStore

    settings = settings_from_args(args)
    path = args.store or settings.store.path
    if path is None:
        raise CommandError("--store: give the store file (or set store.path)")
    model = args.embedding_model or settings.embedding.path
    if model is None:
        raise CommandError("--embedding-model: give an embedding model, a name (edgellm pull minilm) or a folder "
                           "(edgellm model build minilm --task embedding --out DIR), or set embedding.path")
    return RetrievalStore(path, Embedder(model, threads=args.threads)), settings


def cmd_ingest(args: argparse.Namespace) -> None:
    from rich.progress import Progress

    from edgellm.daemon.retrieval.documents import collect

    store, settings = _open_store(args)
    metadata = _key_values(args.meta, "--meta")
    collected = collect(args.paths, args.collection, metadata, allowed=args.ingest_dirs or None,
                        max_bytes=settings.store.max_file_bytes)
    for r in collected.refused:
        print(f"left out {r.path}: {r.reason}", file=sys.stderr)
    with Progress(transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task("Embedding chunks", total=None)
        report = store.ingest(collected.documents,
                              progress=lambda done, total: bar.update(task, completed=done, total=total))
    left_out = f"; {len(collected.refused)} file(s) left out" if collected.refused else ""
    print(f"ingested {report.documents} document(s), {report.chunks} chunk(s); {report.unchanged} unchanged"
          f"{left_out}; store now holds {store.count()['documents']} documents, {store.count()['chunks']} chunks")


def cmd_search(args: argparse.Namespace) -> None:
    store, _ = _open_store(args)
    hits = store.search(args.query, args.k, args.collection, _key_values(args.filter, "--filter"), args.mode)
    if args.json:
        print(json.dumps([h.to_dict() for h in hits], ensure_ascii=False))
        return
    for h in hits:
        sim = f"{h.similarity:.2f}" if h.similarity is not None else "-"
        print(f"rank {h.score:.4f}  cosine {sim}  {h.source}:{h.page} [{h.start}:{h.end}]\n    "
              + " ".join(h.text.split())[:240])


def cmd_ask(args: argparse.Namespace) -> None:
    from edgellm.daemon.engine.generate import Generator
    from edgellm.daemon.engine.model import LoadedModel
    from edgellm.daemon.retrieval.rag import ask

    store, settings = _open_store(args)
    model = args.model or settings.model.path
    if model is None:
        raise CommandError("--model: give the generation model's name or folder (or set model.path)")
    params = params_from_args(args)
    from edgellm.daemon.library import resolve_model

    generator = Generator(LoadedModel.load(resolve_model(model), threads=args.threads))
    answer = ask(generator, store, args.question, params, args.k, args.collection,
                 _key_values(args.filter, "--filter"), settings.store.min_similarity,
                 args.mode or settings.store.answer_mode)
    if args.json:
        print(json.dumps({"answer": answer.answer, "citations": answer.citations}, ensure_ascii=False))
        return
    print(answer.answer.strip())
    for c in answer.citations:
        print(f"[{c['n']}] {c['source']}, page {c['page']}, chars {c['start']}-{c['end']} (score {c['score']:.4f})")


def _add_store_args(p: argparse.ArgumentParser) -> None:
    add_settings_args(p, mqtt=False)
    p.add_argument("--store", type=Path, help="the retrieval store file (store.path)")
    p.add_argument("--embedding-model", help="embedding model: a library name (edgellm pull minilm) or a folder "
                   "(embedding.path)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")
    p.add_argument("--collection", help="limit to, or ingest into, this collection")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgellm", description="On-device LLM daemon and model toolchain.")
    parser.add_argument("--version", action="version", version=f"edgellm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("generate", help="complete one prompt (wrapped in the model's chat template)")
    _add_model_args(p)
    _add_param_args(p)
    p.add_argument("prompt", help="the prompt (rendered with the model's chat template unless --raw)")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object with text, usage and timings")
    p.set_defaults(func=cmd_generate)

    p = commands.add_parser("chat", help="chat with a model on the terminal")
    _add_model_args(p)
    _add_param_args(p)
    p.add_argument("--system", help="a system message")
    p.set_defaults(func=cmd_chat)

    p = commands.add_parser("serve", help="run the daemon: answer requests over MQTT and, if enabled, HTTP")
    add_settings_args(p)
    p.add_argument("--model", help="the model to serve: a library name or a folder (model.path)")
    p.add_argument("--device-id", help="this device's id in MQTT topics (device_id; default: the host name)")
    p.add_argument("--http-port", type=int, help="serve the HTTP API (OpenAI's and Ollama's) on this port: "
                   "http.enabled and http.port")
    p.add_argument("--group", dest="groups", action="append", help="take load-balanced requests of this group")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log_level (default INFO)")
    p.add_argument("--log-format", choices=["text", "json"], help="text (no timestamp under journald), or one "
                   "JSON object per line")
    p.set_defaults(func=cmd_serve)

    p = commands.add_parser("ingest", help="add files or folders (txt, md, html, pdf) to a retrieval store")
    _add_store_args(p)
    p.add_argument("paths", nargs="+", type=Path, help="files or folders (.txt, .md, .html, .pdf)")
    p.add_argument("--meta", action="append", help="KEY=VALUE metadata for these documents (repeatable)")
    p.add_argument("--ingest-dir", dest="ingest_dirs", action="append", type=Path,
                   help="read only files inside this folder, links included (repeatable; as store.ingest_dirs)")
    p.set_defaults(func=cmd_ingest, collection="default")

    p = commands.add_parser("search", help="hybrid (vector + keyword) search of a retrieval store")
    _add_store_args(p)
    p.add_argument("query", help="what to look for, in any of the stored languages")
    p.add_argument("--k", type=int, default=5, help="passages to return (default 5)")
    p.add_argument("--filter", action="append", help="KEY=VALUE metadata filter (repeatable)")
    p.add_argument("--mode", choices=["auto", "float", "bit"], default="auto", help="vector search: float, "
                   "1-bit with float re-ranking, or auto (bit for large stores)")
    p.add_argument("--json", action="store_true", help="one JSON list of hits, each with its source path")
    p.set_defaults(func=cmd_search)

    p = commands.add_parser("ask", help="answer a question from a retrieval store, with citations")
    _add_store_args(p)
    _add_param_args(p)
    p.add_argument("question", help="the question; the answer cites the passages it used")
    p.add_argument("--model", help="the generation model: a library name or a folder (model.path)")
    p.add_argument("--k", type=int, default=4, help="passages given to the model (default 4)")
    p.add_argument("--filter", action="append", help="KEY=VALUE metadata filter (repeatable)")
    p.add_argument("--json", action="store_true", help="one JSON object: answer and citations with source paths")
    p.add_argument("--mode", choices=get_args(AnswerMode), help="grounded: a span copied from the best "
                   "sentence; free: text written from the passages (store.answer_mode; auto: grounded under 1B "
                   "parameters)")
    p.set_defaults(func=cmd_ask)

    p = commands.add_parser("request", help="send one request to a device or group over MQTT, print the reply")
    add_settings_args(p)
    p.add_argument("method", help="generate, chat, embed, status, cancel, ...")
    p.add_argument("payload", nargs="?", default="{}", help="the JSON request, e.g. '{\"prompt\": \"Hello\"}'")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--device", help="device id (default: this device's device_id)")
    target.add_argument("--group", help="send to a group: one member answers")
    p.add_argument("--stream", action="store_true", help="print the text as it arrives (stdout), then the rest "
                   "of the result (usage, timings) on stderr")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the reply; also the "
                   "request's MQTT message expiry (default 120)")
    p.set_defaults(func=cmd_request)

    models = commands.add_parser("models", help="the local model library: list, show, rm")
    sub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    sub.add_parser("list", help="models by name: id, size, when, chat or embedding").set_defaults(func=cmd_models)
    q = sub.add_parser("show", help="one model: architecture, quantization, context, template, license")
    q.add_argument("name", help="the model's name (edgellm models list)")
    q.add_argument("--json", action="store_true", help="print the manifest itself")
    q.set_defaults(func=cmd_models)
    q = sub.add_parser("rm", help="remove a model from the library")
    q.add_argument("name", help="the model's name (edgellm models list)")
    q.add_argument("--force", action="store_true", help="remove it even while a daemon serves it")
    q.set_defaults(func=cmd_models)

    p = commands.add_parser("pull", help="put a model into the local library by name: a signed bundle from a "
                            "store URL (verified, fetched by chunks; works on a device), or, with the host "
                            "toolchain, a .gguf file, a Hugging Face folder or hub id, or 'smollm2' / 'gemma3' / "
                            "'minilm'")
    p.add_argument("source", help="http(s):// or file:// URL of a bundle (.../bundles/NAME/VERSION) or of a "
                   "store (its latest bundle); or a .gguf file, Hugging Face folder or hub id, smollm2, gemma3, "
                   "minilm")
    p.add_argument("--name", help="the library name (default: the bundle's name, or from the source)")
    p.add_argument("--key", action="append", default=[], type=Path,
                   help="a release public key (KEY.pub from `edgellm keygen`) to verify a bundle with; repeatable")
    p.add_argument("--quant", choices=("int4", "int8", "fp32"), default="int4",
                   help="when building: default int4 (int8 for minilm)")
    p.add_argument("--force", action="store_true", help="replace a model already in the library")
    p.set_defaults(func=cmd_pull)
    p = commands.add_parser("run", help="answer a prompt with a model by name, pulling it first if missing; "
                            "without a prompt, chat. A daemon on this machine serving the model answers (warm); "
                            "otherwise the model is loaded here")
    p.add_argument("model", help="a library name (e.g. smollm2), something `pull` takes, or a model folder")
    p.add_argument("prompt", nargs="*", help="answer this and exit (default: chat); flags may come before or after")
    p.add_argument("--system", help="a system message")
    p.add_argument("--format", help="'json' for any JSON object, or a file holding a JSON Schema the answer "
                   "will validate against")
    p.add_argument("--local", action="store_true", help="load the model here even if a daemon serves it")
    p.add_argument("--key", action="append", default=[], type=Path, help="as for pull, when it pulls a bundle")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads when loaded here "
                   "(0: all cores)")
    p.add_argument("--config", type=Path, help="TOML file with the daemon's MQTT or HTTP credentials (default "
                   "/etc/edgellm/edgellm.toml if present)")
    _add_param_args(p)
    p.set_defaults(func=cmd_run)

    p = commands.add_parser("ps", help="what the daemons on this machine serve: model, memory, since when")
    p.add_argument("--json", action="store_true", help="one JSON list, a daemon each")
    p.set_defaults(func=cmd_ps)

    p = commands.add_parser("completion", help="print a shell completion script: "
                            "edgellm completion bash > /etc/bash_completion.d/edgellm")
    p.add_argument("shell", choices=["bash", "zsh"], help="the shell to complete in")
    p.set_defaults(func=cmd_completion)

    for ep in entry_points(group="edgellm.commands"):
        register: Callable[[argparse._SubParsersAction], None] = ep.load()
        register(commands)
    return parser


def pull(source: str, name: str | None = None, keys: list[Path] | None = None, quant: str = "int4",
         force: bool = False) -> Path:
    """A bundle from a store URL is fetched here; anything else is built by the host toolchain's builder
    (the `edgellm.builders` entry point), so this module never imports models/."""
    from edgellm.daemon.library import import_folder, is_model_folder, library_folder
    from edgellm.daemon.update.pull import is_store_url, pull_bundle

    if is_model_folder(Path(source)):
        return import_folder(Path(source), name, force)
    if is_store_url(source):
        manifest, folder = pull_bundle(source, keys or [], lambda bundle: library_folder(name or bundle), force)
        print(f"pulled {manifest.name} {manifest.version} into {folder} (signature and every file verified)",
              file=sys.stderr)
        return folder
    builders = {ep.name: ep for ep in entry_points(group="edgellm.builders")}
    if "pull" not in builders:
        raise CommandError(f"{source}: building a model needs the host toolchain (pip install 'edgellm[host]'); "
                           "on a device, pull a signed bundle by its store URL")
    return builders["pull"].load()(source, name, quant, force)


def cmd_pull(args: argparse.Namespace) -> None:
    pull(args.source, args.name, args.key, args.quant, args.force)


def cmd_run(args: argparse.Namespace) -> None:
    """`ollama run`: pull when missing, then answer PROMPT or chat, through a daemon serving the model if one
    runs here (daemon/terminal/backends.py)."""
    from edgellm.daemon.engine.chat import ChatMessage
    from edgellm.daemon.terminal.backends import LocalBackend, serving_daemon
    from edgellm.daemon.terminal.repl import ChatSession

    folder = _run_folder(args)
    params = params_from_args(args)
    backend = None
    if not args.local and params.logprobs is None:  # the daemon's replies carry no logprobs here: load it
        try:
            backend = serving_daemon(folder, settings_from_args(argparse.Namespace(config=args.config)))
        except CommandError:  # no usable config: nothing to reach a daemon with
            backend = None
    if backend is None:
        backend = LocalBackend(_load(argparse.Namespace(model=str(folder), threads=args.threads)))
    if not args.prompt:
        ChatSession(backend, params, args.system, args.verbose).run(sys.stdin.isatty())
        return
    prompt = " ".join(args.prompt)
    system = [ChatMessage(role="system", content=args.system)] if args.system else []
    events = backend.stream(params, messages=[*system, ChatMessage(role="user", content=prompt)])
    print_stream(events, args.verbose, whole=params.json_schema is not None)


def _run_folder(args: argparse.Namespace) -> Path:
    """The model `run` means: a folder, a library name, or a source pulled (built or fetched) first."""
    from edgellm.daemon.library import is_model_folder, library_folder, library_name
    from edgellm.daemon.update.pull import is_store_url, parse_address

    folder = Path(args.model)
    if not is_model_folder(folder):
        address = parse_address(args.model) if is_store_url(args.model) else None
        name = address.name if address else library_name(args.model)  # a .gguf is looked up under its pull name
        # a store URL without a bundle name (its latest) is always pulled: the name comes with the bundle
        if name is None or not is_model_folder(folder := library_folder(name)):
            folder = pull(args.model, keys=args.key)
    return folder


def cmd_ps(args: argparse.Namespace) -> None:
    from edgellm.daemon.serve.runtime import running_daemons
    from edgellm.daemon.terminal.listing import print_daemons

    print_daemons(running_daemons(), args.json)


def cmd_models(args: argparse.Namespace) -> None:
    """The local library: what is there, one model, removing one (not from under a daemon serving it)."""
    from edgellm.daemon.library import entries, library_home, library_model, remove
    from edgellm.daemon.serve.runtime import running_daemons
    from edgellm.daemon.terminal.listing import model_summary, print_models

    if args.models_command == "rm":
        folder = library_model(args.name)
        serving = [r for r in running_daemons() if r.serves(folder)]
        if serving and not args.force:
            pids = ", ".join(str(r.pid) for r in serving)
            raise CommandError(f"{args.name}: the daemon (pid {pids}) serves this model; stop it first, or "
                               "pass --force to remove it anyway (the daemon keeps it in memory until it restarts, "
                               "then cannot start with it)")
        remove(args.name)
        print(f"removed {args.name}" + (" (a running daemon still serves it from memory)" if serving else ""))
        return
    if args.models_command == "show":
        folder = library_model(args.name)
        if args.json:
            print((folder / "manifest.json").read_text().strip())
        else:
            print(model_summary(args.name, folder))
        return
    found = entries()
    if not found:
        print(f"no models in {library_home()}; `edgellm pull smollm2` builds the built-in one")
        return
    print_models(found)


def cmd_completion(args: argparse.Namespace) -> None:
    """shtab turns the parser (host commands included, where installed) into the shell's completion script."""
    import shtab

    print(shtab.complete(build_parser(), shell=args.shell))


def _command_parser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    """The subcommand's own parser, so an error shows its usage (`edgellm run: ...`), not the top level's."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """argparse, plus a positional after the options: argparse fills optional positionals at their first chance
    (`request generate --stream '{...}'`, `run smollm2 --max-tokens 8 "Count to twenty."`)."""
    args, extra = parser.parse_known_args(argv)
    command = getattr(args, "command", None)
    if extra and command == "request" and args.payload == "{}" and len(extra) == 1:
        args.payload = extra[0]
    elif extra and command == "run" and not any(e.startswith("-") for e in extra):
        args.prompt += extra
    elif extra:
        _command_parser(parser, command).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(build_parser(), argv)
    try:
        status = args.func(args)
        sys.stdout.flush()  # inside the try: a closed pipe is found here, not at exit
    except CommandError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except EdgeError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2 if e.code == "bad_request" else 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `edgellm search --json | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (Python docs, "Note on SIGPIPE")
        return 141
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in HOST_PACKAGES:
            print(f"error: `{args.command}` runs on the central host and needs {e.name}: run scripts/setup.sh "
                  "host, or pip install 'edgellm[host]'", file=sys.stderr)
            return 2
        raise
    return status or 0


if __name__ == "__main__":
    sys.exit(main())

"""`edgellm`: a thin command line over the library. Host-side commands plug in through the
`edgellm.commands` entry point group, so this module never imports models/."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from importlib.metadata import entry_points
from pathlib import Path

from pydantic import ValidationError

from daemon import __version__
from daemon.errors import CommandError, EdgeError

PARAM_FLAGS = {  # GenerationParams field -> flag
    "max_tokens": "--max-tokens", "temperature": "--temperature", "top_p": "--top-p", "top_k": "--top-k",
    "repetition_penalty": "--repetition-penalty", "seed": "--seed", "stop": "--stop",
    "json_schema": "--json-schema",
}


def explain_validation(error: ValidationError, flags: dict[str, str]) -> str:
    lines = []
    for e in error.errors():
        field = str(e["loc"][0]) if e["loc"] else ""
        lines.append(f"{flags.get(field, field)}: {e['msg']}")
    return "; ".join(lines)


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, type=Path, help="an edgellm model folder (from `model build`)")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: all cores)")


def _add_param_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float, help="0 for greedy decoding")
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")
    p.add_argument("--json-schema", type=Path, help="a JSON Schema file; the output will validate against it")
    p.add_argument("--verbose", action="store_true", help="print usage and timings to stderr")


def params_from_args(args: argparse.Namespace):
    from daemon.params import GenerationParams

    values = {f: getattr(args, f) for f in PARAM_FLAGS if getattr(args, f, None) is not None}
    if "json_schema" in values:
        path = values["json_schema"]
        try:
            values["json_schema"] = json.loads(path.read_text())
        except OSError as e:
            raise CommandError(f"--json-schema: cannot read {path}: {e.strerror}") from None
        except json.JSONDecodeError as e:
            raise CommandError(f"--json-schema: {path} is not JSON: {e}") from None
        if not isinstance(values["json_schema"], dict):
            raise CommandError(f"--json-schema: {path} must hold a JSON object")
    try:
        return GenerationParams(**values)
    except ValidationError as e:
        raise CommandError(explain_validation(e, PARAM_FLAGS)) from None


def _load(args: argparse.Namespace):
    from daemon.generate import Generator
    from daemon.model import LoadedModel

    if args.threads < 0:
        raise CommandError("--threads: must be 0 (all cores) or more")
    return Generator(LoadedModel.load(args.model, threads=args.threads))


def _print_stream(events, verbose: bool, as_json: bool = False):
    """Print deltas as they come; return the final Result."""
    from daemon.generate import Delta

    result = None
    for event in events:
        if isinstance(event, Delta):
            if not as_json:
                sys.stdout.write(event.text)
                sys.stdout.flush()
            continue
        if as_json:
            print(json.dumps({"text": event.text, "json": event.json, "finish_reason": event.finish_reason,
                              "usage": vars(event.usage), "timings": vars(event.timings)}, ensure_ascii=False))
        else:
            sys.stdout.write("\n")
        if verbose:
            t, u = event.timings, event.usage
            print(f"[{u.prompt_tokens} prompt + {u.completion_tokens} new tokens, finish {event.finish_reason}; "
                  f"first token {t.ttft_ms:.0f} ms, prefill {t.prefill_tps:.0f} tok/s, "
                  f"decode {t.decode_tps:.1f} tok/s]", file=sys.stderr)
        result = event
    return result


def cmd_generate(args: argparse.Namespace) -> None:
    params = params_from_args(args)
    generator = _load(args)
    ids = generator.prompt_ids(prompt=args.prompt, raw=args.raw)
    _print_stream(generator.stream(ids, params), args.verbose, as_json=args.json)


def cmd_chat(args: argparse.Namespace) -> None:
    from daemon.chat import ChatMessage

    params = params_from_args(args)
    generator = _load(args)
    history = [ChatMessage(role="system", content=args.system)] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"Chatting with {generator.model.manifest.name}. /reset clears the history, /exit or Ctrl-D quits.",
              file=sys.stderr)
    while True:
        if interactive:
            print(">>> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        if not line.strip():
            continue
        history.append(ChatMessage(role="user", content=line.rstrip("\n")))
        result = _print_stream(generator.stream(generator.prompt_ids(messages=history), params), args.verbose)
        history.append(ChatMessage(role="assistant", content=result.text))


def _settings(args: argparse.Namespace):
    from daemon.settings import load_settings

    overrides: dict = {}
    if getattr(args, "device_id", None):
        overrides["device_id"] = args.device_id
    if getattr(args, "groups", None):
        overrides["groups"] = args.groups
    if getattr(args, "log_level", None):
        overrides["log_level"] = args.log_level
    mqtt = {k: v for k, v in (("host", args.mqtt_host), ("port", args.mqtt_port)) if v is not None}
    if mqtt:
        overrides["mqtt"] = mqtt
    if getattr(args, "model", None):
        overrides["model"] = {"path": args.model}
    return load_settings(args.config, overrides)


def _add_settings_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="TOML file (default /etc/edgellm/edgellm.toml if present)")
    p.add_argument("--mqtt-host")
    p.add_argument("--mqtt-port", type=int)


def cmd_serve(args: argparse.Namespace) -> int:
    from daemon.serve import serve

    settings = _settings(args)
    return serve(settings, reload_settings=lambda: _settings(args))


def cmd_request(args: argparse.Namespace) -> int:
    from daemon.client import RpcClient, rpc_topic

    try:
        payload = json.loads(args.payload)
    except json.JSONDecodeError as e:
        raise CommandError(f"JSON: the request payload is not JSON: {e}") from None
    if not isinstance(payload, dict):
        raise CommandError("JSON: the request payload must be a JSON object, e.g. '{\"prompt\": \"Hello\"}'")
    if args.stream:
        payload["stream"] = True
    settings = _settings(args)
    topic = rpc_topic(settings, args.method, args.device, args.group)

    def show(delta: dict) -> None:
        sys.stdout.write(delta.get("text", ""))
        sys.stdout.flush()

    with RpcClient(settings) as client:
        reply = client.call(topic, payload, timeout=args.timeout, on_delta=show)
    if args.stream:
        sys.stdout.write("\n")
    print(json.dumps(reply, ensure_ascii=False))
    return 0 if reply.get("ok") else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgellm", description="On-device LLM daemon and model toolchain.")
    parser.add_argument("--version", action="version", version=f"edgellm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("generate", help="complete one prompt (wrapped in the model's chat template)")
    _add_model_args(p)
    _add_param_args(p)
    p.add_argument("prompt")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object with text, usage and timings")
    p.set_defaults(func=cmd_generate)

    p = commands.add_parser("chat", help="chat with a model on the terminal")
    _add_model_args(p)
    _add_param_args(p)
    p.add_argument("--system", help="a system message")
    p.set_defaults(func=cmd_chat)

    p = commands.add_parser("serve", help="run the daemon: answer requests over MQTT")
    _add_settings_args(p)
    p.add_argument("--model", type=Path, help="the model folder (model.path)")
    p.add_argument("--device-id")
    p.add_argument("--group", dest="groups", action="append", help="take load-balanced requests of this group")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(func=cmd_serve)

    p = commands.add_parser("request", help="send one request to a device or group over MQTT, print the reply")
    _add_settings_args(p)
    p.add_argument("method", help="generate, chat, embed, status, cancel, ...")
    p.add_argument("payload", nargs="?", default="{}", help="the JSON request, e.g. '{\"prompt\": \"Hello\"}'")
    target = p.add_mutually_exclusive_group()
    target.add_argument("--device", help="device id (default: this device's device_id)")
    target.add_argument("--group", help="send to a group: one member answers")
    p.add_argument("--stream", action="store_true", help="print text deltas as they arrive")
    p.add_argument("--timeout", type=float, default=120.0)
    p.set_defaults(func=cmd_request)

    for ep in entry_points(group="edgellm.commands"):
        register: Callable[[argparse._SubParsersAction], None] = ep.load()
        register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse cannot take `request generate --stream '{...}'` (a positional after an option): accept it.
    if extra and getattr(args, "command", None) == "request" and args.payload == "{}" and len(extra) == 1:
        args.payload = extra[0]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        status = args.func(args)
    except CommandError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except EdgeError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2 if e.code == "bad_request" else 1
    except KeyboardInterrupt:
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())

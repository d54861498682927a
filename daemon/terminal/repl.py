"""The chat REPL of `edgellm run NAME` and `edgellm chat`, with `ollama run`'s commands: /help, /set, /show,
/clear, /save, /load, /bye. A line starting with / is a command, never a message; Ctrl-C stops the answer being
written and keeps the session (at the prompt it says how to leave, as ollama does)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from edgellm.daemon.engine.chat import ChatMessage
from edgellm.daemon.engine.params import GenerationParams
from edgellm.daemon.terminal.output import print_stream, print_usage

HELP = """Available commands:
  /set system TEXT          set the system message (clears the conversation)
  /set parameter NAME VALUE set a generation parameter, e.g. /set parameter temperature 0.2
  /set verbose | quiet      show (or hide) token counts and speed after each answer
  /show                     the model, its parameters and the system message
  /show info | parameters | system | template | license
  /clear                    forget the conversation (the system message stays)
  /save FILE, /load FILE    keep a conversation as JSON (OpenAI's messages), or read one back
  /bye                      leave (also /exit, Ctrl-D)
  /help                     this list
Ctrl-C stops an answer; the session goes on."""


class ChatSession:
    def __init__(self, backend, params: GenerationParams, system: str | None = None, verbose: bool = False):
        self.backend = backend
        self.params = params
        self.system = system
        self.verbose = verbose
        self.history: list[ChatMessage] = self._start()

    def _start(self) -> list[ChatMessage]:
        return [ChatMessage(role="system", content=self.system)] if self.system else []

    def run(self, interactive: bool) -> None:
        if interactive:
            _line_editing()
            print(f"Chatting with {self.backend.manifest.name} ({self.backend.where}). /help lists the commands, "
                  "/bye or Ctrl-D quits.", file=sys.stderr)
        while True:
            try:
                line = input(">>> ") if interactive else sys.stdin.readline()
            except EOFError:
                return
            except KeyboardInterrupt:  # at the prompt: a new line, as in ollama
                print("\nUse Ctrl-D or /bye to exit.", file=sys.stderr)
                continue
            if not line:
                return
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if not self.command(text):
                    return
                continue
            self.say(line.rstrip("\n"))

    def say(self, text: str) -> None:
        self.history.append(ChatMessage(role="user", content=text))
        events = self.backend.stream(self.params, messages=self.history)
        try:
            result = print_stream(events, False)
        except KeyboardInterrupt:
            events.close()  # a daemon is told to cancel; a model loaded here just stops
            self.history.pop()  # the unfinished exchange is not part of the conversation
            print("\n[stopped]", file=sys.stderr)
            return
        self.history.append(ChatMessage(role="assistant", content=result.text))
        if self.verbose:
            print_usage(result)

    def command(self, text: str) -> bool:
        """Run one /command; False ends the session."""
        command, _, rest = text.partition(" ")
        rest = rest.strip()
        if command in ("/bye", "/exit", "/quit"):
            return False
        if command in ("/help", "/?"):
            print(HELP, file=sys.stderr)
        elif command in ("/clear", "/reset"):
            self.history = self._start()
            print("Cleared the conversation.", file=sys.stderr)
        elif command == "/set":
            self._set(rest)
        elif command == "/show":
            self._show(rest)
        elif command in ("/save", "/load"):
            self.history = _save_or_load(command, rest, self.history)
        else:
            print(f"Unknown command {command!r}. /help lists the commands.", file=sys.stderr)
        return True

    def _set(self, rest: str) -> None:
        what, _, value = rest.partition(" ")
        value = value.strip()
        if what == "system":
            if not value:
                print("/set system needs the text, e.g. /set system Answer in Spanish.", file=sys.stderr)
                return
            self.system = value
            self.history = self._start()
            print("Set the system message (the conversation starts over).", file=sys.stderr)
        elif what == "parameter":
            self._set_parameter(*value.partition(" ")[::2])
        elif what in ("verbose", "quiet"):
            self.verbose = what == "verbose"
            print(f"Set {what} mode.", file=sys.stderr)
        else:
            print("/set takes system TEXT, parameter NAME VALUE, verbose or quiet.", file=sys.stderr)

    def _set_parameter(self, name: str, value: str) -> None:
        name = {"num_predict": "max_tokens", "repeat_penalty": "repetition_penalty"}.get(name, name)
        if name not in GenerationParams.model_fields or name == "json_schema":
            known = ", ".join(n for n in GenerationParams.model_fields if n != "json_schema")
            print(f"/set parameter: {name or '?'} is not a parameter; one of {known}", file=sys.stderr)
            return
        if not value.strip():
            print(f"/set parameter {name} needs a value, e.g. /set parameter temperature 0.2", file=sys.stderr)
            return
        try:
            parsed = [*self.params.stop, value] if name == "stop" else json.loads(value)
        except json.JSONDecodeError:
            parsed = value  # a word: speculative auto, an adapter's name
        try:
            checked = getattr(GenerationParams(**{name: parsed}), name)
        except ValidationError as e:
            print(f"/set parameter {name}: {e.errors()[0]['msg']}", file=sys.stderr)
            return
        self.params = self.params.model_copy(update={name: checked})
        print(f"Set parameter {name!r} to {checked!r}.", file=sys.stderr)

    def _show(self, what: str) -> None:
        m = self.backend.manifest
        changed = self.params.model_dump(exclude_defaults=True)
        parameters = "\n".join(f"  {k:<20} {v}" for k, v in changed.items()) or "  (the defaults)"
        template = _template(self.backend.folder, m)
        sections = {
            "info": f"Model {m.name} {m.version} ({self.backend.where})\n  architecture  {m.architecture}\n"
                    f"  parameters    {m.parameter_size or '-'}\n  quantization  {m.quantization.scheme}\n"
                    f"  context       "
                    f"{m.generation.context_length if m.generation else '-'} tokens",
            "parameters": "Parameters\n" + parameters,
            "system": "System message\n  " + (self.system or "(none)"),
            "template": template or "(no chat template)",
            "license": m.license or "(no license recorded in the manifest)",
        }
        if what and what not in sections:
            print(f"/show takes {', '.join(sections)}, or nothing for a summary.", file=sys.stderr)
            return
        for name in [what] if what else ["info", "parameters", "system"]:
            print(sections[name], file=sys.stderr)


def _template(folder: Path, manifest) -> str | None:
    name = manifest.generation.chat_template if manifest.generation else None
    try:
        return (folder / name).read_text() if name else None
    except OSError:
        return None


def _line_editing() -> None:
    """Arrow keys, Ctrl-R and a history kept between sessions (GNU readline, where Python has it)."""
    try:
        import readline
    except ImportError:
        return
    import atexit

    path = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local/state") / "edgellm/chat_history"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)
    atexit.register(lambda: _quietly(readline.write_history_file, path))


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except OSError:
        pass


def _save_or_load(command: str, path: str, history: list[ChatMessage]) -> list[ChatMessage]:
    """/save FILE writes the conversation as JSON (OpenAI's messages); /load FILE replaces it with one."""
    if not path:
        print(f"{command} needs a file name, e.g. {command} invoice-chat.json", file=sys.stderr)
        return history
    try:
        if command == "/save":
            Path(path).write_text(json.dumps([m.model_dump() for m in history], ensure_ascii=False, indent=1))
            print(f"saved {len(history)} messages to {path}", file=sys.stderr)
            return history
        loaded = TypeAdapter(list[ChatMessage]).validate_json(Path(path).read_text())
    except OSError as e:
        print(f"{command}: {path}: {e.strerror}", file=sys.stderr)
        return history
    except ValidationError as e:
        print(f"/load: {path} is not a saved conversation ({e.error_count()} problems, e.g. "
              f"{e.errors()[0]['msg']})", file=sys.stderr)
        return history
    print(f"loaded {len(loaded)} messages from {path}", file=sys.stderr)
    return loaded

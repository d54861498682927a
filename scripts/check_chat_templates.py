"""Chat turns as edgellm renders them, against llama.cpp's rendering for the same GGUF file.

edgellm renders the file's own Jinja template (`tokenizer.chat_template`, in a sandbox, as transformers
does); llama.cpp's `llama_chat_apply_template` recognises the template's family and writes its built-in
format. For each file and each conversation (a user turn; system and user; system, user, assistant, user)
the texts must equal llama-cpp-python's Jinja rendering of the same template (`same`); where they differ
from llama.cpp's built-in format, the line shows the first difference. A file without a template: edgellm
refuses chat with a note, and the line says what llama.cpp does instead.

    .venv/bin/python scripts/check_chat_templates.py [--models smollm2,gemma3]

Needs the llama.cpp anchor (scripts/install_bench_anchors.sh). Ends with one JSON line: per model `same`
(true, false, or null where the file has no template) and `all_same`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench_models import cached_build  # scripts/, on the path when a script runs

ROOT = Path(__file__).resolve().parent.parent
LLAMA_PY = ROOT / ".cache/anchors/bin/python"
CONVERSATIONS = [
    [{"role": "user", "content": "What is the total of invoice INV-0042?"}],
    [{"role": "system", "content": "You answer from the documents only."},
     {"role": "user", "content": "When is the payment due?"}],
    [{"role": "system", "content": "You answer from the documents only."},
     {"role": "user", "content": "Who issued the invoice?"},
     {"role": "assistant", "content": "Acme Tools GmbH."},
     {"role": "user", "content": "And who pays it?"}],
]
# llama.cpp's side, in the anchor's venv: the file's template rendered by llama.cpp's built-in formats
# (llama_chat_apply_template), and as Jinja by llama-cpp-python (what its create_chat_completion does)
LLAMA = r"""
import ctypes, json, sys
import llama_cpp
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
source, specials, conversations = (json.loads(a) for a in sys.argv[1:4])
template = source.encode() if source is not None else None
builtin, jinja = [], []
for chat in conversations:
    msgs = (llama_cpp.llama_chat_message * len(chat))(
        *[llama_cpp.llama_chat_message(role=m["role"].encode(), content=m["content"].encode()) for m in chat])
    buf = ctypes.create_string_buffer(1 << 16)
    n = llama_cpp.llama_chat_apply_template(template, msgs, len(chat), True, buf, len(buf))
    builtin.append(buf.raw[:n].decode() if n >= 0 else None)
    if source is not None:
        formatter = Jinja2ChatFormatter(source, specials.get("eos_token", ""), specials.get("bos_token", ""))
        jinja.append(formatter(messages=chat).prompt)
print(json.dumps({"has_template": template is not None, "builtin": builtin, "jinja": jinja}))
"""


def file_template(name: str) -> str | None:
    """The GGUF's `tokenizer.chat_template`, None where it has none."""
    from gguf import GGUFReader

    from edgellm.models.building.sources import resolve_source

    source = resolve_source(name)
    field = GGUFReader(source.folder / source.gguf_file).fields.get("tokenizer.chat_template")
    return bytes(field.parts[field.data[0]]).decode() if field else None


def ours(folder: Path) -> tuple[list[str], dict[str, str]]:
    from edgellm.daemon.engine.chat import ChatMessage
    from edgellm.daemon.engine.model import LoadedModel
    from edgellm.daemon.errors import EdgeError

    model = LoadedModel.load(folder, threads=1)
    specials = model.template._special if model.template is not None else {}
    texts = []
    for chat in CONVERSATIONS:
        try:
            texts.append(model.render_chat([ChatMessage(**m) for m in chat]))
        except EdgeError as e:
            texts.append(f"refused: {e.message}")
    return texts, specials


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="smollm2,gemma3")
    args = p.parse_args()
    if not LLAMA_PY.exists():
        sys.exit("the llama.cpp anchor is missing: scripts/install_bench_anchors.sh")
    result: dict = {}
    for name in args.models.split(","):
        folder = cached_build(ROOT / ".cache" / "bench" / f"{name}-spec", name)
        mine, specials = ours(folder)
        r = subprocess.run([str(LLAMA_PY), "-c", LLAMA, json.dumps(file_template(name)), json.dumps(specials),
                            json.dumps(CONVERSATIONS)], capture_output=True, text=True, check=True)
        theirs = json.loads(r.stdout)
        if theirs["has_template"]:
            result[name] = {"same": mine == theirs["jinja"],
                            "same_as_builtin": [a == b for a, b in zip(mine, theirs["builtin"], strict=True)]}
            for kind in ("jinja", "builtin"):
                differ = [(a, b) for a, b in zip(mine, theirs[kind], strict=True) if a != b]
                if differ:
                    result[name][f"first_difference_{kind}"] = {"edgellm": differ[0][0], "llamacpp": differ[0][1]}
        else:
            result[name] = {"same": None, "edgellm": mine[0],
                            "llamacpp": "no template in the file; llama.cpp " +
                            ("renders its default (ChatML): " + repr(theirs["builtin"][0][:60])
                             if theirs["builtin"][0] else "refuses")}
        print(name, json.dumps(result[name], ensure_ascii=False), file=sys.stderr)
    known = [v["same"] for v in result.values() if v["same"] is not None]
    print(json.dumps({**{k: v["same"] for k, v in result.items()}, "all_same": all(known) and bool(known),
                      "details": result}, ensure_ascii=False))


if __name__ == "__main__":
    main()

"""A model folder, loaded: manifest, onnxruntime decoder, tokenizer and chat template."""

from __future__ import annotations

import ctypes
import ctypes.util
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from edgellm.daemon.engine.chat import ChatMessage, ChatTemplate
from edgellm.daemon.engine.decoder import OnnxDecoder
from edgellm.daemon.engine.manifest import ModelManifest, load_manifest
from edgellm.daemon.errors import EdgeError

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"


@dataclass
class LoadedModel:
    folder: Path
    manifest: ModelManifest
    decoder: OnnxDecoder
    tokenizer: Tokenizer
    template: ChatTemplate | None

    @classmethod
    def load(cls, folder: str | Path, threads: int = 0, verify_hashes: bool = False) -> LoadedModel:
        folder = Path(folder)
        manifest = load_manifest(folder, verify_hashes=verify_hashes, task="text-generation")
        try:
            tokenizer = Tokenizer.from_file(str(folder / TOKENIZER_FILE))
            return_free_heap()  # before the session: the two loads' peaks do not add up
            decoder = OnnxDecoder(folder / MODEL_FILE, threads=threads)
        except Exception as e:  # onnxruntime and tokenizers raise their own types
            raise EdgeError("model_unavailable", f"{folder}: cannot load the model: {e}") from None
        if decoder.adapters is not None:
            decoder.adapters.load_folder(folder)  # the LoRA adapters shipped beside the base (adapters/NAME/)
        template = None
        if manifest.generation.chat_template:
            source = (folder / manifest.generation.chat_template).read_text()
            template = ChatTemplate(source, _special_tokens(tokenizer, manifest))
        return_free_heap()  # and what the session's load freed (20 MB more for Gemma 3 270M)
        return cls(folder, manifest, decoder, tokenizer, template)

    @property
    def context_length(self) -> int:
        return self.manifest.generation.context_length

    @property
    def eos_token_ids(self) -> frozenset[int]:
        return frozenset(self.manifest.generation.eos_token_ids)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def render_chat(self, messages: list[ChatMessage]) -> str:
        if self.template is None:
            raise EdgeError("bad_request", f"model {self.manifest.name} has no chat template: "
                            "send a plain prompt to generate instead")
        return self.template.render(messages)

    def tokenizer_json(self) -> str:
        return (self.folder / TOKENIZER_FILE).read_text()


def return_free_heap() -> None:
    """Give the heap that loading freed back to the system (glibc's malloc_trim). Parsing a 262k-token
    tokenizer.json (Gemma 3) leaves ~190 MB freed but held by the allocator, which a device would otherwise
    carry for as long as the model is served (docs/performance.md, "Memory")."""
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc (musl, macOS): nothing to give back this way
        pass


def _special_tokens(tokenizer: Tokenizer, manifest: ModelManifest) -> dict[str, str]:
    gen = manifest.generation
    tokens = {"eos_token": tokenizer.id_to_token(gen.eos_token_ids[0]) if gen.eos_token_ids else ""}
    tokens["bos_token"] = tokenizer.id_to_token(gen.bos_token_id) if gen.bos_token_id is not None else ""
    return {k: v or "" for k, v in tokens.items()}


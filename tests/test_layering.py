"""The layering, pinned: every import in the package points down (or within its own room).

    applications ─► export ─► reference (torch) ─► formats ─► contract
         │            └─► corpus                     ▲          ▲
         └──────────► keyboard ─► engine ────────────┴──────────┘

Device rooms (contract, formats, engine, keyboard) import neither torch nor the exporter nor the
reference model; only the torch backends of the engine may use the reference model. The checks
read every ``import`` statement (module level and inside functions) from the source, then import
the device rooms in a child process where torch cannot be imported.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {
    "sdk": "pocketpeft",
    "export": "pocketpeft.export",
    "runtime": "pocketpeft.runtime",
    "fleet": "pocketpeft.fleet",
}

CONTRACT = {
    "errors",
    "config",
    "manifest",
    "adapter",
    "global_adapter",
    "tokenizer",
    "fsutil",
    "registry",
    "_deps",
    "text",
    "procinfo",
    "families",
    "modelpkg",
}
#: Engine backends that run the torch reference model (host and server, or ExecuTorch's torch-fed API).
TORCH_BACKENDS = {"torch_backend", "peft_backend", "executorch_backend", "step_graph"}
#: Third-party packages a device room must not import (host work or the reference stack).
HOST_ONLY = {
    "torch",
    "transformers",
    "peft",
    "bitsandbytes",
    "onnx",
    "onnxscript",
    "coremltools",
    "executorch",
    "benchmarks",
}

#: room -> rooms it may import (its own room included).
ALLOWED = {
    "contract": {"contract", "formats"},
    "formats": {"contract", "formats"},
    "reference": {"contract", "formats", "reference"},
    "corpus": {"contract", "corpus"},
    "export": {"contract", "formats", "reference", "corpus", "export"},
    "engine": {"contract", "formats", "engine"},
    "torch-engine": {"contract", "formats", "reference", "engine", "torch-engine"},
    "keyboard": {"contract", "formats", "engine", "keyboard"},
    # federated learning: the ClientApp is a device (engine + keyboard), the ServerApp aggregates
    # LoRA tensors; chitchat senders feed simulated clients (corpus)
    "fleet": {"contract", "formats", "engine", "keyboard", "corpus", "fleet"},
    "apps": {
        "contract",
        "formats",
        "reference",
        "corpus",
        "export",
        "engine",
        "torch-engine",
        "keyboard",
        "fleet",
        "apps",
    },
    # package faces: ``pocketpeft`` and ``pocketpeft.runtime`` re-export their rooms' public names
    "face:pocketpeft": {"contract"},
    "face:runtime": {"contract", "formats", "engine", "keyboard"},
    "face:export": {"contract", "formats", "reference", "corpus", "export"},
}
DEVICE_ROOMS = {"contract", "formats", "engine", "keyboard", "face:runtime"}


def room_of(module: str) -> str | None:
    """The room of a ``pocketpeft`` module name (None outside the package)."""
    parts = module.split(".")
    if parts[0] != "pocketpeft":
        return None
    if module == "pocketpeft":
        return "face:pocketpeft"
    second = parts[1]
    if second in CONTRACT:
        return "contract"
    if second in ("formats", "reference", "corpus", "apps", "fleet"):
        return second
    if second == "__main__":
        return "apps"
    if second == "export":
        return "face:export" if len(parts) == 2 else "export"
    if second == "runtime":
        if len(parts) == 2:
            return "face:runtime"
        if parts[2] == "keyboard":
            return "keyboard"
        if parts[2] == "backends" and len(parts) > 3 and parts[3] in TORCH_BACKENDS:
            return "torch-engine"
        return "engine"
    raise AssertionError(f"{module} belongs to no room: add it to tests/test_layering.py")


def package_modules() -> dict[str, Path]:
    """Every module of the package: dotted name -> source file."""
    out = {}
    for folder, pkg in PACKAGE_DIRS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("").parts
            if folder == "sdk" and rel[0] in ("export", "runtime", "fleet"):
                continue
            if rel[-1] == "__init__":
                rel = rel[:-1]
            out[".".join((pkg, *rel))] = path
    return out


_MODULE_NAMES = set(package_modules())


def imports_of(module: str, path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import statement in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base[: len(base) - node.level + 1]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # ``from pocketpeft import runtime`` imports a module, not a name
            for a in node.names:
                candidate = f"{target}.{a.name}"
                if candidate.startswith("pocketpeft.") and _is_module(candidate):
                    found.append((node.lineno, candidate))
    return found


def _is_module(name: str) -> bool:
    return name in _MODULE_NAMES


def violations(modules: dict[str, Path]) -> list[str]:
    """Every import that points up or sideways, or pulls host-only code into a device room."""
    bad = []
    for module, path in modules.items():
        room = room_of(module)
        where = f"{path.relative_to(ROOT)}"
        for line, target in imports_of(module, path):
            top = target.split(".")[0]
            if room in DEVICE_ROOMS and top in HOST_ONLY:
                bad.append(f"{where}:{line}: device room {room!r} imports {target}")
                continue
            if top == "benchmarks":
                bad.append(f"{where}:{line}: the package imports benchmarks ({target})")
                continue
            other = room_of(target)
            if other is None or other.startswith("face:") and other == room:
                continue
            if other.startswith("face:"):
                other = {"face:pocketpeft": "contract", "face:runtime": "engine", "face:export": "export"}[other]
                if target == "pocketpeft" and room != "face:pocketpeft":
                    continue  # ``from pocketpeft import __version__`` and friends: the face's own names
            if other not in ALLOWED[room]:
                bad.append(f"{where}:{line}: {room} imports {target} ({other})")
    return bad


def test_every_module_has_a_room():
    for module in package_modules():
        assert room_of(module) is not None


def test_imports_point_down():
    bad = violations(package_modules())
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The check is not vacuous: an engine module importing the keyboard, a contract module
    importing torch and the device importing the exporter are each reported."""
    planted = {
        "pocketpeft.runtime.session": "from .keyboard.personalizer import Personalizer\n",
        "pocketpeft.manifest": "import torch\n",
        "pocketpeft.runtime.backends.onnxruntime_backend": "from pocketpeft.export import onnx_target\n",
        "pocketpeft.formats.gguf": "from pocketpeft.reference.model import CausalLM\n",
    }
    modules = {}
    for name, src in planted.items():
        real = package_modules()[name]
        p = tmp_path / real.relative_to(ROOT)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(real.read_text(encoding="utf-8") + "\n\ndef _planted():\n" + textwrap.indent(src, "    "))
        modules[name] = p
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    bad = violations(modules)
    assert {b.split(":")[0] for b in bad} == {str(m.relative_to(tmp_path)) for m in modules.values()}, bad
    assert any("engine imports pocketpeft.runtime.keyboard.personalizer" in b for b in bad)
    assert any("device room 'contract' imports torch" in b for b in bad)
    assert any("imports pocketpeft.export.onnx_target" in b for b in bad)
    assert any("formats imports pocketpeft.reference.model" in b for b in bad)


def test_device_rooms_import_without_torch():
    """Every device module imports in a process where torch, the exporter and the reference model
    cannot be imported (their extras' absence is tolerated: only the import graph is checked)."""
    device = sorted(m for m in package_modules() if room_of(m) in DEVICE_ROOMS)
    code = textwrap.dedent(f"""
        import importlib, sys
        from importlib.abc import MetaPathFinder
        BLOCK = ("torch", "transformers", "peft", "onnx", "pocketpeft.export", "pocketpeft.reference")
        class Block(MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if any(name == b or name.startswith(b + ".") for b in BLOCK):
                    raise ImportError(f"blocked: {{name}}")
        sys.meta_path.insert(0, Block())
        for m in {device!r}:
            importlib.import_module(m)
        leaked = [m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "peft")
                  or m.startswith(("pocketpeft.export", "pocketpeft.reference"))]
        assert not leaked, leaked
        print(len({device!r}))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert int(r.stdout.split()[-1]) == len(device)


@pytest.mark.parametrize("face", ["pocketpeft", "pocketpeft.runtime"])
def test_faces_stay_light(face):
    """``import pocketpeft`` / ``pocketpeft.runtime`` load neither torch nor the exporter."""
    code = (
        f"import sys, {face}; bad = [m for m in sys.modules if m.split('.')[0] == 'torch' "
        "or m.startswith(('pocketpeft.export', 'pocketpeft.reference'))]; print(bad); assert not bad"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr[-2000:]

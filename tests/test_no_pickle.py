"""No unpickling anywhere in the repository, except the one weights-only converter.

Every ``.py`` file is parsed (AST, so strings and comments do not count) and these calls fail the test:
``torch.load`` without ``weights_only=True``; ``pickle``/``cPickle``/``_pickle``/``dill`` ``load``,
``loads`` and ``Unpickler``; ``joblib.load``; ``pandas.read_pickle``; ``shelve.open``; ``marshal.load(s)``;
``numpy.load`` with ``allow_pickle`` anything but ``False``; ``yaml.load``/``load_all`` without
``SafeLoader``/``CSafeLoader``, ``yaml.unsafe_load``/``full_load``; accelerate's ``load_state`` /
``load_custom_state`` (they unpickle with ``weights_only=False``). Aliases made by ``import x as y`` and
``from x import y`` are followed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ALLOWED = {"visreg_hub/hub/convert.py"}  # torch.load(weights_only=True) of official .pth files
SKIP_DIRS = {"third_party", "node_modules", "build", "dist", "__pycache__"}
PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle"}
SAFE_YAML = {"SafeLoader", "CSafeLoader"}


def _keyword(call: ast.Call, name: str):
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value
    return None


def _is_const(node, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


class _Scanner(ast.NodeVisitor):
    def __init__(self) -> None:
        self.aliases: dict[str, str] = {}  # local name -> dotted origin ("np" -> "numpy")
        self.problems: list[tuple[int, str]] = []

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:  # "import a.b" binds a; "import a.b as c" binds c to a.b
            origin = alias.name if alias.asname else alias.name.split(".")[0]
            self.aliases[alias.asname or origin] = origin

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        for alias in node.names:
            self.aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"

    def _dotted(self, func) -> str | None:
        parts = []
        while isinstance(func, ast.Attribute):
            parts.append(func.attr)
            func = func.value
        if not isinstance(func, ast.Name):
            return None
        parts.append(self.aliases.get(func.id, func.id))
        return ".".join(reversed(parts))

    def visit_Call(self, node: ast.Call) -> None:
        name = self._dotted(node.func) or ""
        module, _, attr = name.rpartition(".")
        root = name.split(".")[0]
        problem = None
        if name in {"torch.load", "torch.serialization.load"}:
            if not _is_const(_keyword(node, "weights_only"), True):
                problem = "torch.load without weights_only=True"
        elif root in PICKLERS and attr in {"load", "loads", "Unpickler"}:
            problem = f"{name} (unpickling)"
        elif name in {"joblib.load", "pandas.read_pickle", "shelve.open", "marshal.load", "marshal.loads"}:
            problem = f"{name} (unpickling / code objects)"
        elif name == "numpy.load":
            allow = _keyword(node, "allow_pickle")
            if allow is not None and not _is_const(allow, False):
                problem = "numpy.load with allow_pickle not False"
        elif module == "yaml" and attr in {"unsafe_load", "unsafe_load_all", "full_load", "full_load_all"}:
            problem = f"{name} (not a safe loader)"
        elif module == "yaml" and attr in {"load", "load_all"}:
            loader = _keyword(node, "Loader") or (node.args[1] if len(node.args) > 1 else None)
            loader_name = (self._dotted(loader) or "") if loader is not None else ""
            if loader_name.rpartition(".")[2] not in SAFE_YAML:
                problem = f"{name} without SafeLoader"
        elif isinstance(node.func, ast.Attribute) and node.func.attr in {"load_state", "load_custom_state"}:
            problem = f".{node.func.attr}() (accelerate unpickles with weights_only=False)"
        if problem:
            self.problems.append((node.lineno, problem))
        self.generic_visit(node)


def scan_source(source: str) -> list[tuple[int, str]]:
    scanner = _Scanner()
    scanner.visit(ast.parse(source))
    return scanner.problems


def _python_files() -> list[Path]:
    files = []
    for path in REPO.rglob("*.py"):
        parts = path.relative_to(REPO).parts
        if any(part.startswith(".") or part in SKIP_DIRS for part in parts[:-1]):
            continue
        files.append(path)
    return files


def test_no_unpickling_call_in_the_repository():
    files = _python_files()
    assert len(files) > 100 and REPO / "training" / "engine.py" in files
    found = []
    for path in files:
        relative = path.relative_to(REPO).as_posix()
        if relative in ALLOWED:
            continue
        found += [f"{relative}:{line}: {problem}" for line, problem in scan_source(path.read_text("utf-8"))]
    assert found == []


def test_the_one_allowed_loader_is_weights_only():
    source = (REPO / "visreg_hub/hub/convert.py").read_text("utf-8")
    problems = scan_source(source)
    assert problems == [] and "weights_only=True" in source


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load(p)",
        "import torch\ntorch.load(p, weights_only=False)",
        "import torch\ntorch.load(p, weights_only=flag)",
        "from torch import load\nload(p)",
        "import torch as T\nT.load(p)",
        "import pickle\npickle.load(f)",
        "import pickle as p\np.loads(b)",
        "from pickle import loads\nloads(b)",
        "import pickle\npickle.Unpickler(f).load()",
        "import dill\ndill.loads(b)",
        "import numpy as np\nnp.load(p, allow_pickle=True)",
        "import numpy\nnumpy.load(p, allow_pickle=x)",
        "import yaml\nyaml.load(s)",
        "import yaml\nyaml.load(s, Loader=yaml.Loader)",
        "import yaml\nyaml.unsafe_load(s)",
        "import yaml\nyaml.full_load(s)",
        "import joblib\njoblib.load(p)",
        "accelerator.load_state(folder)",
        "import marshal\nmarshal.loads(b)",
    ],
)
def test_the_scanner_flags_each_unsafe_form(snippet):
    assert len(scan_source(snippet)) == 1, snippet


@pytest.mark.parametrize(
    "snippet",
    [
        "import torch\ntorch.load(p, weights_only=True)",
        "import numpy as np\nnp.load(p)",
        "import numpy as np\nnp.load(p, allow_pickle=False)",
        "import yaml\nyaml.safe_load(s)",
        "import yaml\nyaml.load(s, Loader=yaml.SafeLoader)",
        "from yaml import CSafeLoader, load\nload(s, CSafeLoader)",
        "import pickle\npickle.dumps(x)",
        "model.load_state_dict(state)",
        "import json\njson.loads(s)",
        "s = 'torch.load(p)'",
    ],
)
def test_the_scanner_accepts_safe_forms(snippet):
    assert scan_source(snippet) == [], snippet

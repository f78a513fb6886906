"""The identity of the code that computes a stage: part of its work fingerprint (:mod:`ibot.workdir`).

What counts: every module of this project (``ibot``, ``downstream``) that the stage's registry entry
reaches through its imports (module-level and function-local ones, found in the source without importing
anything), as its syntax tree with comments, docstrings, formatting and log statements (``print(...)`` and
``log(...)`` calls, the logging of this code base: :data:`LOG_CALLS`) removed. So a change to what the stage computes moves its work aside, and a
comment, docstring, reformatting or log-line change does not throw a long pretraining away.

What does not count, because it cannot change a result or is already in the fingerprint otherwise:
the modules of :data:`NOT_COMPUTING` (config resolution and the registry: the resolved config is in the
fingerprint; launching, progress bars, TensorBoard, atomic writes, the metrics record, the fingerprint
rule itself) and third-party libraries (pinned in pyproject.toml; after an upgrade recompute with the
``fresh`` switch, README "Rerun one stage").
"""

from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = ["PROJECT_PACKAGES", "NOT_COMPUTING", "LOG_CALLS", "code_identity", "module_digest"]

#: Top-level packages whose code is part of a stage's identity.
PROJECT_PACKAGES = ("ibot", "downstream")
#: Project modules that take part in a stage's job without computing its result (see the module docstring).
NOT_COMPUTING = frozenset({
    "ibot.config", "ibot.stages", "ibot.run.cli", "ibot.run.context", "ibot.run.launcher", "ibot.workdir",
    "ibot.code_identity", "ibot.progress", "ibot.tensorboard", "ibot.io", "ibot.metrics",
})
#: Statements that are calls of these names only log (downstream.engine.setup.log prints on the main process).
LOG_CALLS = frozenset({"print", "log"})
_ROOT = Path(__file__).resolve().parents[1]


def _module_file(name: str, root: Path = _ROOT) -> Path | None:
    """The source file of a project module (a package's ``__init__.py``), or None if there is none."""
    parts = name.split(".")
    for candidate in (root.joinpath(*parts).with_suffix(".py"), root.joinpath(*parts, "__init__.py")):
        if candidate.is_file():
            return candidate
    return None


def _is_log(node: ast.AST) -> bool:
    return (isinstance(node, ast.Expr) and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name) and node.value.func.id in LOG_CALLS)


class _Normalise(ast.NodeTransformer):
    """Drop docstrings and log statements (a body left empty keeps a ``pass``)."""

    def generic_visit(self, node: ast.AST) -> ast.AST:
        super().generic_visit(node)
        for field in ("body", "orelse", "finalbody"):
            body = getattr(node, field, None)
            if not isinstance(body, list) or not body or not isinstance(body[0], ast.stmt):
                continue
            kept = [stmt for stmt in body if not _is_log(stmt)]
            if field == "body" and isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                      ast.AsyncFunctionDef)) and kept and _is_docstring(kept[0]):
                kept = kept[1:]
            setattr(node, field, kept or ([ast.Pass()] if field == "body" else []))
        return node


def _is_docstring(node: ast.stmt) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def _imports(tree: ast.AST, module: str, is_package: bool, root: Path) -> set[str]:
    """Project modules ``tree`` imports (``from pkg import name`` counts ``pkg.name`` when that is a module)."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in PROJECT_PACKAGES and _module_file(name, root)}


def _parsed(module: str, root: Path = _ROOT) -> tuple[str, frozenset[str]]:
    """A module's normalised digest and the project modules it imports (cached per file version)."""
    path = _module_file(module, root)
    assert path is not None, module
    stat = path.stat()
    return _parsed_file(module, root, path, stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=None)
def _parsed_file(module: str, root: Path, path: Path, mtime_ns: int, size: int) -> tuple[str, frozenset[str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    imports = _imports(tree, module, path.name == "__init__.py", root)
    normalised = ast.dump(_Normalise().visit(tree), annotate_fields=False, include_attributes=False)
    return hashlib.sha256(normalised.encode()).hexdigest(), frozenset(imports)


def module_digest(module: str, root: Path = _ROOT) -> str:
    """sha256 of a project module's normalised syntax tree (see the module docstring)."""
    return _parsed(module, Path(root))[0]


def code_identity(entry: str, root: Path = _ROOT) -> dict[str, Any]:
    """The identity of the code behind a registry entry (``"module:function"``): one digest, and the digest
    of every module it counts (so a changed fingerprint names the changed modules). ``root``: the folder
    holding the project packages (this checkout's by default)."""
    start, root = entry.partition(":")[0], Path(root)
    if _module_file(start, root) is None:
        raise ValueError(f"stage entry {entry!r}: no project module {start!r} under {root}")
    seen: dict[str, str] = {}
    stack = [start]
    while stack:
        module = stack.pop()
        if module in seen or module in NOT_COMPUTING:
            continue
        digest, imports = _parsed(module, root)
        seen[module] = digest
        parents = {module.rsplit(".", i)[0] for i in range(1, module.count(".") + 1)}  # their __init__ runs too
        stack.extend(sorted((imports | parents) - set(seen)))
    modules = dict(sorted(seen.items()))
    total = hashlib.sha256("".join(f"{name}:{digest}\n" for name, digest in modules.items()).encode()).hexdigest()
    return {"digest": total, "modules": modules}

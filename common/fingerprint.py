"""What shaped a result, as a short hash: its settings and the code it ran.

A checkpoint named by ``fingerprint(cfg, model_config, train_config, model)`` cannot go stale:
change a setting, or the code of any ``common`` module the model and its training use (directly
or through the modules they import), and the name changes, so the old file is never loaded.
Sources are compared after parsing (``ast``), so comments and formatting do not count;
docstrings and code do.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import inspect
import json
import types
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

PACKAGE = "common"
ROOT = Path(__file__).resolve().parent.parent


def module_path(name: str, root: Path = ROOT) -> Path | None:
    """The file of the dotted module ``name`` under ``root`` (a module or a package), or None."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(source: str, root: Path = ROOT, path: Path | None = None) -> set[str]:
    """Dotted names of the ``common`` modules that ``source`` imports, anywhere in it (``path``: its
    file, for relative imports)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if path is None:
                    continue
                package = path.parent.relative_to(root).parts
                package = package[:len(package) - node.level + 1]
                base = ".".join([*package, *([node.module] if node.module else [])])
            else:
                base = node.module
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]  # `from common import data`
        else:
            continue
        for name in names:
            parts = name.split(".")
            if parts[0] == PACKAGE:  # importing common.a.b runs common and common.a too
                found.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1))
                             if module_path(p, root))
    return found


def modules_used(sources: Iterable[str], root: Path | None = None, start: Iterable[str] = ()) -> dict[str, Path]:
    """Every ``common`` module that the sources import (plus ``start``), directly or through others."""
    root = ROOT if root is None else root
    todo = set(start).union(*(imported_modules(s, root) for s in sources))
    used: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        if name not in used and (path := module_path(name, root)) is not None:
            used[name] = path
            todo |= imported_modules(path.read_text(encoding="utf-8"), root, path)
    return dict(sorted(used.items()))


@functools.lru_cache(maxsize=256)
def _normalised_source(path: Path, mtime_ns: int, size: int) -> str:
    return ast.unparse(ast.parse(path.read_text(encoding="utf-8")))


def code_digest(modules: Iterable[str], root: Path | None = None) -> str:
    """Hash of the parsed source of ``modules`` and every ``common`` module they import."""
    digest = hashlib.sha256()
    for name, path in modules_used((), root, start=modules).items():
        stat = path.stat()
        digest.update(name.encode())
        digest.update(_normalised_source(path, stat.st_mtime_ns, stat.st_size).encode())
    return digest.hexdigest()


def _object_source(obj: object) -> str:
    try:
        return ast.unparse(ast.parse(inspect.getsource(obj)))
    except (OSError, TypeError, SyntaxError):  # defined where no source is kept: its name then
        return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', repr(obj))}"


def _plain(value: object) -> object:
    """JSON form of what ``json`` cannot write: a partial by its function and arguments, an array by
    its content, an object by its class and attributes (never by a ``repr`` that holds a memory
    address), else its ``repr``."""
    if isinstance(value, functools.partial):
        return {"partial": _describe(value.func), "args": value.args, "keywords": value.keywords}
    if isinstance(value, (type, types.FunctionType, types.MethodType)):
        return _describe(value)
    if isinstance(value, (torch.Tensor, np.ndarray)):  # by content: a repr elides large arrays
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu()
            dtype = str(tensor.dtype).removeprefix("torch.")  # numpy's names ("float32"), and "bfloat16"
            array = (tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor).numpy()  # by its bits
        else:
            array, dtype = value, str(value.dtype)
        return {"array": dtype, "shape": list(array.shape),
                "sha256": hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()}
    if hasattr(value, "__dict__"):
        return {"class": _describe(type(value)), **vars(value)}
    return repr(value)


def _describe(part: object) -> str:
    """A text that changes whenever ``part`` would shape a result differently."""
    if isinstance(part, types.ModuleType):
        return "module:" + code_digest([part.__name__])
    if isinstance(part, nn.Module):
        classes = {type(m) for m in part.modules()}
        ours = sorted({c.__module__ for c in classes if c.__module__.split(".")[0] == PACKAGE})
        foreign = sorted(_object_source(c) for c in classes
                         if c.__module__.split(".")[0] not in (PACKAGE, "torch"))
        return f"model:{part!r}|{code_digest(ours)}|{foreign}"
    if isinstance(part, (type, types.FunctionType, types.MethodType)):
        module = getattr(part, "__module__", "") or ""
        code = code_digest([module]) if module.split(".")[0] == PACKAGE else ""
        return f"code:{_object_source(part)}|{code}"
    if dataclasses.is_dataclass(part) and not isinstance(part, type):
        return f"{type(part).__name__}:" + json.dumps(dataclasses.asdict(part), sort_keys=True, default=_plain)
    return json.dumps(part, sort_keys=True, default=_plain)


def fingerprint(*shaped_by: object, length: int = 12) -> str:
    """A hex digest of everything that shaped a result.

    Each part may be a setting (a dataclass such as ``GPTConfig``, a dict such as the preset, a
    number, a string), a model (its architecture and the code of its classes), a ``common``
    module, a class or a function (its source, and the ``common`` code it depends on).
    """
    if not shaped_by:
        raise ValueError("fingerprint needs at least one part: the settings and code that shaped the result")
    digest = hashlib.sha256()
    for part in shaped_by:
        digest.update(_describe(part).encode())
        digest.update(b"\x00")
    return digest.hexdigest()[:length]

"""Count the lines of code of each project: its notebook, plus the common/ modules it uses.

    python scripts/count_lines.py          # rewrite the section between the markers in README.md
    python scripts/count_lines.py --print  # print it instead

A line of code is a line that holds Python tokens other than comments, docstrings and import
statements: blank lines, comment lines, docstrings and ``import`` / ``from ... import`` lines are not
counted (Python's tokenizer and parser tell them apart, not patterns). A notebook's own count covers
its code cells; its common/ count covers each module of common/ that it imports, directly or through
other common/ modules (imports inside functions included), once.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import tokenize
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "common"
BEGIN, END = "<!-- lines:begin -->", "<!-- lines:end -->"
NOT_CODE = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
            tokenize.ENDMARKER, tokenize.ENCODING}


def skipped_spans(tree: ast.AST) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) positions of the docstrings and import statements of a parsed source."""
    nodes = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            nodes.append(node)
        elif isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
                    first.value.value, str):
                nodes.append(first)
    return [((n.lineno, n.col_offset), (n.end_lineno, n.end_col_offset)) for n in nodes]


def code_line_numbers(source: str) -> set[int]:
    """The numbers of the lines that hold code (see the module's docstring)."""
    spans = skipped_spans(ast.parse(source))
    lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type in NOT_CODE or token.string == ";":
            continue
        if any(start <= token.start and token.end <= end for start, end in spans):
            continue
        lines.update(range(token.start[0], token.end[0] + 1))
    return lines


def code_lines(source: str) -> int:
    return len(code_line_numbers(source))


def notebook_cells(path: Path) -> list[str]:
    """The sources of a notebook's code cells (IPython magics turned into Python)."""
    from IPython.core.inputtransformer2 import TransformerManager

    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    sources = ["".join(c["source"]) if isinstance(c["source"], list) else c["source"]
               for c in cells if c["cell_type"] == "code"]
    return [TransformerManager().transform_cell(s) for s in sources if s.strip()]


def module_path(name: str, root: Path) -> Path | None:
    """The file of the dotted module `name` under `root` (a module or a package), or None."""
    base = root.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def imported_modules(source: str, root: Path, path: Path | None = None) -> set[str]:
    """Dotted names of the PACKAGE modules that `source` imports (`path`: its file, for relative imports)."""
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


def modules_used(sources: list[str], root: Path) -> dict[str, Path]:
    """Every PACKAGE module that the sources import, directly or through other PACKAGE modules."""
    todo = set().union(*(imported_modules(s, root) for s in sources))
    used: dict[str, Path] = {}
    while todo:
        name = todo.pop()
        if name not in used:
            used[name] = module_path(name, root)
            todo |= imported_modules(used[name].read_text(encoding="utf-8"), root, used[name])
    return dict(sorted(used.items()))


@dataclass
class Count:
    notebook: str
    notebook_lines: int
    module_lines: dict[str, int]  # dotted name -> lines of code

    @property
    def common_lines(self) -> int:
        return sum(self.module_lines.values())

    @property
    def total(self) -> int:
        return self.notebook_lines + self.common_lines


def count(notebook: Path, root: Path = ROOT) -> Count:
    sources = notebook_cells(notebook)
    modules = modules_used(sources, root)
    return Count(notebook.stem, sum(code_lines(s) for s in sources),
                 {name: code_lines(path.read_text(encoding="utf-8")) for name, path in modules.items()})


def render(counts: list[Count]) -> str:
    lines = [BEGIN, "", "_Generated by `make lines` (`scripts/count_lines.py`)._", ""]
    lines += [f"| notebook | notebook lines | `{PACKAGE}/` lines | total | `{PACKAGE}/` modules counted |",
              "|---|---:|---:|---:|---|"]
    for c in counts:
        modules = ", ".join(name.removeprefix(f"{PACKAGE}.") for name, n in c.module_lines.items() if n)
        lines.append(f"| {c.notebook} | {c.notebook_lines:,} | {c.common_lines:,} | {c.total:,} | {modules} |")
    shared = {name: n for c in counts for name, n in c.module_lines.items()}
    notebooks = sum(c.notebook_lines for c in counts)
    lines += ["", f"All {len(counts)} notebooks: {notebooks:,} lines, and {sum(shared.values()):,} in the "
                  f"{sum(1 for n in shared.values() if n)} `{PACKAGE}/` modules they use (each counted once): "
                  f"{notebooks + sum(shared.values()):,} in total; the smallest project has "
                  f"{min(c.total for c in counts):,}.", "", END]
    return "\n".join(lines)


def replace_section(text: str, section: str) -> str:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    return head + section + rest.split(END, 1)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--print", action="store_true", help="print instead of rewriting README.md")
    args = parser.parse_args()
    section = render([count(path) for path in sorted(ROOT.glob("[0-9][0-9]_*.ipynb"))])
    if args.print:
        print(section)
        return
    readme = ROOT / "README.md"
    readme.write_text(replace_section(readme.read_text(encoding="utf-8"), section), encoding="utf-8")
    print(section)
    print("README.md lines section updated")


if __name__ == "__main__":
    main()

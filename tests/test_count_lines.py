"""scripts/count_lines.py: what counts as a line of code, and which common/ modules a notebook uses."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import count_lines  # noqa: E402


def test_blank_and_comment_lines_are_not_code():
    source = "x = 1\n\n# a comment\n    \ny = 2  # a trailing comment keeps its line\n"
    assert count_lines.code_line_numbers(source) == {1, 5}


def test_docstrings_are_not_code_but_other_strings_are():
    source = '''"""Module docstring,
on two lines."""
def f(a):
    """Function docstring."""
    return a
class C:
    """Class docstring,
    on two lines."""
    x = 1
    def g(self): "one-line docstring"
s = """a string, not
a docstring"""
f("an argument")
'''
    assert count_lines.code_line_numbers(source) == {3, 5, 6, 9, 10, 11, 12, 13}


def test_each_line_of_a_multi_line_statement_counts():
    source = "total = sum(\n    [\n        1,\n        2,\n    ]\n)\n"
    assert count_lines.code_lines(source) == 6


def test_import_lines_are_not_code():
    source = "import os\nfrom typing import (\n    Any,\n    List,\n)\nimport sys; x = 1\nimport re;\ny = os.sep\n"
    assert count_lines.code_line_numbers(source) == {6, 8}


def make_package(root: Path, modules: dict[str, str]) -> None:
    for name, source in modules.items():
        path = root / f"{name.replace('.', '/')}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)


def make_notebook(path: Path, code_cells: list[str]) -> Path:
    cells = [{"cell_type": "markdown", "metadata": {}, "source": "# Title\nx = 1 in markdown is not code"}]
    cells += [{"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None, "source": s}
              for s in code_cells]
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return path


def test_common_modules_are_followed_transitively(tmp_path):
    make_package(tmp_path, {
        "common.__init__": '"""The package: a docstring only."""\n',
        "common.a": "from common import b\nfrom .c import helper\n\n\ndef run():\n    return b.value() + helper()\n",
        "common.b": "def value():\n    from common import lazy  # an import inside a function\n    return lazy.ONE\n",
        "common.c": "import os\n\n\ndef helper():\n    return len(os.sep)\n",
        "common.lazy": "ONE = 1\n",
        "common.unused": "NEVER = 0\nIMPORTED = 0\n",
        "other": "from common import unused\n",  # outside common/: not followed
    })
    notebook = make_notebook(tmp_path / "01_demo.ipynb", [
        "# set-up\nfrom common.a import run\nimport other\n",
        "result = run(\n)\nprint(result)\n",
        "",
    ])
    assert set(count_lines.modules_used(count_lines.notebook_cells(notebook), tmp_path)) == {
        "common", "common.a", "common.b", "common.c", "common.lazy"}
    counted = count_lines.count(notebook, tmp_path)
    assert counted.notebook_lines == 3
    assert counted.module_lines == {"common": 0, "common.a": 2, "common.b": 2, "common.c": 2, "common.lazy": 1}
    assert (counted.common_lines, counted.total) == (7, 10)


def test_readme_section_is_replaced_between_the_markers():
    text = f"before\n{count_lines.BEGIN}\nold\n{count_lines.END}\nafter\n"
    new = count_lines.replace_section(text, f"{count_lines.BEGIN}\nnew\n{count_lines.END}")
    assert new == f"before\n{count_lines.BEGIN}\nnew\n{count_lines.END}\nafter\n"
    with pytest.raises(SystemExit):
        count_lines.replace_section("no markers", "")

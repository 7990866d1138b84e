"""Which notebooks a command works on, and whether an executed notebook is fit to publish.

Shared by ``run_notebooks.py`` (which runs them) and ``export.py`` (which exports what ran).
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def notebooks(selection: list[str] | None, folder: Path = ROOT) -> list[Path]:
    """The ``NN_*.ipynb`` of ``folder``, or those that ``selection`` names (``02``, ``2`` or a stem)."""
    found = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if not selection:
        return found
    chosen = [p for p in found if any(p.name.startswith(s.zfill(2)) or p.stem == s for s in selection)]
    unknown = [s for s in selection if not any(p.name.startswith(s.zfill(2)) or p.stem == s for p in found)]
    if unknown:
        raise SystemExit(f"no notebook matches {unknown} in {folder}; notebooks: {[p.stem for p in found]}")
    return chosen


def execution_problem(path: Path) -> str | None:
    """Why the executed notebook at ``path`` must not be published (an error, or no outputs), or None."""
    import nbformat

    try:
        nb = nbformat.read(path, as_version=4)
    except Exception as error:  # unreadable JSON, not a notebook
        return f"it cannot be read ({type(error).__name__}: {error})"
    if nb.metadata.get("papermill", {}).get("exception"):
        return "its run stopped with an exception"
    code = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    errors = [i for i, c in enumerate(code) if any(o.get("output_type") == "error" for o in c.get("outputs", []))]
    if errors:
        return f"code cell {errors[0] + 1} holds an error"
    if code and not any(c.get("outputs") for c in code):
        return "it was never executed (no outputs)"
    return None

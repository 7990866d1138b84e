"""Every NN_*.ipynb runs top to bottom in smoke mode, writes finite results where smoke runs
belong (build/smoke/), and leaves the committed reference outputs untouched."""

import hashlib
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(ROOT.glob("[0-9][0-9]_*.ipynb"))


def snapshot(*folders: Path) -> dict[str, str]:
    """Hash of every file under the folders."""
    return {str(p.relative_to(ROOT)): hashlib.sha256(p.read_bytes()).hexdigest()
            for folder in folders for p in sorted(folder.rglob("*")) if p.is_file()}


def missing_numbers(value, path="metrics") -> list[str]:
    """Paths of non-finite numbers (NaN/inf are written as null) outside interval bounds."""
    if isinstance(value, dict):
        return [m for k, v in value.items() for m in missing_numbers(v, f"{path}.{k}")]
    if isinstance(value, list):
        if path.endswith("ci"):  # one seed gives an infinite interval, written as null
            return []
        return [m for i, v in enumerate(value) for m in missing_numbers(v, f"{path}[{i}]")]
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return [path]
    return []


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_smoke_mode(notebook, tmp_path, monkeypatch):
    import papermill

    monkeypatch.setenv("TRANSFORMER_FAMILY_BUILD", str(tmp_path / "build"))
    before = snapshot(ROOT / "results", ROOT / "figures")
    papermill.execute_notebook(
        str(notebook), str(tmp_path / notebook.name), parameters={"SMOKE": True},
        cwd=str(ROOT), kernel_name="python3", progress_bar=False,
    )
    assert snapshot(ROOT / "results", ROOT / "figures") == before, "a smoke run changed results/ or figures/"
    smoke = tmp_path / "build" / "smoke"
    results = smoke / "results" / f"{notebook.stem}.json"
    assert results.exists(), f"{notebook.name} wrote no {results.name}"
    payload = json.loads(results.read_text())
    assert payload["notebook"] == notebook.stem and payload["preset"] == "smoke"
    assert payload["metrics"], "the results file holds no metrics"
    assert missing_numbers(payload["metrics"]) == [], "metrics hold NaN, inf or null"
    assert list((smoke / "figures").glob(f"{notebook.stem[:2]}_*.png")), "no figure was saved"
    assert not (smoke / "staging").exists() or not any((smoke / "staging").iterdir()), "staged files left behind"

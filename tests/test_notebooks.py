"""Every NN_*.ipynb runs top to bottom in smoke mode and writes its results file."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted(ROOT.glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_in_smoke_mode(notebook, tmp_path):
    import papermill

    papermill.execute_notebook(
        str(notebook), str(tmp_path / notebook.name),
        parameters={"SMOKE": True, "OUT_DIR": str(tmp_path)},
        cwd=str(ROOT), kernel_name="python3", progress_bar=False,
    )
    results = tmp_path / "results" / f"{notebook.stem}.json"
    assert results.exists(), f"{notebook.name} wrote no {results.name}"
    payload = json.loads(results.read_text())
    assert payload["notebook"] == notebook.stem and payload["preset"] == "smoke"
    assert payload["metrics"], "the results file holds no metrics"
    assert list((tmp_path / "figures").glob(f"{notebook.stem[:2]}_*.png")), "no figure was saved"

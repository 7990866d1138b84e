"""The scripts that run, export and tabulate notebooks refuse what must not be published."""

import datetime
import json
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import deliverables_table  # noqa: E402
import export  # noqa: E402
import results_table  # noqa: E402
import run_notebooks  # noqa: E402
from notebook_files import execution_problem, notebooks  # noqa: E402


def payload(preset="cpu", metrics=None):
    return {"notebook": "99_x", "preset": preset, "device": "cpu", "wall_s": 60.0,
            "metrics": metrics or {"ppl": 120.0}}


def test_results_table_refuses_a_smoke_run():
    with pytest.raises(SystemExit, match=r"99_x \(preset 'smoke'\)"):
        results_table.render({"99_x": payload("smoke")})


def test_results_table_shows_intervals():
    text = results_table.render({"99_x": payload(metrics={
        "ppl": {"mean": 120.0, "ci": [110.0, 130.0], "values": [1, 2]},
        "acc": 0.9, "acc_ci": [0.85, 0.95],
        "quality": {"dense": {"mean": 2.0, "ci": [1.9, 2.1]}, "moe": {"mean": 1.8, "ci": [1.7, 1.9]}},
    })})
    assert "`ppl`: 120 [110, 130]" in text
    assert "`acc`: 0.9 [0.85, 0.95]" in text
    assert "`quality`: dense 2 [1.9, 2.1], moe 1.8 [1.7, 1.9]" in text
    assert "acc_ci" not in text


def notebook_with(cells, path: Path, exception=False) -> Path:
    nb = nbformat.v4.new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"}})
    if exception:
        nb.metadata["papermill"] = {"exception": True}
    nbformat.write(nb, path)
    return path


def test_execution_problem_spots_errors_and_unexecuted_notebooks(tmp_path):
    good = nbformat.v4.new_code_cell("1 + 1", outputs=[nbformat.v4.new_output("execute_result", {"text/plain": "2"},
                                                                               execution_count=1)])
    failed = nbformat.v4.new_code_cell("1 / 0", outputs=[nbformat.v4.new_output(
        "error", ename="ZeroDivisionError", evalue="division by zero", traceback=[])])
    assert execution_problem(notebook_with([good], tmp_path / "01_a.ipynb")) is None
    assert "holds an error" in execution_problem(notebook_with([good, failed], tmp_path / "02_b.ipynb"))
    assert "never executed" in execution_problem(notebook_with([nbformat.v4.new_code_cell("1")],
                                                               tmp_path / "03_c.ipynb"))
    assert "exception" in execution_problem(notebook_with([good], tmp_path / "04_d.ipynb", exception=True))
    (tmp_path / "05_e.ipynb").write_text("{broken")
    assert "cannot be read" in execution_problem(tmp_path / "05_e.ipynb")
    with pytest.raises(SystemExit, match="02_b.ipynb: code cell 2 holds an error"):
        export.executed(None, tmp_path)
    assert export.executed(["01"], tmp_path) == [tmp_path / "01_a.ipynb"]


def test_notebook_selection_names_what_is_unknown(tmp_path):
    (tmp_path / "01_a.ipynb").write_text("{}")
    assert notebooks(["1"], tmp_path) == [tmp_path / "01_a.ipynb"]
    with pytest.raises(SystemExit, match=r"no notebook matches \['07'\]"):
        notebooks(["07"], tmp_path)


def test_a_failed_run_keeps_the_last_good_executed_notebook(tmp_path):
    executed = tmp_path / "executed"
    executed.mkdir()
    good = executed / "01_demo.ipynb"
    good.write_text("the last good run")
    source = notebook_with([nbformat.v4.new_code_cell("SMOKE = False", metadata={"tags": ["parameters"]}),
                            nbformat.v4.new_code_cell("raise RuntimeError('late failure')")],
                           tmp_path / "01_demo.ipynb")
    with pytest.raises(Exception, match="late failure"):
        run_notebooks.execute(source, smoke=True, out_dir=None, executed_dir=executed, extra={})
    assert good.read_text() == "the last good run"
    failed = json.loads((tmp_path / "failed" / "01_demo.ipynb").read_text())
    assert failed["metadata"]["papermill"]["exception"]
    assert not list(executed.glob(".*"))


def test_source_printing_cells_become_code_on_slides():
    assert export.prints_source("print(inspect.getsource(f))\nprint(show_source(g, 'def', 'return'))")
    assert not export.prints_source("print(show_source(f))\nx = 1")


def test_results_table_shows_findings_and_count_levels_first():
    text = results_table.render({"99_x": payload(metrics={
        "finding": "dense and r8 differ by 2 [1, 3] ppl",
        **{f"m{i}": float(i) for i in range(12)},
        "reference_levels": {"bigram": 186.0, "trigram": 148.0},
    })})
    assert "- **99_x**: dense and r8 differ by 2 [1, 3] ppl" in text
    assert "`reference_levels`: count bigram 186, trigram 148<br>`m0`" in text


@pytest.mark.parametrize("heading, fragment", [
    ("Part 2 · Implementation", "Part-2-%C2%B7-Implementation"),
    ("3.3 Forward + backward", "3.3-Forward-%2B-backward"),
    ("The sweep over the penalty $\\lambda$", "The-sweep-over-the-penalty-%24%5Clambda%24"),
    ("Exit depths: do tokens leave early or late?", "Exit-depths:-do-tokens-leave-early-or-late?"),
])
def test_deliverables_links_use_jupyters_anchors(heading, fragment):
    assert deliverables_table.anchor(heading) == fragment


def test_deliverables_where_column_follows_the_notebook(tmp_path):
    cells = [nbformat.v4.new_markdown_cell("# 01 · Title\n## Theory"),
             nbformat.v4.new_markdown_cell("# Part 2 · Implementation\n### 2.1 The mask"),
             nbformat.v4.new_markdown_cell("## Results: a + b")]
    notebook_with(cells, tmp_path / "01_demo.ipynb")
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "01_loss_curve.png").write_bytes(b"")
    table = "| # | notebook | deliverables | where |\n|---|---|---|---|\n| 01 | [01_demo](01_demo.ipynb) | x | old |"
    row = deliverables_table.render(table, tmp_path).splitlines()[-1]
    assert row.startswith("| 01 | [01_demo](01_demo.ipynb) | x | [Part 2 · Implementation](01_demo.ipynb#Part-2")
    assert "[Results: a + b](01_demo.ipynb#Results:-a-%2B-b)" in row and "Theory" not in row
    assert row.endswith("; figures: [loss curve](figures/01_loss_curve.png) |")


def test_results_table_groups_run_times_by_date():
    times = {"notebooks": {"01_a": 600.0, "02_b": 120.0, "03_c": 60.0},
             "dates": {"01_a": "2026-01-02", "02_b": "2026-01-01"}, "total_s": 780.0}
    text = results_table.render({"01_a": payload(), "run_times": times})
    assert "13.0 min in total" in text
    assert "2026-01-01: 02 2.0; 2026-01-02: 01 10.0; date not recorded: 03 1.0" in text


def test_record_times_merges_wall_times_with_their_date(tmp_path, monkeypatch):
    (tmp_path / "results").mkdir()
    monkeypatch.setattr(run_notebooks, "ROOT", tmp_path)
    run_notebooks.record_times({"01_a": {"wall_s": 10.0, "earlier_s": 0}})
    run_notebooks.record_times({"02_b": {"wall_s": 5.0, "earlier_s": 3.0}})
    record = json.loads((tmp_path / "results" / "run_times.json").read_text())
    today = datetime.date.today().isoformat()
    assert record == {"notebooks": {"01_a": 10.0, "02_b": 5.0}, "dates": {"01_a": today, "02_b": today},
                      "earlier_training_s": {"02_b": 3.0}, "total_s": 15.0}

"""Execute notebooks top to bottom with papermill, then export each one to HTML.

    python scripts/run_notebooks.py                 # every NN_*.ipynb, default (cpu) preset
    python scripts/run_notebooks.py --nb 02 --nb 05 # some of them
    python scripts/run_notebooks.py --smoke         # SMOKE=True: tiny, seconds each, scratch output

Executed notebooks go to build/executed/ (build/smoke/executed/ for smoke runs) and their
HTML to build/html/ (build/smoke/html/); the notebooks themselves write figures/ and results/
(smoke runs: build/smoke/). A notebook is executed into a scratch file first: a run that fails
or is interrupted leaves the last good executed notebook in place, and is kept for inspection
under build/failed/. The wall time of each reference run (cpu preset) is printed and kept in
results/run_times.json, with the training time of earlier runs whose checkpoints it loaded or resumed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

from notebook_files import ROOT, execution_problem, notebooks

sys.path.insert(0, str(ROOT))
# Kernels started from here inherit this: it keeps the CPU profiler behind bench.peak_memory
# from printing a line per use into the notebooks (read when a kernel first imports torch).
os.environ.setdefault("KINETO_LOG_LEVEL", "5")


def execute(path: Path, smoke: bool, out_dir: Path | None, executed_dir: Path, extra: dict) -> float:
    """Run ``path`` with papermill into ``executed_dir`` (only if it succeeds); returns seconds."""
    import papermill

    parameters = {"SMOKE": smoke, **extra}
    if out_dir is not None:
        parameters["OUT_DIR"] = str(out_dir)
    executed_dir.mkdir(parents=True, exist_ok=True)
    scratch = executed_dir / f".{path.stem}.running.ipynb"
    started = time.perf_counter()
    try:
        papermill.execute_notebook(
            str(path), str(scratch), parameters=parameters,
            cwd=str(ROOT), kernel_name="python3", progress_bar=False, log_output=False,
        )
    except BaseException:
        if scratch.exists():
            failed = executed_dir.parent / "failed"
            failed.mkdir(parents=True, exist_ok=True)
            scratch.replace(failed / path.name)
        raise
    problem = execution_problem(scratch)
    if problem:
        raise RuntimeError(f"{path.name}: {problem}")
    scratch.replace(executed_dir / path.name)
    return time.perf_counter() - started


def export_html(executed: Path, html_dir: Path) -> Path:
    """The offline HTML of scripts/export.py; without a local MathJax, nbconvert's default (a CDN)."""
    import export

    try:
        return export.export_html([executed], html_dir)[0]
    except SystemExit as error:
        print(f"  {error}; exporting with MathJax from a CDN instead")
    from nbconvert import HTMLExporter

    html_dir.mkdir(parents=True, exist_ok=True)
    body, _ = HTMLExporter().from_filename(str(executed))
    target = html_dir / f"{executed.stem}.html"
    target.write_text(body, encoding="utf-8")
    return target


def record_times(times: dict[str, dict]) -> None:
    """Merge reference wall times and their dates into results/run_times.json (after each notebook: a batch cut
    short keeps them)."""
    from common.results import read_json, write_json

    record = ROOT / "results" / "run_times.json"
    previous = read_json(record) if record.exists() else {}
    merged = {**previous.get("notebooks", {}), **{k: v["wall_s"] for k, v in times.items()}}
    earlier = {**previous.get("earlier_training_s", {}), **{k: v["earlier_s"] for k, v in times.items()}}
    earlier = {k: v for k, v in earlier.items() if v and k in merged}
    dates = {**previous.get("dates", {}), **{k: datetime.date.today().isoformat() for k in times}}
    write_json(record, {"notebooks": merged, "dates": dates, "earlier_training_s": earlier,
                        "total_s": round(sum(merged.values()), 1)})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nb", action="append", help="notebook number or name (repeatable); default all")
    parser.add_argument("--smoke", action="store_true", help="SMOKE=True: tiny run, scratch output")
    parser.add_argument("--out-dir", type=Path, help="where figures/ and results/ go (default: by preset)")
    parser.add_argument("--preset", help="cpu, gpu or smoke (default: auto)")
    parser.add_argument("--no-html", action="store_true", help="skip the HTML export")
    args = parser.parse_args()

    from common.results import read_json
    from common.runtime import REFERENCE_PRESET, resolve_preset

    try:
        preset = resolve_preset(args.preset or "auto", args.smoke)
    except ValueError as error:
        raise SystemExit(str(error)) from error
    build = ROOT / "build" / ("smoke" if preset == "smoke" else "")
    reference = preset == REFERENCE_PRESET and args.out_dir is None
    extra = {"PRESET": args.preset} if args.preset else {}
    failures = []
    for path in notebooks(args.nb):
        print(f"running {path.name} (preset {preset}) ...", flush=True)
        try:
            seconds = execute(path, args.smoke, args.out_dir, build / "executed", extra)
        except Exception as error:  # papermill's execution error, or a notebook that is unfit to publish
            print(f"  FAILED: {str(error).strip().splitlines()[-1] if str(error).strip() else error!r}", flush=True)
            failures.append(path.stem)
            continue
        print(f"  done in {seconds:.1f} s", flush=True)
        if reference:
            results = read_json(ROOT / "results" / f"{path.stem}.json")
            record_times({path.stem: {"wall_s": round(seconds, 1),
                                      "earlier_s": results.get("train_s_earlier_sessions", 0)}})
        if not args.no_html:
            print(f"  html: {export_html(build / 'executed' / path.name, build / 'html')}")
    if failures:
        raise SystemExit(f"{len(failures)} notebook(s) failed: {', '.join(failures)} (the failed runs are in "
                         f"{(build / 'failed').relative_to(ROOT)}/; the last good outputs were kept)")


if __name__ == "__main__":
    main()

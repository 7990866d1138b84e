"""Execute notebooks top to bottom with papermill, then export each one to HTML.

    python scripts/run_notebooks.py                 # every NN_*.ipynb, default (cpu) preset
    python scripts/run_notebooks.py --nb 02 --nb 05 # some of them
    python scripts/run_notebooks.py --smoke         # SMOKE=True: tiny, seconds each, scratch output

Executed notebooks go to build/executed/ (build/smoke/executed/ for smoke runs) and their
HTML to build/html/; the notebooks themselves write figures/ and results/. The wall time of
each notebook is printed and kept in results/run_times.json (reference runs only).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# Kernels started from here inherit this: it keeps the CPU profiler behind bench.peak_memory
# from printing a line per use into the notebooks (read when a kernel first imports torch).
os.environ.setdefault("KINETO_LOG_LEVEL", "5")


def notebooks(selection: list[str] | None, folder: Path = ROOT) -> list[Path]:
    found = sorted(folder.glob("[0-9][0-9]_*.ipynb"))
    if not selection:
        return found
    chosen = [p for p in found if any(p.name.startswith(s.zfill(2)) or p.stem == s for s in selection)]
    unknown = [s for s in selection if not any(p.name.startswith(s.zfill(2)) or p.stem == s for p in found)]
    if unknown:
        raise SystemExit(f"no notebook matches {unknown}; notebooks: {[p.stem for p in found]}")
    return chosen


def execute(path: Path, smoke: bool, out_dir: Path | None, executed_dir: Path, extra: dict) -> float:
    import papermill

    parameters = {"SMOKE": smoke, **extra}
    if out_dir is not None:
        parameters["OUT_DIR"] = str(out_dir)
    executed_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    papermill.execute_notebook(
        str(path), str(executed_dir / path.name), parameters=parameters,
        cwd=str(ROOT), kernel_name="python3", progress_bar=False, log_output=False,
    )
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nb", action="append", help="notebook number or name (repeatable); default all")
    parser.add_argument("--smoke", action="store_true", help="SMOKE=True: tiny run, scratch output")
    parser.add_argument("--out-dir", type=Path, help="where figures/ and results/ go (default: project)")
    parser.add_argument("--preset", help="cpu or gpu (default: auto)")
    parser.add_argument("--no-html", action="store_true", help="skip the HTML export")
    args = parser.parse_args()

    from common.results import write_json

    build = ROOT / "build" / ("smoke" if args.smoke else "")
    extra = {"PRESET": args.preset} if args.preset else {}
    times = {}
    for path in notebooks(args.nb):
        print(f"running {path.name} ({'smoke' if args.smoke else 'reference'}) ...", flush=True)
        seconds = execute(path, args.smoke, args.out_dir, build / "executed", extra)
        times[path.stem] = round(seconds, 1)
        print(f"  done in {seconds:.1f} s", flush=True)
        if not args.no_html:
            print(f"  html: {export_html(build / 'executed' / path.name, ROOT / 'build' / 'html')}")
    if not args.smoke and args.out_dir is None:
        record = ROOT / "results" / "run_times.json"
        previous = {}
        if record.exists():
            import json

            previous = json.loads(record.read_text()).get("notebooks", {})
        merged = {**previous, **times}
        write_json(record, {"notebooks": merged, "total_s": round(sum(merged.values()), 1)})


if __name__ == "__main__":
    main()

"""Export the executed notebooks of build/executed/ for reading and presenting, offline.

    python scripts/export.py html   [--nb 02]  # build/html/NN_name.html
    python scripts/export.py pdf    [--nb 02]  # build/pdf/NN_name.pdf, printed from the HTML by headless Chromium
    python scripts/export.py slides [--nb 02]  # build/slides/NN_name.slides.html, a reveal.js deck

Nothing is fetched from the network when a page is opened: each output folder holds what its pages
load under assets/ (MathJax 2.7 from Debian's libjs-mathjax; for the slides, reveal.js, RequireJS and
jQuery from the npm registry, packed once into build/cache/npm/), so a folder can be zipped or copied
to another machine as it is.

Progress bars (tqdm widgets) are written out as the text of their final state. The slides follow the
cells' slide metadata; they hide the code and show the outputs, and the source that a cell prints
with ``inspect.getsource`` appears as highlighted code.
"""

from __future__ import annotations

import argparse
import ast
import html
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

from notebook_files import ROOT, execution_problem, notebooks

BUILD = ROOT / "build"
EXECUTED = BUILD / "executed"
NPM_CACHE = BUILD / "cache" / "npm"
MATHJAX = Path(os.environ.get("MATHJAX_DIR", "/usr/share/javascript/mathjax"))
CHROMIUM = os.environ.get("CHROMIUM", "chromium")
NPM = {"reveal.js": "4.6.1", "requirejs": "2.3.8", "jquery": "3.7.1"}
INSTALL = {"mathjax": "apt-get install libjs-mathjax", "chromium": "apt-get install chromium",
           "npm": "apt-get install npm"}
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
# Templates over nbconvert's own. HTML: no RequireJS (only widgets and JavaScript outputs use it, and
# widgets are written out as text); when printed (make pdf, or a browser's print), A4 pages and long
# code lines wrapped instead of cut off. Slides: the reveal template imports Mermaid from a CDN on
# every deck; no notebook draws a Mermaid diagram.
TEMPLATES = {
    "offline_lab.html.j2": """{%- extends 'index.html.j2' -%}
{%- block html_head_js_requirejs -%}{%- endblock html_head_js_requirejs -%}
{%- block html_head_css -%}
<style>
@media print {
  @page { size: A4; margin: 12mm; }
  .jp-InputArea-editor pre, .jp-RenderedText pre { white-space: pre-wrap; overflow-wrap: anywhere; }
}
</style>
{%- endblock html_head_css -%}
""",
    "offline_reveal.html.j2": """{%- extends 'index.html.j2' -%}
{%- block html_head_js_mermaidjs -%}{%- endblock html_head_js_mermaidjs -%}
""",
}


def missing(tool: str, where: str) -> SystemExit:
    return SystemExit(f"{where} not found: install it with `{INSTALL[tool]}`")


# -- assets copied beside the pages -----------------------------------------------------------

def copy_mathjax(assets: Path) -> str:
    """MathJax 2.7 under assets/mathjax/ (symlinks resolved); returns the URL the pages load it by."""
    if not (MATHJAX / "MathJax.js").exists():
        raise missing("mathjax", f"MathJax 2.7 ({MATHJAX}/MathJax.js)")
    target = assets / "mathjax"
    if not (target / "MathJax.js").exists():
        shutil.copytree(MATHJAX, target, ignore=shutil.ignore_patterns("unpacked", "test"), dirs_exist_ok=True)
    return "assets/mathjax/MathJax.js?config=TeX-AMS_CHTML-full,Safe"


def npm_package(name: str, assets: Path) -> Path:
    """The npm package `name` (version pinned in NPM), unpacked under assets/<name>/."""
    tarball = NPM_CACHE / f"{name}-{NPM[name]}.tgz"
    if not tarball.exists():
        if shutil.which("npm") is None:
            raise missing("npm", f"npm (to fetch {name}@{NPM[name]})")
        NPM_CACHE.mkdir(parents=True, exist_ok=True)
        packed = subprocess.run(["npm", "pack", f"{name}@{NPM[name]}", "--pack-destination", str(NPM_CACHE)],
                                capture_output=True, text=True)
        if packed.returncode != 0:
            raise SystemExit(f"`npm pack {name}@{NPM[name]}` failed (is the npm registry reachable?):\n"
                             f"{packed.stderr}")
    target = assets / name
    if not target.exists():
        with tarfile.open(tarball) as tar, tempfile.TemporaryDirectory(dir=assets) as tmp:
            tar.extractall(tmp, filter="data")
            shutil.move(Path(tmp) / "package", target)
    return target


# -- notebook clean-up before export (in memory; build/executed is left as it is) ---------------

def widget_text(state: dict, model_id: str) -> str:
    """Text of a widget's final state: tqdm's HBox(HTML, progress bar, HTML) becomes its text bar."""
    model = state.get(model_id, {})
    name, values = model.get("model_name", ""), model.get("state", {})
    if name == "HBoxModel":
        return "".join(widget_text(state, child.removeprefix("IPY_MODEL_")) for child in values.get("children", []))
    if name == "HTMLModel":
        return html.unescape(re.sub(r"<[^>]+>", "", values.get("value", ""))).replace("\u2007", " ")
    if name in ("FloatProgressModel", "IntProgressModel") and values.get("max"):
        filled = round(10 * (values.get("value", 0) - values.get("min", 0)) / values["max"])
        return "|" + "█" * filled + " " * (10 - filled) + "|"
    return ""


def widgets_as_text(nb) -> None:
    state = nb.metadata.pop("widgets", {}).get("application/vnd.jupyter.widget-state+json", {}).get("state", {})
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            view = output.get("data", {}).pop(WIDGET_VIEW, None)
            if view is not None:
                output["data"]["text/plain"] = widget_text(state, view["model_id"]) or output["data"].get(
                    "text/plain", "")


def prints_source(source: str) -> bool:
    """True for a cell made only of ``print(inspect.getsource(...))`` or ``print(show_source(...))`` lines."""
    try:
        body = ast.parse(source).body
    except SyntaxError:
        return False

    def source_call(call: ast.expr) -> bool:
        if not isinstance(call, ast.Call):
            return False
        name = getattr(call.func, "attr", None) or getattr(call.func, "id", "")
        return name in ("getsource", "show_source")

    return bool(body) and all(
        isinstance(s, ast.Expr) and isinstance(s.value, ast.Call) and getattr(s.value.func, "id", "") == "print"
        and s.value.args and source_call(s.value.args[0]) for s in body)


def printed_source_as_code(nb) -> None:
    """The text a source-printing cell printed becomes a highlighted Python block."""
    for cell in nb.cells:
        if cell.cell_type == "code" and prints_source(cell.source):
            text = "".join(o.get("text", "") for o in cell.outputs if o.get("output_type") == "stream")
            cell.outputs = [{"output_type": "display_data", "metadata": {},
                             "data": {"text/markdown": f"```python\n{text.rstrip()}\n```"}}]


# -- the three exports --------------------------------------------------------------------------

def executed(selection: list[str] | None, folder: Path = EXECUTED) -> list[Path]:
    """The executed notebooks to export; refuses one that failed or never ran."""
    if not list(folder.glob("[0-9][0-9]_*.ipynb")):
        raise SystemExit(f"no executed notebooks in {folder}/: run `make run` first")
    paths = notebooks(selection, folder)
    problems = {p.name: execution_problem(p) for p in paths}
    refused = [f"{name}: {problem}" for name, problem in problems.items() if problem]
    if refused:
        raise SystemExit("not exporting notebooks that did not run cleanly (rerun them with `make run NB=..`):\n  "
                         + "\n  ".join(refused))
    return paths


def write(exporter, path: Path, out_dir: Path, prepare) -> Path:
    import nbformat

    nb = nbformat.read(path, as_version=4)
    prepare(nb)
    body, resources = exporter.from_notebook_node(nb, resources={"metadata": {"name": path.stem}})
    target = out_dir / f"{path.stem}{resources['output_extension']}"
    target.write_text(body, encoding="utf-8")
    return target


def export_html(paths: list[Path], out_dir: Path = BUILD / "html") -> list[Path]:
    from jinja2 import DictLoader
    from nbconvert import HTMLExporter

    assets = out_dir / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    exporter = HTMLExporter(extra_loaders=[DictLoader(TEMPLATES)], template_file="offline_lab.html.j2",
                            mathjax_url=copy_mathjax(assets))
    return [write(exporter, path, out_dir, widgets_as_text) for path in paths]


def export_slides(paths: list[Path], out_dir: Path = BUILD / "slides") -> list[Path]:
    from jinja2 import DictLoader
    from nbconvert import SlidesExporter

    assets = out_dir / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    for name in NPM:
        npm_package(name, assets)
    exporter = SlidesExporter(
        extra_loaders=[DictLoader(TEMPLATES)], template_file="offline_reveal.html.j2",
        mathjax_url=copy_mathjax(assets), reveal_url_prefix="assets/reveal.js", reveal_theme="white",
        require_js_url="assets/requirejs/require.js", jquery_url="assets/jquery/dist/jquery.min.js",
        reveal_scroll=True, reveal_number="c/t", reveal_width="1280", reveal_height="800",
        exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True,
    )

    def prepare(nb) -> None:
        widgets_as_text(nb)
        printed_source_as_code(nb)

    return [write(exporter, path, out_dir, prepare) for path in paths]


def export_pdf(paths: list[Path], out_dir: Path = BUILD / "pdf") -> list[Path]:
    """Print each notebook's HTML page with headless Chromium, network disabled."""
    if shutil.which(CHROMIUM) is None:
        raise missing("chromium", f"Chromium ({CHROMIUM})")
    out_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for page in export_html(paths):
        target = out_dir / f"{page.stem}.pdf"
        target.unlink(missing_ok=True)
        with tempfile.TemporaryDirectory() as profile:
            # --virtual-time-budget: Chromium waits (in fast-forwarded time) for MathJax to typeset.
            command = [CHROMIUM, "--headless", "--disable-gpu", f"--user-data-dir={profile}",
                       "--host-resolver-rules=MAP * ~NOTFOUND",  # offline: any network request fails at once
                       "--run-all-compositor-stages-before-draw", "--virtual-time-budget=30000",
                       "--no-pdf-header-footer", f"--print-to-pdf={target}", page.as_uri()]
            if os.geteuid() == 0:
                command.insert(1, "--no-sandbox")  # Chromium refuses to run as root with its sandbox
            printed = subprocess.run(command, capture_output=True, text=True)
        if printed.returncode != 0 or not target.exists():
            raise SystemExit(f"Chromium could not print {page.name}:\n{printed.stderr[-2000:]}")
        done.append(target)
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("format", choices=["html", "pdf", "slides"])
    parser.add_argument("--nb", action="append", help="notebook number or name (repeatable); default all")
    args = parser.parse_args()
    export = {"html": export_html, "pdf": export_pdf, "slides": export_slides}[args.format]
    for target in export(executed(args.nb)):
        print(target.relative_to(ROOT))


if __name__ == "__main__":
    main()

"""Regenerate the "where" column of README's deliverables table from the notebooks themselves.

    python scripts/deliverables_table.py          # rewrite the column in README.md
    python scripts/deliverables_table.py --print  # print the table instead

For each notebook: a link to every section heading from its implementation part on (markdown
headings of level 1 to 3, linked by the anchors Jupyter and nbconvert give them), then every figure
the reference run saved (``figures/NN_*.png``). The deliverables themselves (the third column) are
the course brief's and are kept as written.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from urllib.parse import quote

from notebook_files import ROOT, notebooks

BEGIN, END = "<!-- deliverables:begin -->", "<!-- deliverables:end -->"
HEADING = re.compile(r"^(#{1,3})\s+(.+?)\s*$")


def anchor(heading: str) -> str:
    """The fragment Jupyter gives a heading: spaces become '-', the rest is URL-quoted."""
    return quote(heading.strip().replace(" ", "-"), safe=":'?,()!*;@=&/")


def headings(path: Path) -> list[str]:
    """Section headings of the notebook's markdown cells, from its "Implementation" part on."""
    found = []
    for cell in json.loads(path.read_text(encoding="utf-8"))["cells"]:
        if cell["cell_type"] != "markdown":
            continue
        source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
        for line in source.splitlines():
            match = HEADING.match(line)
            if match:
                found.append(match.group(2))
    start = next((i for i, h in enumerate(found) if "implementation" in h.lower()), 1)
    return found[start:]


def where(path: Path, figures: Path) -> str:
    sections = " · ".join(f"[{h}]({path.name}#{anchor(h)})" for h in headings(path))
    pictures = ", ".join(f"[{p.stem[3:].replace('_', ' ')}](figures/{p.name})"
                         for p in sorted(figures.glob(f"{path.stem[:2]}_*.png")))
    return sections + (f"; figures: {pictures}" if pictures else "")


def render(table: str, root: Path = ROOT) -> str:
    """The table with each notebook row's last column regenerated."""
    by_number = {p.stem[:2]: p for p in notebooks(None, root)}
    rows = []
    for line in table.splitlines():
        cells = line.split(" | ")
        number = cells[0].removeprefix("| ").strip()
        if number in by_number and len(cells) >= 4:
            line = " | ".join(cells[:3] + [where(by_number[number], root / "figures")]) + " |"
        rows.append(line)
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--print", action="store_true", help="print instead of rewriting README.md")
    args = parser.parse_args()
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"README.md has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    table, tail = rest.split(END, 1)
    table = render(table.strip("\n"))
    if args.print:
        print(table)
        return
    readme.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}", encoding="utf-8")
    print("README.md deliverables table updated")


if __name__ == "__main__":
    main()

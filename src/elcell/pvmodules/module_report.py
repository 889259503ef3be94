"""report.html of `elcell inspect`: the folder's modules, each with its grade, map,
counts and flagged cells' overlays, in one self-contained page. Torch-free."""

from __future__ import annotations

import html
from pathlib import Path

from elcell.infer.report import (
    Gallery,
    GalleryItem,
    Table,
    figures_html,
    gallery_html,
    table_html,
    write_page,
)
from elcell.infer.runtime import Model


def _rule_number(row: dict[str, str]) -> int:
    text = row["rule"].removeprefix("rule ").split(":")[0]
    return int(text) if text.isdigit() else 10**6  # failed photos last


def write_module_report(out: Path, rows: list[dict[str, str]], labels: list[str], model: Model) -> Path:
    """report.html: every module of the folder (`rows`: modules.csv's, resumed ones
    too), in the order of the rule that graded it (the rules file's first rule
    first), with its map, its counts and its flagged cells enlarged."""
    rows = sorted(rows, key=lambda row: (_rule_number(row), row["module"]))
    summary = Table("Modules", ["grade", "rule", "defect cells", "review cells", "dark area", "seconds"],
                    [(row["module"], [row["grade"] or "-", row["rule"] or row["error"], row["defect_cells"],
                                      row["review_cells"], row["dark_area"], row["seconds"]]) for row in rows])
    body = [table_html(summary)]
    esc = html.escape  # names, paths and errors come from file names, which can hold markup
    for row in rows:
        graded = "not inspected" if row["error"] else esc(f"grade {row['grade']}") if row["grade"] else \
            "no grade: no rule matched"
        body.append(f"<h2>{esc(row['module'])}: {graded}</h2>")
        if row["error"]:
            body.append(f'<p class="note">{esc(row["path"])}: {esc(row["error"])}</p>')
            continue
        if (out / "maps" / f"{row['module']}.png").is_file():
            body.append(figures_html([(row["path"], out / "maps" / f"{row['module']}.png")], css="figures maps"))
        counts = Table("", labels, [("defect cells", [row[f"defect_{label}"] for label in labels]),
                                    ("review cells", [row[f"review_{label}"] for label in labels])])
        body.append(table_html(counts))
        overlays = sorted((out / "flagged" / row["module"]).glob("*.png"))
        items = [GalleryItem(f"{row['module']} {p.stem}", p, "") for p in overlays]
        looked_at = int(row["defect_cells"]) + int(row["review_cells"])
        if looked_at and not items:  # inspected with --no-map: nothing drawn, which is not "none flagged"
            body.append(f'<p class="note">{looked_at} cells flagged or in review; no overlays (inspected '
                        "without maps)</p>")
        else:
            body.append(gallery_html(Gallery(f"flagged cells ({len(items)} overlays)", items)))
    return write_page(out / "report.html", "elcell module inspection",
                      f"{len(rows)} modules, {model.path.name}", body)

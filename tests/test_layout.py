"""The README's layout section names every module of every package, and no other."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src" / "elcell"


def readme_layout() -> dict[str, set[str]]:
    """{package folder relative to src/elcell ('' for the top): module names listed}."""
    block = REPO.joinpath("README.md").read_text().split("```\nsrc/elcell/", 1)[1].split("```", 1)[0]
    layout, stack = {"": set()}, [(0, "")]
    for line in block.splitlines()[1:]:
        if not line.startswith("  ") or not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        folder = re.match(r"\s+(\w+)/\s", line + " ")
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1] if stack else ""
        if folder:
            path = f"{parent}/{folder.group(1)}".strip("/")
            layout[path] = set()
            stack.append((indent, path))
        elif re.fullmatch(r"[a-z_ ]+", line.strip()):
            layout[parent].update(line.split())
    return layout


def test_the_readme_lists_each_package_and_module_as_they_are():
    real = {str(d.relative_to(SRC)).replace(".", ""): {p.stem for p in d.glob("*.py") if p.stem != "__init__"}
            for d in [SRC, *SRC.rglob("*")] if d.is_dir() and (d / "__init__.py").is_file()}
    assert readme_layout() == real


def test_the_top_level_keeps_only_the_command_line_and_basics():
    assert len(list(SRC.glob("*.py"))) <= 8
    assert len([d for d in SRC.iterdir() if (d / "__init__.py").is_file()]) >= 4

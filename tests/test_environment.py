"""environment.yml (the conda set-up) names what requirements.txt names: read as
YAML, no conda needed."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def requirement_lines(text: str) -> list[str]:
    """A requirements file's entries: comments and blank lines dropped, spaces normalised."""
    lines = (re.sub(r"\s+#.*", "", line).strip() for line in text.splitlines() if not line.lstrip().startswith("#"))
    return [re.sub(r"\s+", " ", line) for line in lines if line]


def conda_environment() -> tuple[list[str], list[str]]:
    """(conda packages, pip entries) of environment.yml."""
    spec = yaml.safe_load((REPO / "environment.yml").read_text())
    conda = [d for d in spec["dependencies"] if isinstance(d, str)]
    pip = [entry for d in spec["dependencies"] if isinstance(d, dict) for entry in d["pip"]]
    return conda, [re.sub(r"\s+", " ", entry.strip()) for entry in pip]


def test_environment_yml_pins_what_requirements_txt_pins():
    conda, pip = conda_environment()
    assert pip == requirement_lines((REPO / "requirements.txt").read_text())
    assert "pip" in conda  # the pip section needs conda's pip
    assert any(line.startswith("torch==") for line in pip)  # the CPU build's pin, not any torch


def test_environment_yml_python_is_one_elcell_supports():
    conda, _ = conda_environment()
    pythons = [d for d in conda if re.fullmatch(r"python\s*[=<>!~].*", d)]
    assert len(pythons) == 1
    version = tuple(int(v) for v in re.search(r"(\d+)\.(\d+)", pythons[0]).groups())
    pyproject = (REPO / "pyproject.toml").read_text()
    least = tuple(int(v) for v in re.search(r'requires-python = ">=(\d+)\.(\d+)"', pyproject).groups())
    assert version >= least


def test_the_readme_gives_both_ways_to_set_up():
    readme = (REPO / "README.md").read_text()
    assert "pip install -r requirements.txt" in readme and "conda env create -f environment.yml" in readme

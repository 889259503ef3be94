"""Grades of whole modules from rules a user can edit: a YAML file of ordered
rules over the module's counts and areas; the first rule that holds gives the
grade, and the grade names it. Torch-free.

    rules:
      - grade: C
        when: defect_inactive >= 1 or dark_area > 0.05
        because: an inactive cell, or more than 5 % of the module dark
      - grade: A
        when: "true"

A rule's `when` is a small expression: numbers, the names below, comparisons
(<, <=, >, >=, ==, !=), and, or, not, + - * / and parentheses; nothing else
is evaluated. Names (per module):

* defect_<label>, review_<label>: how many cells are `defect` / `review` for a label
* defect_cells, review_cells, ok_cells, cells: cells defect for any label,
  review for any (and defect for none), ok for every label, all cells
* dark_area: the dark share of the whole module (the mean of the cells' dark_area)
* max_dark_area: the largest dark share of one cell
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from elcell.errors import DataError

DEFAULT_RULES = Path(__file__).with_name("grading.yaml")
_COMPARE = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
            ast.Eq: operator.eq, ast.NotEq: operator.ne}
_ARITHMETIC = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
GENERAL_NAMES = ("defect_cells", "review_cells", "ok_cells", "cells", "dark_area", "max_dark_area")


@dataclass
class Rule:
    grade: str
    when: str
    because: str
    number: int  # 1-based, as the user counts the rules in the file
    test: Callable[[dict], bool]

    def describe(self) -> str:
        return f"rule {self.number}: {self.because or self.when}"


def _evaluate(node: ast.AST, names: dict[str, float]) -> float | bool:
    """The value of a parsed expression; only the node kinds the docstring lists."""
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, names)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float | bool):
        return node.value
    if isinstance(node, ast.Name):
        return names[node.id]
    if isinstance(node, ast.BoolOp):
        values = [_evaluate(v, names) for v in node.values]
        return all(values) if isinstance(node.op, ast.And) else any(values)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not | ast.USub):
        value = _evaluate(node.operand, names)
        return (not value) if isinstance(node.op, ast.Not) else -value
    if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
        return _ARITHMETIC[type(node.op)](_evaluate(node.left, names), _evaluate(node.right, names))
    if isinstance(node, ast.Compare):
        left = _evaluate(node.left, names)
        for op, right_node in zip(node.ops, node.comparators, strict=True):
            right = _evaluate(right_node, names)
            if not _COMPARE[type(op)](left, right):
                return False
            left = right
        return True
    raise ValueError(ast.dump(node))


def _compile(text: str, where: str) -> Callable[[dict], bool]:
    source = {"true": "True", "false": "False"}.get(str(text).strip().lower(), str(text))
    try:
        tree = ast.parse(source.strip(), mode="eval")
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(type(op) not in _COMPARE for op in node.ops):
                raise ValueError("comparison")
        _evaluate(tree, _Probe())  # every node kind allowed, every name looked up
    except (SyntaxError, ValueError, ZeroDivisionError) as err:
        raise DataError(f"{where}: cannot read when: {text!r} ({type(err).__name__}); use numbers, names "
                        "such as defect_crack or dark_area, comparisons, and/or/not") from None
    return lambda names: bool(_evaluate(tree, names))


class _Probe(dict):
    """Answers every name with 1, recording the names asked for (checked later
    against the model's labels)."""

    def __missing__(self, key: str) -> float:
        self[key] = 1.0
        return 1.0


def load_rules(path: str | Path | None = None) -> list[Rule]:
    """The ordered rules of a grading YAML file (elcell's default without one)."""
    path = Path(path) if path else DEFAULT_RULES
    where = f"--rules {path}" if path != DEFAULT_RULES else str(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise DataError(f"{where}: cannot read ({err})") from None
    entries = data.get("rules") if isinstance(data, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DataError(f"{where}: expected 'rules:' and a list of rules, each with grade and when")
    rules = []
    for number, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict) or "grade" not in entry or "when" not in entry:
            raise DataError(f"{where} rule {number}: needs 'grade' and 'when'")
        rules.append(Rule(str(entry["grade"]), str(entry["when"]), str(entry.get("because", "")), number,
                          _compile(entry["when"], f"{where} rule {number}")))
    return rules


def names_used(rules: list[Rule]) -> set[str]:
    used = set()
    for rule in rules:
        probe = _Probe()
        rule.test(probe)
        used |= set(probe)
    return used


def _one_edit(a: str, b: str) -> bool:
    """Whether a and b differ by one letter added, dropped or changed, or only in case."""
    a, b = a.casefold(), b.casefold()
    if a == b:
        return True
    if abs(len(a) - len(b)) > 1:
        return False
    short, long = sorted((a, b), key=len)
    i = next((k for k, (x, y) in enumerate(zip(short, long)) if x != y), len(short))
    return short[i + (len(short) == len(long)):] == long[i + 1:]


def check_names(rules: list[Rule], labels: list[str], typos: bool = False) -> list[str]:
    """Names the rules use that this model cannot give: DataError for a name that
    is no count or area at all, or (typos: a user's own rules) whose label is one
    letter off one of the model's; a label the model lacks is returned (it
    counts 0: rules may serve models with other labels)."""
    known = set(GENERAL_NAMES) | {f"{kind}_{label}" for kind in ("defect", "review") for label in labels}
    missing = []
    for name in sorted(names_used(rules) - known):
        kind, _, label = name.partition("_")
        if kind not in ("defect", "review") or not label:
            raise DataError(f"grading rules: unknown name {name!r}; use {', '.join(GENERAL_NAMES)}, "
                            f"or defect_LABEL / review_LABEL with the model's labels {labels}")
        near = [known for known in labels if _one_edit(label, known)] if typos else []
        if near:
            raise DataError(f"grading rules: {name!r} is not a name of this model's; did you mean "
                            f"'{kind}_{near[0]}'? (its labels are {labels})")
        missing.append(name)
    return missing


def grade(rules: list[Rule], names: dict[str, float]) -> tuple[str, Rule | None]:
    """The grade of the first rule that holds (names the model lacks count 0)."""
    values = _Zero(names)
    for rule in rules:
        if rule.test(values):
            return rule.grade, rule
    return "", None


class _Zero(dict):
    def __missing__(self, key: str) -> float:
        return 0.0

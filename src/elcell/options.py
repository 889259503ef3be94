"""Options declared once: each option of a config dataclass carries its base
value, help, group, choices and check in its field metadata; the command line,
--help, --print-config and validation are all built from that. Torch-free.

Also the argparse types the other commands use for their own options, so that
"a positive number" is checked and worded alike everywhere.
"""

from __future__ import annotations

import argparse
import functools
import math
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import MISSING, Field, field, fields
from typing import Any

from elcell.errors import DataError

Check = Callable[[Any], str | None]  # a value -> what is wrong with it, or None



# `inspect` and `serve --map-views`: with --map-detail fine, a module's flagged
# cells get fine heatmaps of one view each (elcell.infer.runtime.Model.run); any
# --map-views above 1 asks for the fine map. A view costs about five times a
# cell's probabilities and a module may have dozens of flagged cells; one view's
# peak lands on the defect nearly as often as eight's (docs/heatmaps.md), it only
# does not follow a turned cell. `explain` draws a cell with all the model's views.
MAP_VIEWS = 1

# `inspect` and `serve --map-detail`: which heatmap a module's flagged cells get.
# "coarse": LayerCAM on the last feature map (stride 32: 8 x 8 at 225 px), read
# from the same pass that scores the cells, with no backward pass through the
# backbone, so a module with many flagged cells keeps its map in the time of its
# probabilities. It says which part of a cell holds the defect (its peak is on
# a drawn crack to within a quarter of the cell for every cell tried), not where
# the crack runs (docs/heatmaps.md, *Coarse maps for modules*).
# "fine": the model's own LayerCAM at stride 8 or 16, a
# backward pass per view, what `explain` draws. A model exported before coarse
# maps existed gives its fine map.
MAP_DETAILS = ("coarse", "fine")
MAP_DETAIL = "coarse"

# How a recall-first threshold is read off a few positive cells
# (elcell.infer.metrics.threshold_for_recall; docs/accuracy.md, *Thresholds from
# a few validation cells*): `evaluate --recall-estimator`, `train --threshold-estimator`.
RECALL_ESTIMATORS = ("empirical", "expected", "logit-normal")


def option(base: Any, help: str, group: str, *, choices: Sequence | None = None,
           check: Check | None = None, metavar: str | None = None, cli: str | None = None) -> Any:
    """A config field: `base` is the option's value in the original specification
    (the `spec` recipe), or, for an option newer than it, what a run without the
    option did; recipes override it. `cli` names its flag where the field's name
    cannot (`--from`: a Python keyword)."""
    return field(default=base, metadata={"help": help, "group": group, "choices": choices,
                                         "check": check, "metavar": metavar, "base": base, "cli": cli})


def defaults_from(factory: Callable[[str, Any], Any]):
    """Class decorator, applied before @dataclass: every option's default becomes
    `factory(name, base)`, evaluated when an instance is made (e.g. the default
    recipe's value), so that `Config()` equals the command with no options."""
    def decorate(cls: type) -> type:
        for name, value in list(vars(cls).items()):
            if isinstance(value, Field):
                base = value.default
                value.default = MISSING
                value.default_factory = lambda name=name, base=base: factory(name, base)
        return cls
    return decorate


def show_progress(progress: bool | None) -> bool:
    """Progress bars when asked, or by default when stderr is a terminal: in a
    log file they would write a line per update."""
    return sys.stderr.isatty() if progress is None else progress


def base_values(cls: type) -> dict[str, Any]:
    return {f.name: f.metadata["base"] for f in fields(cls)}


# --------------------------------------------------------------------------- checks
def at_least(low: float, words: str | None = None) -> Check:
    return lambda v: None if v >= low else f"must be {words or f'{low:g} or more'}"


def above(low: float, words: str | None = None) -> Check:
    return lambda v: None if v > low else f"must be {words or f'above {low:g}'}"


def within(low: float, high: float, words: str, high_open: bool = False) -> Check:
    return lambda v: None if low <= v and (v < high if high_open else v <= high) else f"must be {words}"


# the checks several commands' options share
POSITIVE = at_least(1)
NON_NEGATIVE = at_least(0)
OPEN_FRACTION: Check = lambda v: None if 0 < v < 1 else "must be in (0, 1)"  # noqa: E731


def flag(name: str, config_class: type | None = None) -> str:
    """The command-line flag of option `name` (of `config_class`, which may rename it)."""
    fields_ = getattr(config_class, "__dataclass_fields__", {})
    renamed = fields_[name].metadata.get("cli") if name in fields_ else None
    return renamed or "--" + name.replace("_", "-")


def problems(config: Any) -> list[str]:
    """Every option of `config` that breaks its declared choices or check."""
    found = []
    for f in fields(config):
        value, meta = getattr(config, f.name), f.metadata
        if value is None or not meta:
            continue
        if meta["choices"] is not None and value not in meta["choices"]:
            found.append(f"{flag(f.name, type(config))} {value!r}: choose from {list(meta['choices'])}")
        elif meta["check"] is not None and (isinstance(value, float) and math.isnan(value) or meta["check"](value)):
            found.append(f"{flag(f.name, type(config))} {value} {meta['check'](value) or 'must be a number'}")
    return found


def validate(config: Any) -> None:
    """DataError naming the first option of `config` that is out of bounds."""
    found = problems(config)
    if found:
        raise DataError(found[0])


def option_types(config_class: type) -> dict[str, type]:
    """Each option's plain type (int for `int | None`), for building the CLI parser."""
    hints = typing.get_type_hints(config_class)
    plain = {}
    for f in fields(config_class):
        args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)]
        plain[f.name] = args[0] if args else hints[f.name]
    return plain


# --------------------------------------------------------------------------- values from files
_KINDS = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}


@functools.cache
def _adapter(hint: Any):
    # strict: YAML already typed the value, so 2.5 for a count or "no" for a flag is a
    # mistake to name, not a value to round or to read as false. pydantic comes with
    # FastAPI in the core; imported here, only when files are read.
    from pydantic import ConfigDict, TypeAdapter

    return TypeAdapter(hint, config=ConfigDict(strict=True))


def _as_on_command_line(kind: type, value: Any) -> Any:
    """What a value of the wrong YAML type means where the command line would read it
    alike: PyYAML reads `lr: 3e-4` as text (YAML 1.1 floats need a dot), and
    `devices: 2` or `precision: 32` as numbers of options that are text, and
    `devices: [0, 1]` as the list --devices 0,1 gives."""
    if kind is float and isinstance(value, str):
        return float(value)
    if kind is str and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    if kind is str and isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool)
                                                       for v in value):
        return ",".join(map(str, value))  # `devices: [0, 1]` as --devices 0,1
    raise ValueError(value)


def typed_values(config_class: type, values: dict[str, Any], source: str) -> dict[str, Any]:
    """`values` (option: value, read from `source`, a YAML file) checked against
    each option's annotation with pydantic; DataError naming the source, the key
    and the value for the first that does not fit. Unknown keys pass through
    (the config class refuses them with their own message)."""
    hints = typing.get_type_hints(config_class)
    plain = option_types(config_class)
    typed = dict(values)
    for key, value in values.items():
        if key not in hints:
            continue
        try:
            typed[key] = _adapter(hints[key]).validate_python(value)
        except ValueError:  # pydantic's ValidationError is a ValueError
            try:
                typed[key] = _adapter(hints[key]).validate_python(_as_on_command_line(plain[key], value))
            except ValueError:
                kind = _KINDS.get(plain[key], plain[key].__name__)
                empty = " (or empty)" if type(None) in typing.get_args(hints[key]) else ""
                raise DataError(f"{source}: {key}: {value!r} is not {kind}{empty}") from None
    return typed


# --------------------------------------------------------------------------- command line
class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default after its help, but not an unset one ('None')."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


_METAVARS = {int: "N", float: "X", str: "NAME"}


def add_options(parser: argparse.ArgumentParser, config_class: type, groups: Sequence[str],
                defaults: dict[str, Any]) -> None:
    """One --option per field of a config dataclass, in argument groups by the
    field's `group` (in the order of `groups`), with its help and its value in
    `defaults` (e.g. the recipe's) as the default."""
    sections = {name: parser.add_argument_group(name) for name in groups}
    for name, kind in option_types(config_class).items():
        meta = config_class.__dataclass_fields__[name].metadata
        text = meta["help"]
        if meta["choices"] is not None and kind is not int:
            text += f" (one of: {', '.join(map(str, meta['choices']))})"
        text = text.replace("%", "%%")  # argparse formats help with %
        target = sections[meta["group"]]
        if kind is bool:
            target.add_argument(flag(name, config_class), dest=name, action=argparse.BooleanOptionalAction,
                                default=defaults[name], help=text)
        else:
            target.add_argument(flag(name, config_class), dest=name, type=kind, default=defaults[name], help=text,
                                metavar=meta["metavar"] or _METAVARS.get(kind, "VALUE"))


def _whole_number(text: str, low: int, words: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"{value}: need {words}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    return _whole_number(text, 1, "at least 1")


def non_negative_int(text: str) -> int:
    """argparse type: an integer of at least 0."""
    return _whole_number(text, 0, "0 or more")


def fraction(text: str) -> float:
    """argparse type: a fraction in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"{value:g}: need a fraction in (0, 1]")
    return value

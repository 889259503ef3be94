"""`elcell inspect --resume`: an earlier run's folder checked against this run,
so that one folder holds one layout and one map choice, and the pictures of a
module interrupted before its row are drawn again."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from elcell.errors import DataError
from elcell.pvmodules.geometry import parse_grid


def check_grid(out: Path, grids: Sequence[str], grid: str) -> None:
    """A resumed run cuts its modules as the first run did: one folder, one layout."""
    seen = {parse_grid(g): g for g in set(grids) if g}
    if len(seen) > 1:
        raise DataError(f"--resume {out}: its modules were cut with several grids "
                        f"({', '.join(sorted(seen.values()))}); write to a new --out")
    if seen and parse_grid(grid) not in seen:
        other = next(iter(seen.values()))
        raise DataError(f"--resume {out}: its modules were cut as --grid {other}, not {grid}; resume with "
                        f"--grid {other}, or write to a new --out")


def check_maps(out: Path, done: dict[str, str], want_map: bool) -> None:
    """A resumed run draws maps as the first run did, so the report shows all or none."""
    mapped = [(out / "maps" / f"{name}.png").is_file() for name in done]
    if want_map and mapped and not any(mapped):
        raise DataError(f"--resume {out}: its {len(mapped)} finished modules have no maps in maps/ (inspected "
                        "with --no-map, or the maps were removed); resume with --no-map, or write to a new --out")
    if not want_map and any(mapped):
        raise DataError(f"--resume {out}: its modules were inspected with their maps; resume with --map (the "
                        "default), or write to a new --out")


def drop_pictures(out: Path, done: dict[str, str]) -> None:
    """A module's map and overlays are written before its row: those of a module
    without a row are an interrupted one's, drawn again (or not) by this run."""
    for picture in (out / "maps").glob("*.png"):
        if picture.stem not in done:
            picture.unlink()
    for folder in (out / "flagged").glob("*"):
        if folder.is_dir() and folder.name not in done:
            shutil.rmtree(folder)

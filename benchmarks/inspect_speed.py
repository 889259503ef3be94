"""How long one module takes, end to end: decode the photo, find, rectify and
cut the module, score every cell, grade it and write its rows; with and
without the map (heatmaps of the flagged cells, the map PNG and their
overlays). Beside it, `elcell predict` on the same cells already cut, as files,
in the same run, as a ratio.

    python benchmarks/inspect_speed.py MODEL.onnx [--repeat 5]

Modules: the real 6x10 poly photo (tests/data/modules, 2599 x 1633 px) and a
144 half-cell (6x24) photo assembled from real ELPV cells at the same scale.
Prints the median seconds of --repeat runs after one warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import cv2

from elcell.cells.images import read_pixels
from elcell.cells.labels import elpv_table
from elcell.infer.predict import predict
from elcell.infer.runtime import open_model
from elcell.pvmodules.geometry import parse_grid
from elcell.pvmodules.grading import load_rules
from elcell.pvmodules.inspect import inspect_paths
from elcell.pvmodules.segment import save_cell, segment_module
from elcell.pvmodules.synthetic import assemble_module

POLY = Path(__file__).resolve().parents[1] / "tests" / "data" / "modules" / "poly-6x10-A1.jpg"


def half_cell_module(folder: Path) -> Path:
    """A 6x24 half-cell module photo from real ELPV cells, about 2600 px wide."""
    table = elpv_table()
    cells = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in table.paths[:72]]
    image, _ = assemble_module(cells, 6, 24, split_gap=True, rotation_deg=2, perspective=0.01, cell_size=200,
                               seed=0)
    path = folder / "half-cells-6x24.png"
    cv2.imwrite(str(path), image)
    return path


def cut_to_files(photo: Path, grid: str, folder: Path) -> list[Path]:
    """The photo's cells as `elcell segment` cuts them, one PNG each."""
    paths = []
    for r, row in enumerate(segment_module(read_pixels(photo), *parse_grid(grid))):
        for c, cell in enumerate(row):
            paths.append(folder / f"r{r}_c{c}.png")
            save_cell(cell, paths[-1])
    return paths


def median_seconds(run, repeat: int) -> float:
    run()  # warm-up: sessions, caches
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    model = open_model(args.model)
    rules = load_rules()
    with tempfile.TemporaryDirectory(prefix="elcell-inspect-") as tmp:
        tmp = Path(tmp)
        modules = [(POLY, "6x10"), (half_cell_module(tmp), "6x24")]
        print(f"{args.model.name}: {model.info.backbone} at {model.decoding.size} px, heatmaps "
              f"{model.info.extra.get('heatmap')}; median of {args.repeat} runs")
        for photo, grid in modules:
            (tmp / photo.stem).mkdir()
            cells = cut_to_files(photo, grid, tmp / photo.stem)
            plain, mapped = (median_seconds(partial(inspect_paths, model, [photo], grid, tmp / "out", rules,
                                                    want_map=want_map, overwrite=True), args.repeat)
                             for want_map in (False, True))
            offline = median_seconds(partial(predict, model, cells, tmp / "p.csv", overwrite=True, progress=False),
                                     args.repeat)
            print(f"{photo.name} ({grid}, {len(cells)} cells): inspect {plain:.2f} s, with the map {mapped:.2f} s; "
                  f"predict on the cut cells {offline:.2f} s (inspect / predict = {plain / offline:.2f})")


if __name__ == "__main__":
    main()

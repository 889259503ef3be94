"""How long one module takes, end to end, float against int8, with and without
the map, as ratios measured in one run.

    python benchmarks/inspect_speed.py MODEL.onnx [--int8 MODEL.int8.onnx] [--repeat 5] [--all-views]

End to end: decode the photo, find, rectify and cut the module, score every
cell, grade it and write its rows (`inspect_paths`, as `elcell inspect`); with
the map: also the heatmaps of the flagged cells (coarse, from the scoring pass,
as `inspect` draws them by default, and fine, one view each, as `--map-detail
fine`; with --all-views also the fine map of the model's own 4 or 8 views, as
`inspect --map-detail fine --map-views 8`), the map PNG and their overlays. Beside them,
`elcell predict` on the same cells already cut, as files. Without --int8 the float model is quantised here as `elcell export
--int8` does (7-bit weights, 100 ELPV cells to calibrate; no recall guard: this
only times it).

Modules: the real 6x10 poly photo (tests/data/modules, 2599 x 1633 px) and a
144 half-cell (6x24) photo assembled from real ELPV cells at the same scale.
Contenders run in alternating rounds (a busy neighbour slows each alike);
each is reported as the median of --repeat rounds after a warm-up, each
ratio as the median of the per-round ratios. Then where the time of one
int8 inspection goes, stage by stage (decode, find, rectify, cut and score).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import cv2

import elcell.pvmodules.inspect
from elcell.cells.images import read_pixels, read_reduced
from elcell.cells.labels import elpv_table
from elcell.infer.cpuinfo import cpu_model
from elcell.infer.predict import predict
from elcell.infer.quantize import calibration_cells, quantize
from elcell.infer.runtime import open_model, score_cells
from elcell.options import MAP_VIEWS
from elcell.pvmodules.geometry import cut_cells, locate_module, parse_grid, rectify
from elcell.pvmodules.grading import load_rules
from elcell.pvmodules.inspect import as_gray, decode_size, inspect_paths
from elcell.pvmodules.judge import inspect_module
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


def int8_copy(float_path: Path, folder: Path) -> Path:
    """The float model quantised as `elcell export --int8` quantises it (the same scheme)."""
    model = open_model(float_path)
    cells, _ = calibration_cells(elpv_table(), model.decoding, count=100)
    return quantize(float_path, folder / f"{float_path.stem}.int8.onnx", cells, source="ELPV (benchmark)")


def seconds(run) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def rounds(contenders: dict[str, object], repeat: int) -> dict[str, list[float]]:
    """Each contender once per round, in turn, after warming up (sessions, caches) on
    those without the map (with it, a module can take a minute: its first run is timed)."""
    for name, run in contenders.items():
        if "map" not in name:
            run()
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeat):
        for name, run in contenders.items():
            times[name].append(seconds(run))
    return times


def ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of a / b."""
    return statistics.median(x / y for x, y in zip(times[a], times[b], strict=True))


def stages(model, photo: Path, grid: str, rules) -> dict[str, float]:
    """Where one inspection's time goes (one run, after inspect_speed's warm-ups)."""
    rows, cols = parse_grid(grid)
    out, t = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        out[name], t = now - t, now

    image = as_gray(read_reduced(photo, decode_size(model, rows, cols))[0])
    lap("decode")
    geometry = locate_module(image, rows, cols)
    lap("find (warps once to find the grid)")
    flat = rectify(image, geometry)
    lap("rectify (warps again)")
    cells = [cell for row in cut_cells(flat, geometry) for cell in row]
    score_cells(model, cells)
    lap(f"cut + score {len(cells)} cells")
    found = inspect_module(model, image, rows, cols, rules, want_map=False)
    lap("all but decoding, as inspect_module")
    out["flagged cells (heatmaps with the map)"] = len(found.flagged())
    return out


def reduced_decoding(model, folder: Path, rules, repeat: int, kind: str = "int8") -> None:
    """The poly photo upscaled to 8000 px as a JPEG (a 40 MP camera): inspected as
    `elcell inspect` reads it (decoded smaller in the JPEG's DCT) against decoded whole."""
    gray = cv2.imread(str(POLY), cv2.IMREAD_GRAYSCALE)
    photo = folder / "poly-8000.jpg"
    cv2.imwrite(str(photo), cv2.resize(gray, None, fx=8000 / gray.shape[1], fy=8000 / gray.shape[1],
                                       interpolation=cv2.INTER_CUBIC), [cv2.IMWRITE_JPEG_QUALITY, 95])
    reduced = partial(inspect_paths, model, [photo], "6x10", folder / "out", rules, want_map=False, overwrite=True)

    def whole() -> None:
        kept = elcell.pvmodules.inspect.DECODE_CELLS
        elcell.pvmodules.inspect.DECODE_CELLS = 1e6  # no reduction reaches that size
        try:
            reduced()
        finally:
            elcell.pvmodules.inspect.DECODE_CELLS = kept

    times = rounds({"reduced": reduced, "whole": whole}, repeat)
    factor = 8000 / read_reduced(photo, decode_size(model, 6, 10))[0].shape[1]
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"\n{photo.name} (8000 x 5027 px, {kind}): decoded {factor:.0f}x smaller {median['reduced']:.2f} s, "
          f"whole {median['whole']:.2f} s; reduced / whole {ratio(times, 'reduced', 'whole'):.2f}")


def show_module(name: str, cells: int, times: dict[str, list[float]], flagged: int) -> None:
    median = {key: statistics.median(values) for key, values in times.items()}
    print(f"\n{name} ({cells} cells, {flagged} flagged by the int8 model: a heatmap each with the map)")
    for kind in ("float", "int8"):
        print(f"  {kind:5s}: inspect {median[f'{kind} plain']:.2f} s, with the map {median[f'{kind} map']:.2f} s, "
              f"predict on the cut cells {median[f'{kind} predict']:.2f} s; map / no map "
              f"{ratio(times, f'{kind} map', f'{kind} plain'):.2f}, inspect / predict "
              f"{ratio(times, f'{kind} plain', f'{kind} predict'):.2f}")
        print(f"         with the fine map (one view) {median[f'{kind} map, fine']:.2f} s; "
              f"coarse / fine {ratio(times, f'{kind} map', f'{kind} map, fine'):.2f}")
        if f"{kind} map, all views" in times:
            print(f"         with the fine map of all the model's views {median[f'{kind} map, all views']:.2f} s; "
                  f"1 view / all {ratio(times, f'{kind} map, fine', f'{kind} map, all views'):.2f}")
    print(f"  int8 / float: inspect {ratio(times, 'int8 plain', 'float plain'):.2f}, with the map "
          f"{ratio(times, 'int8 map', 'float map'):.2f}, predict {ratio(times, 'int8 predict', 'float predict'):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="the float model")
    parser.add_argument("--int8", type=Path, help="its int8 export (default: quantised here)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--all-views", action="store_true",
                        help="also time the map with all of the model's views (minutes on a module of many "
                             "flagged cells)")
    args = parser.parse_args()
    cpu = cpu_model() or platform.processor()
    print(" ".join(sys.argv), "|", cpu, "| cv2 threads", cv2.getNumThreads())
    rules = load_rules()
    with tempfile.TemporaryDirectory(prefix="elcell-inspect-") as tmp:
        tmp = Path(tmp)
        models = {"float": open_model(args.model), "int8": open_model(args.int8 or int8_copy(args.model, tmp))}
        info = models["float"].info
        print(f"{args.model.name}: {info.backbone} at {models['float'].decoding.size} px, heatmaps "
              f"{info.extra.get('heatmap')}; median of {args.repeat} alternating rounds")
        for photo, grid in [(POLY, "6x10"), (half_cell_module(tmp), "6x24")]:
            (tmp / photo.stem).mkdir()
            cells = cut_to_files(photo, grid, tmp / photo.stem)
            contenders = {}
            for kind, model in models.items():
                inspect = partial(inspect_paths, model, [photo], grid, tmp / "out", rules, overwrite=True)
                contenders[f"{kind} plain"] = partial(inspect, want_map=False)
                contenders[f"{kind} map"] = partial(inspect, map_views=MAP_VIEWS)  # coarse where the model has it
                contenders[f"{kind} map, fine"] = partial(inspect, map_views=MAP_VIEWS, map_detail="fine")
                if args.all_views:
                    contenders[f"{kind} map, all views"] = partial(inspect, map_views=None, map_detail="fine")
                contenders[f"{kind} predict"] = partial(predict, model, cells, tmp / "p.csv", overwrite=True,
                                                        progress=False)
            split = stages(models["int8"], photo, grid, rules)
            show_module(photo.name, len(cells), rounds(contenders, args.repeat),
                        split["flagged cells (heatmaps with the map)"])
            print("  int8 stages: " + ", ".join(f"{k} {v:.2f} s" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in split.items()))
            height, width = segment_module(read_pixels(photo), *parse_grid(grid))[0][0].shape
            print(f"  (a cell as cut: {width} x {height} px; the model's input: {models['int8'].decoding.size} px)")
        reduced_decoding(models["int8"], tmp, rules, args.repeat)


if __name__ == "__main__":
    main()

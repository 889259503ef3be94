"""What the durable review queue costs the station: per scored cell offered
(hash of the pixels, and for a queued cell its PNG written and fsync'ed and
queue.json rewritten), per answer (the row appended and fsync'ed, the cell
leaving the queue), and a restart (the queue read back).

Real ELPV cells (300 x 300, 8-bit); probabilities are set so that every cell
is queued (borderline) or none is (sure ok), in the same run. Prints figures
only; disk and a neighbour's load move them.

    python benchmarks/review_queue.py --cells 300
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from elcell.cells.images import read_pixels
from elcell.cells.labels import elpv_table
from elcell.station.queue import ReviewQueue, Scored
from elcell.station.review import LabelsFolder

LABELS = ["crack", "inactive"]


def offered(cells: list[np.ndarray], prob: float) -> list[Scored]:
    decision = np.array(["ok", "ok"])
    return [Scored(f"c{i}.png", pixels, np.array([prob, 0.01]), decision) for i, pixels in enumerate(cells)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=300)
    parser.add_argument("--batch", type=int, default=60, help="cells per offer (a module's worth)")
    args = parser.parse_args()
    cells = [read_pixels(p) for p in elpv_table().paths[: args.cells]]
    with tempfile.TemporaryDirectory() as tmp:
        folder = LabelsFolder(Path(tmp) / "reviewed", LABELS)
        queue = ReviewQueue(folder, [0.5, 0.5], max_items=10 * args.cells, random_share=0.0)
        for name, prob in (("sure ok, none queued", 0.001), ("borderline, all queued", 0.45)):
            start = time.perf_counter()
            for k in range(0, len(cells), args.batch):
                queue.offer(offered(cells[k:k + args.batch], prob))
            took = time.perf_counter() - start
            print(f"offer, {name}: {1000 * took / len(cells):.2f} ms per cell ({len(queue)} waiting)")
        start = time.perf_counter()
        again = ReviewQueue(folder, [0.5, 0.5], max_items=10 * args.cells)
        print(f"restart: {len(again)} waiting cells read back in {1000 * (time.perf_counter() - start):.1f} ms")
        answers = min(100, len(again))
        start = time.perf_counter()
        for _ in range(answers):
            item = again.next("bench")
            folder.add(None, item.name, {"crack": 1}, item.id, again.image(item.id))
            again.done(item.id)
        took = time.perf_counter() - start
        print(f"answer: {1000 * took / answers:.2f} ms each ({answers} answers, queue of {len(again) + answers})")


if __name__ == "__main__":
    main()

"""`elcell serve` as an attacker and a power cut would treat it, on loopback and
bounded in count and time: large images that compress to nothing, many module
photos at once, slow uploads, SIGTERM with work in flight, and kill -9 in the
middle of a stream of review answers. A real `elcell serve --labels-out` in a
subprocess, the tiny trained model, real ELPV cells and module photos. The
phases are those of benchmarks/serve_hostile.py, which prints the figures."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from elcell.cells.images import read_pixels
from elcell.cells.labels import read_labels_csv

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import serve_hostile  # noqa: E402 - the benchmark's phases, asserted on here

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cells(seed_csv) -> list[Path]:
    return read_labels_csv(seed_csv).paths[:40]


def test_hostile_load_gets_4xx_or_2xx_and_bounded_memory(tiny_onnx, cells, tmp_path):
    """Defaults of `elcell serve --labels-out DIR`, no token: never a 5xx, alive
    after, resident memory grows by less than 2 GiB; SIGTERM during load
    answers the request in flight and every review answer saved is a row whose
    image decodes."""
    with serve_hostile.Station(tiny_onnx, tmp_path / "reviewed") as station:
        base = serve_hostile.warm_up(station, cells[0])
        assert serve_hostile.bombs(station) == {413: 1}  # 24 in one request: 1.1 GB of pixels, refused unread
        assert station.peak - base < 100 * 2**20
        # 4 x 230 MB at once, over the 512 MB held at most: two wait for the others' pixels to go
        assert serve_hostile.bombs(station, images=5, clients=4) == {200: 4}
        assert serve_hostile.modules(station, clients=4, rounds=1) == {200: 4 * 2}
        statuses, slowest = serve_hostile.trickle(station, cells[1], clients=3, seconds=3.0)
        assert statuses == {200: 3}
        assert station.alive()
        growth = station.peak - base
        # measured 1.2-1.6 GB (allocator and thread timing vary between runs); without
        # the pixel budget the 4 x 230 MB requests alone hold several GB at once
        assert 0 < growth < 2 * serve_hostile.GIB, growth / 2**20
        result = serve_hostile.reviews_then_sigterm(station, cells)
    assert result["in_flight"] == 200 and result["exit_code"] == 0
    assert max(result["statuses"]) < 500 and result["answered"], result["statuses"]
    rows, broken = serve_hostile.saved_rows(station.labels_out)
    assert set(result["answered"]) <= set(rows) and not broken


def test_kill_9_mid_stream_of_answers_leaves_every_row_whole(tiny_onnx, cells, tmp_path):
    """SIGKILL while a client posts review answers as fast as it can: every row of
    labels.csv names an image that is there, decodes, and is the cell uploaded."""
    uploaded = {f"k{i:03d}": read_pixels(p) for i, p in enumerate(cells)}
    station = serve_hostile.Station(tiny_onnx, tmp_path / "reviewed", "--threshold", "0", "--review-threshold", "0")
    with station:
        with httpx.Client(base_url=station.url, timeout=120) as http:
            for i, path in enumerate(cells):  # every cell flagged (threshold 0): all queued
                http.post("/api/v1/cells", files=[("files", (f"k{i:03d}.png", path.read_bytes(), "image/png"))],
                          params={"heatmaps": "none"}).raise_for_status()
        saved: list[str] = []

        def answer() -> None:
            with httpx.Client(base_url=station.url, timeout=30) as http:
                try:
                    while (item := http.get("/api/v1/review/next").json()["item"]) is not None:
                        reply = http.post(f"/api/v1/review/{item['id']}", json={"labels": {"crack": 1}})
                        saved.append(reply.json()["path"])
                except (httpx.TransportError, ValueError, KeyError):
                    return  # the server died under us

        poster = threading.Thread(target=answer)
        poster.start()
        while len(saved) < 5:
            time.sleep(0.005)
            assert poster.is_alive(), "the answers ended before the kill"
        station.process.send_signal(signal.SIGKILL)
        poster.join(timeout=60)
    assert station.process.returncode == -signal.SIGKILL and len(saved) < len(cells)
    table = read_labels_csv(tmp_path / "reviewed" / "labels.csv")
    assert len(table) >= len(saved)  # every answer the client heard of is a row
    for path in table.paths:
        stem = path.name.split("_")[1]  # cells/DATE-TIME_NAME_RANDOM.png
        np.testing.assert_array_equal(read_pixels(path), uploaded[stem])

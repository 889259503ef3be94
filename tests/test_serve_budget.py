"""`elcell serve`'s memory budget: decoded pixels per request and held by all
requests, decoding concurrency, and a model queue counted in bytes. With the
tiny trained model, real ELPV cells and a real module photo."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from servehelp import RunningServer, png_bytes

import elcell.station.uploads
from elcell.cells.images import read_pixels
from elcell.cells.labels import read_labels_csv
from elcell.cli import build_parser, main
from elcell.infer.runtime import open_model
from elcell.station.app import Settings, create_app
from elcell.station.batcher import Batcher, QueueFull
from elcell.station.budget import Budget, Busy, PixelBudget, TooManyPixels, decoded_bytes

MODULE = Path(__file__).parent / "data" / "modules" / "poly-6x10-A1.jpg"
STATION = "http://127.0.0.1:8000"


@pytest.fixture(scope="module")
def model(tiny_onnx):
    return open_model(tiny_onnx, spin=False)


@pytest.fixture(scope="module")
def cells(seed_csv) -> list[Path]:
    return read_labels_csv(seed_csv).paths[24:32]


@pytest.fixture(scope="module")
def uniform16() -> bytes:
    """A uniform 4900 x 4900 16-bit PNG: about 60 kB that decode to 46 MB."""
    return png_bytes(np.full((4900, 4900), 30000, np.uint16))


def test_headers_give_the_decoded_size(uniform16, cells):
    assert decoded_bytes(uniform16, 10**8) == 4900 * 4900 * 2
    gray = read_pixels(cells[0])
    assert decoded_bytes(cells[0].read_bytes(), 10**8) == gray.size  # 8-bit gray: a byte a pixel
    assert decoded_bytes(uniform16, 4900 * 4900 - 1) == 0  # refused unread by its own check
    assert decoded_bytes(b"not an image", 10**8) == 0


def test_a_request_decoding_past_its_budget_is_refused_unread(model, cells, uniform16, monkeypatch):
    decoded = []
    real = elcell.station.uploads.decode_cell
    monkeypatch.setattr(elcell.station.uploads, "decode_cell", lambda *a: decoded.append(a[1]) or real(*a))
    app = create_app(model, Settings(labels_out=None))
    with TestClient(app, base_url=STATION) as client:
        many = client.post("/api/v1/cells", files=[("files", (f"u{i}.png", uniform16, "image/png"))
                                                   for i in range(24)])
        assert many.status_code == 413 and decoded == []  # from the headers alone
        detail = many.json()["detail"]
        assert detail.startswith("request: its 24 images decode to 1.1 GB of pixels") and "u0.png" in detail
        assert "256 MB per request (--max-request-mb)" in detail
        small16 = png_bytes(np.full((2000, 2000), 30000, np.uint16))  # 8 MB decoded: decoding it costs less
        few = client.post("/api/v1/cells", files=[("files", (f"u{i}.png", small16, "image/png"))
                                                  for i in range(2)] + [("files", (cells[0].name,
                                                                                    cells[0].read_bytes()))])
        assert few.status_code == 200 and len(few.json()["cells"]) == 3 and len(decoded) == 3
        assert app.state.station.pixels.held == 0  # given back once answered
    small = create_app(model, Settings(max_request_mb=40))  # the photo below: 16 MB as RGB
    with TestClient(small, base_url=STATION) as client:
        photo = client.post("/api/v1/modules", data={"grid": "6x10"},
                            files={"file": ("big.png", uniform16, "image/png")})
        assert photo.status_code == 413
        assert photo.json()["detail"] == ("big.png: decodes to 46 MB of pixels; this station accepts 40 MB per "
                                          "request (--max-request-mb)")
        module = client.post("/api/v1/modules", data={"grid": "6x10"},
                             files={"file": (MODULE.name, MODULE.read_bytes(), "image/jpeg")})
        assert module.status_code == 200 and module.json()["grade"]


def test_requests_together_hold_at_most_the_decoded_budget():
    """Past --max-decoded-mb a request waits until others give back theirs, or
    until --budget-wait-s has passed (503); alone it always goes."""
    mb = 2**20

    async def requests():
        budget = PixelBudget(Budget(max_request_mb=100, max_decoded_mb=150, budget_wait_s=0.2))
        order = []

        async def request(name: str, size: int, seconds: float) -> None:
            async with budget.hold([size * mb], [name]):
                order.append(f"{name} in")
                assert budget.held <= 150 * mb
                await asyncio.sleep(seconds)
            order.append(f"{name} out")

        first = asyncio.ensure_future(request("a.png", 80, 0.1))
        await asyncio.sleep(0.01)
        await asyncio.gather(first, request("b.png", 80, 0))  # b waits for a to finish
        assert order == ["a.png in", "a.png out", "b.png in", "b.png out"]
        async with budget.hold([60 * mb, 20 * mb], ["c.png", "d.png"]):
            with pytest.raises(Busy, match="requests hold 80 MB of decoded pixels and this one needs 80 MB") as busy:
                await request("e.png", 80, 0)  # waited 0.2 s in vain
            assert busy.value.retry_after >= 1
            await request("f.png", 70, 0)  # up to the budget exactly: at once
        assert budget.held == 0 and budget.largest == 150 * mb
        with pytest.raises(TooManyPixels, match="g.png: decodes to 101 MB of pixels; this station accepts 100 MB"):
            await request("g.png", 101, 0)
        alone = PixelBudget(Budget(max_request_mb=100, max_decoded_mb=50, budget_wait_s=0))
        async with alone.hold([90 * mb], ["h.png"]):  # nothing else held: under its own limit, it goes
            assert alone.held == 90 * mb

    asyncio.run(requests())


def test_images_are_decoded_a_few_at_a_time(model, cells, monkeypatch):
    """16 clients upload at once; no more images are decoded at once than --decoders."""
    active, most, lock = [0], [0], threading.Lock()
    real = elcell.station.uploads.decode_cell

    def counted(*args):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            time.sleep(0.02)  # long enough for others to overlap if nothing stopped them
            return real(*args)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(elcell.station.uploads, "decode_cell", counted)
    files = [("files", (p.name, p.read_bytes(), "image/png")) for p in cells[:4]]
    with RunningServer(create_app(model, Settings(decoders=2))) as server, ThreadPoolExecutor(16) as pool:
        statuses = list(pool.map(lambda _: httpx.post(f"{server.url}/api/v1/cells", files=files,
                                                      timeout=120).status_code, range(16)))
    assert statuses == [200] * 16 and most[0] == 2


def test_the_queue_counts_the_bytes_a_job_holds(model, cells):
    """A module photo waiting for the model holds its pixels: one such job can fill the
    queue, where counting jobs would have let hundreds wait."""
    batcher = Batcher(model, max_queue_bytes=10 * 2**20)
    release = threading.Event()

    async def crowd():
        held = asyncio.ensure_future(batcher.call(release.wait))
        while not batcher.busy:
            await asyncio.sleep(0.01)
        photo = asyncio.ensure_future(batcher.call(lambda: "inspected", nbytes=8 * 2**20))
        await asyncio.sleep(0.05)
        assert batcher.queued_bytes == 8 * 2**20
        with pytest.raises(QueueFull, match="8.0 MB of work is queued") as full:
            await batcher.call(lambda: "another", nbytes=4 * 2**20)
        release.set()
        assert await photo == "inspected" and full.value.retry_after >= 1
        assert await batcher.call(lambda: "alone", nbytes=50 * 2**20) == "alone"  # an empty queue takes it
        await held
        await batcher.stop()

    asyncio.run(crowd())


def test_the_budget_is_declared_once_as_options():
    args = build_parser().parse_args(["serve", "m.onnx", "--max-request-mb", "64", "--max-queue-mb", "8",
                                      "--decoders", "1"])
    assert (args.max_request_mb, args.max_queue_mb, args.decoders, args.max_decoded_mb, args.max_upload_mb) == \
        (64.0, 8.0, 1, Budget().max_decoded_mb, Budget().max_upload_mb)
    settings = Settings()
    assert (settings.max_request_mb, settings.decoders) == (Budget().max_request_mb, Budget().decoders)


def test_a_budget_out_of_bounds_stops_the_start(tiny_onnx, monkeypatch, capsys):
    started = []
    monkeypatch.setattr("elcell.station.app._Server.run", lambda server: started.append(server))
    for option, value, why in (("--max-request-mb", "0", "must be above 0"), ("--decoders", "0", "must be 1 or more"),
                               ("--max-upload-mb", "-1", "must be above 0")):
        assert main(["serve", str(tiny_onnx), option, value]) == 2
        assert f"elcell: error: {option} {float(value) if option != '--decoders' else value} {why}" in \
            capsys.readouterr().err
    assert not started
    assert main(["serve", str(tiny_onnx), "--max-decoded-mb", "512", "--decoders", "1"]) == 0
    assert started[0].config.app.state.station.pixels.total == 512 * 2**20

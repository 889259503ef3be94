"""`elcell serve` under stress: a fuzz of every route from its OpenAPI schema,
16 concurrent clients reviewing, a labels writer killed at random moments, and
SIGTERM with a request in flight. With the tiny trained model on real cells."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from servehelp import RunningServer, wait_until

from elcell.cells.images import read_pixels
from elcell.cells.labels import read_labels_csv
from elcell.station.app import Settings, create_app
from elcell.station.review import LabelsFolder

MODULES = Path(__file__).parent / "data" / "modules"
pytestmark = pytest.mark.slow




def test_a_writer_killed_at_any_moment_leaves_a_readable_file(tmp_path, seed_cells):
    script = (f"import numpy as np\nfrom elcell.cells.images import read_pixels\nfrom elcell.station.review import LabelsFolder\n"
              f"f = LabelsFolder({str(tmp_path / 'k')!r}, ['crack', 'inactive'])\np = read_pixels({str(seed_cells[0])!r})\n"
              "print('ready', flush=True)\nfor i in range(100000):\n    f.add(p, f'c{i}.png', {'crack': i % 2}, key=f'{i:016x}')\n")
    for delay in (0.3, 0.55, 0.8):
        writer = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
        try:
            ready, _, _ = select.select([writer.stdout], [], [], 60)  # a bounded wait for its first line
            assert ready and writer.stdout.readline() == b"ready\n", "the writer did not start in 60 s"
            time.sleep(delay)
        finally:
            writer.kill()
            writer.wait(timeout=60)
        table = read_labels_csv(tmp_path / "k" / "labels.csv")  # readable as the kill left it
        assert len(table) > 0  # a row never names a missing or half-written image:
        assert all(np.array_equal(read_pixels(p), read_pixels(seed_cells[0])) for p in table.paths)
        assert LabelsFolder(tmp_path / "k", ["crack", "inactive"]).rows == len(table)


def test_no_route_answers_5xx_to_anything_its_schema_allows(model, seed_cells, tmp_path):
    """Every operation in the OpenAPI schema, with inputs drawn from it and
    inputs that break it (random uploads, grids, ids, labels, query values),
    and with the ids of a real cell and module: never a 5xx."""
    # imported here, not at the top: the fast tier collects this module too, and
    # hypothesis and schemathesis are assertion-rewritten on import (seconds)
    import hypothesis
    import schemathesis
    from schemathesis.generation.modes import GenerationMode

    # schemathesis calls an ASGI app as host "testserver", which the station allows as an operator would
    app = create_app(model, Settings(labels_out=tmp_path / "fuzz", review_thresholds=[0.0, 1.0],
                                     allowed_hosts=("testserver",)))
    failures, refused = [], []
    with TestClient(app) as client:  # lifespan: the batcher runs
        cell = client.post("/api/v1/cells", files=[("files", (seed_cells[0].name, seed_cells[0].read_bytes(), "image/png"))])
        module = client.post("/api/v1/modules", data={"grid": "2x2"}, files={
            "file": ("m.jpg", (MODULES / "mono-2x2-MMEL1.jpg").read_bytes(), "image/jpeg")})
        real = {"key": cell.json()["cells"][0]["id"], "item_id": cell.json()["cells"][0]["review"]}
        modules = {"key": module.json()["id"]}
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 12

        for operation in operations:
            strategies = [operation.as_strategy(GenerationMode.POSITIVE)]
            names = {p.name for p in operation.path_parameters}
            if names:
                known = {k: v for k, v in (modules if "modules" in operation.path else real).items() if k in names}
                strategies.append(operation.as_strategy(GenerationMode.POSITIVE, path_parameters=known))
            if names or operation.body or operation.query:
                strategies.append(operation.as_strategy(GenerationMode.NEGATIVE))

            @hypothesis.settings(max_examples=30, deadline=None, database=None,
                                 suppress_health_check=list(hypothesis.HealthCheck))
            @hypothesis.given(hypothesis.strategies.one_of(strategies))
            def no_server_error(case):
                response = case.call()
                if response.status_code >= 500:
                    failures.append(f"{case.method} {case.formatted_path}: {response.status_code} "
                                    f"{response.text[:200]}")
                if b"--allowed-host" in response.content:  # a refused host would make the fuzz test nothing
                    refused.append(f"{case.method} {case.formatted_path}")

            no_server_error()
    assert not failures, failures[:5]
    assert not refused, refused[:5]


def test_sixteen_clients_lose_nothing(model, seed_cells, tmp_path):
    app = create_app(model, Settings(labels_out=tmp_path / "load", review_thresholds=[0.0, 1.0]))  # all flagged
    files = [(p.name, p.read_bytes()) for p in seed_cells]
    statuses, answered = [], []

    def client_loop(k: int) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for i in range(4):
                name, data = files[(k * 4 + i) % len(files)]
                statuses.append(http.post("/api/v1/cells", files=[("files", (name, data, "image/png"))]).status_code)
                item = http.get("/api/v1/review/next").json()["item"]
                if item:
                    saved = http.post(f"/api/v1/review/{item['id']}", json={"labels": {"crack": k % 2}})
                    statuses.append(saved.status_code)
                    answered.append(item["id"]) if saved.status_code == 200 else None

    with RunningServer(app) as server, ThreadPoolExecutor(16) as pool:
        list(pool.map(client_loop, range(16)))
    assert statuses and max(statuses) < 500, sorted(set(statuses))
    table = read_labels_csv(tmp_path / "load" / "labels.csv")
    assert len(table) == len(answered) == len(set(answered)) > 0 and all(p.is_file() for p in table.paths)
    assert app.state.station.batcher.stats.mean_batch > 1  # concurrent clients shared batches


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_sigterm_finishes_requests_in_flight_then_exits(tiny_onnx):
    port = _free_port()
    env = {**os.environ, "ELCELL_TOKEN": "tok"}
    server = subprocess.Popen([sys.executable, "-m", "elcell.cli", "serve", str(tiny_onnx), "--port", str(port),
                               "--log-level", "warning"], env=env, stderr=subprocess.PIPE, text=True)
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer tok"}
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
        assert httpx.get(f"{url}/api/v1/model").status_code == 401  # the token came from the environment
        result = {}
        photo = (MODULES / "poly-6x10-A1.jpg").read_bytes()
        request = threading.Thread(target=lambda: result.update(answer=httpx.post(
            f"{url}/api/v1/modules", headers=auth, files={"file": ("poly.jpg", photo, "image/jpeg")},
            data={"grid": "6x10"}, timeout=120)))
        request.start()
        wait_until(lambda: httpx.get(f"{url}/healthz").json()["in_flight"] >= 1, "the request to arrive",
                   pause=0.005)
        server.send_signal(signal.SIGTERM)
        request.join(timeout=120)
        assert result["answer"].status_code == 200 and result["answer"].json()["grade"]
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()
        server.wait(timeout=60)

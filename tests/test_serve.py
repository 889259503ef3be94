"""`elcell serve`: the API on real ELPV cells and real module photos with the tiny
trained model, its answers against `elcell predict` and `elcell inspect`, its
status codes, the batcher, the review store, a schema fuzz, load and SIGTERM."""

from __future__ import annotations

import asyncio
import csv
import os
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from servehelp import RunningServer, async_wait_until, bomb_png, png_bytes, wait_until
from starlette.websockets import WebSocketDisconnect

from elcell.cells.images import load_cell, read_pixels
from elcell.cells.labels import read_labels_csv
from elcell.cli import build_parser, main
from elcell.errors import DataError
from elcell.infer.runtime import score_cells
from elcell.station.app import Settings, create_app
from elcell.station.batcher import Batcher, QueueFull
from elcell.station.budget import MB
from elcell.station.results import decode_cell
from elcell.station.review import LabelsFolder

MODULES = Path(__file__).parent / "data" / "modules"
STATION = "http://127.0.0.1:8000"  # the station's own address: TestClient's default host is refused


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle, delimiter=";"))




@pytest.fixture()
def client(model, tmp_path):
    with TestClient(create_app(model, Settings(labels_out=tmp_path / "reviewed")), base_url=STATION) as client:
        yield client


def upload(paths) -> list:
    return [("files", (Path(p).name, Path(p).read_bytes(), "image/png")) for p in paths]


# --------------------------------------------------------------------------- same answers as the CLI
def test_cells_answer_as_predict_does(client, model, tiny_onnx, seed_cells, tmp_path):
    answer = client.post("/api/v1/cells?heatmaps=all", files=upload(seed_cells) + [
        ("files", ("notes.txt", b"not an image", "text/plain"))])
    assert answer.status_code == 200
    got = answer.json()["cells"]
    assert [c["name"] for c in got] == [p.name for p in seed_cells] + ["notes.txt"]
    assert got[-1]["error"].startswith("notes.txt: not a readable image") and got[-1]["probs"] == {}
    assert main(["predict", str(tiny_onnx), *map(str, seed_cells), "--out", str(tmp_path / "p.csv"),
                 "--no-progress"]) == 0
    for cell, row in zip(got, read_csv(tmp_path / "p.csv"), strict=False):
        assert cell["error"] is None
        for label in model.info.labels:
            assert abs(cell["probs"][label] - float(row[f"prob_{label}"])) <= 1e-6
            assert cell["decisions"][label] == row[f"decision_{label}"]
            x0, y0, x1, y1 = cell["boxes"][label]
            assert 0 <= x0 < x1 <= cell["width"] and 0 <= y0 < y1 <= cell["height"]
    image = client.get(got[0]["image"])
    overlay = client.get(got[0]["overlays"]["crack"])
    assert image.headers["content-type"] == overlay.headers["content-type"] == "image/png"
    assert client.get(got[0]["overlays"]["crack"].replace("crack", "nolabel")).status_code == 404


def test_uploads_decode_as_files_do(model, seed_cells, tmp_path):
    """An upload becomes the model input `elcell predict` makes of the same file:
    8-bit PNG, 16-bit PNG (12-bit camera values too), JPEG."""
    pixels = read_pixels(seed_cells[0])
    (tmp_path / "c16.png").write_bytes(png_bytes(pixels.astype(np.uint16) * 257))
    (tmp_path / "c12.png").write_bytes(png_bytes(pixels.astype(np.uint16) * 16))
    Image.fromarray(pixels).save(tmp_path / "c.jpg", quality=90)
    for path in [seed_cells[0], tmp_path / "c16.png", tmp_path / "c12.png", tmp_path / "c.jpg"]:
        decoded = decode_cell(path.read_bytes(), path.name, model.decoding)
        assert decoded.error is None
        np.testing.assert_array_equal(decoded.cell, load_cell(path, model.decoding))


@pytest.mark.slow
@pytest.mark.parametrize("photo, grid", [("poly-6x10-A1.jpg", "6x10"), ("mono-2x2-MMEL1.jpg", "2x2")])
def test_modules_answer_as_inspect_does(client, tiny_onnx, tmp_path, photo, grid):
    answer = client.post("/api/v1/modules", files={"file": (photo, (MODULES / photo).read_bytes(), "image/jpeg")},
                         data={"grid": grid})
    assert answer.status_code == 200, answer.text
    module = answer.json()
    out = tmp_path / "inspected"
    assert main(["inspect", str(tiny_onnx), str(MODULES / photo), "--grid", grid, "--out", str(out),
                 "--no-report"]) == 0
    expected = read_csv(out / "modules.csv")[0]
    assert (module["grade"], module["rule"]) == (expected["grade"], expected["rule"])
    rows = read_csv(out / "cells.csv")
    assert len(module["cells"]) == len(rows)
    for cell, row in zip(module["cells"], rows, strict=True):
        assert (cell["row"], cell["col"]) == (int(row["row"]), int(row["col"]))
        corners = np.array(cell["corners"]).ravel()
        np.testing.assert_allclose(corners, [float(row[k]) for k in ("x0", "y0", "x1", "y1", "x2", "y2", "x3", "y3")],
                                   atol=0.051)
        for label in ("crack", "inactive"):
            assert abs(cell["probs"][label] - float(row[f"prob_{label}"])) <= 1e-6
            assert cell["decisions"][label] == row[f"decision_{label}"]
        assert abs(cell["dark_area"] - float(row["dark_area"])) <= 5e-5
        x0, y0, x1, y1 = cell["map_box"]
        assert 0 <= x0 < x1 <= module["map_size"][0] and 0 <= y0 < y1 <= module["map_size"][1]
    picture = client.get(module["map"])
    assert picture.status_code == 200 and picture.content.startswith(b"\x89PNG")
    assert client.get(f"/api/v1/modules/{module['id']}").json()["grade"] == module["grade"]
    flagged = next((c for c in module["cells"] if set(c["decisions"].values()) != {"ok"}), module["cells"][0])
    kept = client.app.state.station.cell(flagged["id"])
    assert kept.coarse == (set(flagged["decisions"].values()) != {"ok"})  # the map's coarse heatmap, for its box
    assert client.get(f"/api/v1/results/{flagged['id']}/overlay/crack.png").status_code == 200
    assert not kept.coarse and kept.heatmaps.shape[1:] == (4, 4)  # the overlay drew the fine map (32 px / 8)


def test_model_and_health(client, model):
    info = client.get("/api/v1/model").json()
    assert info["labels"] == model.info.labels == ["crack", "inactive"]
    assert info["size"] == model.info.decoding.size and info["decoding"]["bit_depth"] == 16
    assert info["thresholds"] == {"crack": 0.5, "inactive": 0.5} and info["review"] is True
    assert info["version"] and info["model"].startswith(model.path.name)
    assert client.get("/healthz").json()["status"] == "ok"
    assert "/api/v1/cells" in client.get("/openapi.json").json()["paths"]
    page = client.get("/")
    assert page.status_code == 200 and "/static/app.js" in page.text and "http" not in page.text.split("<body>")[1]
    docs = client.get("/docs").text  # Swagger UI from the app itself: works offline
    assert "swagger-ui-bundle.js" in docs and "cdn" not in docs
    script = next(line for line in docs.splitlines() if "swagger-ui-bundle.js" in line).split('"')[1]
    assert client.get(script).status_code == 200


def test_the_page_shows_names_and_errors_as_text(client):
    """The page builds its DOM from the API's answers, which hold uploaded file names
    and error texts: only as text nodes and attributes, never parsed as HTML."""
    script = client.get("/static/app.js").text
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function",
                 "createContextualFragment", "DOMParser"):
        assert sink not in script, sink
    assert "document.createElement(tag)" in script and "node.append(child)" in script  # el(): text children
    name = "<img src=x onerror=alert(1)>.png"
    answer = client.post("/api/v1/cells", files=[("files", (name, b"no image", "image/png")),
                                                 ("files", ("ok.png", png_bytes(np.zeros((64, 64), np.uint8)),
                                                            "image/png"))])
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    assert answer.json()["cells"][0]["name"] == name  # JSON, not HTML: the page escapes by using text nodes


# --------------------------------------------------------------------------- status codes
def test_status_codes_a_client_can_act_on(model, seed_cells, tmp_path):
    app = create_app(model, Settings(token="s3cret", max_upload_mb=0.5))
    auth = {"Authorization": "Bearer s3cret"}
    with TestClient(app, base_url=STATION) as client:
        assert client.post("/api/v1/cells", files=upload(seed_cells[:1])).status_code == 401
        wrong = client.get("/api/v1/model", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "token" in wrong.json()["detail"]
        assert wrong.headers["www-authenticate"].startswith("Bearer")
        assert client.get("/healthz").status_code == 200  # no token needed to see it is alive
        assert client.post("/api/v1/cells", files=upload(seed_cells[:1]), headers=auth).status_code == 200
        # none readable: 400 naming each file; a decompression bomb's header is refused unread
        bad = client.post("/api/v1/cells", headers=auth, files=[
            ("files", ("a.png", b"", "image/png")), ("files", ("b.png", bomb_png(8000, 8000), "image/png"))])
        assert bad.status_code == 400
        assert "a.png: empty file" in bad.json()["detail"] and "b.png: image is 8000x8000" in bad.json()["detail"]
        # over the limit: by Content-Length before reading, and while reading a body without one
        big = np.random.default_rng(0).integers(0, 255, (800, 800), dtype=np.uint8)
        too_big = client.post("/api/v1/cells", headers=auth, files=[("files", ("big.png", png_bytes(big), "image/png"))])
        assert too_big.status_code == 413 and "0.5 MB" in too_big.json()["detail"]

        def chunks():
            for _ in range(40):
                yield b"x" * 65536

        streamed = client.post("/api/v1/cells", headers={**auth, "Content-Type": "multipart/form-data; boundary=b"},
                               content=chunks())
        assert streamed.status_code == 413
        # malformed: 422 naming the field
        for answer in (client.post("/api/v1/cells", headers=auth),
                       client.post("/api/v1/cells?heatmaps=some", headers=auth, files=upload(seed_cells[:1]))):
            assert answer.status_code == 422 and answer.json()["detail"].startswith("malformed request")
        # a grid in words, not a pattern or a command-line option
        for grid, words in (("6by10", "is not a grid"), ("abc", "is not a grid"), ("0x0", "has no cells")):
            answer = client.post("/api/v1/modules", headers=auth, data={"grid": grid},
                                 files={"file": ("m.jpg", b"x", "image/jpeg")})
            assert answer.status_code == 422 and words in answer.json()["detail"]
            assert "--grid" not in answer.json()["detail"] and "\\d" not in answer.json()["detail"]
        assert "files" in client.post("/api/v1/cells", headers=auth).json()["detail"]
        # a module photo that is not an image: 400; an image without a module: 422 with the reason
        assert client.post("/api/v1/modules", headers=auth, data={"grid": "6x10"},
                           files={"file": ("m.jpg", b"nope", "image/jpeg")}).status_code == 400
        bomb = client.post("/api/v1/modules", headers=auth, data={"grid": "6x10"},
                           files={"file": ("m.png", bomb_png(12000, 11000), "image/png")})
        assert bomb.status_code == 400 and "m.png: image is 12000x11000 pixels" in bomb.json()["detail"]
        for width, height in ((11000, 10000), (20000, 10000)):  # past Pillow's warning and its own refusal
            bomb = client.post("/api/v1/cells", headers=auth, files={"files": ("c.png", bomb_png(width, height),
                                                                                "image/png")})
            assert bomb.status_code == 400 and f"c.png: image is {width}x{height} pixels, more than the 25 million " \
                "accepted here" in bomb.json()["detail"], bomb.json()
        blank = client.post("/api/v1/modules", headers=auth, data={"grid": "6x10"},
                            files={"file": ("blank.png", png_bytes(np.zeros((400, 600), np.uint8)), "image/png")})
        assert blank.status_code == 422 and blank.json()["detail"].startswith("blank.png: no module found")
        assert client.get("/api/v1/results/0123/image.png", headers=auth).status_code == 404
        assert client.get("/api/v1/modules/0123/map.png", headers=auth).status_code == 404
        assert client.get("/api/v1/review/next", headers=auth).status_code == 404  # review loop off


def test_requests_naming_other_hosts_are_refused(model, seed_cells, tmp_path):
    """DNS rebinding: a page at evil.example whose name now resolves to the station
    sends Host: evil.example. Only the station's own names pass, with any port."""
    settings = Settings(host="10.0.4.17", allowed_hosts=("Inspection-PC.plant.local", "[fd00::17]"),
                        labels_out=tmp_path / "reviewed")
    with TestClient(create_app(model, settings), base_url=STATION) as client:
        for host in ("localhost", "localhost:8000", "127.0.0.1", "127.0.0.1:8000", "[::1]", "[::1]:8000",
                     "10.0.4.17", "10.0.4.17:8000", "inspection-pc.plant.local:8000", "INSPECTION-PC.plant.local.",
                     "[fd00::17]:8000"):
            assert client.get("/healthz", headers={"Host": host}).status_code == 200, host
            assert client.get("/api/v1/model", headers={"Host": host}).status_code == 200, host
        for host in ("evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io",
                     "10.0.4.18", "[::2]:8000", "localhost:8000:8000", "[::1]x", "0.0.0.0:8000"):
            for answer in (client.get("/", headers={"Host": host}), client.get("/healthz", headers={"Host": host}),
                           client.post("/api/v1/cells", headers={"Host": host}, files=upload(seed_cells[:1])),
                           client.post("/api/v1/review/abc", headers={"Host": host}, json={"labels": {}})):
                assert answer.status_code == 400, (host, answer.status_code)
                detail = answer.json()["detail"]
                assert repr(host) in detail and detail.count(". ") == 0, detail
                malformed = host in ("localhost:8000:8000", "[::1]x")  # no advice to allow what is no name
                assert ("is not a host name or address" if malformed else "--allowed-host") in detail, detail
        assert client.get("/api/v1/review").json()["waiting"] == 0  # the refused upload reached nothing
        no_host = client.get("/healthz", headers={"Host": ""})
        assert no_host.status_code == 400 and "no Host header" in no_host.json()["detail"]
        with pytest.raises(WebSocketDisconnect) as closed:  # a WebSocket is refused the same way
            with client.websocket_connect("/ws", headers={"Host": "evil.example"}):
                pass
        assert closed.value.code == 1008 and "--allowed-host" in closed.value.reason
    with pytest.raises(DataError, match="--allowed-host '\\*'"):  # a name, not a pattern
        create_app(model, Settings(allowed_hosts=("*",)))
    with RunningServer(create_app(model, Settings())) as server:  # through uvicorn as a browser would come
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        refused = httpx.get(f"{server.url}/healthz", headers={"Host": "evil.example"})
        assert refused.status_code == 400 and "evil.example" in refused.json()["detail"]
        port = server.url.rsplit(":", 1)[1]
        assert httpx.get(f"{server.url}/healthz", headers={"Host": f"localhost:{port}"}).status_code == 200


def test_the_schema_declares_the_token_so_docs_can_send_it(model):
    with TestClient(create_app(model, Settings(token="s3cret")), base_url=STATION) as client:
        schema = client.get("/openapi.json").json()
        assert schema["components"]["securitySchemes"]["bearer"]["type"] == "http"
        assert schema["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        api = [(path, op) for path, ops in schema["paths"].items() for op in ops.values()]
        assert len(api) >= 12 and all(op.get("security") == [{"bearer": []}] for path, op in api
                                      if path.startswith("/api/"))
        assert "security" not in schema["paths"]["/healthz"]["get"]
        # what /docs sends after "Authorize": the scheme's header, checked by the token
        assert client.get("/api/v1/model", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert client.get("/api/v1/model", headers={"Authorization": "Bearer s3cre"}).status_code == 401
    with TestClient(create_app(model, Settings()), base_url=STATION) as client:
        assert "securitySchemes" not in client.get("/openapi.json").json().get("components", {})


def test_a_full_queue_answers_503_with_retry_after(model, seed_cells):
    cell_bytes = load_cell(seed_cells[0], model.decoding).nbytes
    app = create_app(model, Settings(max_queue_mb=1.5 * cell_bytes / MB))  # one cell waits, a second is refused
    release = threading.Event()
    with TestClient(app, base_url=STATION) as client:
        batcher = app.state.station.batcher
        blocker = threading.Thread(target=lambda: asyncio.run(batcher.call(release.wait)))
        blocker.start()
        wait_until(lambda: batcher.busy, "the blocking call to start")
        waiting = threading.Thread(target=lambda: client.post("/api/v1/cells", files=upload(seed_cells[:1])))
        waiting.start()
        wait_until(lambda: batcher.queued >= 1, "the second request to queue")
        busy = client.post("/api/v1/cells", files=upload(seed_cells[1:2]))
        release.set()
        blocker.join(timeout=60)
        waiting.join(timeout=60)
    assert busy.status_code == 503 and int(busy.headers["retry-after"]) >= 1 and "busy" in busy.json()["detail"]


# --------------------------------------------------------------------------- batching
def test_concurrent_requests_are_batched_and_answered_alike(model, seed_cells):
    decoded = np.stack([load_cell(p, model.decoding) for p in seed_cells])
    alone = score_cells(model, decoded)
    batcher = Batcher(model, batch_size=8, max_wait=0.05)

    async def many():
        return await asyncio.gather(*(batcher.score(decoded[i:i + 1]) for i in range(len(seed_cells))))

    got = asyncio.run(many())
    asyncio.run(batcher.stop())
    np.testing.assert_allclose(np.concatenate([g.probs for g in got]), alone.probs, atol=2e-6)
    assert [list(g.decisions[0]) for g in got] == [list(d) for d in alone.decisions]
    assert batcher.stats.batches < len(seed_cells) and batcher.stats.largest <= 8


def test_the_batcher_refuses_past_its_bound(model, seed_cells):
    cell = load_cell(seed_cells[0], model.decoding)[None]
    batcher = Batcher(model, max_queue_bytes=2 * cell.nbytes)  # bytes held, not jobs
    release = threading.Event()

    async def crowd():
        held = asyncio.ensure_future(batcher.call(release.wait))
        await async_wait_until(lambda: batcher.busy, "the blocking call to start")
        queued = [asyncio.ensure_future(batcher.score(cell)) for _ in range(2)]
        await asyncio.sleep(0.05)
        with pytest.raises(QueueFull):
            await batcher.score(cell)
        release.set()
        await asyncio.gather(held, *queued)
        await batcher.stop()

    asyncio.run(crowd())


# --------------------------------------------------------------------------- the labels folder (tests/test_review.py: the loop)
def test_the_labels_file_survives_concurrency_and_a_kill(tmp_path, seed_cells):
    folder = LabelsFolder(tmp_path / "labels", ["crack", "inactive"])
    pixels = read_pixels(seed_cells[0])
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: folder.add(pixels, f"cell{i}.png", {"crack": i % 2}, key=f"{i:016x}"), range(48)))
    table = read_labels_csv(folder.csv)
    assert len(table) == 48 and all(np.array_equal(read_pixels(p), pixels) for p in table.paths)
    assert sorted(table.targets[:, 0].tolist()) == [0] * 24 + [1] * 24
    # a killed writer's partial last line: dropped when the folder is opened again
    with open(folder.csv, "ab") as handle:
        handle.write(b"cells/half_written.png;1")
    again = LabelsFolder(tmp_path / "labels", ["crack", "inactive"])
    assert again.dropped_partial_line and again.rows == 48 and len(read_labels_csv(folder.csv)) == 48
    with open(folder.csv, "ab") as handle:  # and before appending, by a writer that did not restart
        handle.write(b"cells/half")
    again.add(pixels, "after.png", {"inactive": 1}, key=f"{99:016x}")
    assert len(read_labels_csv(folder.csv)) == 49
    with pytest.raises(DataError, match="columns"):
        LabelsFolder(tmp_path / "labels", ["defective"])


def test_an_answer_reaches_the_disk_image_first_then_its_row(tmp_path, seed_cells, monkeypatch):
    """The order that survives a power cut: the image fsync'ed and renamed into
    cells/, cells/ fsync'ed (the rename), and only then the row appended and fsync'ed."""
    folder = LabelsFolder(tmp_path / "labels", ["crack", "inactive"])
    events = []
    fsync, replace, write = os.fsync, os.replace, os.write

    def what(fd: int) -> tuple[str, int]:
        info = os.fstat(fd)
        return ("folder" if stat.S_ISDIR(info.st_mode) else "file", info.st_ino)

    def recorded_fsync(fd):
        events.append(("fsync", *what(fd)))
        fsync(fd)

    def recorded_replace(source, target):
        replace(source, target)
        events.append(("rename", "file", os.stat(target).st_ino))

    def recorded_write(fd, data):
        events.append(("write", *what(fd)))
        return write(fd, data)

    monkeypatch.setattr(os, "fsync", recorded_fsync)
    monkeypatch.setattr(os, "replace", recorded_replace)
    monkeypatch.setattr(os, "write", recorded_write)
    saved = folder.add(read_pixels(seed_cells[0]), "c.png", {"crack": 1})
    monkeypatch.undo()
    image = os.stat(tmp_path / "labels" / saved.path).st_ino
    assert events == [("fsync", "file", image), ("rename", "file", image),
                      ("fsync", "folder", os.stat(folder.cells).st_ino),
                      ("write", "file", os.stat(folder.csv).st_ino), ("fsync", "file", os.stat(folder.csv).st_ino)]
    assert read_labels_csv(folder.csv).targets.tolist() == [[1, 0]]


def test_the_command_line():
    args = build_parser().parse_args(["serve", "m.onnx"])
    assert (args.host, args.port, args.max_upload_mb, args.labels_out, args.module) == \
        ("127.0.0.1", 8000, 50.0, None, "elcell.station.app")
    args = build_parser().parse_args(["serve", "m.onnx", "--allowed-host", "a", "--allowed-host", "b.lan",
                                      "--token-file", "t.txt"])
    assert (args.allowed_host, args.token_file, args.token) == (["a", "b.lan"], "t.txt", None)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "m.onnx", "--token", "x", "--token-file", "t.txt"])
    assert build_parser().parse_args(["serve", "m.onnx"]).review_random == 0.1
    assert build_parser().parse_args(["serve", "m.onnx", "--review-random", "0"]).review_random == 0
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "m.onnx", "--review-random", "1.5"])


def test_serve_starts_with_a_token_file_and_its_hosts(tiny_onnx, tmp_path, monkeypatch):
    """`elcell serve --token-file F --allowed-host N`, up to the app it would run."""
    monkeypatch.delenv("ELCELL_TOKEN", raising=False)
    started = []
    monkeypatch.setattr("elcell.station.app._Server.run", lambda server: started.append(server.config))
    (tmp_path / "token.txt").write_text("  tok-from-file\n")
    assert main(["serve", str(tiny_onnx), "--host", "0.0.0.0", "--labels-out", str(tmp_path / "reviewed"),
                 "--token-file", str(tmp_path / "token.txt"), "--allowed-host", "inspection-pc"]) == 0
    (config,) = started
    assert config.host == "0.0.0.0"
    with TestClient(config.app, base_url="http://inspection-pc:8000") as client:
        assert client.get("/api/v1/model").status_code == 401
        assert client.get("/api/v1/model", headers={"Authorization": "Bearer tok-from-file"}).status_code == 200
        assert client.get("/api/v1/model", headers={"Host": "other-pc:8000"}).status_code == 400


def test_a_token_file_must_hold_a_token(tiny_onnx, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("elcell.station.app._Server.run", lambda server: pytest.fail("the station started"))
    (tmp_path / "empty.txt").write_text(" \n")
    for file, why in (("missing.txt", "cannot read it"), ("empty.txt", "the file is empty")):
        assert main(["serve", str(tiny_onnx), "--token-file", str(tmp_path / file)]) == 2
        assert f"elcell: error: --token-file {tmp_path / file}: {why}" in capsys.readouterr().err


def test_a_labels_folder_that_cannot_be_one_is_refused_before_serving(tiny_onnx, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("elcell.station.app._Server.run", lambda server: pytest.fail("the station started"))
    (tmp_path / "a-file").write_text("not a folder")
    for folder, why in (("a-file", "exists and is not a folder"), ("a-file/reviewed", "is a file, not a folder")):
        assert main(["serve", str(tiny_onnx), "--labels-out", str(tmp_path / folder)]) == 2
        err = capsys.readouterr().err
        assert f"elcell: error: --labels-out {tmp_path / folder}: " in err and why in err, err
        assert "Traceback" not in err


def test_serve_refuses_to_start_open_to_the_network(tiny_onnx, tmp_path, monkeypatch, capsys):
    """Beyond loopback with --labels-out and no token: refused before the model is
    opened (exit 2), not only warned about; on loopback, or with a token, it starts."""
    monkeypatch.delenv("ELCELL_TOKEN", raising=False)
    started = []
    monkeypatch.setattr("elcell.station.app._Server.run", lambda server: started.append(server.config.host))
    labels = ["--labels-out", str(tmp_path / "reviewed")]
    for host in ("0.0.0.0", "::", "192.168.1.20", "inspection-pc"):
        assert main(["serve", str(tiny_onnx), "--host", host, *labels]) == 2
        err = capsys.readouterr().err
        assert f"elcell: error: --host {host} with --labels-out and no token" in err and "--token-file" in err
    assert not started and not (tmp_path / "reviewed").exists()
    assert main(["serve", str(tiny_onnx), "--host", "127.0.0.1", *labels]) == 0
    assert main(["serve", str(tiny_onnx), "--host", "0.0.0.0"]) == 0  # no labels to write: a warning
    assert "without a token" in capsys.readouterr().err
    monkeypatch.setenv("ELCELL_TOKEN", "tok")
    assert main(["serve", str(tiny_onnx), "--host", "0.0.0.0", *labels]) == 0
    assert started == ["127.0.0.1", "0.0.0.0", "0.0.0.0"]


def test_a_port_another_program_holds_is_refused_before_the_page_is_announced(tiny_onnx, monkeypatch, capsys):
    import socket

    monkeypatch.setattr("elcell.station.app._Server.run", lambda server: pytest.fail("the station started"))
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert main(["serve", str(tiny_onnx), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"elcell: error: --port {port}: cannot listen on 127.0.0.1:{port}" in err and "page http" not in err

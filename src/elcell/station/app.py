"""`elcell serve`: an inspection station's web page and HTTP API, and the review
loop that turns an operator's answers into training data. Torch-free.

    elcell serve MODEL.onnx [--host 127.0.0.1] [--port 8000] [--labels-out DIR]
                 [--token-file FILE | --token T] [--allowed-host NAME ...]

The API (JSON, OpenAPI at /docs) scores cell images and inspects module
photos with the numbers `elcell predict` and `elcell inspect` give; the page
at / is served by the app itself (no CDN: inspection PCs are often offline).
Requests from concurrent clients are batched (elcell.station.batcher); results are
kept for the page in a bounded store (elcell.station.results); answers to the review
loop go to DIR/labels.csv (elcell.station.review). Bad input is a 4xx with one
sentence naming the file or field, never a 500. Requests naming a host the
station does not serve are refused (elcell.station.guard); with a token the schema
declares it as HTTP bearer, so /docs can send it ("Authorize").
"""

from __future__ import annotations

import socket
import sys
from contextlib import asynccontextmanager
from dataclasses import fields
from pathlib import Path
from typing import Annotated, Literal

import uvicorn
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, Response, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from elcell import __version__
from elcell.cells.images import MAX_PIXELS, to_cell
from elcell.errors import DataError
from elcell.infer.predict import model_column
from elcell.infer.runtime import Model, chosen_thresholds, open_model
from elcell.io import safe_name
from elcell.options import validate
from elcell.station.budget import Budget, Busy, TooManyPixels, decoded_bytes
from elcell.station.guard import PROTECTED, Guard, is_loopback, read_token, served_hosts
from elcell.station.results import (
    API,
    MAX_CELL_PIXELS,
    CellResult,
    ModuleResult,
    cell_png,
    cell_record,
    module_png,
    module_record,
    overlay,
)
from elcell.station.review_api import review_routes
from elcell.station.schemas import (
    ERRORS,
    CellOut,
    CellsOut,
    Health,
    ModelOut,
    ModuleOut,
)
from elcell.station.state import Settings, Station, module_result, read_grid
from elcell.station.uploads import inspect_photo, score_uploads

STATIC = Path(__file__).parent / "static"
MAX_FILES = 256  # cells in one request
MAX_GRID_CELLS = 1000  # cells in one module
PNG = {"content": {"image/png": {}}, "description": "PNG image"}


def create_app(model: Model, settings: Settings | None = None) -> FastAPI:
    """The service for one model: API under /api/v1, the page at /, /healthz, /docs."""
    settings = settings or Settings()
    station = Station(model, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        station.batcher.start()
        yield
        await station.batcher.stop()  # requests in flight have finished (uvicorn waits for them)

    # FastAPIOffline: FastAPI whose /docs and /redoc load Swagger UI and ReDoc from this
    # app, not from a CDN (inspection PCs are often offline)
    app = FastAPIOffline(title="elcell inspection station", version=__version__, lifespan=lifespan,
                         description="Cracks and inactive regions in EL images of solar cells and modules. "
                                     "Errors are JSON {\"detail\": ...}.")
    app.state.station = station
    app.add_middleware(Guard, token=settings.token, max_body=int(settings.max_upload_mb * 2**20),
                       hosts=served_hosts(settings.host, settings.allowed_hosts))
    _handlers(app)
    _routes(app, station)
    if settings.token:
        _declare_bearer(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _declare_bearer(app: FastAPI) -> None:
    """Declare the token in the OpenAPI schema: an HTTP bearer scheme on every route
    Guard protects, so that /docs offers "Authorize" and sends it. Guard still checks it."""
    plain = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = plain()
            schema.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
                "type": "http", "scheme": "bearer",
                "description": "the station's token (elcell serve --token-file, $ELCELL_TOKEN or --token)"}
            for path, operations in schema.get("paths", {}).items():
                if path.startswith(PROTECTED):
                    for operation in operations.values():
                        operation["security"] = [{"bearer": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error.get("loc", ()) if part != "body") or "request"
            problems.append(f"{where}: {error.get('msg', 'invalid')}")
        return JSONResponse({"detail": "malformed request: " + "; ".join(problems)}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Busy)  # the model's queue (QueueFull) or the decoded pixels held
    async def busy(request: Request, exc: Busy) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(TooManyPixels)
    async def too_many_pixels(request: Request, exc: TooManyPixels) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=413)


def _png(data: bytes) -> Response:
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


def _routes(app: FastAPI, station: Station) -> None:  # noqa: C901 - one route per nested function
    labels, model, batcher = station.labels, station.model, station.batcher

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/healthz", response_model=Health, tags=["service"])
    async def healthz() -> dict:
        """Liveness, and how busy the service is (no token needed)."""
        guard = _guard(app)
        stats = batcher.stats
        return {"status": "ok", "in_flight": guard.in_flight if guard else 0, "queued": batcher.queued,
                "batches": stats.batches, "cells": stats.cells, "mean_batch": round(stats.mean_batch, 3)}

    @app.get(f"{API}/model", response_model=ModelOut, responses=ERRORS, tags=["model"])
    async def model_info() -> dict:
        """The model: labels, thresholds, decoding, and what this service accepts."""
        decoding = model.info.decoding
        return {"model": model_column(model), "labels": labels,
                "thresholds": dict(zip(labels, map(float, station.thresholds))),
                "review_thresholds": dict(zip(labels, map(float, station.review_thresholds))),
                "size": decoding.size,
                "decoding": {"size": decoding.size, "shrink": decoding.shrink, "bit_depth": decoding.bit_depth},
                "backbone": model.info.backbone, "version": __version__, "review": station.folder is not None,
                "max_upload_mb": station.settings.max_upload_mb, "max_files": MAX_FILES}

    @app.post(f"{API}/cells", response_model=CellsOut, responses=ERRORS, tags=["cells"])
    async def score_cells(
        files: Annotated[list[UploadFile], File(description="one or more cell images (PNG, JPEG, TIFF, BMP; "
                                                            "8- or 16-bit gray or RGB)")],
        heatmaps: Annotated[Literal["flagged", "all", "none"], Query(
            description="which labels get a box: those not ok (default), all, or none")] = "flagged",
        tta: Annotated[bool, Query(description="average the flips of each cell, as predict --tta")] = False,
    ) -> dict:
        """Score cell images: per cell its probabilities, decisions and boxes, as `elcell predict` gives."""
        if len(files) > MAX_FILES:
            raise HTTPException(422, f"files: {len(files)} files; send at most {MAX_FILES} per request")
        names = [file.filename or f"file{i + 1}" for i, file in enumerate(files)]
        data = [await file.read() for file in files]
        async with station.pixels.hold([decoded_bytes(d, MAX_CELL_PIXELS) for d in data], names):
            return await score_uploads(station, data, names, heatmaps, tta)

    @app.get(f"{API}/results/{{key}}", response_model=CellOut, responses=ERRORS, tags=["cells"])
    async def result(key: str) -> dict:
        """A cell scored earlier (or cut from a module), as POST /cells answered it."""
        return cell_record(key, station.cell(key), labels, "all")

    @app.get(f"{API}/results/{{key}}/image.png", responses={200: PNG, **ERRORS}, tags=["cells"],
             response_class=Response)
    async def result_image(key: str) -> Response:
        """The cell at its own resolution, 8-bit."""
        return _png(await run_in_threadpool(cell_png, station.cell(key)))

    @app.get(f"{API}/results/{{key}}/overlay/{{label}}.png", responses={200: PNG, **ERRORS}, tags=["cells"],
             response_class=Response)
    async def result_overlay(key: str, label: str) -> Response:
        """The label's heatmap on the cell, with its box, probability and decision."""
        found = station.cell(key)
        if label not in labels:
            raise HTTPException(404, f"label {label!r}: the model's labels are {labels}")
        if found.heatmaps is None or found.coarse:  # an overlay shows the fine map
            cell = found.cell if found.cell is not None else to_cell(found.gray, model.decoding)
            found.heatmaps = (await batcher.score(cell[None], heatmaps=True)).heatmaps[0]
            found.coarse = False
        return _png(await run_in_threadpool(overlay, found, labels, label))

    @app.post(f"{API}/modules", response_model=ModuleOut, responses=ERRORS, tags=["modules"])
    async def inspect(
        file: Annotated[UploadFile, File(description="an EL photo of a whole module")],
        grid: Annotated[str, Form(description="cells as the module appears in the photo, ROWSxCOLS, e.g. 6x10")],
    ) -> dict:
        """Inspect a module photo: grade, rule, and per cell its row, col, corners, probabilities,
        decisions and dark area, as `elcell inspect` gives; its map as PNG at `map`."""
        rows, cols = read_grid(grid)
        if rows * cols > MAX_GRID_CELLS:
            raise HTTPException(422, f"grid: {grid} is {rows * cols} cells; at most {MAX_GRID_CELLS}")
        filename = file.filename or "module"
        data = await file.read()
        name = safe_name(Path(filename).stem)
        async with station.pixels.hold([decoded_bytes(data, MAX_PIXELS)], [filename]):
            found = await inspect_photo(station, data, filename, name, rows, cols)
        module = ModuleResult(name, f"{rows}x{cols}", found)
        places = [(r, c) for r in range(rows) for c in range(cols)]
        kept = await run_in_threadpool(station.keep, [CellResult(
            f"{name}_r{r + 1:02d}_c{c + 1:02d}", found.cells[r][c], model.decoding.bit_depth, found.probs[r, c],
            found.decisions[r, c], found.heatmaps.get((r, c)), coarse=found.map_detail == "coarse" and (r, c) in found.heatmaps)
            for r, c in places])
        module.cells.update(zip(places, kept, strict=True))
        return module_record(station.store.put(module), module, station.store)

    @app.get(f"{API}/modules/{{key}}", response_model=ModuleOut, responses=ERRORS, tags=["modules"])
    async def module(key: str) -> dict:
        """A module inspected earlier, as POST /modules answered it."""
        return module_record(key, module_result(station, key), station.store)

    @app.get(f"{API}/modules/{{key}}/map.png", responses={200: PNG, **ERRORS}, tags=["modules"],
             response_class=Response)
    async def module_map(key: str) -> Response:
        """The module's map: each cell outlined in its decision's colour, flagged cells' heatmaps."""
        return _png(await run_in_threadpool(module_png, module_result(station, key)))

    review_routes(app, station)


def _guard(app: FastAPI) -> Guard | None:
    """The Guard instance in the built middleware stack (for its in-flight count)."""
    layer = app.middleware_stack
    while layer is not None and not isinstance(layer, Guard):
        layer = getattr(layer, "app", None)
    return layer


# --------------------------------------------------------------------------- command
def main(args) -> int:
    """`elcell serve` (options: elcell.cli): run the app on uvicorn until Ctrl-C or
    SIGTERM, which stop taking connections, finish the requests in flight (up
    to 30 s) and then the batcher's queue, and exit."""
    if not args.max_wait_ms >= 0:
        raise DataError("--max-wait-ms must be at least 0")
    budget = Budget(**{f.name: getattr(args, f.name) for f in fields(Budget)})
    validate(budget)
    token = read_token(args.token, getattr(args, "token_file", None))
    hosts = served_hosts(args.host, args.allowed_host or ())
    local = is_loopback(args.host)
    if not local and args.labels_out and not token:
        raise DataError(f"--host {args.host} with --labels-out and no token: anyone on the network could write "
                        "training labels; give a token (--token-file FILE or $ELCELL_TOKEN) or listen on "
                        "127.0.0.1")
    check_port(args.host, args.port)  # before the page's address is printed: it might be another program's
    model = open_model(args.model, threads=args.threads, spin=False)  # shares the cores with the web side
    info = model.info
    thresholds, review = chosen_thresholds(info, args.threshold, args.review_threshold)
    settings = Settings(
        **vars(budget), token=token, host=args.host, allowed_hosts=tuple(args.allowed_host or ()),
        labels_out=Path(args.labels_out) if args.labels_out else None,
        batch_size=args.batch_size, max_wait_ms=args.max_wait_ms,
        thresholds=thresholds, review_thresholds=review, rules=args.rules,
        review_random=args.review_random, review_order=args.review_order,
        map_views=args.map_views, map_detail=args.map_detail)
    app = create_app(model, settings)
    folder = app.state.station.folder
    host = f"[{args.host}]" if ":" in args.host else args.host
    say = f"elcell: {model.path.name} on {model.provider}; page http://{host}:{args.port}/, API docs /docs"
    if folder is not None:
        say += f"; reviews to {folder.csv} ({folder.rows} rows" + \
            (", a partial last line dropped)" if folder.dropped_partial_line else ")")
    print(say, file=sys.stderr)
    if app.state.station.rescored:
        print(f"elcell: {app.state.station.rescored}", file=sys.stderr)
    if not local:
        print(f"elcell: answering requests for {', '.join(sorted(hosts))}; others get 400 (add the names clients "
              "use with --allowed-host NAME)", file=sys.stderr)
    if not local and not token:
        print(f"elcell: warning: listening on {args.host} without a token: anyone who reaches this machine can "
              "use the API (set --token-file FILE or ELCELL_TOKEN)", file=sys.stderr)
    config = uvicorn.Config(app, host=args.host, port=args.port, timeout_graceful_shutdown=30,
                            log_level=args.log_level, access_log=args.log_level == "debug", server_header=False)
    _Server(config).run()
    print("elcell: stopped; requests in flight were answered", file=sys.stderr)
    return 0


def check_port(host: str, port: int) -> None:
    """DataError when this process cannot listen on host:port (another program
    has it, or the address is not this machine's), on every address the name
    gives, as uvicorn binds them."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as err:
        raise DataError(f"--host {host}: not an address to listen on ({err.strerror})") from None
    for family, kind, proto, _, address in dict.fromkeys(found):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is free
            try:
                probe.bind(address)
            except OSError as err:
                raise DataError(f"--port {port}: cannot listen on {host}:{port} ({err.strerror}); another "
                                "program, perhaps another elcell serve, has it: pick another --port") from None


class _Server(uvicorn.Server):
    """uvicorn's server, which after a graceful stop on SIGTERM or Ctrl-C would
    raise the signal again (the process then dies of it); `elcell serve` exits
    with status 0 instead, having finished its requests."""

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        captured = getattr(self, "_captured_signals", None)
        if isinstance(captured, list):
            captured.clear()

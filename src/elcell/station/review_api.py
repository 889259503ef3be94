"""The review loop's routes: the next cell and why it was chosen, answers, skips,
a page's lease returned when its tab closes, and the queued cells' pictures
(served from the queue's own files, so they outlive the result store and a
restart). Torch-free.

A page names itself with `session` (an id it keeps in sessionStorage): a
reload asks with the same id and gets its cell back at once; polling with it
keeps the lease. An answer to a cell the station no longer knows is a 410
saying so in words.
"""

from __future__ import annotations

import re
import secrets
from typing import Annotated

import numpy as np
from fastapi import FastAPI, HTTPException, Query, Response
from starlette.concurrency import run_in_threadpool

from elcell.cells.images import to_cell
from elcell.station.results import API, CellResult, cell_png, overlay
from elcell.station.schemas import ERRORS, ReviewAnswer, ReviewNext, ReviewSaved, ReviewStatus
from elcell.station.state import Station

PNG = {"content": {"image/png": {}}, "description": "PNG image"}
Session = Annotated[str, Query(pattern=r"^[A-Za-z0-9_-]{0,64}$", max_length=64,
                               description="the page's session id: its cell comes back to it after a reload")]


def check_id(item_id: str) -> None:
    """A 404 for what cannot be a queued cell's id (a typo, a truncated link),
    rather than the 410 of a cell that left the queue."""
    if not re.fullmatch(r"[0-9a-f]{16}", item_id):
        raise HTTPException(404, f"{item_id[:20]!r} is not a review cell's id (16 hex digits, as "
                                 f"{API}/review/next gives)")


def gone(item_id: str, what: str = "that answer was not saved") -> HTTPException:
    return HTTPException(410, f"cell {item_id[:16]!r} no longer waits for review: the station does not know it "
                              f"(dropped from a full queue, or its queue was cleared); {what}")


def review_routes(app: FastAPI, station: Station) -> None:  # noqa: C901 - one route per nested function
    labels = station.labels

    def queue():
        station.review_folder()
        return station.queue

    def status() -> dict:
        folder = station.folder
        counts = station.queue.counts() if station.queue is not None else {}  # an empty queue still counts
        return {"enabled": folder is not None, "labels": labels, **counts,
                "rows": folder.rows if folder else 0, "csv": str(folder.csv) if folder else None}

    @app.get(f"{API}/review", response_model=ReviewStatus, responses=ERRORS, tags=["review"])
    async def review_status(session: Session = "") -> dict:
        """Whether the review loop is on, how many cells wait and how many are answered
        (rows of labels.csv). A page polls it with its session, which keeps its lease."""
        if session and station.queue is not None:
            station.queue.renew(session)
        return status()

    @app.get(f"{API}/review/next", response_model=ReviewNext, responses=ERRORS, tags=["review"])
    async def review_next(session: Session = "") -> dict:
        """The next cell for a person to label, and why it was chosen; held for this
        session for a minute (renewed while it polls), or null when none waits."""
        waiting = queue()
        item = waiting.next(session or secrets.token_hex(8))
        counts = waiting.counts()
        if item is None:
            return {"item": None, **counts}
        base = f"{API}/review/{item.id}"
        return {"item": {"id": item.id, "name": item.name, "probs": item.probs, "decisions": item.decisions,
                         "reason": item.reason, "random": item.random, "image": f"{base}/image.png",
                         "overlays": {label: f"{base}/overlay/{label}.png" for label in labels}}, **counts}

    @app.post(f"{API}/review/release", response_model=ReviewStatus, responses=ERRORS, tags=["review"])
    async def review_release(session: Session) -> dict:
        """Return the cell a page session holds (sent when its tab closes or reloads)."""
        queue().release(session)
        return status()

    @app.post(f"{API}/review/{{item_id}}", response_model=ReviewSaved, responses=ERRORS, tags=["review"])
    async def review_answer(item_id: str, answer: ReviewAnswer) -> dict:
        """Label a cell: 1 for each label it has (none: ok). Appends a row to labels.csv;
        a second answer for a cell answered before replaces its row if it differs."""
        folder, waiting = station.review_folder(), queue()
        check_id(item_id)
        unknown = sorted(set(answer.labels) - set(labels))
        if unknown:
            raise HTTPException(422, f"labels: {unknown} are not this model's labels {labels}")
        item = waiting.get(item_id)
        if item is None and item_id not in folder.answered:
            raise gone(item_id)
        image = waiting.image(item_id) if item is not None else None
        if item is not None and image is None:
            raise gone(item_id)
        name = item.name if item is not None else folder.answered[item_id][0]
        try:
            saved = await run_in_threadpool(folder.add, None, name, answer.labels, item_id, image)
        except OSError as err:
            raise HTTPException(503, f"could not save the answer in {folder.folder}: {err}") from None
        await run_in_threadpool(waiting.done, item_id)  # queue.json rewritten and fsync'ed: off the loop
        replaced = dict(zip(labels, map(int, saved.replaced), strict=True)) if saved.replaced else None
        return {"id": item_id, "path": saved.path, "labels": dict(zip(labels, map(int, saved.values), strict=True)),
                "rows": saved.rows, "waiting": len(waiting), "replaced": replaced, "same": saved.same}

    @app.post(f"{API}/review/{{item_id}}/skip", response_model=ReviewStatus, responses=ERRORS, tags=["review"])
    async def review_skip(item_id: str) -> dict:
        """Send a cell behind the others without labelling it."""
        check_id(item_id)
        if not await run_in_threadpool(queue().skip, item_id):
            raise gone(item_id, "nothing to skip")
        return status()

    @app.get(f"{API}/review/{{item_id}}/image.png", responses={200: PNG, **ERRORS}, tags=["review"],
             response_class=Response)
    async def review_image(item_id: str) -> Response:
        """The queued cell, 8-bit, at its own resolution."""
        return Response(await run_in_threadpool(cell_png, _result(station, item_id)), media_type="image/png")

    @app.get(f"{API}/review/{{item_id}}/overlay/{{label}}.png", responses={200: PNG, **ERRORS}, tags=["review"],
             response_class=Response)
    async def review_overlay(item_id: str, label: str) -> Response:
        """The label's heatmap on the queued cell."""
        if label not in labels:
            raise HTTPException(404, f"label {label!r}: the model's labels are {labels}")
        found = _result(station, item_id)
        cell = to_cell(found.gray, station.model.decoding)
        found.heatmaps = (await station.batcher.score(cell[None], heatmaps=True)).heatmaps[0]
        return Response(await run_in_threadpool(overlay, found, labels, label), media_type="image/png")


def _result(station: Station, item_id: str) -> CellResult:
    """A queued cell as a CellResult (for the pictures), or a 404."""
    waiting = station.queue
    item = waiting.get(item_id) if waiting is not None else None
    pixels = waiting.pixels(item_id) if item is not None else None
    if item is None or pixels is None:
        raise HTTPException(404, f"no cell {item_id[:16]!r} waits for review (answered, or unknown)")
    labels = station.labels
    return CellResult(item.name, pixels, station.model.decoding.bit_depth,
                      np.array([item.probs[label] for label in labels]),
                      np.array([item.decisions[label] for label in labels]))

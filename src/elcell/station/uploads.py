"""The upload routes' work once a request's pixels are reserved (elcell.station.budget):
decode its images one at a time in a decoder thread, then score or inspect them
in the model's queue. Torch-free."""

from __future__ import annotations

import numpy as np
from fastapi import HTTPException
from starlette.concurrency import run_in_threadpool

from elcell.errors import ImageError
from elcell.pvmodules.inspect import decode_size, in_photo_pixels
from elcell.pvmodules.judge import ModuleInspection, inspect_module
from elcell.station.results import CellResult, Upload, cell_record, decode_cell, error_record
from elcell.station.state import Station, decode_module, looks_like_module


async def inspect_photo(station: Station, data: bytes, filename: str, name: str, rows: int,
                         cols: int) -> ModuleInspection:
    """POST /modules once its pixels are reserved: decode the photo (a decoder
    thread), then inspect it in the model's queue, where it counts the bytes it holds."""
    image, scale = await station.decode(lambda: decode_module(data, filename,
                                                              decode_size(station.model, rows, cols)))
    try:
        return in_photo_pixels(await station.batcher.call(lambda: inspect_module(
            station.model, image, rows, cols, station.rules, name, want_map=True, thresholds=station.thresholds,
            review_thresholds=station.review_thresholds, map_views=station.settings.map_views,
            map_detail=station.settings.map_detail), nbytes=image.nbytes), scale)
    except ImageError as err:  # no module, cut off, grid does not fit
        raise HTTPException(422, f"{filename}: {err}") from None
    except MemoryError:
        raise HTTPException(413, f"{filename}: too large to inspect in this service's memory") from None


async def score_uploads(station: Station, data: list[bytes], names: list[str], heatmaps: str, tta: bool) -> dict:
    """POST /cells once its pixels are reserved: decode the uploads one at a time,
    refuse module photos, score the readable cells, keep them (offered to the
    review queue when reviews are on)."""
    model, batcher, labels = station.model, station.batcher, station.labels
    uploads: list[Upload] = await station.decode(
        lambda: [decode_cell(d, n, model.decoding) for d, n in zip(data, names, strict=True)])
    for u in uploads:  # a module photo sent as a cell: refused in words, pointing at Modules mode
        why = None if u.error else looks_like_module(u.pixels.shape, model.decoding.size)
        if why:
            u.error, u.pixels, u.gray, u.cell = f"{u.name}: {why}", None, None, None
    good = [u for u in uploads if u.error is None]
    if not good:
        raise HTTPException(400, "no upload is a readable image: " + "; ".join(u.error for u in uploads))
    cells = np.stack([u.cell for u in good])
    scores = await batcher.score(cells, tta=tta)
    results = [CellResult(u.name, u.pixels, model.decoding.bit_depth, scores.probs[k], scores.decisions[k],
                          cell=u.cell) for k, u in enumerate(good)]
    wanted = [k for k, r in enumerate(results) if heatmaps == "all" or (heatmaps == "flagged" and r.flagged)]
    if wanted:
        maps = (await batcher.score(cells[wanted], heatmaps=True)).heatmaps
        for k, heat in zip(wanted, maps, strict=True):
            results[k].heatmaps = heat
    kept = iter(zip(await run_in_threadpool(station.keep, results), results, strict=True))  # disk: off the loop
    records = [error_record(u.name, u.error) if u.error else cell_record(*next(kept), labels, heatmaps)
               for u in uploads]
    return {"cells": records}


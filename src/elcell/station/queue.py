"""The review queue: cells waiting for an operator, kept on disk beside the
answers so that a restart resumes it. Torch-free.

What enters: every cell the model flagged, every borderline one (within
`UNCERTAIN_MARGIN` log-odds of a threshold: with a review threshold equal to
the threshold nothing is `review`, yet a crack at 0.41 should reach a
person), and a share (`random_share`) of the `ok` ones drawn at random
(uniformly, borderline or not, so that their answers estimate the line's
error rate), so that misses are found. A cell is
known by the hash of its pixels: scored again, it is not queued again, and
once answered it is not queued at all.

What leaves first: the order of `elcell.infer.review_order`: `check` (most
uncertain first) or `teach` (the most likely defects and the cells nearest 0.5
in turn), every 1/random_share-th cell handed out a random `ok` one. Each is
leased to one reviewer's page session for `lease` seconds (renewed while the
page polls), so two reviewers never get the same cell; the same session asks
again (a reload) and gets its cell back at once; `release` returns it (a
closed tab).

On disk, in the --labels-out folder: queue/<key>.png, the cell at its own
resolution and depth (written and fsync'ed before it is listed), and
queue.json, the list with what the model said (rewritten atomically on each
change), with the model and thresholds that scored them. Leases are not
kept: after a restart every cell is free. A restart with another model (or
other thresholds) scores the waiting cells again (`rescore`): what they show
and the order they leave in are the serving model's, and a cell it would not
queue leaves. Bounded: past `max_items` the cell the order would offer last
is dropped (and counted).
"""

from __future__ import annotations

import json
import os
import random
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from elcell.errors import DataError
from elcell.infer.review_order import (
    UNCERTAIN_MARGIN,
    boundary,
    check_order,
    margins,
    random_turn,
    reason,
    teach_reason,
)
from elcell.station.review import LabelsFolder, _sync_folder, _write_synced, pixel_key, png


@dataclass
class ReviewItem:
    """A cell waiting for a person: what the model said, and why it was chosen."""

    id: str  # the pixel key
    name: str
    probs: dict[str, float]
    decisions: dict[str, str]
    margin: float
    random: bool
    reason: str
    seq: int = 0  # arrival order, for ties and skips
    skips: int = 0
    holder: str | None = None  # the page session holding it
    leased_until: float = 0.0

    def saved(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("holder", "leased_until")}


@dataclass
class Scored:
    """A scored cell offered to the queue."""

    name: str
    pixels: np.ndarray
    probs: np.ndarray
    decisions: np.ndarray


class ReviewQueue:
    """The waiting cells of one --labels-out folder. Thread-safe."""

    def __init__(self, folder: LabelsFolder, thresholds: list[float], max_items: int = 1000, lease: float = 60.0,
                 random_share: float = 0.0, seed: int | None = None, order: str = "check"):
        self.folder = folder
        self.order = check_order(order)
        self.labels = folder.labels
        self.thresholds = list(thresholds)
        self.max_items = max_items
        self.lease = lease
        self.random_share = random_share
        self.dropped = 0
        self.handed = 0
        self.taught = 0  # cells handed out in the teach order, not at random: whose turn it is
        self.files = folder.folder / "queue"
        self.state = folder.folder / "queue.json"
        self._rng = random.Random(seed)
        self._lock = threading.Lock()  # the items: held briefly, so pages are answered while cells are written
        self._offering = threading.Lock()  # one offer at a time: the same cell from two requests is written once
        self._items: dict[str, ReviewItem] = {}
        self.scorer: dict[str, Any] | None = None  # what scored the waiting cells (rescore)
        self.files.mkdir(exist_ok=True)
        self._load()

    # ------------------------------------------------------------------ disk
    def _load(self) -> None:
        """The queue as the last run left it, less cells answered since (a crash
        between a row and the queue's update) and cells whose image is gone."""
        if self.state.is_file():
            saved = self._read_state()
            for entry in saved["items"]:
                item = ReviewItem(**entry)
                if item.id not in self.folder.answered and self._file(item.id).is_file():
                    self._items[item.id] = item
            self.dropped = saved["dropped"]
            self.scorer = saved.get("scorer")
        for file in self.files.glob("*.png"):  # images written but never listed
            if file.stem not in self._items:
                file.unlink(missing_ok=True)

    def _read_state(self) -> dict:
        """queue.json, or a refusal to start: read as empty, the waiting cells'
        images would be removed as never listed."""
        try:
            saved = json.loads(self.state.read_text(encoding="utf-8"))
            for entry in saved["items"]:
                ReviewItem(**entry)
            saved["dropped"] = int(saved.get("dropped") or 0)
            return saved
        except (OSError, ValueError, TypeError, KeyError) as err:
            waiting = len(list(self.files.glob("*.png")))
            raise DataError(f"{self.state}: the review queue cannot be read ({err}); nothing was changed. To go "
                            f"on, copy its {waiting} images in {self.files} aside, move queue.json aside and start "
                            "again (the queue starts empty and those images are removed from it); upload the "
                            "copies to queue them again") from err

    def _save(self) -> None:
        """Rewrite queue.json atomically (under the lock)."""
        data = json.dumps({"labels": self.labels, "dropped": self.dropped, "scorer": self.scorer,
                           "items": [item.saved() for item in self._items.values()]})
        tmp = self.state.with_name(f".{self.state.name}.{secrets.token_hex(4)}.tmp")
        _write_synced(tmp, data.encode("utf-8"))
        os.replace(tmp, self.state)
        _sync_folder(self.state.parent)

    def _file(self, key: str) -> Path:
        return self.files / f"{key}.png"

    def image(self, key: str) -> bytes | None:
        """The queued cell's PNG (its own resolution and depth), None once it has gone."""
        try:
            return self._file(key).read_bytes()
        except OSError:
            return None

    def pixels(self, key: str) -> np.ndarray | None:
        try:
            with Image.open(self._file(key)) as image:
                return np.asarray(image)
        except OSError:
            return None

    # ------------------------------------------------------------------ in
    def offer(self, cells: list[Scored]) -> list[str | None]:
        """Queue those of `cells` that should be reviewed; per cell its key when it
        waits (queued now or before), else None (not for review, or answered already)."""
        with self._offering:
            return self._offer(cells)

    def _offer(self, cells: list[Scored]) -> list[str | None]:
        keys: list[str | None] = []
        added = []
        for cell in cells:
            key = pixel_key(cell.pixels)
            waiting = key in self._items or any(i.id == key for i in added)
            item = None if waiting or key in self.folder.answered else self._choose(key, cell)
            if item is not None:
                # fast to encode: a module's worth of borderline cells arrives at once; an
                # answered cell keeps these bytes in cells/
                _write_synced(self._file(key), png(cell.pixels, compress_level=1), atomic=True)
                added.append(item)
            keys.append(key if waiting or item is not None else None)
        if added:
            _sync_folder(self.files)  # the images on disk before the list names them
            with self._lock:
                for item in added:
                    item.seq = max((i.seq for i in self._items.values()), default=0) + 1
                    self._items.setdefault(item.id, item)
                self._bound()
                self._save()
        return keys

    def _choose(self, key: str, cell: Scored, drawn: bool | None = None) -> ReviewItem | None:
        """The item for a cell that should be reviewed, else None. drawn: whether
        it was drawn at random already (None: draw now)."""
        probs = np.asarray(cell.probs, dtype=np.float64)
        margin = float(margins(probs[None], self.thresholds)[0][0])
        flagged = bool((np.asarray(cell.decisions) != "ok").any())
        if drawn is None:
            drawn = self._rng.random() < self.random_share  # uniform over ok cells: an error rate
        drawn = drawn and not flagged
        if not (flagged or margin < UNCERTAIN_MARGIN or drawn):
            return None
        return ReviewItem(key, cell.name, dict(zip(self.labels, map(float, probs), strict=True)),
                          dict(zip(self.labels, map(str, cell.decisions), strict=True)), margin, drawn,
                          reason(probs, self.thresholds, self.labels, drawn, flagged))

    # Cells scored again per call: a few MB of model input at a time.
    RESCORE_BATCH = 32

    def rescore(self, scorer: dict[str, Any],
                score: Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray]]) -> str | None:
        """Make the waiting cells the serving model's: when `scorer` (its identity
        and thresholds) is not what scored them, `score` them again (pixels ->
        probs [B, N], decisions [B, N]) and keep those it would queue, and the
        random draws (now random or flagged, as it scores them). A cell this model
        cannot read (another bit depth) or whose image is gone leaves too. The
        list is saved before any image is deleted. Returns a line for the log,
        None when nothing was scored again. Call before serving."""
        with self._offering, self._lock:
            before = self.scorer
            if before == scorer or not self._items:
                self.scorer = scorer
                self._save()
                return None
            items = list(self._items.values())
            kept: dict[str, ReviewItem] = {}
            unreadable = 0
            for start in range(0, len(items), self.RESCORE_BATCH):
                for item, new in self._rescored(items[start:start + self.RESCORE_BATCH], score):
                    if new is False:
                        unreadable += 1
                    elif new is not None:
                        new.seq, new.skips = item.seq, item.skips
                        kept[item.id] = new
            gone = [key for key in self._items if key not in kept]
            self._items, self.scorer = kept, scorer
            self._save()
            for key in gone:
                self._file(key).unlink(missing_ok=True)
        why = "had no record of the model that scored them" if before is None else \
            "were scored by another model or thresholds"
        left = len(gone) - unreadable
        return (f"{len(items)} cells waiting for review {why}: scored again by this one, {len(kept)} still wait"
                + (f", {left} it would not queue left the queue" if left else "")
                + (f", {unreadable} it cannot read left the queue" if unreadable else ""))

    def _rescored(self, batch: list[ReviewItem], score) -> list[tuple[ReviewItem, ReviewItem | None | bool]]:
        """Each item with its new item (None: not queued now; False: its image is
        gone or this model cannot read it), cell by cell where the batch fails."""
        pixels = [self.pixels(item.id) for item in batch]
        try:
            probs, decisions = score([p for p in pixels if p is not None]) if any(
                p is not None for p in pixels) else ([], [])
        except Exception:  # noqa: BLE001 - one unreadable cell must not keep the station from starting
            if len(batch) == 1:
                return [(batch[0], False)]
            return [pair for item in batch for pair in self._rescored([item], score)]
        scored = iter(zip(probs, decisions, strict=True))
        result: list[tuple[ReviewItem, ReviewItem | None | bool]] = []
        for item, p in zip(batch, pixels, strict=True):
            if p is None:
                result.append((item, False))
                continue
            prob, decision = next(scored)
            result.append((item, self._choose(item.id, Scored(item.name, p, prob, decision), drawn=item.random)))
        return result

    def _bound(self) -> None:
        while len(self._items) > self.max_items:
            now = time.monotonic()
            free = [i for i in self._items.values() if i.leased_until <= now] or list(self._items.values())
            gone = max(free, key=self._last_offered)
            self._forget(gone.id)
            self.dropped += 1

    def _last_offered(self, item: ReviewItem) -> tuple:
        """Sort key: the largest is the cell the order would hand out last. Random
        cells are kept (an error rate needs them); in `teach`, the cell scored
        lowest on every label: neither a likely defect nor near 0.5."""
        if self.order == "teach":
            return not item.random, -max(item.probs.values()), -item.seq
        return not item.random, item.margin, -item.seq

    def _forget(self, key: str) -> None:
        self._items.pop(key, None)
        self._file(key).unlink(missing_ok=True)

    # ------------------------------------------------------------------ out
    def next(self, session: str, now: float | None = None) -> ReviewItem | None:
        """The cell `session` holds or last returned (a reload gets it back), else the
        next free one in the review order, now held by `session` for `lease` seconds."""
        now = time.monotonic() if now is None else now
        with self._lock:
            free = [i for i in self._items.values() if i.leased_until <= now]
            mine = self._held(session, now) or next((i for i in free if i.holder == session), None)
            if mine is not None:
                mine.leased_until = now + self.lease
                return mine
            if not free:
                return None
            randoms = [i for i in free if i.random]
            if randoms and random_turn(self.handed, self.random_share):
                item = min(randoms, key=lambda i: (i.skips, i.seq))
            elif self.order == "teach":
                item = self._teach([i for i in free if not i.random] or free)
            else:
                item = min(free, key=lambda i: (i.skips, i.margin, i.seq))
            self.handed += 1
            item.holder, item.leased_until = session, now + self.lease
            return item

    def _teach(self, free: list[ReviewItem]) -> ReviewItem:
        """The `teach` order's next cell: turn by turn the highest-scored cell for
        each label, then the one nearest 0.5 (its reason says which)."""
        turn, self.taught = self.taught, self.taught + 1
        if turn % 2 == 0:
            likely = (turn // 2) % len(self.labels)
            label = self.labels[likely]
            item = min(free, key=lambda i: (i.skips, -i.probs[label], i.seq))
        else:
            item = min(free, key=lambda i: (i.skips, boundary(i.probs.values()), i.seq))
            likely = None
        if not item.random:
            item.reason = teach_reason(list(item.probs.values()), self.labels, likely)
        return item

    def _held(self, session: str, now: float) -> ReviewItem | None:
        return next((i for i in self._items.values() if i.holder == session and i.leased_until > now), None)

    def renew(self, session: str, now: float | None = None) -> None:
        """A page that polls keeps its cell."""
        now = time.monotonic() if now is None else now
        with self._lock:
            held = self._held(session, now)
            if held is not None:
                held.leased_until = now + self.lease

    def release(self, session: str) -> int:
        """Free the cells a page session holds (its tab closes or reloads): anyone
        may take them at once, and the same session asking again gets them back
        first. Returns how many."""
        with self._lock:
            held = [i for i in self._items.values() if i.holder == session and i.leased_until > 0]
            for item in held:
                item.leased_until = 0.0
            return len(held)

    def get(self, key: str) -> ReviewItem | None:
        with self._lock:
            return self._items.get(key)

    def done(self, key: str) -> None:
        """The cell's answer is in labels.csv: it leaves the queue."""
        with self._lock:
            if key in self._items:
                self._forget(key)
                self._save()

    def skip(self, key: str) -> bool:
        """Send a cell behind those not skipped as often (nobody holds it)."""
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return False
            item.skips += 1
            item.holder, item.leased_until = None, 0.0  # not handed back to the page that skipped it
            self._save()
            return True

    def __len__(self) -> int:
        return len(self._items)

    def counts(self) -> dict[str, Any]:
        with self._lock:
            return {"waiting": len(self._items), "answered": self.folder.rows,
                    "dropped": self.dropped}

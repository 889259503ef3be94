"""The station's memory budget: how many bytes of pixels requests may decode
and hold, declared once as `elcell serve` options. Torch-free.

A request body is capped (--max-upload-mb), but a compressed image is not its
pixels: a uniform 4900 x 4900 16-bit PNG is a few kB and decodes to 46 MB, so
under a 50 MB cap one request could carry a thousand of them. So before a
single pixel is decoded, each image's header gives its decoded size (width x
height x the bytes per pixel of its mode), and

* a request whose images together decode to more than --max-request-mb is
  refused with 413 and a sentence naming the limit;
* requests hold what they decode until they are answered, and all of them
  together at most --max-decoded-mb: a request that would pass it waits for
  others to finish, up to --budget-wait-s, then gets 503 with Retry-After (as
  a full queue does); with nothing else held it goes at once, so a request
  under the per-request limit always gets its turn;
* a request decodes its images one at a time, and at most --decoders images
  are decoded at once over all requests (not one per web thread).

The model's queue (elcell.station.batcher) is bounded in bytes too
(--max-queue-mb): a job counts the bytes it holds (its cells, or the module
photo it inspects), not one per job.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass

from elcell.options import above, at_least, option

GROUP = "memory budget"
MB = 2**20
# bytes per pixel as Pillow decodes a mode: multi-band images are stored 4 bytes a pixel
_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


class Busy(Exception):
    """The station holds as much work as it may: come back in `retry_after` s (503)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class TooManyPixels(Exception):
    """A request whose images decode to more than one request may hold (413)."""


@dataclass
class Budget:
    """The memory limits of `elcell serve` (its "memory budget" options)."""

    max_upload_mb: float = option(50.0, "largest request body accepted, in MB (413 past it, before it is read)",
                                  GROUP, check=above(0))
    max_request_mb: float = option(
        256.0, "decoded pixels one request may hold, in MB, as its images' headers say (width x height x bytes "
               "per pixel: 1 for 8-bit gray, 2 for 16-bit, 4 for colour); 413 past it, before decoding",
        GROUP, check=above(0))
    max_decoded_mb: float = option(
        512.0, "decoded pixels all requests together may hold at once, in MB; a request that would pass it "
               "waits for others to finish (--budget-wait-s)", GROUP, check=above(0))
    budget_wait_s: float = option(
        30.0, "longest a request waits for --max-decoded-mb to free up, in seconds; then 503 Busy with "
              "Retry-After", GROUP, check=at_least(0))
    max_queue_mb: float = option(
        64.0, "bytes of work queued for the model, in MB (cells, module photos waiting to be inspected); "
              "503 Busy with Retry-After past it", GROUP, check=above(0))
    decoders: int = option(2, "images decoded at once over all requests (each request decodes its images one "
                              "at a time)", GROUP, check=at_least(1))


def size_text(nbytes: float) -> str:
    """'1.1 GB', '256 MB', '46 MB', '0.3 MB': bytes as the budget's options count them (2**20 a MB)."""
    mb = nbytes / MB
    if mb >= 1024:
        return f"{mb / 1024:.1f} GB"
    return f"{mb:.0f} MB" if mb >= 10 else f"{mb:.1f} MB"


def decoded_bytes(data: bytes, max_pixels: int) -> int:
    """The bytes `data`'s pixels take once decoded, from its header alone. 0 for what
    will not be decoded at all: no readable header, or more than `max_pixels`
    pixels (refused unread, with its own message, by the decoder)."""
    import io

    # here, not at the top: `elcell --help` reads Budget and needs no Pillow
    from elcell.cells.images import open_image

    try:
        with open_image(io.BytesIO(data)) as image:
            width, height, mode = image.width, image.height, image.mode
    except Exception:  # noqa: BLE001 - the decoder names what is wrong with it
        return 0
    if width * height > max_pixels:
        return 0
    return width * height * _BYTES_PER_PIXEL.get(mode, 4)


class PixelBudget:
    """Bytes of decoded pixels held by requests, against the per-request and the
    station-wide limit. `hold` is entered from the event loop (one loop: the counts
    need no lock), before decoding."""

    def __init__(self, budget: Budget):
        self.per_request = int(budget.max_request_mb * MB)
        self.total = int(budget.max_decoded_mb * MB)
        self.wait = budget.budget_wait_s
        self.held = 0
        self.largest = 0  # the most held at once, for tests and figures
        self._freed: asyncio.Condition | None = None

    @asynccontextmanager
    async def hold(self, sizes: Sequence[int], names: Sequence[str]) -> AsyncIterator[int]:
        """Reserve the bytes `sizes` (one per image named in `names`) until the block
        ends. TooManyPixels (413) past the per-request limit; when the station holds
        too much, wait up to `wait` s for others to give theirs back, then Busy (503)."""
        need = int(sum(sizes))
        if need > self.per_request:
            raise TooManyPixels(self._too_large(need, sizes, names))
        self._freed = self._freed or asyncio.Condition()
        async with self._freed:
            try:
                if not self.fits(need):  # (wait_for with no time left would not even look)
                    await asyncio.wait_for(self._freed.wait_for(lambda: self.fits(need)), self.wait)
            except asyncio.TimeoutError:
                raise Busy(f"the service is busy: requests hold {size_text(self.held)} of decoded pixels and this "
                           f"one needs {size_text(need)}, past the {size_text(self.total)} of --max-decoded-mb; "
                           f"try again in {max(1, round(self.wait))} s", max(1, round(self.wait))) from None
            self.held += need
            self.largest = max(self.largest, self.held)
        try:
            yield need
        finally:
            async with self._freed:
                self.held -= need
                self._freed.notify_all()

    def fits(self, need: int) -> bool:
        """Whether a request needing `need` bytes may decode now (alone, it always may)."""
        return not self.held or self.held + need <= self.total

    def _too_large(self, need: int, sizes: Sequence[int], names: Sequence[str]) -> str:
        limit = size_text(self.per_request)
        if len(sizes) == 1:
            return (f"{names[0]}: decodes to {size_text(need)} of pixels; this station accepts {limit} per request "
                    "(--max-request-mb)")
        big = max(range(len(sizes)), key=lambda k: sizes[k])
        return (f"request: its {len(sizes)} images decode to {size_text(need)} of pixels (the largest, "
                f"{names[big]}, to {size_text(sizes[big])}); this station accepts {limit} per request "
                "(--max-request-mb): send fewer images per request")

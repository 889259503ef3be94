"""Helpers for the service's tests: a real uvicorn server in a thread, and small files."""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib

import numpy as np
import uvicorn
from PIL import Image


def wait_until(condition, what: str, timeout: float = 60.0, pause: float = 0.01) -> None:
    """Poll `condition()` until it holds; AssertionError naming `what` after `timeout`
    seconds, so a test whose condition never comes fails instead of hanging."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout:g} s for {what}"
        time.sleep(pause)


async def async_wait_until(condition, what: str, timeout: float = 60.0, pause: float = 0.01) -> None:
    """`wait_until` inside an event loop: sleeps without blocking the loop."""
    import asyncio

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout:g} s for {what}"
        await asyncio.sleep(pause)


class RunningServer:
    """`app` on uvicorn at 127.0.0.1 on a free port (or `port`), in a thread, for a `with` block."""

    def __init__(self, app, port: int = 0, **config):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> RunningServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's header)."""
    data = png_bytes(np.zeros((8, 8), dtype=np.uint8))
    ihdr = struct.pack(">II", width, height) + data[24:29]
    chunk = b"IHDR" + ihdr
    return data[:8] + struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk)) + data[33:]

"""`elcell serve` under hostile load, on loopback: what it answers and how much
resident memory it grows by.

The station runs as `elcell serve MODEL --labels-out DIR` (no token, loopback:
the set-up issue 34 names) in a subprocess; its VmRSS (/proc/PID/status) is
sampled every 20 ms. After a warm-up (a cell scored, a module inspected), in
order:

1. bombs: one request of 24 uniform 4900 x 4900 16-bit PNGs (60 kB each,
   46 MB decoded), then 4 clients at once each sending 5 of them (230 MB);
2. modules: 8 clients at once, each posting the real module photos of
   tests/data/modules twice;
3. trickle: 3 clients each sending a cell upload a few hundred bytes at a
   time over about 3 s, while /healthz is asked every 0.1 s;
4. reviews: answers posted to the review queue while 4 clients upload cells;
   SIGTERM arrives with a module request in flight.

Prints each phase's status codes, the server's RSS growth over its warm
baseline (peak and at the end), /healthz latency during the trickle, and
whether every review answered 200 is a row of labels.csv whose image decodes.

    python benchmarks/serve_hostile.py MODEL.onnx [--cells CSV]

The clients run on the same machine as the server. tests/test_serve_hostile.py
runs the same phases and asserts on them.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from elcell.infer.cpuinfo import cpu_model

MODULES = Path(__file__).resolve().parents[1] / "tests" / "data" / "modules"
GIB = 2**30


def png16(side: int = 4900, value: int = 30000) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.full((side, side), value, np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vm_rss(pid: int) -> int:
    """Resident bytes of process `pid` (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class Station:
    """`elcell serve MODEL --labels-out DIR` on a free loopback port, its RSS sampled."""

    def __init__(self, model: str | Path, labels_out: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.labels_out = labels_out
        self.process = subprocess.Popen(
            [sys.executable, "-m", "elcell.cli", "serve", str(model), "--port", str(self.port), "--labels-out",
             str(labels_out), "--log-level", "warning", *extra], stderr=subprocess.PIPE, text=True)
        self.peak = 0
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> Station:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    raise RuntimeError(f"elcell serve did not start: {self.process.stderr.read()}") from None
                time.sleep(0.2)
        self._sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def _sample(self) -> None:
        while not self._stop.is_set() and self.process.poll() is None:
            try:
                self.peak = max(self.peak, vm_rss(self.process.pid))
            except (FileNotFoundError, ProcessLookupError):
                return
            time.sleep(0.02)

    def rss(self) -> int:
        return vm_rss(self.process.pid)

    def alive(self) -> bool:
        return httpx.get(f"{self.url}/healthz", timeout=30).status_code == 200


def warm_up(station: Station, cell: Path) -> int:
    """One cell and one module through every stage; returns the RSS after, the baseline."""
    with httpx.Client(base_url=station.url, timeout=300) as http:
        http.post("/api/v1/cells", files=[("files", (cell.name, cell.read_bytes(), "image/png"))]).raise_for_status()
        photo = MODULES / "mono-2x2-MMEL1.jpg"
        http.post("/api/v1/modules", data={"grid": "2x2"},
                  files={"file": (photo.name, photo.read_bytes(), "image/jpeg")}).raise_for_status()
    time.sleep(0.5)
    station.peak = 0
    return station.rss()


def bombs(station: Station, images: int = 24, clients: int = 1) -> Counter:
    """`clients` requests at once, each of `images` uniform 4900 x 4900 16-bit PNGs."""
    data = png16()
    files = [("files", (f"u{i:02d}.png", data, "image/png")) for i in range(images)]
    with ThreadPoolExecutor(clients) as pool:
        return Counter(pool.map(lambda _: httpx.post(f"{station.url}/api/v1/cells", files=files,
                                                     timeout=300).status_code, range(clients)))


def modules(station: Station, clients: int = 8, rounds: int = 2) -> Counter:
    """`clients` clients at once, each posting every real module photo `rounds` times."""
    photos = [(p, p.stem.split("-")[1]) for p in sorted(MODULES.glob("*.jpg"))]

    def client(_) -> list[int]:
        with httpx.Client(base_url=station.url, timeout=300) as http:
            return [http.post("/api/v1/modules", data={"grid": grid},
                              files={"file": (photo.name, photo.read_bytes(), "image/jpeg")}).status_code
                    for photo, grid in photos * rounds]

    with ThreadPoolExecutor(clients) as pool:
        return Counter(code for codes in pool.map(client, range(clients)) for code in codes)


def trickled_post(url: str, path: str, cell: Path, seconds: float) -> int:
    """POST one cell as multipart, the body sent in small pieces over `seconds`: a slow
    client. Returns the status code the station answers with."""
    boundary = "elcellhostile"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{cell.name}\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + cell.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=120) as sock:
        sock.sendall((f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {len(body)}\r\n"
                      f"Content-Type: multipart/form-data; boundary={boundary}\r\nConnection: close\r\n\r\n").encode())
        pieces = max(1, int(seconds / 0.05))
        step = -(-len(body) // pieces)
        for start in range(0, len(body), step):
            sock.sendall(body[start:start + step])
            time.sleep(0.05)
        answer = b""
        while not answer.endswith(b"}") and (chunk := sock.recv(65536)):
            answer += chunk
    return int(answer.split(b" ", 2)[1])


def trickle(station: Station, cell: Path, clients: int = 3, seconds: float = 3.0) -> tuple[Counter, float]:
    """`clients` slow uploads at once; /healthz asked meanwhile. Returns the uploads'
    statuses and the slowest /healthz answer (s) while they trickled."""
    slowest = 0.0
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(trickled_post, station.url, "/api/v1/cells", cell, seconds) for _ in range(clients)]
        while not all(f.done() for f in futures):
            started = time.perf_counter()
            assert station.alive()
            slowest = max(slowest, time.perf_counter() - started)
            time.sleep(0.1)
        return Counter(f.result() for f in futures), slowest


def reviews_then_sigterm(station: Station, cells: list[Path]) -> dict:
    """Cells uploaded by 4 clients while one answers reviews; SIGTERM with a module
    request in flight. Returns the statuses, the answers saved, the in-flight answer."""
    answered: list[str] = []
    statuses: Counter = Counter()
    stop = threading.Event()

    def reviewer() -> None:
        with httpx.Client(base_url=station.url, timeout=60) as http:
            while not stop.is_set():
                try:
                    item = http.get("/api/v1/review/next").json().get("item")
                    if item is None:
                        time.sleep(0.02)
                        continue
                    saved = http.post(f"/api/v1/review/{item['id']}", json={"labels": {}})
                except httpx.TransportError:
                    return  # the station has stopped taking connections
                statuses[saved.status_code] += 1
                if saved.status_code == 200:
                    answered.append(saved.json()["path"])

    def uploader(k: int) -> None:
        with httpx.Client(base_url=station.url, timeout=60) as http:
            for path in cells[k::4]:
                statuses[http.post("/api/v1/cells", files=[("files", (path.name, path.read_bytes(),
                                                                       "image/png"))]).status_code] += 1

    threads = [threading.Thread(target=reviewer)] + [threading.Thread(target=uploader, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads[1:]:
        thread.join()
    in_flight: dict = {}
    photo = MODULES / "poly-6x10-A1.jpg"
    request = threading.Thread(target=lambda: in_flight.update(answer=httpx.post(
        f"{station.url}/api/v1/modules", files={"file": (photo.name, photo.read_bytes(), "image/jpeg")},
        data={"grid": "6x10"}, timeout=300)))
    request.start()
    while httpx.get(f"{station.url}/healthz").json()["in_flight"] < 1:
        time.sleep(0.005)
    station.process.send_signal(signal.SIGTERM)
    request.join(timeout=300)
    exit_code = station.process.wait(timeout=120)
    stop.set()
    threads[0].join(timeout=60)
    return {"statuses": statuses, "answered": answered, "in_flight": in_flight["answer"].status_code,
            "exit_code": exit_code}


def saved_rows(labels_out: Path) -> tuple[list[str], list[str]]:
    """The rows of DIR/labels.csv, and those whose image is missing or does not decode."""
    from elcell.cells.images import read_pixels
    from elcell.cells.labels import read_labels_csv
    from elcell.errors import ImageError

    table = read_labels_csv(labels_out / "labels.csv")
    broken = []
    for path in table.paths:
        try:
            read_pixels(path)
        except ImageError:
            broken.append(str(path))
    return [str(p.relative_to(labels_out)) for p in table.paths], broken


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="an elcell ONNX model or run folder")
    parser.add_argument("--cells", help="a labels CSV of cells to upload (default: 40 ELPV cells)")
    args = parser.parse_args()
    from elcell.cells.labels import elpv_table, read_labels_csv

    cells = (read_labels_csv(args.cells) if args.cells else elpv_table()).paths[:40]
    print(f"# {' '.join(sys.argv)}\n# CPU: {cpu_model() or '?'}, {os.cpu_count()} logical CPUs; "
          "other processes may share them")
    import tempfile

    with tempfile.TemporaryDirectory() as folder, Station(args.model, Path(folder) / "reviewed") as station:
        base = warm_up(station, cells[0])
        print(f"warm RSS {base / 2**20:.0f} MB")
        for name, phase in (("one request of 24 uniform 4900x4900 16-bit PNGs", lambda: bombs(station)),
                            ("4 requests of 5 such PNGs at once", lambda: bombs(station, 5, 4)),
                            ("8 clients posting module photos", lambda: modules(station))):
            started = time.perf_counter()
            statuses = phase()
            print(f"{name}: statuses {dict(statuses)}; {time.perf_counter() - started:.1f} s; RSS peak "
                  f"+{(station.peak - base) / 2**20:.0f} MB, now +{(station.rss() - base) / 2**20:.0f} MB")
        statuses, slowest = trickle(station, cells[1])
        print(f"trickle: statuses {dict(statuses)}; slowest /healthz meanwhile {slowest * 1000:.0f} ms")
        print(f"alive after: {station.alive()}; RSS peak over all phases +{(station.peak - base) / 2**20:.0f} MB")
        result = reviews_then_sigterm(station, cells)
        rows, broken = saved_rows(station.labels_out)
        lost = sorted(set(result["answered"]) - set(rows))
        print(f"reviews + SIGTERM: statuses {dict(result['statuses'])}; request in flight answered "
              f"{result['in_flight']}; exit code {result['exit_code']}; {len(result['answered'])} answers saved, "
              f"{len(rows)} rows, {len(lost)} answers lost, {len(broken)} images unreadable")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`elcell serve` throughput: 1, 8 and 32 concurrent clients each sending single
cells, beside `elcell predict`'s offline cells/s on the same cells in the same run.

The service runs as `elcell serve` in a subprocess on 127.0.0.1 (as on a
station); the clients are asyncio tasks with httpx in this process, each
sending one cell per request, one request at a time, for --seconds. Prints
cells/s, p50/p95 latency, the mean batch the server formed, and the share of
the offline rate reached. Offline is measured before and after the clients
(a neighbour's load hits both alike) and the mean is used.

    python benchmarks/serve_throughput.py runs/quick/best_model_epoch19.onnx --seconds 10

The clients share the machine with the server: on 2 cores they take part of
what the server could use. Figures only; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from elcell.cells.labels import elpv_table
from elcell.infer.predict import predict
from elcell.infer.runtime import open_model


def offline_rate(model_path: str, paths: list[Path], batch_size: int, threads: int) -> float:
    """`elcell predict`'s cells/s (decoding included), as the command runs."""
    model = open_model(model_path, threads=threads)
    with tempfile.TemporaryDirectory() as folder:
        predict(model, paths[: min(len(paths), 16)], Path(folder) / "warm.csv", batch_size=batch_size, progress=False)
        result = predict(model, paths, Path(folder) / "p.csv", batch_size=batch_size, progress=False)
    return result.predicted / result.seconds


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args, port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "elcell.cli", "serve", args.model, "--port", str(port), "--log-level",
               "warning", "--batch-size", str(args.batch_size), "--max-wait-ms", str(args.max_wait_ms),
               "--threads", str(args.threads)]
    server = subprocess.Popen(command, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.2)
    server.kill()
    raise SystemExit("elcell serve did not start")


async def clients(url: str, files: list[tuple[str, bytes]], count: int, seconds: float,
                  heatmaps: str) -> tuple[int, list[float], int]:
    """`count` clients sending single cells for `seconds`: (cells, latencies, non-200 answers)."""
    latencies: list[float] = []
    failed = 0
    stop = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=count, max_keepalive_connections=count)

    async def one(k: int, http: httpx.AsyncClient) -> None:
        nonlocal failed
        i = k
        while time.perf_counter() < stop:
            name, data = files[i % len(files)]
            started = time.perf_counter()
            answer = await http.post(f"{url}/api/v1/cells?heatmaps={heatmaps}",
                                     files=[("files", (name, data, "image/png"))])
            if answer.status_code == 200:
                latencies.append(time.perf_counter() - started)
            else:
                failed += 1
            i += count

    async with httpx.AsyncClient(timeout=120, limits=limits) as http:
        await asyncio.gather(*(one(k, http) for k in range(count)))
    return len(latencies), latencies, failed


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="elcell ONNX model")
    parser.add_argument("--cells", type=int, default=128, help="ELPV cells to send (and to predict offline)")
    parser.add_argument("--clients", default="1,8,32", help="concurrent clients, comma-separated")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long each client count sends")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads, both sides")
    parser.add_argument("--heatmaps", default="none", choices=["none", "flagged", "all"],
                        help="boxes asked of the service (none: the same work as predict)")
    args = parser.parse_args()
    paths = elpv_table().paths[: args.cells]
    files = [(p.name, p.read_bytes()) for p in paths]
    print(f"{len(paths)} ELPV cells; model {Path(args.model).name}; batch {args.batch_size}, "
          f"max wait {args.max_wait_ms} ms; heatmaps={args.heatmaps}; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f} at the start")
    before = offline_rate(args.model, paths, args.batch_size, args.threads)
    port = free_port()
    server = start_server(args, port)
    url = f"http://127.0.0.1:{port}"
    rows = []
    try:
        asyncio.run(clients(url, files, 4, 1.0, args.heatmaps))  # warm up
        for count in (int(c) for c in args.clients.split(",")):
            health = httpx.get(f"{url}/healthz").json()
            started = time.perf_counter()
            done, latencies, failed = asyncio.run(clients(url, files, count, args.seconds, args.heatmaps))
            wall = time.perf_counter() - started
            after_health = httpx.get(f"{url}/healthz").json()
            batches = after_health["batches"] - health["batches"]
            mean_batch = (after_health["cells"] - health["cells"]) / batches if batches else 0.0
            rows.append((count, done / wall, percentile(latencies, 50) * 1000, percentile(latencies, 95) * 1000,
                         mean_batch, failed))
    finally:
        server.terminate()
        server.wait(timeout=60)
    after = offline_rate(args.model, paths, args.batch_size, args.threads)
    offline = (before + after) / 2
    print(f"\npredict offline: {offline:.1f} cells/s (before {before:.1f}, after {after:.1f})\n")
    print(f"{'clients':>7} {'cells/s':>9} {'of offline':>10} {'p50 ms':>8} {'p95 ms':>8} {'mean batch':>10} "
          f"{'not 200':>7}")
    for count, rate, p50, p95, mean_batch, failed in rows:
        print(f"{count:>7} {rate:>9.1f} {100 * rate / offline:>9.0f}% {p50:>8.1f} {p95:>8.1f} {mean_batch:>10.1f} "
              f"{failed:>7}")


if __name__ == "__main__":
    main()

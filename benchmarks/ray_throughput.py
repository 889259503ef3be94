"""Archive scoring: cells/s through `elcell predict --ray` against the local
`predict` on the same real ELPV cells, in one process, in alternating rounds
(so a neighbour's load hits both alike), and the memory each Ray actor holds.

    python benchmarks/ray_throughput.py MODEL.onnx --cells 1024 --rounds 2
    python benchmarks/ray_throughput.py MODEL.onnx --address auto      # on a running cluster

The local path is `predict` as the command runs it (decoding threads, one
ONNX Runtime session with every core); Ray is each plan of actors x threads
given with --plans. Ray's start-up (the local cluster, the actors opening the
model) is counted in every Ray round: it is what a user waits for. Memory: the
peak resident size of each model actor's process (sampled from /proc every
0.2 s), and of this driver. Figures only; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from elcell.infer.cpuinfo import cpu_model


def cpu_name() -> str:
    return cpu_model() or platform.processor()


def actor_rss_mib() -> dict[int, float]:
    """Resident MiB of every Ray model actor process on this machine, by pid."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                if b"CellActor" not in handle.read():
                    continue
            with open(f"/proc/{pid}/status") as handle:
                rss = next(int(line.split()[1]) for line in handle if line.startswith("VmRSS:"))
            found[int(pid)] = rss / 1024
        except (OSError, StopIteration):
            continue
    return found


class PeakSampler:
    """Peak RSS per actor process while a round runs."""

    def __init__(self):
        self.peaks: dict[int, float] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        while not self.stop.wait(0.2):
            for pid, rss in actor_rss_mib().items():
                self.peaks[pid] = max(rss, self.peaks.get(pid, 0.0))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def copy_cells(count: int, folder: Path) -> list[Path]:
    from elcell.cells.labels import elpv_table

    table = elpv_table()
    paths = []
    for k in range(count):
        paths.append(folder / f"c{k:05d}.png")
        shutil.copy(table.paths[k % len(table.paths)], paths[-1])
    return paths


def one_round(model, paths, out: Path, batch_size: int, scorer=None) -> float:
    from elcell.infer.predict import predict

    out.unlink(missing_ok=True)
    started = time.perf_counter()
    result = predict(model, paths, out, batch_size=batch_size, progress=False, scorer=scorer)
    assert result.predicted == len(paths)
    return len(paths) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--cells", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--plans", default="2x1,1x2", help="actors x threads, comma-separated")
    parser.add_argument("--address", default="local", help="a Ray cluster to join (default: a local Ray)")
    args = parser.parse_args()

    import ray

    from elcell.cluster.cells import ray_scorer
    from elcell.cluster.pipeline import Plan
    from elcell.cluster.session import connect, shutdown
    from elcell.infer.runtime import open_model

    print(f"$ python {' '.join(sys.argv)}")
    print(f"CPU: {cpu_name()}, {os.cpu_count()} logical CPUs; load average {os.getloadavg()[0]:.1f} at start; "
          f"ray {ray.__version__}, Python {platform.python_version()}")
    model = open_model(args.model)
    folder = Path(tempfile.mkdtemp(prefix="elcell-ray-bench-"))
    try:
        paths = copy_cells(args.cells, folder)
        cluster = connect(args.address)
        print(f"{args.cells} cells, batch {args.batch_size}; Ray: {cluster.cpus} CPUs")
        plans = [Plan(*map(int, text.split("x"))) for text in args.plans.split(",")]
        rates: dict[str, list[float]] = {"local": []} | {plan.describe(): [] for plan in plans}
        peaks: dict[str, list[float]] = {plan.describe(): [] for plan in plans}
        for r in range(args.rounds):
            rates["local"].append(one_round(model, paths, folder / "out.csv", args.batch_size))
            for plan in plans:
                with PeakSampler() as sampler:
                    rate = one_round(model, paths, folder / "out.csv", args.batch_size, ray_scorer(plan))
                rates[plan.describe()].append(rate)
                peaks[plan.describe()] += sampler.peaks.values()
            print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()), flush=True)
        local = statistics.median(rates["local"])
        print(f"\nlocal predict: {local:.1f} cells/s (median of {args.rounds})")
        for plan in plans:
            name = plan.describe()
            ratios = [ray_rate / local_rate for ray_rate, local_rate in zip(rates[name], rates["local"], strict=True)]
            memory = f"{statistics.median(peaks[name]):.0f} MiB" if peaks[name] else "not sampled (remote)"
            print(f"ray {name}: {statistics.median(rates[name]):.1f} cells/s, x{statistics.median(ratios):.2f} "
                  f"of local (median of per-round ratios); peak RSS per actor {memory}")
        print(f"load average {os.getloadavg()[0]:.1f} at the end")
        if cluster.started_here:
            shutdown()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

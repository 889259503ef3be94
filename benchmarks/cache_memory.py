"""Memory of elcell's training data path: 2,624 vs 26,240 cells through the real loader.

The ELPV cells are decoded into elcell's uint8 cache with `elcell.training.data.build_cache`
twice, under a temporary folder: once as they are and once with the list of
paths repeated --repeat times (the cache key hashes the whole ordered list, so
the repeated list is a cache of its own with N x repeat rows; no copies of the
files are needed). Then, in a fresh child process for each cache, one epoch
goes through `CellDataModule`'s train loader (shuffled batches, a fancy-index
read of the memory map per batch) and the device-side batch work of
ELCellModule (float, /255, kornia augmentation, normalisation) on the CPU.

Each child samples /proc/self/status after every batch and prints the peak of

* RssAnon: private memory (heap, tensors, numpy arrays). This is what the
  kernel cannot take back without swap; it must not grow with the data set.
* RssFile: pages of the memory-mapped cache that this process has touched.
  They are page cache: shared between processes (loader workers, DDP ranks)
  and dropped by the kernel under memory pressure, then read again from disk.

For contrast, --in-memory (on by default) also runs the same epoch with the
cache read into RAM (np.load without mmap_mode), which is what RssAnon looks
like when it does grow with the data.

    python benchmarks/cache_memory.py                  # 2,624 vs 26,240 cells, 300 px
    python benchmarks/cache_memory.py --repeat 4 --image-size 128 --no-in-memory

Needs about (1 + repeat) x 2,624 x size^2 bytes of disk (2.6 GB at 300 px, x10)
for a few minutes; the caches are deleted at the end unless --keep.
Figures only; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

STATUS_FIELDS = ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM")


def status_mib(pid: int | str = "self") -> dict[str, float]:
    """The memory lines of /proc/PID/status, in MiB."""
    values = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in STATUS_FIELDS:
                values[key] = int(rest.split()[0]) / 1024
    return values


def child_pids() -> list[int]:
    """Processes whose parent is this one (DataLoader workers)."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == me:
                found.append(int(entry))
    return found


# --------------------------------------------------------------------------- child
def epoch(args: argparse.Namespace) -> None:
    """One epoch over the cache at args.child; prints one JSON line."""
    import torch

    from elcell.cells.labels import LabelTable
    from elcell.training.augment import BatchAugment, normalise
    from elcell.training.data import CellDataModule

    torch.manual_seed(0)
    augment = BatchAugment()
    baseline = status_mib()
    started = time.perf_counter()
    images = np.load(args.child, mmap_mode=None if args.mode == "in-memory" else "r")
    load_seconds = time.perf_counter() - started
    rows = len(images)
    table = LabelTable(paths=[Path(f"cell{i}") for i in range(rows)], names=["defective"],
                       targets=np.zeros((rows, 1), dtype=np.float32))
    split = np.full(rows, "train")
    loader = CellDataModule(images, table, split, args.batch_size, args.workers).train_dataloader()
    peak = dict(baseline)
    peak_workers_anon = 0.0
    total = len(loader)
    trace = []  # RssAnon at every tenth of the epoch: flat, or growing batch by batch?
    batches = 0
    started = time.perf_counter()
    for batch, _targets in loader:
        pixels = normalise(augment(batch.float().div_(255.0)), 0.5, 0.25)
        del pixels
        batches += 1
        now = status_mib()
        for key in ("VmRSS", "RssAnon", "RssFile"):
            peak[key] = max(peak[key], now[key])
        if batches == 1 or batches * 10 // total > (batches - 1) * 10 // total:
            trace.append(round(now["RssAnon"]))
        if args.workers and batches % 20 == 1:
            anon = 0.0
            for pid in child_pids():
                try:
                    anon += status_mib(pid)["RssAnon"]
                except (OSError, KeyError):
                    pass
            peak_workers_anon = max(peak_workers_anon, anon)
    seconds = time.perf_counter() - started
    print(json.dumps({
        "rows": rows, "mode": args.mode, "batches": batches, "epoch_s": round(seconds, 1),
        "load_s": round(load_seconds, 2),
        "baseline_anon": baseline["RssAnon"], "baseline_file": baseline["RssFile"],
        "peak_anon": peak["RssAnon"], "peak_file": peak["RssFile"], "peak_rss": peak["VmRSS"],
        "hwm": status_mib()["VmHWM"], "workers_anon": peak_workers_anon, "anon_trace": trace,
    }))


# --------------------------------------------------------------------------- parent
def build(paths: list[Path], size: int, folder: Path) -> tuple[Path, float]:
    from elcell.cells.images import Decoding
    from elcell.training.data import build_cache, cache_key

    started = time.perf_counter()
    images = build_cache(paths, Decoding(size), folder, progress=False)
    seconds = time.perf_counter() - started
    del images
    return folder / f"{cache_key(paths, Decoding(size))}.npy", seconds


def run_child(args: argparse.Namespace, cache: Path, mode: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--child", str(cache), "--mode", mode,
               "--batch-size", str(args.batch_size), "--workers", str(args.workers)]
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"child failed ({' '.join(command)}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image-size", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=10, help="the large cache has N x repeat rows")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0, help="loader workers in the epoch pass")
    parser.add_argument("--in-memory", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the epoch with the cache loaded into RAM, for contrast")
    parser.add_argument("--tmp-dir", default=None, help="where the caches go (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the caches")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="memmap", choices=["memmap", "in-memory"],
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        epoch(args)
        return

    import torch

    from elcell.cells.labels import elpv_table

    print("command:", " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    print(f"torch {torch.__version__}, python {platform.python_version()}, {platform.platform()}")
    table = elpv_table()
    folder = Path(tempfile.mkdtemp(prefix="elcell-cache-memory-", dir=args.tmp_dir))
    print(f"caches under {folder}; batch {args.batch_size}, loader workers {args.workers}, "
          f"{args.image_size} px")
    try:
        caches = []
        for scale in (1, args.repeat):
            paths = list(table.paths) * scale
            cache, seconds = build(paths, args.image_size, folder)
            caches.append(cache)
            print(f"built {len(paths):,} rows in {seconds:.0f} s: {cache.stat().st_size / 2**20:,.0f} MiB "
                  "on disk", flush=True)
        modes = ["memmap", "in-memory"] if args.in_memory else ["memmap"]
        results = []
        for mode in modes:
            for cache in caches:
                result = run_child(args, cache, mode)
                results.append(result)
                print(f"  {mode:<9} {result['rows']:>7,} rows: RssAnon {result['baseline_anon']:6.0f} -> "
                      f"peak {result['peak_anon']:6.0f} MiB | RssFile peak {result['peak_file']:6.0f} MiB | "
                      f"epoch {result['epoch_s']:.0f} s", flush=True)
                print(f"    RssAnon over the epoch (MiB, every tenth): {result['anon_trace']}")
        print(f"result (peak during one epoch; growth = {args.repeat}x rows minus 1x rows):")
        print(f"  {'':<10}{'rows':>8} {'RssAnon MiB':>12} {'RssFile MiB':>12} {'VmRSS MiB':>10}"
              + (f" {'workers anon':>13}" if args.workers else ""))
        for r in results:
            print(f"  {r['mode']:<10}{r['rows']:>8,} {r['peak_anon']:>12.0f} {r['peak_file']:>12.0f} "
                  f"{r['peak_rss']:>10.0f}" + (f" {r['workers_anon']:>13.0f}" if args.workers else ""))
        for mode in modes:
            small, large = [r for r in results if r["mode"] == mode]
            print(f"  {mode}: RssAnon grows {large['peak_anon'] - small['peak_anon']:+.0f} MiB, "
                  f"RssFile grows {large['peak_file'] - small['peak_file']:+.0f} MiB "
                  f"from {small['rows']:,} to {large['rows']:,} cells")
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

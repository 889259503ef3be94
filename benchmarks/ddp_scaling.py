"""Training throughput with 1 vs N processes (Lightning DDP; gloo on CPU, NCCL on GPU).

Runs the real `elcell.training.train.train` on ELPV cells once per process count, times
each training epoch on rank 0 (validation and export excluded), and prints
cells/s for the whole world. The first epoch is a warm-up and is not counted.

    python benchmarks/ddp_scaling.py --processes 1 2 --backbone resnet18 --image-size 128
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

WORKER = textwrap.dedent('''
    import json, sys, time
    import lightning as L
    import torch
    from elcell.training.config import TrainConfig
    from elcell.training.train import train

    class EpochTimer(L.Callback):
        def __init__(self, path):
            self.path, self.times = path, []
        def on_train_epoch_start(self, trainer, module):
            self.start = time.perf_counter()
        def on_train_epoch_end(self, trainer, module):
            self.times.append(time.perf_counter() - self.start)
            if trainer.global_rank == 0:
                open(self.path, "w").write(json.dumps({"epoch_seconds": self.times,
                                                       "world": trainer.world_size,
                                                       "threads": torch.get_num_threads()}))

    args = json.loads(sys.argv[1])
    train(TrainConfig.from_recipe("spec", data="elpv", limit=args["cells"], out=args["out"], backbone=args["backbone"],
                      pretrained="none", image_size=args["image_size"], batch_size=args["batch_size"],
                      epochs=args["epochs"], devices=str(args["processes"]), val_fraction=0.1,
                      accelerator=args["accelerator"], progress=False),
          callbacks=[EpochTimer(args["record"])])
''')


def run(processes: int, args: argparse.Namespace, folder: Path) -> dict:
    script = folder / "worker.py"
    script.write_text(WORKER)
    record = folder / f"times-{processes}.json"
    settings = {"cells": args.cells, "out": str(folder / f"run-{processes}"), "backbone": args.backbone,
                "image_size": args.image_size, "batch_size": args.batch_size, "epochs": args.epochs,
                "processes": processes, "record": str(record), "accelerator": args.accelerator}
    env = dict(os.environ)
    if args.accelerator == "cpu":
        # Share the cores: N processes x (cores / N) threads, no oversubscription.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    started = time.perf_counter()
    subprocess.run([sys.executable, str(script), json.dumps(settings)], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = json.loads(record.read_text())
    result["wall_seconds"] = time.perf_counter() - started
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--cells", type=int, default=640, help="ELPV cells used (90%% train)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    args = parser.parse_args()

    import torch

    print(f"command: {' '.join(sys.argv)}")
    print(f"torch {torch.__version__}, {os.cpu_count()} CPU cores, accelerator {args.accelerator}")
    train_cells = args.cells - round(args.cells * 0.1)
    baseline = None
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ELCELL_CACHE"] = str(Path(tmp) / "cache")
        for processes in args.processes:
            result = run(processes, args, Path(tmp))
            steady = result["epoch_seconds"][1:] or result["epoch_seconds"]
            rate = train_cells / (sum(steady) / len(steady))
            baseline = baseline or rate
            print(f"{processes} process(es) x {result['threads']} thread(s): {rate:7.1f} cells/s "
                  f"(x{rate / baseline:.2f}), epochs {[round(t, 1) for t in result['epoch_seconds']]} s, "
                  f"whole run {result['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()

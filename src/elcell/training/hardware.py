"""What a run trains on: GPUs, native bf16 on the CPU, and a record of the
machine for comparing wall times between runs."""

from __future__ import annotations

import os
import platform
import sys

import torch
from lightning.pytorch.utilities import rank_zero_only

from elcell.errors import DataError
from elcell.infer.cpuinfo import cpu_model
from elcell.training.config import TrainConfig


def gpu_available(config: TrainConfig) -> bool:
    return config.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()


def check_devices(config: TrainConfig) -> None:
    """More GPUs than the machine shows: one sentence before any work (Lightning's
    answer is a traceback after the data is loaded)."""
    if not gpu_available(config):
        return
    have = torch.cuda.device_count()
    wanted = str(config.devices).strip("[]() ")
    if wanted.isdigit():  # a count
        too_many = int(wanted) > have
    else:  # GPU indices, '0,1' or a YAML list; 'auto' and '-1' take what is there
        indices = [part.strip() for part in wanted.split(",") if part.strip()]
        too_many = all(i.isdigit() for i in indices) and any(int(i) >= have for i in indices)
    if too_many:
        raise DataError(f"--devices {config.devices}: this machine has {have} GPU(s) visible; ask for "
                        f"at most {have}, or add --accelerator cpu to train in CPU processes")


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matrix work in hardware (AMD Zen 4+, Intel Cooper Lake+)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def resolve_precision(config: TrainConfig) -> str:
    """`auto`: bf16 autocast on GPUs that have it and on CPUs with native bf16
    (x3.4 per ResNet-50 step with channels-last, docs/performance.md); else float32."""
    if config.precision != "auto":
        return config.precision
    if gpu_available(config):
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    return "bf16-mixed" if cpu_has_native_bf16() else "32-true"


def machine(config: TrainConfig) -> dict:
    """What trained the model, for comparing wall times between runs."""
    cpu = cpu_model() or platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if gpu_available(config) else None
    return {"cpu": cpu, "cpu_cores": os.cpu_count(), "gpu": gpu, "precision": resolve_precision(config),
            "torch": torch.__version__}


_looked_at_load = False


def note_busy_machine() -> None:
    """A training shares its cores badly: two heavy processes on 2 cores take 3-10x
    as long. Say so once, at the start, rather than leave the user wondering.
    Only the process's first training looks: the load a k-fold run's next fold
    (or a two-stage run's second stage) sees is mostly the previous one's."""
    global _looked_at_load
    if _looked_at_load:
        return
    _looked_at_load = True
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if rank_zero_only.rank == 0 and load > max(1.0, 0.5 * cores):
        print(f"elcell: note: this machine is busy (load {load:.1f} on {cores} cores): training will take "
              "longer than the times given for an idle machine", file=sys.stderr)

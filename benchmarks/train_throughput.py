"""Training throughput: elcell's real training step vs a plain reference, in one process.

What is compared (same backbone, image size, batch size, ELPV cells, loss, Adam):

* elcell: the library's own path. The ELPV cells are decoded once into the
  memory-mapped uint8 cache (`elcell.training.data.build_cache`), batches come from
  `CellDataModule`'s train loader, and a Lightning Trainer runs
  `ELCellModule` (uint8 batch -> device -> `on_after_batch_transfer`: kornia
  flips + brightness/contrast jitter + normalisation -> 1-channel-conv1 ResNet
  -> weighted BCE -> Adam). Precision, channels-last and loader workers are
  what `elcell train` would pick on this machine (`auto`), or what the flags say.
* reference: what the original spec implies. A torch Dataset opens the PNG with
  PIL in every __getitem__ (every epoch), converts to RGB, resizes, flips with
  PIL (p=0.4 each), jitters brightness and contrast with ImageEnhance, makes a
  float32 CHW tensor and normalises it; a DataLoader (--ref-workers processes)
  collates; the same ResNet with a 3-channel conv1 trains in float32 NCHW with
  BCEWithLogits and Adam in a plain loop.
* ceiling (default on a GPU, --ceiling elsewhere): elcell's model, precision and
  memory format on a synthetic, already normalised batch that sits on the device;
  no data path at all. elcell / ceiling is the share the data path leaves.

The contenders run in alternating rounds (reference, elcell, [ceiling], ...) so
a neighbour's load hits them alike; each round is a fresh epoch iterator whose
first --warmup steps are not timed. Prints images/s per round, medians and the
median of the per-round ratios.

--levers instead measures the single levers with a plain loop built from the
library's parts (the same ops as ELCellModule's step, without Lightning):
precision x memory format, 1- vs 3-channel conv1, kornia vs pure-torch
augmentation, torch.compile (--compile-lever: takes minutes), loader workers
0 vs 1 (through the real Trainer path) and the glibc allocator (alternating
child processes, since malloc settings are per process).

    python benchmarks/train_throughput.py                         # ResNet-50, 300 px, batch 16
    python benchmarks/train_throughput.py --backbone resnet18 --image-size 128 --steps 3
    python benchmarks/train_throughput.py --precision bf16-mixed --channels-last on
    python benchmarks/train_throughput.py --levers --precision bf16-mixed --channels-last on
    python benchmarks/train_throughput.py --device cuda             # GPU: adds the ceiling

Figures only; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc mallopt() parameters (malloc.h)


def tune_glibc_malloc() -> bool:
    """Keep freed memory in the process instead of returning it to the kernel.

    glibc serves every block above 32 MiB with its own mmap and unmaps it on
    free, so each training step faults in (and the kernel zeroes) every large
    activation again: gigabytes per ResNet-50 step. With mmap off and trimming
    off, freed activations are reused by the next step. Linux/glibc only.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        # mallopt(3): M_MMAP_MAX 0 = never mmap a block; M_TRIM_THRESHOLD -1 = never trim the heap.
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))
    except (OSError, AttributeError):
        return False


def _malloc_flag() -> str:
    """--malloc's value, read before argparse runs (and before torch is imported)."""
    argv = sys.argv[1:]
    for i, arg in enumerate(argv):
        if arg == "--malloc" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith("--malloc="):
            return arg.split("=", 1)[1]
    return "default"


# Allocator settings must be in place before torch allocates anything.
MALLOC_TUNED = _malloc_flag() == "tuned" and tune_glibc_malloc()

import torch  # noqa: E402
from PIL import Image, ImageEnhance  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

from elcell.infer import cpuinfo  # noqa: E402


# --------------------------------------------------------------------------- machine
def cpu_model() -> str:
    return cpuinfo.cpu_model() or platform.processor() or "unknown"


def cpu_flags() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as handle:
        for line in handle:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
                return " ".join(f for f in wanted if f in flags) or "-"
    return "?"


def ram_gib() -> float:
    with contextlib.suppress(OSError), open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def print_machine(args: argparse.Namespace) -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print("command:", " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    print(f"torch {torch.__version__}, python {platform.python_version()}, {platform.platform()}")
    print(f"cpu: {cpu_model()} ({cpu_flags()}), {cores} cores usable, "
          f"torch threads {torch.get_num_threads()}, RAM {ram_gib():.1f} GiB")
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        print(f"gpu: {props.name}, {props.total_memory / 2**30:.0f} GiB, "
              f"cuda {torch.version.cuda}, cudnn {torch.backends.cudnn.version()}")
    with contextlib.suppress(OSError):
        print("load average at start:", " ".join(Path("/proc/loadavg").read_text().split()[:3]))
    print(f"malloc: {args.malloc}" + (" (mallopt failed: glibc default)"
                                      if args.malloc == "tuned" and not MALLOC_TUNED else ""))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------------- data
class Data:
    """The ELPV cells: table, split, the elcell cache and the train-split statistics."""

    def __init__(self, size: int, cache_dir: str | None, limit: int | None):
        from elcell.cells.images import Decoding
        from elcell.cells.labels import elpv_table
        from elcell.training.data import build_cache, pixel_stats, stratified_split

        table = elpv_table()
        if limit:
            table = table.subset(np.arange(min(limit, len(table))))
        self.table = table
        self.split = stratified_split(table, val_fraction=0.1, seed=0)
        started = time.perf_counter()
        self.images = build_cache(table.paths, Decoding(size), cache_dir, progress=False)
        self.cache_seconds = time.perf_counter() - started
        self.train_index = np.flatnonzero(self.split == "train")
        self.mean, self.std = pixel_stats(self.images, self.train_index)
        positive = table.targets[self.train_index].sum(axis=0)
        self.pos_weight = [float(w) for w in (len(self.train_index) - positive) / positive]


# --------------------------------------------------------------------------- reference
class ReferenceCells(Dataset):
    """Per-sample PIL pipeline: decode from disk, RGB, resize, flips, jitter, float CHW."""

    def __init__(self, paths, targets, size, mean, std, flip_p=0.4, brightness=0.2, contrast=0.2):
        self.paths, self.targets, self.size = list(paths), torch.as_tensor(targets), size
        self.mean, self.std = mean, std
        self.flip_p, self.brightness, self.contrast = flip_p, brightness, contrast

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        with Image.open(self.paths[i]) as image:
            image = image.convert("RGB").resize((self.size, self.size), Image.BILINEAR)
        if random.random() < self.flip_p:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if random.random() < self.flip_p:
            image = image.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        b, c = self.brightness, self.contrast
        image = ImageEnhance.Brightness(image).enhance(random.uniform(1 - b, 1 + b))
        image = ImageEnhance.Contrast(image).enhance(random.uniform(1 - c, 1 + c))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return ((pixels - self.mean) / self.std).contiguous(), self.targets[i]


def reference_model(backbone: str, num_labels: int) -> nn.Module:
    from elcell.training.nets.build import ResNet

    model = ResNet(backbone, num_labels)
    model.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


class Reference:
    def __init__(self, data: Data, args: argparse.Namespace, device: torch.device):
        self.device = device
        table = data.table
        dataset = ReferenceCells([table.paths[i] for i in data.train_index],
                                 table.targets[data.train_index], args.image_size, data.mean, data.std)
        self.loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                                 num_workers=args.ref_workers)
        self.model = reference_model(args.backbone, len(table.names)).to(device)
        self.criterion = nn.BCEWithLogitsLoss(
            pos_weight=torch.tensor(data.pos_weight, dtype=torch.float32)).to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)

    def run(self, warmup: int, steps: int) -> float:
        """Seconds for `steps` steps after `warmup` untimed ones, in a fresh epoch."""
        self.model.train()
        started = 0.0
        for i, (images, targets) in enumerate(self.loader):
            if i == warmup:
                sync(self.device)
                started = time.perf_counter()
            images, targets = images.to(self.device), targets.to(self.device)
            self.optimizer.zero_grad(set_to_none=True)
            loss = self.criterion(self.model(images), targets)
            loss.backward()
            self.optimizer.step()
            if i + 1 == warmup + steps:
                break
        sync(self.device)
        return time.perf_counter() - started


# --------------------------------------------------------------------------- elcell
def resolve_config(args: argparse.Namespace) -> tuple[str, bool, int]:
    """(precision, channels_last, loader workers) as `elcell train` would choose them here."""
    import elcell.training.train as train
    from elcell.training.config import TrainConfig

    gpu = args.device == "cuda"
    config = TrainConfig.from_recipe("spec", accelerator="gpu" if gpu else "cpu", precision=args.precision)
    precision = train.resolve_precision(config)
    if args.channels_last == "auto":
        # The rule train.train() applies when it builds ELCellModule; a resolver
        # function wins if the library grows one.
        resolver = getattr(train, "resolve_channels_last", None)
        channels_last = resolver(config) if resolver else gpu or precision == "bf16-mixed"
    else:
        channels_last = args.channels_last == "on"
    workers = (4 if gpu else 0) if args.workers == "auto" else int(args.workers)  # as train.py
    return precision, channels_last, workers


class Elcell:
    def __init__(self, data: Data, args: argparse.Namespace, device: torch.device,
                 workers: int | None = None):
        from elcell.training.data import CellDataModule
        from elcell.training.lightning_module import ELCellModule

        self.args, self.device = args, device
        self.precision, self.channels_last, default_workers = resolve_config(args)
        self.workers = default_workers if workers is None else workers
        torch.manual_seed(0)
        self.module = ELCellModule(
            backbone=args.backbone, label_names=data.table.names, mean=data.mean, std=data.std,
            pos_weight=data.pos_weight, channels_last=self.channels_last, image_size=args.image_size,
        )
        self.datamodule = CellDataModule(data.images, data.table, data.split, args.batch_size,
                                         self.workers, pin_memory=device.type == "cuda")

    def describe(self) -> str:
        return (f"precision {self.precision}, channels-last {'on' if self.channels_last else 'off'}, "
                f"loader workers {self.workers}, pin_memory {self.device.type == 'cuda'}")

    def run(self, warmup: int, steps: int) -> float:
        import lightning as L

        clock = _StepClock(warmup, steps, self.device)
        with _quiet_lightning(), contextlib.suppress(_TimedStepsDone):
            trainer = L.Trainer(
                accelerator="gpu" if self.device.type == "cuda" else "cpu", devices=1,
                precision=self.precision, max_epochs=1, limit_train_batches=warmup + steps,
                limit_val_batches=0, num_sanity_val_steps=0, enable_checkpointing=False,
                logger=False, enable_progress_bar=False, enable_model_summary=False,
                callbacks=[clock],
            )
            trainer.fit(self.module, datamodule=self.datamodule)
        del trainer
        gc.collect()  # the stopped fit's loader workers go now, not during a later round
        return clock.seconds


class _TimedStepsDone(Exception):
    """Ends fit() after the last timed step: without validation there is no val_f1
    for ELCellModule's ReduceLROnPlateau, so the epoch must not reach its end."""


def _callback_base():
    from lightning.pytorch.callbacks import Callback

    return Callback


class _StepClock(_callback_base()):
    """Wall time from the end of the last warm-up batch to the end of the last timed one.

    Between two on_train_batch_end calls Lightning fetches the next batch, moves
    it to the device, runs on_after_batch_transfer and the optimiser step, so
    the window covers the whole step, data included.
    """

    def __init__(self, warmup: int, steps: int, device: torch.device):
        self.warmup, self.steps, self.device = warmup, steps, device
        self.started = self.seconds = 0.0

    def on_train_start(self, trainer, pl_module) -> None:
        if self.warmup == 0:
            sync(self.device)
            self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 == self.warmup:
            sync(self.device)
            self.started = time.perf_counter()
        elif batch_idx + 1 == self.warmup + self.steps:
            sync(self.device)
            self.seconds = time.perf_counter() - self.started
            raise _TimedStepsDone


@contextlib.contextmanager
def _quiet_lightning():
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# --------------------------------------------------------------------------- plain steps
def autocast_dtype(precision: str) -> torch.dtype | None:
    return {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(precision)


class ModelStep:
    """One optimiser step of elcell's model on a batch (no data path).

    With `augment`, the batch is uint8 and goes through the same ops as
    ELCellModule.on_after_batch_transfer (float, /255, augment, normalise,
    memory format) first; else it is used as it is (the ceiling).
    """

    def __init__(self, args, device, data: Data, precision: str, channels_last: bool,
                 in_channels: int = 1, augment: nn.Module | None = None, compile_model: bool = False):
        from elcell.training.nets.build import build_model

        torch.manual_seed(0)
        model = build_model(args.backbone, len(data.table.names))
        if in_channels == 3:
            model.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        model = model.to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model, self.device, self.channels_last = model, device, channels_last
        self.forward = torch.compile(model) if compile_model else model
        self.in_channels, self.augment, self.mean, self.std = in_channels, augment, data.mean, data.std
        self.dtype = autocast_dtype(precision)
        self.scaler = torch.amp.GradScaler(device.type) if precision == "16-mixed" else None
        self.criterion = nn.BCEWithLogitsLoss(
            pos_weight=torch.tensor(data.pos_weight, dtype=torch.float32)).to(device)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        generator = torch.Generator().manual_seed(0)
        size, batch = args.image_size, args.batch_size
        rows = torch.from_numpy(np.ascontiguousarray(data.images[data.train_index[:batch]]))[:, None]
        if augment is None:  # ceiling: a normalised float batch already on the device
            self.batch = ((rows.float() / 255.0 - data.mean) / data.std).to(device)
            self.batch = self._layout(self._channels(self.batch))
        else:
            self.batch = rows.to(device)
        self.targets = torch.rand(batch, len(data.table.names), generator=generator).to(device)
        assert self.batch.shape[-1] == size

    def _channels(self, images: torch.Tensor) -> torch.Tensor:
        return images.expand(-1, 3, -1, -1) if self.in_channels == 3 else images

    def _layout(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last if self.channels_last
                                 else torch.contiguous_format)

    def __call__(self) -> None:
        images = self.batch
        if self.augment is not None:
            images = self.augment(images.float().div_(255.0))
            images = self._layout(self._channels((images - self.mean) / self.std))
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32,
                            enabled=self.dtype is not None):
            loss = self.criterion(self.forward(images).float(), self.targets)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()

    def run(self, warmup: int, steps: int) -> float:
        for _ in range(warmup):
            self()
        sync(self.device)
        started = time.perf_counter()
        for _ in range(steps):
            self()
        sync(self.device)
        return time.perf_counter() - started


class TorchAugment(nn.Module):
    """Pure-torch twin of elcell.training.augment.BatchAugment (same distributions, no kornia)."""

    def __init__(self, flip_p: float = 0.4, brightness: float = 0.2, contrast: float = 0.2):
        super().__init__()
        self.flip_p, self.brightness, self.contrast = flip_p, brightness, contrast

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        n, device = len(images), images.device

        def per_sample(low: float, high: float) -> torch.Tensor:
            return torch.empty(n, 1, 1, 1, device=device).uniform_(low, high)

        flip = torch.rand(n, 1, 1, 1, device=device) < self.flip_p
        images = torch.where(flip, images.flip(-1), images)
        flip = torch.rand(n, 1, 1, 1, device=device) < self.flip_p
        images = torch.where(flip, images.flip(-2), images)
        b, c = self.brightness, self.contrast
        brightness, contrast = per_sample(1 - b, 1 + b), per_sample(1 - c, 1 + c)
        steps = [lambda x: (x * brightness).clamp_(0, 1),
                 lambda x: (x * contrast + x.mean((1, 2, 3), keepdim=True) * (1 - contrast)).clamp_(0, 1)]
        if random.random() < 0.5:  # ColorJitter applies its steps in a random order
            steps.reverse()
        for step in steps:
            images = step(images)
        return images


# --------------------------------------------------------------------------- reporting
def alternate(contenders: dict, rounds: int, warmup: int, steps: int, batch: int,
              warm: bool = True) -> dict[str, list[float]]:
    """images/s of each contender per round, contenders interleaved within each round.

    With `warm`, every contender first runs once untimed (allocator, oneDNN
    primitives, cudnn autotuning, worker start), so round 1 is like the others.
    """
    if warm:
        for run in contenders.values():
            run(warmup, 1)
    rates: dict[str, list[float]] = {name: [] for name in contenders}
    for r in range(rounds):
        cells = []
        for name, run in contenders.items():
            rate = batch * steps / run(warmup, steps)
            rates[name].append(rate)
            cells.append(f"{name} {rate:7.2f}")
        print(f"  round {r + 1}/{rounds}: " + " | ".join(cells) + " img/s", flush=True)
    return rates


def summarise(rates: dict[str, list[float]], baseline: str) -> None:
    for name, values in rates.items():
        line = f"  {name:<28} median {statistics.median(values):8.2f} img/s"
        if name != baseline:
            ratios = [a / b for a, b in zip(values, rates[baseline])]
            spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
            line += f"   x{statistics.median(ratios):.2f} vs {baseline} (per-round median; {spread})"
        print(line)


def peak_rss_mib() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# --------------------------------------------------------------------------- modes
def compare(args, device, data: Data) -> None:
    elcell = Elcell(data, args, device)
    contenders = {"reference": Reference(data, args, device).run, "elcell": elcell.run}
    print(f"elcell:    {elcell.describe()}")
    print(f"reference: float32 NCHW, 3-channel conv1, PIL per sample, DataLoader workers {args.ref_workers}")
    if args.ceiling:
        ceiling = ModelStep(args, device, data, elcell.precision, elcell.channels_last)
        contenders["ceiling"] = ceiling.run
        print("ceiling:   elcell's model/precision/layout on a synthetic batch already on the device")
    print(f"{args.backbone}, {args.image_size} px, batch {args.batch_size}, "
          f"{args.rounds} rounds x {args.steps} timed steps (+{args.warmup} warm-up per round)")
    print("warm-up round (not counted) ...", flush=True)
    rates = alternate(contenders, args.rounds, args.warmup, args.steps, args.batch_size)
    print("result:")
    summarise({k: rates[k] for k in ("reference", "elcell")}, "reference")
    if args.ceiling:
        shares = [e / c for e, c in zip(rates["elcell"], rates["ceiling"])]
        print(f"  ceiling (model only)         median {statistics.median(rates['ceiling']):8.2f} img/s"
              f"   elcell reaches {100 * statistics.median(shares):.0f} % of it "
              f"({100 * min(shares):.0f}-{100 * max(shares):.0f} %)")
    print(f"peak RSS {peak_rss_mib():.0f} MiB (whole process, all contenders)")


def levers(args, device, data: Data) -> None:
    """Each lever on its own, its contenders alternating (see the module docstring)."""
    precision, channels_last, _ = resolve_config(args)
    print(f"{args.backbone}, {args.image_size} px, batch {args.batch_size}; "
          f"{args.rounds} rounds x {args.steps} steps each; elcell's setting: {precision}, "
          f"{'channels-last' if channels_last else 'NCHW'}")
    groups = {1: lever_precision_layout, 2: lever_conv1, 3: lever_augmentation, 4: lever_compile,
              5: lever_workers, 6: lever_allocator}
    only = {int(n) for n in args.only.split(",")} if args.only else set(groups) - (
        set() if args.compile_lever else {4})
    for number, lever in groups.items():
        if number in only:
            lever(args, device, data, precision, channels_last)


def _rate(args, contenders: dict) -> dict[str, list[float]]:
    return alternate(contenders, args.rounds, args.warmup, args.steps, args.batch_size)


def _layout_name(channels_last: bool) -> str:
    return "channels-last" if channels_last else "NCHW"


def lever_precision_layout(args, device, data, precision, channels_last) -> None:
    from elcell.training.augment import BatchAugment

    low = precision if precision != "32-true" else "bf16-mixed"
    print("\n[1] precision x memory format (model step on an augmented uint8 batch, 1-ch conv1)")
    grid = {}
    for prec in ("32-true", low):
        for cl in (False, True):
            step = ModelStep(args, device, data, prec, cl, augment=BatchAugment().to(device))
            grid[f"{prec} {_layout_name(cl)}"] = step.run
    summarise(_rate(args, grid), "32-true NCHW")


def lever_conv1(args, device, data, precision, channels_last) -> None:
    from elcell.training.augment import BatchAugment

    desc = f"{precision}, {_layout_name(channels_last)}"
    print(f"\n[2] conv1: gray in one channel vs gray copied to RGB ({desc})")
    pair = {"3-channel conv1": ModelStep(args, device, data, precision, channels_last,
                                         in_channels=3, augment=BatchAugment().to(device)).run,
            "1-channel conv1": ModelStep(args, device, data, precision, channels_last,
                                         augment=BatchAugment().to(device)).run}
    summarise(_rate(args, pair), "3-channel conv1")


def lever_augmentation(args, device, data, precision, channels_last) -> None:
    from elcell.training.augment import BatchAugment, normalise

    batch = args.batch_size
    print(f"\n[3] augmentation alone on a uint8 batch of {batch} (float, /255, augment, normalise)")
    rows = torch.from_numpy(np.ascontiguousarray(data.images[data.train_index[:batch]]))[:, None]
    rows = rows.to(device)

    def timer(augment: nn.Module):
        def run(warmup: int, steps: int) -> float:
            for _ in range(warmup):
                augment(rows.float().div_(255.0))
            sync(device)
            started = time.perf_counter()
            for _ in range(steps * 10):  # 10 batches per "step": one batch is short
                normalise(augment(rows.float().div_(255.0)), data.mean, data.std)
            sync(device)
            return (time.perf_counter() - started) / 10
        return run

    rates = _rate(args, {"kornia BatchAugment": timer(BatchAugment().to(device)),
                         "pure torch": timer(TorchAugment())})
    summarise(rates, "kornia BatchAugment")
    for name, values in rates.items():
        print(f"  {name}: {1000 * batch / statistics.median(values):.2f} ms per batch")


def lever_compile(args, device, data, precision, channels_last) -> None:
    from elcell.training.augment import BatchAugment

    desc = f"{precision}, {_layout_name(channels_last)}"
    print(f"\n[4] torch.compile of the model ({desc}); the first call compiles")
    compiled = ModelStep(args, device, data, precision, channels_last,
                         augment=BatchAugment().to(device), compile_model=True)
    started = time.perf_counter()
    compiled.run(0, 1)
    print(f"  compile + first step: {time.perf_counter() - started:.0f} s", flush=True)
    pair = {"eager": ModelStep(args, device, data, precision, channels_last,
                               augment=BatchAugment().to(device)).run,
            "torch.compile": compiled.run}
    summarise(_rate(args, pair), "eager")


def lever_workers(args, device, data, precision, channels_last) -> None:
    print("\n[5] elcell loader workers 0 vs 1 (the real Trainer path, elcell's precision/layout)")
    pair = {"workers 0": Elcell(data, args, device, workers=0).run,
            "workers 1": Elcell(data, args, device, workers=1).run}
    summarise(_rate(args, pair), "workers 0")


def lever_allocator(args, device, data, precision, channels_last) -> None:
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return
    print("\n[6] glibc malloc: default vs tuned (no mmap per large block, no trim);"
          " alternating child processes, model step only")
    allocator_lever(args)


def allocator_lever(args) -> None:
    rates: dict[str, list[float]] = {"malloc default": [], "malloc tuned": []}
    base = [sys.executable, os.path.abspath(__file__), "--child-step", "--backbone", args.backbone,
            "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
            "--precision", args.precision, "--channels-last", args.channels_last,
            "--warmup", str(max(args.warmup, 3)), "--steps", str(args.steps)]
    if args.cache_dir:
        base += ["--cache-dir", args.cache_dir]
    for r in range(args.rounds):
        cells = []
        for name, mode in (("malloc default", "default"), ("malloc tuned", "tuned")):
            out = subprocess.run([*base, "--malloc", mode], capture_output=True, text=True, check=True)
            rate, rss = (float(v) for v in out.stdout.split()[-2:])
            rates[name].append(rate)
            cells.append(f"{name} {rate:7.2f} img/s, peak RSS {rss:.0f} MiB")
        print(f"  round {r + 1}/{args.rounds}: " + " | ".join(cells), flush=True)
    summarise(rates, "malloc default")


def child_step(args, device, data: Data) -> None:
    """Internal (--child-step): time the plain step once, print 'img/s peak-RSS-MiB'."""
    from elcell.training.augment import BatchAugment

    precision, channels_last, _ = resolve_config(args)
    step = ModelStep(args, device, data, precision, channels_last, augment=BatchAugment().to(device))
    seconds = step.run(args.warmup, args.steps)
    print(f"{args.batch_size * args.steps / seconds:.3f} {peak_rss_mib():.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet50", choices=["resnet18", "resnet34", "resnet50"])
    parser.add_argument("--image-size", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per contender and round (default: 5 on CPU, 50 on a GPU, "
                             "fewer where one pass over the train split holds fewer)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps at the start of each round (default: 1 on CPU, 5 on a GPU)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--precision", default="auto",
                        choices=["auto", "32-true", "bf16-mixed", "16-mixed"],
                        help="elcell's precision; auto = what `elcell train` picks here")
    parser.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"],
                        help="elcell's memory format; auto = what `elcell train` picks here")
    parser.add_argument("--workers", default="auto",
                        help="elcell's loader workers; auto = what `elcell train` picks here")
    parser.add_argument("--ref-workers", type=int, default=2, help="reference DataLoader workers")
    parser.add_argument("--ceiling", action=argparse.BooleanOptionalAction, default=None,
                        help="also time the model-only ceiling (default: on with --device cuda)")
    parser.add_argument("--levers", action="store_true", help="measure the single levers instead")
    parser.add_argument("--compile-lever", action="store_true",
                        help="with --levers: torch.compile too (lever 4)")
    parser.add_argument("--only", default=None,
                        help="with --levers: comma-separated lever numbers to run, e.g. 1,4")
    parser.add_argument("--malloc", default="default", choices=["default", "tuned"],
                        help="glibc allocator settings for this process (see tune_glibc_malloc)")
    parser.add_argument("--cache-dir", default=None, help="elcell image cache (default: elcell's)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N ELPV cells")
    parser.add_argument("--child-step", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device visible to torch")
    gpu = args.device == "cuda"
    if args.ceiling is None:
        args.ceiling = gpu
    steps_given = args.steps is not None
    if args.steps is None:  # a GPU step takes milliseconds: time enough of them
        args.steps = 50 if gpu else 5
    if args.warmup is None:
        args.warmup = 5 if gpu else 1
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as elcell's Trainer sets it on a GPU

    if args.child_step:
        child_step(args, device, Data(args.image_size, args.cache_dir, args.limit))
        return
    print_machine(args)
    data = Data(args.image_size, args.cache_dir, args.limit)
    print(f"ELPV: {len(data.table)} cells, {len(data.train_index)} in the train split; "
          f"cache ready in {data.cache_seconds:.1f} s (decoded once, reused across runs)")
    fit_steps_in_one_epoch(args, data, steps_given)
    (levers if args.levers else compare)(args, device, data)


def fit_steps_in_one_epoch(args: argparse.Namespace, data: Data, steps_given: bool) -> None:
    """Each round times steps within one pass over the train split: past its end
    elcell's epoch would end (validation, the plateau scheduler) and the reference
    would time fewer steps than it counts. A default --steps shrinks to fit."""
    batches = len(data.train_index) // args.batch_size  # whole batches: the loaders drop the last
    if args.warmup + args.steps <= batches:
        return
    cells = f"the {len(data.train_index)} train cells ({batches} batches of {args.batch_size})"
    if batches <= args.warmup:
        sys.exit(f"--warmup {args.warmup} steps leave no timed step in one pass over {cells}: "
                 "give a smaller --warmup or --batch-size, or more cells")
    if steps_given:
        sys.exit(f"--warmup {args.warmup} + --steps {args.steps} do not fit in one pass over {cells}: "
                 "give fewer --steps, a smaller --batch-size or more cells")
    args.steps = batches - args.warmup
    print(f"timing {args.steps} steps per round: all that one pass holds at batch {args.batch_size}")


if __name__ == "__main__":
    main()

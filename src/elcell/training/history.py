"""What a run records of its epochs: metrics.csv merged over sessions, losses.png,
a line per epoch where no progress bar is drawn, and Lightning's console noise
kept out of the way."""

from __future__ import annotations

import csv
import io
import logging
import sys
import time
import warnings
from pathlib import Path

import lightning as L
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from elcell.io import atomic_path, atomic_write_text


class _DropTips(logging.Filter):
    """Lightning advertises a cloud logger on every run; not useful on an inspection PC."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTips())
# Expected: our augmentation lives in the module's on_after_batch_transfer on purpose.
warnings.filterwarnings("ignore", message=".*overridden `on_after_batch_transfer`.*")
# A resumed run writes into its own checkpoints/ folder, as it should.
warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
# Lightning's own use of a deprecated PyTorch API, not ours: printed on every run.
warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*")


def merge_session_logs(run: Path) -> Path:
    """One metrics.csv for the run from each session's log (logs/<n>/metrics.csv).

    Every start or --resume logs to a new session folder, because Lightning's
    CSV logger would otherwise replace the earlier epochs' rows.
    """
    rows, columns = [], {}
    for session in sorted((run / "logs").glob("*/metrics.csv"), key=lambda p: int(p.parent.name)):
        with open(session) as handle:
            reader = csv.DictReader(handle)
            columns.update(dict.fromkeys(reader.fieldnames or []))
            rows.extend(reader)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(run / "metrics.csv", buffer.getvalue())
    return run / "metrics.csv"


def _per_epoch(metrics_csv: Path) -> dict[int, dict[str, float]]:
    per_epoch: dict[int, dict[str, float]] = {}
    with open(metrics_csv) as handle:
        for row in csv.DictReader(handle):
            if row.get("epoch"):
                entry = per_epoch.setdefault(int(row["epoch"]), {})
                entry.update({k: float(v) for k, v in row.items() if v and k != "epoch"})
    return per_epoch


def plot_losses(metrics_csv: Path, out: Path, best_epoch: int | None = None) -> Figure:
    """losses.png: train/val loss and val F1 per epoch (1-based, as the console
    counts), from Lightning's metrics.csv, with the epoch that was kept marked."""
    per_epoch = _per_epoch(metrics_csv)
    epochs = sorted(per_epoch)
    figure = Figure(figsize=(10, 4), layout="tight")
    ax_loss, ax_f1 = figure.subplots(1, 2)
    for key, label in (("train_loss", "train loss"), ("val_loss", "val loss")):
        points = [(e + 1, per_epoch[e][key]) for e in epochs if key in per_epoch[e]]
        if points:
            ax_loss.plot(*zip(*points), marker="o", markersize=3, label=label)
    points = [(e + 1, per_epoch[e]["val_f1"]) for e in epochs if "val_f1" in per_epoch[e]]
    if points:
        ax_f1.plot(*zip(*points), marker="o", markersize=3, color="tab:green", label="val weighted F1")
    if best_epoch is not None and best_epoch in per_epoch and "val_f1" in per_epoch[best_epoch]:
        f1 = per_epoch[best_epoch]["val_f1"]
        for ax in (ax_loss, ax_f1):
            ax.axvline(best_epoch + 1, color="gray", linestyle="--", linewidth=1)
        ax_f1.plot([best_epoch + 1], [f1], marker="*", markersize=14, color="tab:red", linestyle="none",
                   label=f"kept: epoch {best_epoch + 1}, F1 {f1:.3f}")
    ax_loss.set(xlabel="epoch", ylabel="weighted BCE loss", title="Loss")
    ax_f1.set(xlabel="epoch", ylabel="F1", ylim=(0, 1), title="Validation F1")
    for ax in (ax_loss, ax_f1):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole epochs, not 2.5
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    with atomic_path(out) as tmp:
        figure.savefig(tmp, dpi=100, format="png")
    return figure


class EpochLines(L.Callback):
    """Where no progress bar is drawn (a log file, CI), one line per epoch on
    stderr instead: a bar redrawn per step would write thousands of lines.

    An epoch's line is written when the next epoch starts (or training ends):
    only then has Lightning reduced the epoch's train loss and validation F1."""

    def __init__(self):
        self.started: float | None = None

    def _line(self, trainer: L.Trainer, epoch: int) -> None:
        if self.started is None or not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics
        shown = ", ".join(f"{name} {float(metrics[name]):.4f}" for name in ("train_loss", "val_loss", "val_f1")
                          if name in metrics)
        print(f"epoch {epoch + 1}/{trainer.max_epochs}: {shown} ({time.perf_counter() - self.started:.0f} s)",
              file=sys.stderr, flush=True)

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._line(trainer, trainer.current_epoch - 1)
        self.started = time.perf_counter()

    def on_fit_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._line(trainer, trainer.current_epoch - 1)
        self.started = None


def next_session(run: Path) -> int:
    sessions = [int(p.name) for p in (run / "logs").glob("*") if p.name.isdigit()]
    return max(sessions, default=-1) + 1

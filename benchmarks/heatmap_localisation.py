"""Do a model's heatmaps point at the defect? The pointing game, rotation and
flip consistency, and corner bias (elcell.infer.localisation) of a trained run's
heatmaps, for several ways of computing them, on the run's own held-out cells.

    python benchmarks/heatmap_localisation.py runs/quick
    python benchmarks/heatmap_localisation.py runs/transfer --methods 32:gradcam,16:gradcam,16:layercam

Pointing game: clean held-out cells (every label 0) with realistic cracks drawn
on them by the training code's generator (some cutting off a darkened area),
the drawn pixels as truth. Consistency and corner bias: the held-out cells the
model flags (probability >= 0.5 for the label). Prints one row per method.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch

from elcell.cells.images import Decoding, load_cell
from elcell.infer.localisation import SYMMETRIES, border_share, consistency, pointing_game
from elcell.training.augment import _realistic_cracks
from elcell.training.lightning_module import ELCellModule


def load_run(run: Path) -> tuple[torch.nn.Module, dict]:
    summary = json.loads((run / "summary.json").read_text())
    state = torch.load(run / summary["best_checkpoint"], map_location="cpu", weights_only=False)
    module = ELCellModule(**state["hyper_parameters"])
    module.load_state_dict(state["state_dict"])
    return module.model.eval(), dict(module.hparams)


def held_out(run: Path, hparams: dict) -> tuple[np.ndarray, np.ndarray]:
    """The run's test cells (else its validation cells), decoded as trained, and their labels."""
    name = "test.csv" if (run / "test.csv").is_file() else "val.csv"
    with open(run / name) as handle:
        rows = list(csv.reader(handle, delimiter=";"))[1:]
    decoding = Decoding(hparams["image_size"], hparams.get("shrink", "bilinear"), hparams.get("bit_depth", 16))
    cells = np.stack([load_cell(row[0], decoding) for row in rows])
    return cells, np.array([[float(v) for v in row[1:1 + len(hparams["label_names"])]] for row in rows])


def _batches(hparams: dict, cells: np.ndarray, batch: int = 32):
    for start in range(0, len(cells), batch):
        x = torch.from_numpy(np.ascontiguousarray(cells[start:start + batch])).float()[:, None] / 255
        yield (x - hparams["mean"]) / hparams["std"]


def probabilities(net, hparams: dict, cells: np.ndarray, label: int) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([torch.sigmoid(net(x)[:, label]).numpy() for x in _batches(hparams, cells)])


def heatmaps(net, hparams: dict, cells: np.ndarray, label: int) -> np.ndarray:
    """Heatmaps [N, h, w] of one label."""
    with torch.no_grad():
        return np.concatenate([net.forward_with_cam(x)[1][:, label].numpy() for x in _batches(hparams, cells)])


def drawn_defects(clean: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Clean cells with cracks (and some darkened areas) drawn on; the drawn pixels."""
    torch.manual_seed(seed)
    n, size = len(clean), clean.shape[-1]
    shade, _ = _realistic_cracks(n, size, size, "cpu")
    shade = shade.numpy()
    cracked = np.clip(clean.astype(np.float32) * shade, 0, 255).round().astype(np.uint8)
    return cracked, shade < 0.9


def measure(net, hparams: dict, cells: np.ndarray, labels: np.ndarray, label: int, seed: int,
            limit: int) -> dict:
    clean = cells[(labels == 0).all(axis=1)][:limit]
    cracked, masks = drawn_defects(clean, seed)
    game = pointing_game(heatmaps(net, hparams, cracked, label), masks)
    flagged = cells[probabilities(net, hparams, cells, label) >= 0.5][:limit]
    flagged_maps = heatmaps(net, hparams, flagged, label)
    turned = {name: heatmaps(net, hparams, np.ascontiguousarray(turn(flagged)), label)
              for name, turn in SYMMETRIES.items()}
    agree = consistency(flagged_maps, turned)
    border, border_area = border_share(flagged_maps)
    return {"map": "x".join(map(str, flagged_maps.shape[1:])), "drawn cells": len(clean), "hits": game.hits,
            "chance": game.chance, "no peak": game.no_peak, "flagged": len(flagged),
            "rotations": float(np.mean([agree[k] for k in ("rot90", "rot180", "rot270")])),
            "flips": float(np.mean([agree[k] for k in ("flip_lr", "flip_ud", "transpose", "anti_transpose")])),
            "border peaks": border, "border area": border_area}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished run folder of `elcell train`")
    parser.add_argument("--methods", default="32:gradcam,16:gradcam,16:layercam,8:gradcam,8:layercam",
                        help="STRIDE:METHOD[:sym],...: the feature map (stride 8, 16 or 32), gradcam or "
                             "layercam, and with :sym the mean over the cell's symmetric views")
    parser.add_argument("--label", help="the label to explain (default: 'crack', else the only label)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the drawn cracks")
    parser.add_argument("--cells", type=int, default=150,
                        help="at most this many clean cells to draw on, and flagged cells to turn")
    args = parser.parse_args()
    net, hparams = load_run(args.run)
    names = [n.lower() for n in hparams["label_names"]]
    label = names.index(args.label or ("crack" if "crack" in names else names[0]))
    cells, labels = held_out(args.run, hparams)
    print(f"{args.run}: {hparams['backbone']} at {hparams['image_size']} px, label {names[label]}, "
          f"{len(cells)} held-out cells")
    print(f"{'method':<18}{'map':>7}{'hits':>7}{'chance':>8}{'no peak':>9}{'rot':>6}{'flip':>6}"
          f"{'border':>8}{'area':>6}")
    for spec in args.methods.split(","):
        stride, method, *views = spec.split(":")
        net.cam_stride, net.cam_method = int(stride), method
        net.cam_views = 8 if views == ["sym"] and hparams.get("rotate90") else 4 if views else 1
        r = measure(net, hparams, cells, labels, label, args.seed, args.cells)
        print(f"{spec:<18}{r['map']:>7}{r['hits']:>7.3f}{r['chance']:>8.3f}{r['no peak']:>9.3f}"
              f"{r['rotations']:>6.2f}{r['flips']:>6.2f}{r['border peaks']:>8.3f}{r['border area']:>6.2f}")
    print(f"({r['drawn cells']} clean cells with drawn cracks; {r['flagged']} flagged cells for consistency "
          "and border peaks)")


if __name__ == "__main__":
    main()

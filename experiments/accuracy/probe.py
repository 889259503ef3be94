"""Linear probe: how much of the defect label a frozen backbone's features hold.

A logistic regression on the pooled features of the train cells, scored on
the validation cells of a protocol run's split (the test cells are not read).
It tells a pretrained backbone's features apart from what fine-tuning adds:

    python experiments/accuracy/probe.py runs/accuracy/E03-rot90/split.csv \\
        none runs/accuracy/S1-simclr/backbone.pth runs/accuracy/E03-rot90/checkpoints/last.ckpt

`none` is a randomly initialised ResNet, the floor any learnt feature must beat.
"""

from __future__ import annotations

import argparse
import csv

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score
from sklearn.preprocessing import StandardScaler

from elcell.cells.images import SHRINKS, Decoding, load_cell
from elcell.training.nets.build import ResNet, load_pretrained


def read_split(path: str) -> tuple[list[str], np.ndarray, np.ndarray]:
    with open(path) as handle:
        rows = [row for row in csv.DictReader(handle, delimiter=";") if row["split"] in ("train", "val")]
    labels = np.array([float(row[list(row)[2]]) >= 0.5 for row in rows])
    return [row["path"] for row in rows], np.array([row["split"] for row in rows]), labels


@torch.no_grad()
def features(weights: str, images: np.ndarray, backbone: str) -> np.ndarray:
    torch.manual_seed(0)
    model = ResNet(backbone, num_labels=1)
    if weights != "none":
        load_pretrained(model, weights)
    model.fc = torch.nn.Identity()
    model.eval()
    pixels = torch.from_numpy(images).float().div(255.0)[:, None]
    pixels = (pixels - pixels.mean()) / pixels.std()  # one mean/std for all: the probe rescales anyway
    return torch.cat([model(batch) for batch in pixels.split(64)]).numpy()


def probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray, val_y: np.ndarray) -> dict:
    scaler = StandardScaler().fit(train_x)
    classifier = LogisticRegression(C=0.1, class_weight="balanced", max_iter=5000)
    classifier.fit(scaler.transform(train_x), train_y)
    scores = classifier.predict_proba(scaler.transform(val_x))[:, 1]
    return {"val_acc": accuracy_score(val_y, scores >= 0.5), "val_f1": f1_score(val_y, scores >= 0.5),
            "val_auc": roc_auc_score(val_y, scores)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("split", help="split.csv of a protocol run (train and val rows are used)")
    parser.add_argument("weights", nargs="+", help="'none', a backbone .pth or an elcell checkpoint")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--shrink", default="bilinear", choices=SHRINKS,
                        help="decode as the weights were trained (elcell train --shrink)")
    args = parser.parse_args()
    paths, parts, labels = read_split(args.split)
    images = np.stack([load_cell(path, Decoding(args.image_size, args.shrink)) for path in paths])
    train, val = parts == "train", parts == "val"
    print("| backbone weights | probe val acc | probe val F1 | probe val AUC |")
    print("|---|---|---|---|")
    for weights in args.weights:
        x = features(weights, images, args.backbone)
        result = probe(x[train], labels[train], x[val], labels[val])
        print(f"| {weights} | {result['val_acc']:.3f} | {result['val_f1']:.3f} | {result['val_auc']:.3f} |")


if __name__ == "__main__":
    main()

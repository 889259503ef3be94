"""Shared fixtures: real ELPV cells, a seed-format CSV made from them, and one
tiny model trained once per test session (resnet18, 64 px, 64 cells)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep the tests' image caches out of the user's ~/.cache."""
    os.environ["ELCELL_CACHE"] = str(tmp_path_factory.mktemp("elcell-cache"))


@pytest.fixture(scope="session")
def elpv():
    from elcell.cells.labels import elpv_table

    return elpv_table()


def write_seed_csv(folder: Path, elpv, count: int = 64, sep: str = ";", seed: int = 0) -> Path:
    """A crack/inactive CSV in the seed format over real ELPV cells, copied into `folder`.

    ELPV has no crack/inactive columns; as stand-ins, `crack` is the expert's
    defect probability >= 0.5 and `inactive` is probability 1 (the clearest defects).
    """
    rng = np.random.default_rng(seed)
    probability = elpv.targets[:, 0]
    defective = np.flatnonzero(probability >= 0.5)
    intact = np.flatnonzero(probability < 0.5)
    rows = np.concatenate([rng.choice(defective, count // 2, replace=False),
                           rng.choice(intact, count - count // 2, replace=False)])
    (folder / "cells").mkdir(parents=True, exist_ok=True)
    lines = [sep.join(["path", "crack", "inactive"])]
    for i in rows:
        name = f"cells/{elpv.paths[i].name}"
        shutil.copy(elpv.paths[i], folder / name)
        lines.append(sep.join([name, str(int(probability[i] >= 0.5)), str(int(probability[i] == 1.0))]))
    csv_path = folder / "data.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    return csv_path


@pytest.fixture(scope="session")
def seed_csv(tmp_path_factory, elpv) -> Path:
    return write_seed_csv(tmp_path_factory.mktemp("seed"), elpv)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, seed_csv) -> Path:
    """A run folder from `elcell train` on 64 real cells: test_resnet, 32 px, 8 epochs
    of 6 steps (enough for its probabilities to spread over most of 0-1, so a
    decision does not flip on the last digit).

    Shared by every test that needs a trained model or its ONNX file. 32 px, the
    smallest size with a heatmap of more than one position a side (4 x 4 at
    stride 8), because almost every command the fast tier runs scores cells with it.
    """
    from elcell.training.config import TrainConfig
    from elcell.training.train import train

    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(TrainConfig.from_recipe("spec", data=str(seed_csv), out=str(out), backbone="test_resnet",
                                  pretrained="none", image_size=32, batch_size=8, epochs=8, lr=3e-3,
                                  val_fraction=0.25, progress=False))
    return out


@pytest.fixture(scope="session")
def tiny_onnx(tiny_run) -> Path:
    return next(tiny_run.glob("best_model_epoch*.onnx"))


@pytest.fixture(scope="session")
def model(tiny_onnx):
    """The tiny model open in ONNX Runtime, its idle threads not spin-waiting: tests
    share a few cores with each other (the service's threads too) and with other work."""
    from elcell.infer.runtime import open_model

    return open_model(tiny_onnx, spin=False)


@pytest.fixture(scope="session")
def seed_cells(seed_csv) -> list[Path]:
    """16 real ELPV cells of the seed CSV, half of them defective."""
    from elcell.cells.labels import read_labels_csv

    return list(read_labels_csv(seed_csv).paths[24:40])


@pytest.fixture()
def one_thread():
    """Small PyTorch models on one thread: reproducible sums, and no OpenMP stalls on a
    shared machine (two threads there made the Grad-CAM tests up to 40x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def cell_folder(tmp_path, elpv) -> Path:
    """12 real cells, some in a subfolder."""
    folder = tmp_path / "cells"
    (folder / "row2").mkdir(parents=True)
    for i, source in enumerate(elpv.paths[:12]):
        shutil.copy(source, folder / ("row2" if i % 2 else ".") / source.name)
    return folder

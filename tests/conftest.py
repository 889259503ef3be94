"""Shared fixtures: real ELPV cells, a seed-format CSV made from them, and one
tiny model trained once per test session (test_resnet, 32 px, 64 cells)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
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
def seed_csv() -> Path:
    return _TINY_RUN["csv"]


# The tiny run, built in a second process from the start of the session, while
# pytest collects and then runs the tests that need no model: on 2 cores its
# ~10 s (mostly the ONNX export's tracing, on one core) then cost the session
# almost nothing. Started by pytest_sessionstart, stopped at collection's end if
# no selected test needs it.
_TINY_RUN: dict = {}
# float32 on every CPU: with bf16 autocast (AVX512-BF16 CPUs) the tiny model comes out another
# network, and the tests that hold its probabilities to a photo's cut cells must pass on both kinds
TINY_RUN_OPTIONS = ["--recipe", "spec", "--backbone", "test_resnet", "--pretrained", "none", "--image-size", "32",
                    "--batch-size", "8", "--epochs", "8", "--lr", "3e-3", "--val-fraction", "0.25", "--no-progress",
                    "--precision", "32-true"]


def _needs_model(item: pytest.Item) -> bool:
    return "tiny_run" in getattr(item, "fixturenames", ())


def _die_with_pytest() -> None:
    """In the child: killed when pytest goes, however it goes (pytest-timeout's
    os._exit, a CI runner's SIGKILL), so no build outlives the session."""
    if sys.platform == "linux":
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def pytest_sessionstart(session):
    if session.config.option.collectonly:
        return
    from elcell.cells.labels import elpv_table

    # under pytest's own base temp, which keeps the last few sessions' and removes older ones
    folder = session.config._tmp_path_factory.mktemp("tiny-run")
    csv_path = write_seed_csv(folder / "seed", elpv_table())
    out = folder / "runs" / "tiny"
    # one thread: the other core collects and runs tests meanwhile
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ELCELL_CACHE": str(folder / "cache")}
    log = open(folder / "tiny.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "elcell.cli", "train", "--data", str(csv_path),
                                "--out", str(out), *TINY_RUN_OPTIONS], stdout=log, stderr=subprocess.STDOUT,
                               env=env, preexec_fn=_die_with_pytest)
    _TINY_RUN.update(folder=folder, csv=csv_path, out=out, process=process, log=log)


def pytest_collection_modifyitems(session, config, items):
    # tests that need no model first (stable: each group keeps its order), so
    # they run while the model is built
    items.sort(key=_needs_model)


def pytest_collection_finish(session):
    if _TINY_RUN and not any(_needs_model(item) for item in session.items):
        _TINY_RUN["process"].kill()


def pytest_sessionfinish(session):
    if _TINY_RUN:
        _TINY_RUN["process"].kill()
        _TINY_RUN["process"].wait()
        _TINY_RUN["log"].close()


@pytest.fixture(scope="session")
def tiny_run() -> Path:
    """A run folder from `elcell train` on 64 real cells: test_resnet, 32 px, 8 epochs
    of 6 steps (enough for its probabilities to spread over most of 0-1, so a
    decision does not flip on the last digit).

    Shared by every test that needs a trained model or its ONNX file. 32 px, the
    smallest size with a heatmap of more than one position a side (4 x 4 at
    stride 8), because almost every command the fast tier runs scores cells with it.
    """
    process, log = _TINY_RUN["process"], _TINY_RUN["folder"] / "tiny.log"
    if process.wait(timeout=600) != 0:
        pytest.fail(f"the tiny model's training failed (exit {process.returncode}):\n{log.read_text()[-3000:]}")
    return _TINY_RUN["out"]


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

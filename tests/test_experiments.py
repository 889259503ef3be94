"""The accuracy experiment scripts (experiments/accuracy/) on a tiny real protocol run."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from elcell.training.config import TrainConfig
from elcell.training.train import train

SCRIPTS = Path(__file__).resolve().parents[1] / "experiments" / "accuracy"

pytestmark = pytest.mark.slow  # trains models


@pytest.fixture(scope="module")
def protocol_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("experiments") / "E99-tiny"
    train(TrainConfig.from_recipe("spec", data="elpv", limit=96, out=str(out), backbone="resnet18", pretrained="none",
                      image_size=32, batch_size=16, epochs=1, val_fraction=0.2, test_fraction=0.25,
                      progress=False))
    return out


def run_script(name: str, *args) -> str:
    done = subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_table_row_holds_the_runs_summary_figures(protocol_run):
    summary = json.loads((protocol_run / "summary.json").read_text())
    rows = [line for line in run_script("table.py", protocol_run).splitlines() if line.startswith("| **E99**")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    assert cells[1:5] == [f"{summary[s]['defective'][m]:.3f}" for s in ("val", "test") for m in ("accuracy", "f1")]
    assert cells[-1] == "18, 32 px"


def test_errors_counts_the_test_cells_by_expert_probability(protocol_run, tmp_path):
    summary = json.loads((protocol_run / "summary.json").read_text())
    sheet = tmp_path / "missed.png"
    text = run_script("errors.py", protocol_run, "--missed", sheet)
    counts = [int(n) for n in re.findall(r"probability [\d.]+:\s+(\d+) cells", text)]
    assert sum(counts) == summary["cells"]["test"] == 24
    accuracy = float(re.search(r"binary accuracy ([\d.]+)", text).group(1))
    assert accuracy == pytest.approx(summary["test"]["defective"]["accuracy"], abs=5e-4)
    auc = float(re.search(r"ROC-AUC ([\d.]+)", text).group(1))
    assert auc == pytest.approx(summary["test"]["defective"]["roc_auc"], abs=5e-4)
    best = float(re.search(r"best accuracy at any threshold ([\d.]+)", text).group(1))
    assert accuracy <= best <= 1  # some threshold splits the cells as 0.5 does
    # the threshold applied to the test cells is the one that is best on the val cells
    applied = re.search(r"best threshold on the val cells [\d.]+ \(at ([\d.inf]+)\)", text).group(1)
    on_val = run_script("errors.py", protocol_run, "--split", "val")
    assert re.search(r"best accuracy at any threshold [\d.]+ \(at ([\d.inf]+);", on_val).group(1) == applied
    assert "val cells" not in on_val
    missed = int(re.search(r"(\d+) missed clear defects", text).group(1))
    with Image.open(sheet) as image:  # 6 cells of 150 px per row
        assert image.size == (900, 150 * max(1, -(-min(missed, 24) // 6)))


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_script", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_names_a_repeat_by_its_experiment_and_seed():
    short_name = load_script("table").short_name
    assert short_name(Path("runs/E03-rot90")) == "E03"
    assert short_name(Path("E29-R1-finetune-after-synthetic-init-seed1")) == "E29-R1"
    assert short_name(Path("R2-E03-init-seed2")) == "R2"
    assert short_name(Path("Q-quick-recipe")) == "Q"
    assert short_name(Path("my-run")) == "my-run"
    assert short_name(Path("Baseline-run")) == "Baseline-run"


def test_best_threshold_accuracy_finds_the_threshold_that_separates_best():
    best_threshold_accuracy = load_script("errors").best_threshold_accuracy

    probs = np.array([0.1, 0.3, 0.35, 0.4, 0.9])
    assert best_threshold_accuracy(probs, np.array([0, 0, 1, 1, 1], bool)) == (1.0, 0.35)
    assert best_threshold_accuracy(probs, np.zeros(5, bool)) == (1.0, np.inf)  # all called ok
    assert best_threshold_accuracy(probs, np.array([1, 0, 1, 0, 1], bool))[0] == 0.6  # no threshold fits


def test_errors_of_a_run_with_itself_is_the_run(protocol_run):
    alone = run_script("errors.py", protocol_run, "--split", "train").splitlines()[1:]
    twice = run_script("errors.py", protocol_run, protocol_run, "--split", "train").splitlines()[1:]
    assert alone == twice and len(alone) >= 3


def test_probe_scores_frozen_features_of_each_backbone_on_val_cells(protocol_run):
    checkpoint = protocol_run / "checkpoints" / "last.ckpt"
    out = run_script("probe.py", protocol_run / "split.csv", "none", checkpoint, "--image-size", "32")
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    for weights in ("none", str(checkpoint)):
        figures = [float(x) for x in rows[weights].strip("|").split("|")[1:]]
        assert len(figures) == 3 and all(0 <= x <= 1 for x in figures)


@pytest.mark.parametrize("config", sorted(SCRIPTS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_experiment_config_is_a_valid_train_config(config):
    import yaml

    values = yaml.safe_load(config.read_text())
    assert values["data"] == "elpv" or values["data"].startswith("runs/accuracy/")
    TrainConfig.from_dict(values, source=str(config))


def test_elpv_csv_all_gives_the_protocol_split_with_hard_labels(tmp_path):
    """E23 trains on this CSV and must hold out exactly the test quarter of --data elpv."""
    from elcell.cells.labels import load_table
    from elcell.training.data import stratified_split

    run_script("elpv_csv.py", "all", tmp_path / "all.csv")
    soft, hard = load_table("elpv"), load_table(str(tmp_path / "all.csv"), group="type")
    assert [str(p) for p in hard.paths] == [str(p) for p in soft.paths]
    assert set(np.unique(hard.targets)) == {0.0, 1.0}
    assert np.array_equal(hard.targets, soft.positives.astype(np.float32))
    assert np.array_equal(stratified_split(hard, 0.1, 0, 0.25), stratified_split(soft, 0.1, 0, 0.25))

"""Real DDP on CPU: two gloo processes train one epoch on real cells."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from elcell.cli import main

SCRIPT = textwrap.dedent('''
    """Run by the test; Lightning re-runs this file for rank 1 with rank 0's environment."""
    import hashlib, json, sys
    from pathlib import Path
    import lightning as L
    from elcell.training.config import TrainConfig
    from elcell.training.train import train

    class RecordCells(L.Callback):
        """Writes a hash of every training cell this rank saw to seen-rank{N}.json."""
        def __init__(self, folder):
            self.folder, self.seen = Path(folder), []
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            images = batch[0]
            # batch arrives augmented (flipped), so hash an orientation-free summary
            for image in images:
                self.seen.append(round(float(image.double().sum()), 3))
        def on_train_epoch_end(self, trainer, module):
            path = self.folder / f"seen-rank{trainer.global_rank}.json"
            path.write_text(json.dumps({"world": trainer.world_size, "seen": self.seen}))

    data, out, record = sys.argv[1:4]
    train(TrainConfig.from_recipe("spec", data=data, out=out, backbone="test_resnet", pretrained="none", image_size=32,
                      batch_size=8, epochs=1, devices="2", accelerator="cpu", progress=False,
                      brightness=0, contrast=0, val_fraction=0.25), callbacks=[RecordCells(record)])
''')

pytestmark = pytest.mark.slow  # trains models


def test_two_cpu_processes_share_the_work(tmp_path, seed_csv, capsys):
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, str(script), str(seed_csv), str(out), str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    ranks = [json.loads((tmp_path / f"seen-rank{r}.json").read_text()) for r in (0, 1)]
    assert all(rank["world"] == 2 for rank in ranks)
    seen0, seen1 = (rank["seen"] for rank in ranks)
    # 48 training cells, DistributedSampler gives each rank 24, in 3 batches of 8.
    assert len(seen0) == len(seen1) == 24
    assert not set(seen0) & set(seen1), "the ranks must see disjoint cells"
    assert len(set(seen0) | set(seen1)) == 48

    # Only rank 0 wrote the run's outputs, once.
    summary = json.loads((out / "summary.json").read_text())
    assert (out / summary["onnx"]).is_file() and (out / "losses.png").is_file()
    assert len(list(out.glob("*.onnx"))) == 1
    metrics = (out / "metrics.csv").read_text()
    assert "val_f1" in metrics

    # A checkpoint from 2 processes resumes in 1.
    code = main(["train", "--data", str(seed_csv), "--out", str(tmp_path / "resumed"),
                 "--backbone", "test_resnet", "--pretrained", "none", "--image-size", "32",
                 "--batch-size", "8", "--epochs", "2", "--devices", "1", "--val-fraction", "0.25",
                 "--no-progress", "--resume", str(out / "checkpoints" / "last.ckpt")])
    assert code == 0, capsys.readouterr().err
    resumed = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    assert resumed["epochs_run"] == 2


def test_validation_f1_counts_are_summed_across_ranks():
    """LabelF1 keeps counts as summed states: a 2-rank sync equals one process over all cells."""
    import torch

    from elcell.training.lightning_module import LabelF1

    rng = np.random.default_rng(0)
    probs, targets = torch.tensor(rng.random((40, 2))), torch.tensor(rng.random((40, 2)) > 0.6).float()
    whole, halves = LabelF1(2), [LabelF1(2), LabelF1(2)]
    whole.update(probs, targets)
    halves[0].update(probs[:20], targets[:20])
    halves[1].update(probs[20:], targets[20:])
    for name in ("tp", "fp", "fn"):  # what dist_reduce_fx="sum" does across ranks
        summed = getattr(halves[0], name) + getattr(halves[1], name)
        assert torch.equal(summed, getattr(whole, name))
    from sklearn.metrics import f1_score

    expected = f1_score(targets.numpy(), (probs.numpy() >= 0.5), average="weighted", zero_division=0)
    assert float(whole.compute()["weighted_f1"]) == pytest.approx(expected)


@pytest.mark.parametrize("devices", ["2", 2, "0,1", [0, 1]])
def test_more_gpus_than_the_machine_has_is_one_sentence_before_any_work(tmp_path, seed_csv, monkeypatch,
                                                                        devices):
    """On a one-GPU machine two GPUs, by count or by index, are refused with the
    count and the CPU alternative, and no run folder is left behind (found on a
    GPU machine: Lightning's own answer was a traceback after the cells were loaded)."""
    import torch

    from elcell.errors import DataError
    from elcell.training.config import TrainConfig
    from elcell.training.train import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    out = tmp_path / "run"
    with pytest.raises(DataError, match=r"--devices .*: this machine has 1 GPU\(s\) visible.*--accelerator cpu"):
        train(TrainConfig.from_recipe("spec", data=str(seed_csv), out=str(out), devices=devices, pretrained="none"))
    assert not out.exists()

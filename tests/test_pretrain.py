"""`elcell pretrain`: SimCLR on unlabelled cells, and fine-tuning from its backbone."""

from __future__ import annotations

import json
import math
import shlex
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from elcell.cli import main as cli
from elcell.errors import DataError
from elcell.training.data import stratified_split
from elcell.training.nets.build import ResNet, load_pretrained
from elcell.training.pretrain import SimCLRModule, nt_xent, pretrain, pretrain_cells
from elcell.training.pretrain_options import PretrainConfig

pytestmark = pytest.mark.slow  # trains models


def copy_cells(folder, elpv, count: int):
    """`count` real ELPV cells copied into `folder`: unlabelled images as a line records them."""
    folder.mkdir(parents=True)
    for path in elpv.paths[:count]:
        shutil.copy(path, folder / path.name)
    return folder


def test_nt_xent_matches_the_loss_written_out_and_scores_found_twins():
    torch.manual_seed(0)
    z = F.normalize(torch.randn(6, 8), dim=1)  # rows i and i+3 are one cell's two views
    loss, accuracy = nt_xent(z, temperature=0.5)
    similarity = z @ z.T / 0.5
    expected = []
    for i in range(6):
        partner = (i + 3) % 6
        others = [similarity[i, j] for j in range(6) if j != i]
        expected.append(-similarity[i, partner] + torch.logsumexp(torch.stack(others), 0))
    assert loss.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-5)

    twins = F.normalize(torch.eye(3, 8), dim=1).repeat(2, 1)  # identical views, orthogonal cells
    loss, accuracy = nt_xent(twins, temperature=0.1)
    assert accuracy.item() == 1.0
    # the partner is found with near-certainty: loss is the 4 orthogonal rows' share only
    assert loss.item() == pytest.approx(math.log(1 + 4 * math.exp(-10)), rel=1e-3)


def test_views_are_two_different_normalised_augmentations_of_each_cell():
    module = SimCLRModule("resnet18", mean=0.5, std=0.2, image_size=32)
    images = torch.randint(0, 256, (4, 1, 48, 48), dtype=torch.uint8)  # resized by the crop
    views = module.on_after_batch_transfer((images, torch.zeros(4, 0)), 0)
    assert views.shape == (8, 1, 32, 32)
    assert not torch.allclose(views[:4], views[4:])


def test_pretraining_leaves_out_exactly_the_test_cells_of_train(elpv):
    config = PretrainConfig(data="elpv", test_fraction=0.25, val_fraction=0.1, seed=0)
    kept = set(pretrain_cells(config))
    split = stratified_split(elpv, val_fraction=0.1, seed=0, test_fraction=0.25)
    assert kept == {p for p, part in zip(elpv.paths, split) if part != "test"}
    assert len(kept) == int((split != "test").sum()) < len(elpv)


def test_bad_inputs_fail_before_a_run_folder_exists(tmp_path, elpv):
    folder = copy_cells(tmp_path / "cells", elpv, 3)
    out = tmp_path / "run"
    with pytest.raises(DataError, match="need at least 8"):
        pretrain(PretrainConfig(data=str(folder), out=str(out), progress=False))
    listing = tmp_path / "cells.csv"
    listing.write_text("path\n" + "".join(f"cells/{p.name}\n" for p in elpv.paths[:3]))
    with pytest.raises(DataError, match="3 images to pretrain on"):
        pretrain(PretrainConfig(data=str(listing), out=str(out), progress=False))
    with pytest.raises(DataError, match="no such file"):
        pretrain(PretrainConfig(data=str(tmp_path / "missing"), out=str(out), progress=False))
    with pytest.raises(DataError, match="is a folder"):
        pretrain(PretrainConfig(data=str(folder), out=str(out), test_fraction=0.25, progress=False))
    with pytest.raises(DataError, match="crop-scale"):
        pretrain(PretrainConfig(data=str(folder), out=str(out), crop_scale=0.0, progress=False))
    with pytest.raises(DataError, match="--shrink 'nearest': choose from"):
        pretrain(PretrainConfig(data=str(folder), out=str(out), shrink="nearest", progress=False))
    with pytest.raises(DataError, match="--bit-depth 7: choose from"):
        pretrain(PretrainConfig(data=str(folder), out=str(out), bit_depth=7, progress=False))
    assert not out.exists()
    enough = copy_cells(tmp_path / "enough", elpv, 8)
    (tmp_path / "a-file").write_text("not a folder")
    for where, why in ((tmp_path / "a-file", "exists and is not a folder"),
                       (tmp_path / "a-file" / "run", "is a file, not a folder")):
        with pytest.raises(DataError, match=f"--out {where}: .*{why}"):
            pretrain(PretrainConfig(data=str(enough), out=str(where), progress=False))


def test_pretrain_on_a_folder_then_fine_tune_from_its_backbone(tmp_path, elpv, seed_csv, capsys):
    folder = tmp_path / "unlabelled"
    copy_cells(folder / "line2", elpv, 16)  # found recursively
    run = tmp_path / "ssl"
    assert cli(["pretrain", "--data", str(folder), "--out", str(run), "--image-size", "64",
                "--shrink", "min", "--batch-size", "8", "--epochs", "2", "--no-progress"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["cells"] == 16 and summary["epochs_run"] == 2
    assert np.isfinite(summary["final_ssl_loss"])
    use = json.loads(capsys.readouterr().out)["use"]
    assert use.endswith(f"--pretrained {run / 'backbone.pth'} --image-size 64 --shrink min")
    metrics = (run / "metrics.csv").read_text()
    assert "ssl_loss" in metrics and "pair_accuracy" in metrics

    # the backbone loads into a labelled model, every layer but the head
    model = ResNet("resnet18", num_labels=2)
    loaded = load_pretrained(model, str(run / "backbone.pth"))
    saved = torch.load(run / "backbone.pth", weights_only=True)
    assert set(loaded) == set(saved) and not any(key.startswith("fc.") for key in saved)
    assert torch.equal(model.layer4[1].conv2.weight, saved["layer4.1.conv2.weight"])

    fine_tuned = tmp_path / "fine-tuned"
    # the command pretrain printed, as a user pastes it (it names the backbone: the
    # default recipe's may be another)
    assert cli([*shlex.split(use)[1:], "--data", str(seed_csv), "--out", str(fine_tuned), "--batch-size", "16",
                "--epochs", "1", "--finetune-epochs", "0", "--no-progress"]) == 0
    assert (fine_tuned / "summary.json").is_file()


def test_a_used_run_folder_is_refused_before_any_work(tmp_path, elpv):
    folder = copy_cells(tmp_path / "cells", elpv, 8)
    out = tmp_path / "run"
    out.mkdir()
    (out / "summary.json").write_text("{}")
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="not empty"):
        pretrain(PretrainConfig(data=str(folder), out=str(out), cache_dir=str(cache), progress=False))
    assert not cache.exists() and [p.name for p in out.iterdir()] == ["summary.json"]

"""End-to-end `elcell train` on real ELPV cells: every output, ONNX parity, resume."""

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import lightning as L
import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml
from PIL import Image

from elcell.cells.images import Decoding, load_cell
from elcell.cells.labels import read_labels_csv
from elcell.cli import main
from elcell.errors import DataError
from elcell.infer.modelinfo import read_info
from elcell.infer.runtime import open_model
from elcell.training.config import TrainConfig
from elcell.training.data import pos_weights
from elcell.training.export import InferenceGraph, heatmap_difference
from elcell.training.lightning_module import ELCellModule
from elcell.training.train import train


def test_run_folder_holds_every_output(tiny_run):
    for name in ("config.yaml", "split.csv", "metrics.csv", "losses.png", "summary.json",
                 "checkpoints/last.ckpt"):
        assert (tiny_run / name).is_file(), name
    assert list((tiny_run / "tensorboard").glob("events.out.tfevents.*"))
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert (tiny_run / summary["best_checkpoint"]).is_file()
    assert summary["onnx"] == f"best_model_epoch{read_info(tiny_run / summary['onnx']).epoch}.onnx"
    # N counts from 1, as the log's "epoch N/E" does: the epoch of the best val_f1 in metrics.csv, plus one
    rows = [r for r in csv.DictReader(open(tiny_run / "metrics.csv")) if r.get("val_f1")]
    best = max(rows, key=lambda r: float(r["val_f1"]))
    assert summary["onnx"] == f"best_model_epoch{int(best['epoch']) + 1}.onnx"
    assert summary["best_checkpoint"].startswith(f"checkpoints/best-epoch{int(best['epoch']) + 1}-")
    assert summary["onnx_max_abs_diff"] <= 1e-4
    assert summary["cells"] == {"train": 48, "val": 16, "test": 0}
    assert yaml.safe_load((tiny_run / "config.yaml").read_text())["backbone"] == "test_resnet"
    with Image.open(tiny_run / "losses.png") as plot:
        assert plot.format == "PNG" and plot.size[0] > 400


def test_metrics_csv_has_losses_and_f1_per_epoch(tiny_run):
    rows = list(csv.DictReader(open(tiny_run / "metrics.csv")))
    epochs = {int(r["epoch"]) for r in rows if r.get("val_f1")}
    assert epochs == set(range(yaml.safe_load((tiny_run / "config.yaml").read_text())["epochs"]))
    columns = set(rows[0])
    for name in ("train_loss", "val_loss", "val_f1", "val_mean_f1", "val_recall_crack",
                 "val_precision_inactive", "val_f1_inactive"):
        assert name in columns, name


def test_onnx_file_is_uint8_in_probs_out_with_metadata(tiny_onnx, tiny_run):
    session = ort.InferenceSession(str(tiny_onnx))
    (inp,) = session.get_inputs()
    assert inp.name == "images" and inp.type == "tensor(uint8)" and inp.shape[1:] == [1, 32, 32]
    assert isinstance(inp.shape[0], str)  # dynamic batch
    assert [o.name for o in session.get_outputs()] == ["probs", "heatmap", "heatmap_coarse"]
    info = read_info(tiny_onnx)
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert info.labels == ["crack", "inactive"] and info.decoding.size == 32
    assert info.mean == pytest.approx(summary["mean"]) and info.thresholds == [0.5, 0.5]


def test_onnx_matches_pytorch_on_cells_it_never_saw(tiny_onnx, tiny_run, elpv, seed_csv):
    seen = {line.split(";")[0].split("/")[-1] for line in seed_csv.read_text().splitlines()[1:]}
    unseen = [p for p in elpv.paths if p.name not in seen][:7]
    cells = np.stack([load_cell(p, Decoding(32)) for p in unseen])[:, None]
    probs, heatmap, coarse = ort.InferenceSession(str(tiny_onnx)).run(None, {"images": cells})
    assert probs.shape == (7, 2) and ((probs >= 0) & (probs <= 1)).all()
    summary = json.loads((tiny_run / "summary.json").read_text())
    state = torch.load(tiny_run / summary["best_checkpoint"], weights_only=False)
    module = ELCellModule(**state["hyper_parameters"])
    module.load_state_dict(state["state_dict"])
    module.model.use_heatmap(read_info(tiny_onnx).extra["heatmap"])
    graph = InferenceGraph(module.model, module.hparams.mean, module.hparams.std).eval()
    with torch.no_grad():
        torch_probs, torch_heatmap, torch_coarse = graph(torch.from_numpy(cells))
    assert np.abs(probs - torch_probs.numpy()).max() <= 1e-4
    # on average within 1e-4 of the peak; a ReLU mask flipped by float rounding moves a few positions more
    assert heatmap_difference(heatmap, torch_heatmap.numpy()) <= 1e-4
    assert coarse.shape == (7, 2, 1, 1) and heatmap_difference(coarse, torch_coarse.numpy()) <= 1e-4  # 32 px / 32
    # the graph maps one view; the runtime averages the views as PyTorch's cam_views does
    model = open_model(tiny_onnx)
    assert model.graph_views == 1 and model.heatmap_views in (4, 8)
    module.model.cam_views = model.heatmap_views
    with torch.no_grad():
        _, averaged, _ = graph(torch.from_numpy(cells))
    runtime_probs, runtime_maps = model.run(cells[:, 0], heatmaps=True)
    assert np.abs(runtime_probs - probs).max() <= 1e-6  # the cells as given
    assert heatmap_difference(runtime_maps, averaged.numpy()) <= 1e-4
    assert heatmap_difference(runtime_maps, heatmap) > 1e-3  # the views did change the map
    np.testing.assert_allclose(model.run(cells[:, 0], heatmaps=True, views=1)[1], heatmap, atol=1e-6)


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint(tiny_run, seed_csv, tmp_path):
    out = tmp_path / "resumed"
    out.mkdir()
    (out / "best_model_epoch0.onnx").write_bytes(b"the best model of an earlier session")
    (out / "best_model_epoch0.int8.onnx").write_bytes(b"its int8 copy, not elcell train's to remove")
    trained = yaml.safe_load((tiny_run / "config.yaml").read_text())["epochs"]
    summary = train(TrainConfig.from_recipe("spec", data=str(seed_csv), out=str(out), backbone="test_resnet",
                                pretrained="none", image_size=64, batch_size=16, epochs=trained + 1, lr=1e-3,
                                val_fraction=0.25, progress=False,
                                resume=str(tiny_run / "checkpoints" / "last.ckpt")))
    before = list(csv.DictReader(open(tiny_run / "metrics.csv")))
    after = list(csv.DictReader(open(out / "metrics.csv")))
    # No epoch is repeated: the step counter carries on and only the one epoch added runs.
    assert min(int(r["step"]) for r in after) >= max(int(r["step"]) for r in before)
    assert {int(r["epoch"]) for r in after if r.get("epoch")} == {trained}
    assert summary["epochs_run"] == trained + 1
    # one model per run folder, so `predict RUN/best_model_epoch*.onnx` finds the right one
    assert sorted(p.name for p in out.glob("best_model_epoch*.onnx")) == sorted(
        [summary["onnx"], "best_model_epoch0.int8.onnx"])
    assert read_info(out / summary["onnx"]).labels == ["crack", "inactive"]


def test_a_moved_run_resumes_with_its_own_best_checkpoint(tiny_run, tmp_path, capsys):
    run = tmp_path / "moved"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("eval", "*.onnx"))
    last = run / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=False)
    for saved in state["callbacks"].values():  # as after `mv`: its record names a folder that is gone
        if "dirpath" in saved:
            gone = "/gone/run/checkpoints"
            saved.update(dirpath=gone, best_model_path=f"{gone}/{Path(saved['best_model_path']).name}",
                         best_k_models={f"{gone}/{Path(k).name}": v for k, v in saved["best_k_models"].items()})
    torch.save(state, last)
    assert main(["train", "--resume", str(last), "--no-progress"]) == 0  # no epoch left: it exports
    summary, original = (json.loads((folder / "summary.json").read_text()) for folder in (run, tiny_run))
    assert summary["best_checkpoint"] == original["best_checkpoint"]  # this folder's, the old best
    assert summary["best_val_f1"] == pytest.approx(original["best_val_f1"])
    assert (run / summary["onnx"]).is_file() and summary["onnx"] == original["onnx"]
    # resumed into a third folder with nothing left to train: the best is read where the run lies now
    third = tmp_path / "third"
    assert main(["train", "--resume", str(last), "--out", str(third), "--no-progress"]) == 0
    summary = json.loads((third / "summary.json").read_text())
    assert summary["onnx"] == original["onnx"]
    # its best score too, though Lightning restores the record only into the run's own folder
    assert summary["best_val_f1"] == pytest.approx(original["best_val_f1"])


@pytest.mark.slow
def test_a_onecycle_run_cannot_be_extended(tmp_path):
    config = TrainConfig.from_recipe("spec", data="elpv", limit=48, out=str(tmp_path / "run"), backbone="test_resnet",
                         pretrained="none", image_size=32, batch_size=16, epochs=1, schedule="onecycle",
                         progress=False)
    train(config)
    last = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    with pytest.raises(DataError, match="a --schedule onecycle run cannot change its number of steps"):
        train(replace(config, resume=last, epochs=2))  # it would step past OneCycleLR's end


def test_resume_from_a_file_that_is_not_a_checkpoint_names_it(elpv, tmp_path, capsys):
    from elcell.cli import main

    for name, content in (("cell.png", elpv.paths[0].read_bytes()), ("empty.ckpt", b"")):
        (tmp_path / name).write_bytes(content)
        # the default recipe has two stages, which --resume refuses; the file is named first
        assert main(["train", "--resume", str(tmp_path / name), "--out", str(tmp_path / "run")]) == 2
        assert f"--resume {tmp_path / name}: not a checkpoint of `elcell train`" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_export_names_bad_checkpoints_and_keeps_existing_files(tiny_run, tmp_path, capsys):
    from elcell.cli import main

    checkpoint = next((tiny_run / "checkpoints").glob("best-*.ckpt"))
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(checkpoint.read_bytes()[:5000])
    weights = tmp_path / "weights.pth"
    torch.save({"conv1.weight": torch.zeros(1)}, weights)
    for bad in (truncated, weights):
        assert main(["export", str(bad), "--out", str(tmp_path / "x.onnx")]) == 2
        assert f"{bad}: not a checkpoint of `elcell train`" in capsys.readouterr().err
    folder = tmp_path / "new" / "folder"
    assert main(["export", str(checkpoint), "--out", f"{folder}/"]) == 0
    exported = next(folder.glob("best_model_epoch*.onnx"))
    assert main(["export", str(checkpoint), "--out", f"{folder}/"]) == 2
    assert "exists: pass --overwrite" in capsys.readouterr().err
    assert main(["export", str(checkpoint), "--out", str(folder), "--overwrite"]) == 0
    assert [p.name for p in folder.iterdir()] == [exported.name]
    assert main(["export", str(exported), "--int8", "--calibration", "elpv", "--out", "y.onnx"]) == 2
    assert "name its int8 model with --int8-out" in capsys.readouterr().err


@pytest.mark.slow
def test_elpv_trains_on_soft_targets(tmp_path):
    summary = train(TrainConfig.from_recipe("spec", data="elpv", limit=64, out=str(tmp_path / "elpv"), backbone="test_resnet",
                                pretrained="none", image_size=32, batch_size=16, epochs=1,
                                val_fraction=0.25, progress=False))
    assert summary["labels"] == ["defective"]
    split = (tmp_path / "elpv" / "split.csv").read_text().splitlines()
    assert len(split) == 65
    soft = {float(line.split(";")[2]) for line in split[1:]}
    assert any(0 < value < 1 for value in soft)  # 1/3 and 2/3 kept as soft targets


def test_pos_weight_balances_classes():
    targets = np.array([[1, 0], [0, 0], [0, 1], [0, 1]], dtype=np.float32)
    assert pos_weights(targets) == [3.0, 1.0]
    assert pos_weights(np.array([[1 / 3], [2 / 3], [0.0]])) == pytest.approx([2.0])


def test_resumed_sessions_keep_earlier_epochs_in_metrics_csv(tmp_path):
    from elcell.training.history import merge_session_logs

    for session, text in (("0", "epoch,step,val_f1\n0,2,0.5\n1,5,0.6\n"),
                          ("1", "epoch,step,val_f1,train_loss\n2,8,0.7,0.3\n"),
                          ("10", "epoch,step,val_f1\n3,11,0.8\n")):
        (tmp_path / "logs" / session).mkdir(parents=True)
        (tmp_path / "logs" / session / "metrics.csv").write_text(text)
    rows = list(csv.DictReader(open(merge_session_logs(tmp_path))))
    assert [r["epoch"] for r in rows] == ["0", "1", "2", "3"]  # sessions in numeric order
    assert rows[2]["train_loss"] == "0.3" and rows[0]["train_loss"] == ""


@pytest.mark.slow
def test_last_checkpoint_is_written_after_every_epoch(tmp_path):
    """An interrupted run must have something to --resume from, whatever its scores."""
    seen = []

    class LookAtCheckpoints(L.Callback):
        def on_train_epoch_start(self, trainer, module):
            last = tmp_path / "run" / "checkpoints" / "last.ckpt"
            seen.append(torch.load(last, weights_only=False)["epoch"] if last.exists() else None)

    train(TrainConfig.from_recipe("spec", data="elpv", limit=48, out=str(tmp_path / "run"), backbone="test_resnet",
                      pretrained="none", image_size=32, batch_size=16, epochs=3, progress=False),
          callbacks=[LookAtCheckpoints()])
    assert seen == [None, 0, 1]


def test_pos_weight_none_leaves_the_loss_unweighted():
    targets = np.array([[1, 0], [0, 0], [0, 1], [0, 1]], dtype=np.float32)
    assert pos_weights(targets, "none") == [1.0, 1.0]


def test_warmup_cosine_rises_linearly_then_decays_to_zero():
    from elcell.training.lightning_module import warmup_cosine

    assert [warmup_cosine(s, 4, 20) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert warmup_cosine(4, 4, 20) == 1.0
    assert warmup_cosine(12, 4, 20) == pytest.approx(0.5)
    assert warmup_cosine(20, 4, 20) == pytest.approx(0.0)


@pytest.mark.slow
def test_protocol_run_scores_the_exported_model_on_val_and_test_per_cell_type(tmp_path):
    out = tmp_path / "protocol"
    summary = train(TrainConfig.from_recipe("spec", data="elpv", limit=96, out=str(out), backbone="test_resnet",
                                pretrained="none", image_size=32, batch_size=16, epochs=3,
                                val_fraction=0.2, test_fraction=0.25, optimizer="adamw",
                                weight_decay=0.05, schedule="cosine", warmup_epochs=1, rotate90=True,
                                affine_degrees=5, affine_translate=0.05, affine_scale=0.1, tta=True,
                                pooling="max", synthetic_cracks=0.5, synthetic_crack_shape="realistic",
                                progress=False))
    assert summary["onnx_max_abs_diff"] < 1e-4  # the max-pooled model exports faithfully
    hparams = torch.load(out / summary["best_checkpoint"], weights_only=True)["hyper_parameters"]
    assert hparams["pooling"] == "max" and hparams["synthetic_cracks"] == 0.5 and hparams["crack_label"] == 0
    assert hparams["synthetic_crack_shape"] == "realistic" and hparams["inactive_label"] is None  # ELPV: one label
    split = {line.split(";")[0]: line.split(";")[1] for line in (out / "split.csv").read_text().splitlines()[1:]}
    test_rows = list(csv.DictReader(open(out / "eval" / "test" / "predictions.csv"), delimiter=";"))
    assert len(test_rows) == summary["cells"]["test"] == summary["test"]["cells"] == 24
    assert {split[row["path"]] for row in test_rows} == {"test"}  # only held-out cells are scored
    # the run's own held-out cells in the training format, ELPV's soft labels kept, ready for the tools
    targets = {line.split(";")[0]: float(line.split(";")[2])
               for line in (out / "split.csv").read_text().splitlines()[1:]}
    for part in ("val", "test"):
        written = read_labels_csv(out / f"{part}.csv")
        assert sorted(map(str, written.paths)) == sorted(p for p, name in split.items() if name == part)
        assert written.names == ["defective"]
        assert written.targets[:, 0].tolist() == pytest.approx([targets[str(p)] for p in written.paths])
    assert main(["evaluate", str(out), "--data", str(out / "test.csv"), "--out", str(tmp_path / "again"),
                 "--no-progress"]) == 0
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert again["per_label"]["defective"]["accuracy"] == pytest.approx(
        json.loads((out / "eval" / "test" / "metrics.json").read_text())["without_tta"]["per_label"]["defective"]["accuracy"])
    test = summary["test"]
    assert test["tta"] is True and set(test["groups"]) == {"mono", "poly"}
    assert sum(g["cells"] for g in test["groups"].values()) == 24
    accuracy = np.mean([(float(r["prob_defective"]) >= 0.5) == (r["true_defective"] == "1")
                        for r in test_rows])
    assert test["defective"]["accuracy"] == pytest.approx(accuracy)
    assert json.loads((out / "eval" / "test" / "metrics.json").read_text())["tta"] is True
    # cosine: low during the warm-up epoch, at the peak after it, decaying after that
    rates = [float(r["lr-AdamW"]) for r in csv.DictReader(open(out / "metrics.csv")) if r.get("lr-AdamW")]
    assert len(rates) == 3 and rates[0] < rates[1] and rates[2] < rates[1] <= 1e-4


@pytest.mark.parametrize("option, value", [("schedule", "linear"), ("optimizer", "lion"),
                                           ("loss_weighting", "focal"), ("pooling", "sum"),
                                           ("input_norm", "histogram"), ("synthetic_crack_shape", "wavy"),
                                           ("shrink", "nearest"), ("bit_depth", 20)])
def test_unknown_recipe_choices_fail_before_a_run_folder_exists(tmp_path, option, value):
    from elcell.errors import DataError

    with pytest.raises(DataError, match=option.replace("_", "-")):
        train(TrainConfig.from_recipe("spec", data="elpv", limit=32, out=str(tmp_path / "run"), pretrained="none",
                          **{option: value}))
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_init_seed_keeps_the_split_and_changes_the_weights(tmp_path):
    def run(name, **seeds):
        out = tmp_path / name
        train(TrainConfig.from_recipe("spec", data="elpv", limit=48, out=str(out), backbone="test_resnet", pretrained="none",
                          image_size=32, batch_size=16, epochs=1, val_fraction=0.25, progress=False, **seeds))
        state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        return (out / "split.csv").read_text(), state["model.conv1.weight"]

    split_a, conv_a = run("a")
    split_b, conv_b = run("b", init_seed=1)
    split_c, conv_c = run("c", init_seed=0)
    assert split_a == split_b == split_c
    assert not torch.equal(conv_a, conv_b)
    assert torch.equal(conv_a, conv_c)  # init_seed equal to seed is the same run


def test_synthetic_cracks_need_a_probability_and_a_label_to_mark(tmp_path):
    from elcell.errors import DataError
    from elcell.training.augment import crack_label, label_index

    with pytest.raises(DataError, match="--synthetic-cracks 1.5"):
        train(TrainConfig.from_recipe("spec", data="elpv", limit=32, out=str(tmp_path / "run"), synthetic_cracks=1.5))
    assert not (tmp_path / "run").exists()
    assert crack_label(["inactive", "crack"], 0.2, shape="realistic") == 1
    assert crack_label(["Inactive", "Crack"], 0.2, shape="realistic") == 1  # a CSV's own spelling
    assert label_index(["Crack", "INACTIVE"], "inactive") == 1 and label_index(["crack"], "inactive") is None
    assert crack_label(["defective"], 0.2, shape="realistic") == 0
    with pytest.raises(DataError, match="'crack' or a single label"):
        crack_label(["finger", "inactive"], 0.2, shape="realistic")
    # broken fingers are defects, not cracks
    assert crack_label(["defective"], 0.2, shape="realistic+fingers") == 0
    assert crack_label(["crack", "inactive"], 0.0, shape="realistic+fingers") == 0  # nothing drawn
    with pytest.raises(DataError, match="not cracks"):
        crack_label(["crack", "inactive"], 0.2, shape="realistic+fingers")


@pytest.mark.slow
@pytest.mark.parametrize("schedule", ["onecycle", "plateau"])
def test_backbone_lr_scale_0_trains_the_head_on_a_frozen_backbone(tmp_path, schedule):
    start = {}

    class KeepStartWeights(L.Callback):
        def on_train_start(self, trainer, module):
            start.update({k: v.clone() for k, v in module.model.state_dict().items()})

    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="stays at its random initialisation"):
        train(TrainConfig.from_recipe("spec", data="elpv", limit=48, out=str(out), backbone="test_resnet", pretrained="none",
                          image_size=32, batch_size=16, epochs=2, optimizer="adamw", weight_decay=0.05,
                          schedule=schedule, backbone_lr_scale=0.0, progress=False),
              callbacks=[KeepStartWeights()])
    end = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    changed = {k for k, v in start.items() if not torch.equal(v, end["model." + k])}
    assert {k for k in changed if k.startswith("fc.")} == {k for k in start if k.startswith("fc.")}
    # only BatchNorm's running statistics move in the backbone, never a weight
    assert {k.rsplit(".", 1)[1] for k in changed if not k.startswith("fc.")} == {
        "running_mean", "running_var", "num_batches_tracked"}


@pytest.mark.slow
def test_backbone_lr_scale_holds_through_the_schedule_and_on_resume(tmp_path):
    from elcell.errors import DataError

    config = TrainConfig.from_recipe("spec", data="elpv", limit=48, out=str(tmp_path / "run"), backbone="test_resnet",
                         pretrained="none", image_size=32, batch_size=16, epochs=3, optimizer="adamw",
                         schedule="cosine", warmup_epochs=1, backbone_lr_scale=0.25, progress=False)
    train(config)
    rows = [r for r in csv.DictReader(open(tmp_path / "run" / "metrics.csv")) if r.get("lr-AdamW/head")]
    head = [float(r["lr-AdamW/head"]) for r in rows]
    backbone = [float(r["lr-AdamW/backbone"]) for r in rows]
    assert len(rows) == 3 and head[0] < head[1] and head[2] < head[1]  # warm-up, then decay
    assert backbone == pytest.approx([0.25 * lr for lr in head])
    last = str(tmp_path / "run" / "checkpoints" / "last.ckpt")
    with pytest.raises(DataError, match="--backbone-lr-scale 0.25; resume it with that value"):
        train(replace(config, resume=last, backbone_lr_scale=1.0, epochs=4))


def test_backbone_lr_scale_gives_the_backbone_its_own_learning_rate():
    from elcell.errors import DataError

    module = ELCellModule("test_resnet", ["crack"], 0.5, 0.2, [1.0], lr=1e-3, backbone_lr_scale=0.1)
    backbone, head = module._param_groups()
    assert (backbone["name"], backbone["lr"], head["name"], head.get("lr")) == ("backbone", pytest.approx(1e-4),
                                                                             "head", None)
    ids = [id(p) for p in backbone["params"] + head["params"]]
    assert sorted(ids) == sorted(id(p) for p in module.parameters())  # each parameter in one group
    assert {id(p) for p in head["params"]} == {id(p) for p in module.model.fc.parameters()}
    (one,) = ELCellModule("test_resnet", ["crack"], 0.5, 0.2, [1.0])._param_groups()
    assert "lr" not in one and len(one["params"]) == len(ids)  # the optimiser's lr for all
    with pytest.raises(DataError, match="--backbone-lr-scale nan"):
        train(TrainConfig.from_recipe("spec", data="elpv", limit=32, backbone_lr_scale=float("nan")))


@pytest.mark.slow
def test_ema_checkpoints_hold_the_average_of_the_trained_weights(tmp_path):
    decay, average = 0.8, {}

    class FollowTheAverage(L.Callback):
        """An independent EMA over the head's weight after every optimiser step."""

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            weight = module.model.fc[0].weight.detach().clone()
            average["fc"] = weight if "fc" not in average else decay * average["fc"] + (1 - decay) * weight

    out = tmp_path / "run"
    train(TrainConfig.from_recipe("spec", data="elpv", limit=48, out=str(out), backbone="test_resnet", pretrained="none",
                      image_size=32, batch_size=16, epochs=2, lr=1e-2, ema_decay=decay, progress=False),
          callbacks=[FollowTheAverage()])
    checkpoint = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    saved, trained = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert torch.allclose(saved["model.fc.0.weight"], average["fc"], atol=1e-6)
    assert not torch.allclose(saved["model.fc.0.weight"], trained["model.fc.0.weight"])
    # the best checkpoint, which is exported, holds an average too
    summary = json.loads((out / "summary.json").read_text())
    assert "current_model_state" in torch.load(out / summary["best_checkpoint"], weights_only=True)


@pytest.mark.slow
def test_ema_resume_goes_on_from_the_trained_weights_and_needs_the_average(tmp_path):
    from elcell.errors import DataError

    config = TrainConfig.from_recipe("spec", data="elpv", limit=48, out=str(tmp_path / "run"), backbone="test_resnet",
                         pretrained="none", image_size=32, batch_size=16, epochs=1, ema_decay=0.9,
                         progress=False)
    train(config)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(DataError, match="trained with --ema-decay; resume it with --ema-decay"):
        train(replace(config, resume=str(last), epochs=2, ema_decay=0.0))
    first = torch.load(last, weights_only=True)
    seen = {}

    class StartWeights(L.Callback):
        def on_train_start(self, trainer, module):
            seen["conv1"] = module.model.conv1.weight.detach().clone()

    train(replace(config, resume=str(last), epochs=2), callbacks=[StartWeights()])
    assert torch.equal(seen["conv1"], first["current_model_state"]["model.conv1.weight"])
    assert not torch.equal(seen["conv1"], first["state_dict"]["model.conv1.weight"])
    assert torch.load(last, weights_only=True)["epoch"] == 1


@pytest.mark.slow
def test_ema_decay_is_checked_and_must_match_on_resume(tmp_path):
    from elcell.errors import DataError

    with pytest.raises(DataError, match="--ema-decay 1.0 must be in"):
        train(TrainConfig.from_recipe("spec", data="elpv", limit=32, out=str(tmp_path / "bad"), ema_decay=1.0))
    assert not (tmp_path / "bad").exists()
    config = TrainConfig.from_recipe("spec", data="elpv", limit=48, out=str(tmp_path / "plain"), backbone="test_resnet",
                         pretrained="none", image_size=32, batch_size=16, epochs=1, progress=False)
    train(config)
    with pytest.raises(DataError, match="trained without --ema-decay; resume it without it"):
        train(replace(config, resume=str(tmp_path / "plain" / "checkpoints" / "last.ckpt"), epochs=2,
                      ema_decay=0.99))


def test_sgd_uses_nesterov_momentum_and_l2_weight_decay():
    module = ELCellModule("test_resnet", ["crack"], 0.5, 0.2, [1.0], lr=0.05, weight_decay=5e-4,
                          optimizer="sgd", schedule="plateau")
    optimizer = module.configure_optimizers()["optimizer"]
    assert isinstance(optimizer, torch.optim.SGD)
    group = optimizer.param_groups[0]
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.05, 0.9, True, 5e-4)


@pytest.mark.slow
def test_cell_input_norm_travels_into_the_onnx_model(tmp_path, elpv):
    """The standardisation runs in the graph, not in elcell's Python preprocessing:
    a darker exposure of a cell scores the same, where the same weights without
    it do not."""
    import onnx

    from elcell.training.export import export_onnx, info_from_hparams

    out = tmp_path / "run"
    summary = train(TrainConfig.from_recipe("spec", data="elpv", limit=48, out=str(out), backbone="test_resnet", pretrained="none",
                                image_size=64, batch_size=16, epochs=1, input_norm="cell", progress=False))
    nodes = [node.op_type for node in onnx.load(str(out / summary["onnx"])).graph.node]
    assert {"ReduceMean", "Sqrt", "Clip"} <= set(nodes[:nodes.index("Conv")])
    assert read_info(out / summary["onnx"]).extra["input_norm"] == "cell"

    state = torch.load(out / summary["best_checkpoint"], weights_only=False)
    module = ELCellModule(**state["hyper_parameters"])
    module.load_state_dict(state["state_dict"])
    module.model.input_norm = "dataset"  # the control: the same weights, no standardisation
    export_onnx(module.model, info_from_hparams(module.hparams, 0), tmp_path / "control.onnx")

    cells = np.stack([load_cell(p, Decoding(64)) for p in elpv.paths[:6]])[:, None]
    darker = np.round(cells * 0.6).astype(np.uint8)  # no clipping, only rounding
    change = {}
    for name, path in (("cell", out / summary["onnx"]), ("control", tmp_path / "control.onnx")):
        session = ort.InferenceSession(str(path))
        probs, darker_probs = (session.run(["probs"], {"images": x})[0] for x in (cells, darker))
        change[name] = np.abs(probs - darker_probs).max()
    # a one-epoch model barely reacts to its input, hence the small scales
    assert change["cell"] < 5e-5 and change["control"] > 2e-4


@pytest.mark.slow
def test_min_shrink_is_trained_on_and_stored_so_predict_and_explain_decode_alike(tmp_path, elpv):
    from elcell.infer.explain import write_explanations
    from elcell.infer.modelinfo import ModelInfo
    from elcell.infer.runtime import open_model, score_files

    out = tmp_path / "run"
    config = TrainConfig.from_recipe("spec", data="elpv", limit=48, out=str(out), backbone="test_resnet", pretrained="none",
                         image_size=64, batch_size=16, epochs=1, shrink="min", progress=False)
    summary = train(config)
    with open(out / "split.csv") as handle:  # the model's normalisation: the train cells as decoded
        train_cells = [row["path"] for row in csv.DictReader(handle, delimiter=";") if row["split"] == "train"]
    assert summary["mean"] == pytest.approx(np.mean([load_cell(p, Decoding(64, "min")) for p in train_cells]) / 255)
    model = open_model(out / summary["onnx"])
    assert model.info.decoding.shrink == "min" and model.info.to_props()["elcell_format"] == "2"
    paths = elpv.paths[:4]
    filtered, bilinear = (np.stack([load_cell(p, Decoding(64, shrink)) for p in paths]) for shrink in ("min", "bilinear"))
    scored = next(score_files(model, paths, batch_size=4, workers=0)).probs
    assert np.array_equal(scored, model.run(filtered))
    assert np.abs(scored - model.run(bilinear)).max() > 1e-5  # so the check of explain below can fail
    explained = write_explanations(model, paths, tmp_path / "explain").records
    assert np.allclose([[label["probability"] for label in r["labels"].values()] for r in explained],
                       scored, atol=1e-6)
    old = {k: v for k, v in model.info.to_props().items() if k != "shrink"}  # a model from before --shrink
    assert ModelInfo.from_props({**old, "elcell_format": "1"}).decoding.shrink == "bilinear"
    with pytest.raises(ValueError, match="format 4 is newer than this elcell's"):
        ModelInfo.from_props({**old, "elcell_format": "4"})
    with pytest.raises(ValueError, match="shrink 'lanczos' is not one of"):
        ModelInfo.from_props({**old, "shrink": '"lanczos"'})
    with pytest.raises(DataError, match="trained with --shrink min; resume it with that value"):
        train(replace(config, resume=str(out / "checkpoints" / "last.ckpt"), shrink="bilinear", epochs=2))


@pytest.mark.slow
def test_bit_depth_is_trained_on_and_stored_so_a_12bit_camera_is_read_alike_everywhere(tmp_path, elpv):
    """Cells from a 12-bit camera in 16-bit PNGs: trained and scored as the 8-bit
    cells they were made from, not as the near-black cells 0..65535 would give."""
    from conftest import write_seed_csv

    from elcell.infer.explain import write_explanations
    from elcell.infer.modelinfo import ModelInfo
    from elcell.infer.runtime import open_model, score_files

    labels = write_seed_csv(tmp_path / "twelve-bit", elpv, count=32)
    originals = {}
    for path in sorted((tmp_path / "twelve-bit" / "cells").iterdir()):
        originals[path] = np.asarray(Image.open(path))
        Image.fromarray(np.round(originals[path] * (4095 / 255)).astype(np.uint16)).save(path)
    out = tmp_path / "run"
    config = TrainConfig.from_recipe("spec", data=str(labels), out=str(out), backbone="test_resnet", pretrained="none",
                         image_size=64, batch_size=16, epochs=1, bit_depth=12, progress=False)
    summary = train(config)
    eight_bit = {path: np.asarray(Image.fromarray(pixels).resize((64, 64), Image.BILINEAR))
                 for path, pixels in originals.items()}
    with open(out / "split.csv") as handle:  # the model's normalisation: the train cells as decoded
        train_cells = [row["path"] for row in csv.DictReader(handle, delimiter=";") if row["split"] == "train"]
    assert summary["mean"] == pytest.approx(np.mean([eight_bit[Path(p)] for p in train_cells]) / 255)

    model = open_model(out / summary["onnx"])
    assert model.info.decoding.bit_depth == 12 and model.info.to_props()["elcell_format"] == "3"
    paths = sorted(originals)[:4]
    full_range = tmp_path / "full-range.png"  # a 16-bit camera's cell: beyond what this model reads
    Image.fromarray(originals[paths[0]].astype(np.uint16) * 257).save(full_range)
    scored = next(score_files(model, [*paths, full_range], batch_size=8, workers=0))
    assert np.array_equal(scored.probs[:4], model.run(np.stack([eight_bit[p] for p in paths])))
    top = int(originals[paths[0]].max()) * 257
    assert f"16-bit image with values up to {top}, above 0..4095" in scored.errors[4]
    assert np.isnan(scored.probs[4]).all()
    as_sixteen_bits = np.stack([load_cell(p, Decoding(64)) for p in paths])
    assert np.abs(scored.probs[:4] - model.run(as_sixteen_bits)).max() > 1e-5  # the check above can fail
    explained = write_explanations(model, paths, tmp_path / "explain").records
    assert np.allclose([[label["probability"] for label in r["labels"].values()] for r in explained],
                       scored.probs[:4], atol=1e-6)

    old = {**model.info.to_props(), "elcell_format": "2", "bit_depth": "8"}  # before --bit-depth: always 8
    assert ModelInfo.from_props(old).decoding.bit_depth == 16
    with pytest.raises(DataError, match="trained with --bit-depth 12; resume it with that value"):
        train(replace(config, resume=str(out / "checkpoints" / "last.ckpt"), bit_depth=16, epochs=2))


@pytest.mark.slow
def test_realistic_cracks_on_crack_inactive_cells_mark_both_labels(tmp_path, seed_csv):
    out = tmp_path / "run"
    train(TrainConfig.from_recipe("spec", data=str(seed_csv), out=str(out), backbone="test_resnet", pretrained="none",
                      image_size=32, batch_size=16, epochs=1, val_fraction=0.25, synthetic_cracks=0.5,
                      synthetic_crack_shape="realistic", progress=False))
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    names = state["hyper_parameters"]["label_names"]
    assert names[state["hyper_parameters"]["crack_label"]] == "crack"
    assert names[state["hyper_parameters"]["inactive_label"]] == "inactive"
    module = ELCellModule(**state["hyper_parameters"])  # as trained: cracks mark both labels
    torch.manual_seed(0)
    _, marked = module.synthetic_cracks(torch.full((64, 1, 32, 32), 0.5), torch.zeros(64, 2))
    crack, inactive = marked[:, names.index("crack")], marked[:, names.index("inactive")]
    assert crack.mean() == pytest.approx(0.5, abs=0.2) and 0 < inactive.sum() < crack.sum()
    assert (crack[inactive == 1] == 1).all()  # an area is only cut off by a crack


class FirstWeights(L.Callback):
    """Keeps the model's first convolution as training starts."""

    def on_train_start(self, trainer, module):
        self.conv1 = module.model.conv1.weight.detach().clone()


@pytest.mark.slow
def test_two_stages_fine_tune_the_pretext_backbone_on_the_real_labels_alone(tmp_path, seed_csv):
    out = tmp_path / "run"
    config = TrainConfig.from_recipe("spec", data=str(seed_csv), out=str(out), backbone="test_resnet", pretrained="none",
                         image_size=32, batch_size=16, epochs=1, val_fraction=0.25, warmup_epochs=2,
                         synthetic_cracks=0.5, synthetic_crack_shape="realistic", finetune_epochs=2,
                         finetune_lr=5e-4, progress=False)
    seen = FirstWeights()
    summary = train(config, callbacks=[seen])
    pretext = out / "pretext"
    first = yaml.safe_load((pretext / "config.yaml").read_text())
    second = yaml.safe_load((out / "config.yaml").read_text())
    assert (first["epochs"], first["synthetic_cracks"], first["finetune_epochs"]) == (1, 0.5, 0)
    assert (second["epochs"], second["lr"], second["warmup_epochs"], second["synthetic_cracks"]) == (2, 5e-4, 1, 0)
    assert yaml.safe_load((out / "two-stage.yaml").read_text())["finetune_epochs"] == 2  # how it was started
    assert (pretext / "split.csv").read_text() == (out / "split.csv").read_text()  # the same held-out cells
    # the callback saw the second stage only, and it started from the first stage's last weights
    pretext_state = torch.load(pretext / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert torch.equal(seen.conv1, pretext_state["model.conv1.weight"].float())
    assert summary["epochs_run"] == 2 and summary["pretext"]["run"] == "pretext"
    assert json.loads((out / "summary.json").read_text())["pretext"] == summary["pretext"]
    assert len(list(out.glob("*.onnx"))) == 1 and (out / "eval" / "val" / "metrics.json").is_file()

    with pytest.raises(DataError, match="not empty"):  # another command does not overwrite it
        train(replace(config, finetune_epochs=1))
    # the second stage failed: the same command again keeps the first stage and runs the second
    first_stage = (pretext / "summary.json").stat().st_mtime_ns
    for entry in out.iterdir():
        if entry.name not in ("pretext", "two-stage.yaml"):
            shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    assert train(config)["pretext"] == summary["pretext"]
    assert (pretext / "summary.json").stat().st_mtime_ns == first_stage and (out / "summary.json").is_file()
    with pytest.raises(DataError, match="--resume continues one stage"):
        train(replace(config, out=str(tmp_path / "other"), resume=str(out / "checkpoints" / "last.ckpt")))


def test_an_unfinished_first_stage_is_resumed_then_the_command_rerun(tmp_path, seed_csv):
    out = tmp_path / "run"
    (out / "pretext" / "checkpoints").mkdir(parents=True)
    config = TrainConfig.from_recipe("spec", data=str(seed_csv), out=str(out), finetune_epochs=2)
    (out / "two-stage.yaml").write_text(config.to_yaml())
    with pytest.raises(DataError, match="first stage did not finish: resume it with --resume .*pretext"):
        train(config)


def test_losses_plot_marks_the_kept_epoch_on_whole_epochs(tiny_run, tmp_path):
    from elcell.training.history import plot_losses

    figure = plot_losses(tiny_run / "metrics.csv", tmp_path / "losses.png", best_epoch=1)
    loss, f1 = figure.axes
    assert any(text.startswith("kept: epoch 2, F1 ") for text in f1.get_legend_handles_labels()[1])
    figure.canvas.draw()
    for ax in (loss, f1):
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)  # no epoch 1.5
    assert (tmp_path / "losses.png").is_file()


@pytest.mark.slow
def test_without_a_terminal_training_prints_a_line_per_epoch_not_progress_bars(tmp_path, seed_csv, capsys):
    from elcell.cli import main

    out = tmp_path / "run"
    assert main(["train", "--recipe", "quick", "--data", str(seed_csv), "--out", str(out), "--image-size", "32",
                 "--epochs", "2", "--batch-size", "16"]) == 0
    err = capsys.readouterr().err
    epochs = [line for line in err.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/2", "epoch 2/2"]
    assert all("val_f1" in line for line in epochs)
    assert "\r" not in err and "it/s" not in err  # no progress bar redrawn into a log
    assert "Checkpoint directory" not in err and "LeafSpec" not in err


def test_a_busy_machine_is_named_once_at_the_start(monkeypatch, capsys):
    import elcell.training.hardware

    hardware = elcell.training.hardware
    monkeypatch.setattr(hardware.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(hardware, "_looked_at_load", False)
    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (4.0, 3.0, 2.0))
    hardware.note_busy_machine()
    hardware.note_busy_machine()
    assert capsys.readouterr().err == ("elcell: note: this machine is busy (load 4.0 on 2 cores): training will "
                                       "take longer than the times given for an idle machine\n")
    # idle at the start: the load a k-fold run's next fold meets is its own previous fold's, not named
    monkeypatch.setattr(hardware, "_looked_at_load", False)
    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (0.2, 0.2, 0.2))
    hardware.note_busy_machine()
    monkeypatch.setattr(hardware.os, "getloadavg", lambda: (1.9, 1.5, 1.0))
    hardware.note_busy_machine()
    assert capsys.readouterr().err == ""


def test_a_run_record_stores_paths_absolute_so_it_works_from_any_folder(tmp_path, seed_csv, monkeypatch):
    from elcell.training.train import with_absolute_paths

    monkeypatch.chdir(seed_csv.parent)
    config = TrainConfig.from_recipe("quick", data=seed_csv.name, cache_dir=".", pretrained="none")
    absolute = with_absolute_paths(config)
    assert absolute.data == str(seed_csv.resolve()) and absolute.cache_dir == str(seed_csv.parent.resolve())
    assert absolute.pretrained == "none"  # a name, not a path, stays as it is
    assert with_absolute_paths(TrainConfig.from_recipe("quick", data="elpv")).data == "elpv"
    monkeypatch.chdir(tmp_path)  # from elsewhere, the record still names the file
    assert TrainConfig.from_dict(yaml.safe_load(absolute.to_yaml())).data == str(seed_csv.resolve())

"""`elcell train --from RUN` (fine-tuning with replay, new label columns) and
`elcell compare` of two real models: overlays of their disagreements and the
exit status a promotion is gated on. Real ELPV cells, real ONNX Runtime."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import write_seed_csv

from elcell.cli import main


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def new_line_csv(folder: Path, elpv, count: int = 32) -> Path:
    """Cells the tiny run never saw, labelled `crack` and a new column `severe`
    (the expert's probability 1), without `inactive`: a new line's review."""
    seed = write_seed_csv(folder, elpv, count=count, seed=7)
    rows = [line.split(";") for line in seed.read_text().splitlines()[1:]]
    path = folder / "new.csv"
    path.write_text("path;crack;severe\n" + "".join(f"{r[0]};{r[1]};{r[2]}\n" for r in rows))
    return path


def test_the_network_is_copied_and_a_new_label_gets_a_fresh_row(tiny_run, elpv, tmp_path):
    import torch

    from elcell.training.adapt import adapt_config, start_from_run, starting_checkpoint
    from elcell.training.lightning_module import ELCellModule

    config = adapt_config(str(tiny_run), data=str(new_line_csv(tmp_path, elpv)))
    checkpoint = starting_checkpoint(config)
    old = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    module = ELCellModule(backbone="resnet18", label_names=["crack", "inactive", "severe"], mean=0.1, std=0.2,
                          pos_weight=[1.0, 1.0, 1.0])
    fresh_row = module.model.state_dict()["fc.4.weight"][2].clone()
    start_from_run(module, checkpoint)
    state = module.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in old.items() if not k.startswith("fc.4"))
    assert torch.equal(state["fc.4.weight"][:2], old["fc.4.weight"]) and torch.equal(state["fc.4.bias"][:2],
                                                                                     old["fc.4.bias"])
    assert torch.equal(state["fc.4.weight"][2], fresh_row)  # the new label starts where a fresh head does
    assert module.hparams.mean == checkpoint["hyper_parameters"]["mean"] != 0.1
    # the options: the run's network and decoding, the adapt recipe's short schedule
    assert (config.backbone, config.image_size, config.recipe, config.epochs, config.replay) == \
        ("resnet18", 64, "adapt", 10, 0.5)


def test_replay_draws_old_train_and_val_cells_with_unknown_new_labels(tiny_run, elpv, tmp_path):
    from elcell.cells.labels import load_table
    from elcell.training.data import stratified_split
    from elcell.training.fromrun import replay_cells, with_replay

    new = load_table(new_line_csv(tmp_path, elpv))
    split = stratified_split(new, 0.25, seed=0)
    old = replay_cells(tiny_run, str(tiny_run))
    table, merged = with_replay(new, split, old, ["crack", "inactive"], share=0.5, seed=0)
    assert table.names == ["crack", "inactive", "severe"]
    replayed = np.arange(len(new), len(table))
    for part in ("train", "val"):  # as many old cells as new ones in each part
        assert (merged[replayed] == part).sum() == min((split == part).sum(), (np.asarray(old.groups) == part).sum())
    old_parts = dict(zip(map(str, old.paths), old.groups))
    assert all(old_parts[str(table.paths[i])] == merged[i] for i in replayed)  # never an old test cell
    assert np.isnan(table.targets[:len(new), 1]).all()  # the new line was not judged on `inactive`
    assert np.isnan(table.targets[replayed, 2]).all()  # nor the old one on `severe`
    assert not np.isnan(table.targets[replayed, :2]).any()


def test_replay_keeps_the_old_cells_label_mix_even_when_few_are_drawn():
    from elcell.training.fromrun import stratified_draw

    strata = np.array([[0, 0]] * 80 + [[1, 0]] * 14 + [[1, 1]] * 6)  # ELPV-like: inactive is rare
    drawn = stratified_draw(strata, 20, np.random.default_rng(0))
    assert len(set(drawn.tolist())) == 20 and (strata[drawn, 1] == 1).sum() == 1 and (strata[drawn, 0] == 1).sum() == 4
    assert len(stratified_draw(strata, 100, np.random.default_rng(1))) == 100


@pytest.mark.parametrize("case, message", [
    ("onnx", "an ONNX file holds no training state"),
    ("empty", "no checkpoint in"),
    ("backbone", "leave --backbone out"),
    ("no record", "give --replay 0"),
    ("recipe", "--recipe adapt is the schedule of `elcell train --from RUN`"),
    ("no data", "needs --data LABELS.csv"),
])
def test_from_refuses_what_it_cannot_fine_tune(case, message, tiny_run, tiny_onnx, elpv, tmp_path, capsys):
    data = new_line_csv(tmp_path, elpv, count=8)
    source, extra = str(tiny_run), []
    if case == "onnx":
        source = str(tiny_onnx)
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        source = str(tmp_path / "empty")
    elif case == "backbone":
        extra = ["--backbone", "resnet34"]
    elif case == "no record":  # a run folder whose split.csv was not kept
        shutil.copytree(tiny_run, tmp_path / "copy", ignore=shutil.ignore_patterns("split.csv"))
        source = str(tmp_path / "copy")
    argv = ["train", *([] if case == "no data" else ["--data", str(data)]), "--out", str(tmp_path / "out"), *extra]
    argv += ["--recipe", "adapt"] if case == "recipe" else ["--from", source]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and message in err
    assert not (tmp_path / "out").exists()


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open(), delimiter=";"))


@pytest.mark.slow
def test_from_fine_tunes_with_replay_and_exports_every_label(tiny_run, elpv, tmp_path, capsys):
    from elcell.infer.runtime import open_model

    data = new_line_csv(tmp_path, elpv)
    out = tmp_path / "adapted"
    code, _, err = run_cli(["train", "--from", str(tiny_run), "--data", str(data), "--out", str(out),
                            "--epochs", "1", "--no-progress"], capsys)
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["labels"] == ["crack", "inactive", "severe"]
    assert open_model(out / summary["onnx"]).info.labels == ["crack", "inactive", "severe"]
    rows = _rows(out / "split.csv")
    new = {str(p.resolve()) for p in (tmp_path / "cells").iterdir()}
    replayed = [r for r in rows if r["path"] not in new]
    assert replayed and all(r["severe"] == "" and r["inactive"] != "" for r in replayed)
    assert all(r["inactive"] == "" for r in rows if r["path"] in new)
    record = (out / "config.yaml").read_text()
    assert f"from_run: {tiny_run}" in record and "recipe: adapt" in record
    # an adaptation resumes as any run: the same cells drawn again, one more epoch
    code, _, err = run_cli(["train", "--resume", str(out / "checkpoints" / "last.ckpt"), "--epochs", "2",
                            "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads((out / "summary.json").read_text())["epochs_run"] == 2
    assert _rows(out / "split.csv") == rows


@pytest.fixture()
def lenient(tiny_onnx, seed_csv, tmp_path) -> Path:
    """The tiny model with thresholds lowered until every crack on seed_csv is
    caught: a second real model that decides many cells differently."""
    from elcell.cells.labels import load_table
    from elcell.infer.evaluate import evaluate
    from elcell.infer.runtime import open_model

    metrics = evaluate(open_model(tiny_onnx), load_table(seed_csv), tmp_path / "tuned",
                       tune_thresholds="recall=1.0", progress=False)
    return Path(metrics["tuning"]["model"])


def test_compare_draws_disagreements_and_gates_on_recall(tiny_onnx, lenient, seed_csv, tmp_path, capsys):
    # a cell whose name would be markup on the page
    odd = seed_csv.parent / "cells" / "a<b>&'.png"
    first = _rows(seed_csv)[0]
    shutil.copy(seed_csv.parent / first["path"], odd)
    data = tmp_path / "labels.csv"
    data.write_text(seed_csv.read_text().replace("path;crack;inactive\n", "path;crack;inactive\n"
                                                 f"{odd};{first['crack']};{first['inactive']}\n"))
    out = tmp_path / "cmp"
    code, stdout, _ = run_cli(["compare", str(lenient), str(tiny_onnx), "--data", str(data), "--out", str(out),
                               "--require", "recall=crack", "--overlays", "100"], capsys)
    assert code == 1 and "not promoted" in stdout  # the strict model misses cracks the lenient one caught
    result = json.loads((out / "compare.json").read_text())
    disagreeing = _rows(out / "disagreements.csv")
    assert result["disagreements"] == len(disagreeing) > 0
    assert result["overlays"] == sum((r[f"decision_a_{n}"] != r[f"decision_b_{n}"])
                                     for r in disagreeing for n in ("crack", "inactive"))
    page = (out / "disagreements.html").read_text()
    drawn = sorted((out / "overlays").glob("*.png"))
    assert len(drawn) == result["overlays"] and all(f'src="overlays/{p.name}"' in page for p in drawn)
    from PIL import Image

    with Image.open(drawn[0]) as sheet:  # two panels side by side
        assert sheet.width > 2 * sheet.height * 0.8
    if any(r["path"] == str(odd) for r in disagreeing):
        assert "a&lt;b&gt;&amp;&#x27;.png" in page and "a<b>" not in page
    # the other way round B is not worse: promoted
    code, _, _ = run_cli(["compare", str(tiny_onnx), str(lenient), "--data", str(data), "--require",
                          "recall=crack"], capsys)
    assert code == 0

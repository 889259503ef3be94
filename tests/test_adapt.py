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
import yaml
from conftest import write_seed_csv

from elcell.cli import main
from elcell.errors import DataError


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
    module = ELCellModule(backbone=config.backbone, label_names=["crack", "inactive", "severe"], mean=0.1, std=0.2,
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
    run = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert (config.backbone, config.image_size, config.recipe, config.epochs, config.replay, config.keep) == \
        (run["backbone"], run["image_size"], "adapt", 10, 0.5, "last")


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
    ("typo", "column 'Crack' differs from"),
    ("not a checkpoint", "fake.ckpt: not a checkpoint of `elcell train`"),
    ("resume", "starts a new fine-tuning: give one of them"),
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
    elif case == "typo":  # a misspelt column would become a new output
        data.write_text(data.read_text().replace("path;crack;", "path;Crack;", 1))
    elif case == "not a checkpoint":  # named itself, not a config.yaml of the folder it lies in
        (tmp_path / "fake.ckpt").write_text("not a checkpoint")
        source = str(tmp_path / "fake.ckpt")
    elif case == "resume":  # a run that was not a fine-tuning, resumed with --from
        extra = ["--resume", str(tiny_run / "checkpoints" / "last.ckpt")]
    elif case == "no record":  # a run folder whose split.csv was not kept
        shutil.copytree(tiny_run, tmp_path / "copy", ignore=shutil.ignore_patterns("split.csv"))
        source = str(tmp_path / "copy")
    argv = ["train", *([] if case == "no data" else ["--data", str(data)]), "--out", str(tmp_path / "out"), *extra]
    argv += ["--recipe", "adapt"] if case == "recipe" else ["--from", source]
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and message in err
    assert not (tmp_path / "out").exists()


def test_resume_with_from_takes_its_own_source_however_spelt_or_moved(tiny_run, tmp_path):
    from elcell.training.adapt import _resumes_from
    from elcell.training.fromrun import find_checkpoint

    run, other = tmp_path / "adapted", tmp_path / "other"
    for folder in (run, other):
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "checkpoints" / "last.ckpt").write_bytes(b"")
    last = str(run / "checkpoints" / "last.ckpt")
    (run / "config.yaml").write_text(yaml.safe_dump({"from_run": str(tiny_run)}))
    assert _resumes_from(last, str(tiny_run)) and _resumes_from(last, str(find_checkpoint(str(tiny_run))))
    assert not _resumes_from(last, str(other))  # another run than the one it fine-tuned
    (run / "config.yaml").write_text(yaml.safe_dump({"from_run": str(tmp_path / "moved-away")}))
    assert _resumes_from(last, str(tiny_run))  # the source moved: --from says where it went
    (run / "config.yaml").write_text(yaml.safe_dump({"from_run": str(tiny_run)}))
    with pytest.raises(DataError, match=f"--from {tmp_path / 'typo'}: "):  # its own error, not "give one"
        _resumes_from(last, str(tmp_path / "typo"))
    (run / "config.yaml").write_text(yaml.safe_dump({"epochs": 3}))
    assert not _resumes_from(last, str(tiny_run))  # not a fine-tuning at all
    (run / "config.yaml").write_text("from_run: [unclosed")
    assert not _resumes_from(last, str(tiny_run))  # an unreadable record: not known to be one


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open(), delimiter=";"))


@pytest.fixture(scope="module")
def adapted(tiny_run, elpv, tmp_path_factory) -> Path:
    """The tiny run fine-tuned for two epochs with --from on a new line's cells."""
    folder = tmp_path_factory.mktemp("adapt")
    data = new_line_csv(folder, elpv)
    out = folder / "adapted"
    assert main(["train", "--from", str(tiny_run), "--data", str(data), "--out", str(out), "--epochs", "2",
                 "--no-progress"]) == 0
    return out


@pytest.mark.slow
def test_from_fine_tunes_with_replay_and_exports_every_label(adapted, tiny_run, tmp_path, capsys):
    from elcell.infer.runtime import open_model

    summary = json.loads((adapted / "summary.json").read_text())
    assert summary["labels"] == ["crack", "inactive", "severe"]
    # adapt keeps the schedule's end, whatever the few validation cells said
    assert (summary["kept"], summary["best_checkpoint"], summary["onnx"]) == \
        ("last", "checkpoints/last.ckpt", "best_model_epoch2.onnx")  # epochs count from 1
    assert open_model(adapted / summary["onnx"]).info.labels == ["crack", "inactive", "severe"]
    rows = _rows(adapted / "split.csv")
    new = {str(p.resolve()) for p in (adapted.parent / "cells").iterdir()}
    replayed = [r for r in rows if r["path"] not in new]
    assert replayed and all(r["severe"] == "" and r["inactive"] != "" for r in replayed)
    assert all(r["inactive"] == "" for r in rows if r["path"] in new)
    record = (adapted / "config.yaml").read_text()
    assert f"from_run: {tiny_run}" in record and "recipe: adapt" in record
    # an adaptation resumes as any run (here a copy): the same cells drawn again, one more epoch
    copy = tmp_path / "copy"
    shutil.copytree(adapted, copy)
    code, _, err = run_cli(["train", "--resume", str(copy / "checkpoints" / "last.ckpt"), "--epochs", "3",
                            "--no-progress"], capsys)
    assert code == 0, err
    assert json.loads((copy / "summary.json").read_text())["epochs_run"] == 3
    assert _rows(copy / "split.csv") == rows


@pytest.fixture(scope="module")
def lenient(tiny_onnx, seed_csv, tmp_path_factory) -> Path:
    """The tiny model with thresholds lowered until every crack on seed_csv is
    caught: a second real model that decides many cells differently."""
    from elcell.cells.labels import load_table
    from elcell.infer.evaluate import evaluate
    from elcell.infer.runtime import open_model

    metrics = evaluate(open_model(tiny_onnx), load_table(seed_csv), tmp_path_factory.mktemp("tuned"),
                       tune_thresholds="recall=1.0", progress=False)
    return Path(metrics["tuning"]["model"])


@pytest.mark.slow
def test_compare_draws_disagreements_and_gates_on_recall(lenient, adapted, seed_csv, tmp_path, capsys):
    out = tmp_path / "cmp"
    code, stdout, _ = run_cli(["compare", str(lenient), str(adapted), "--data", str(seed_csv), "--out", str(out),
                               "--require", "recall=crack", "--overlays", "5"], capsys)
    # the adapted model, at 0.5, misses cracks the tiny one at its recall-1.0 threshold caught
    assert code == 1 and "not promoted" in stdout
    result = json.loads((out / "compare.json").read_text())
    disagreeing = _rows(out / "disagreements.csv")
    assert result["disagreements"] == len(disagreeing) > 5
    page = (out / "disagreements.html").read_text()
    drawn = sorted((out / "overlays").glob("*.png"))
    assert len(drawn) == result["overlays"] and all(f'src="overlays/{p.name}"' in page for p in drawn)
    assert len({p.stem.rsplit("_", 1)[0] for p in drawn}) == 5  # the five cells whose probability moved most
    change = {Path(r["path"]).stem: max(abs(float(r[f"prob_b_{n}"]) - float(r[f"prob_a_{n}"]))
                                        for n in ("crack", "inactive")) for r in disagreeing}
    assert page.index(f'src="overlays/{max(change, key=change.get)}_') < page.index("</table>")
    assert page.index(f'src="overlays/{max(change, key=change.get)}_') == page.index('src="overlays/')
    from PIL import Image

    with Image.open(drawn[0]) as sheet:  # A's panel beside B's
        assert sheet.width > 1.6 * sheet.height
    # the other way round B is not worse: promoted
    code, _, _ = run_cli(["compare", str(adapted), str(lenient), "--data", str(seed_csv), "--require",
                          "recall=crack"], capsys)
    assert code == 0


@pytest.mark.slow
def test_the_disagreements_page_keeps_file_names_as_text(tiny_onnx, lenient, seed_csv, tmp_path, capsys):
    _, out, _ = run_cli(["compare", str(lenient), str(tiny_onnx), "--data", str(seed_csv), "--out",
                         str(tmp_path / "one"), "--overlays", "0"], capsys)
    assert "the same weights with other thresholds" in out  # lenient: tiny_onnx with tuned thresholds
    row = _rows(tmp_path / "one" / "disagreements.csv")[0]  # a cell the two decide differently
    assert not (tmp_path / "one" / "overlays").exists()  # --overlays 0 draws none
    odd = tmp_path / "a<b>&'x.png"  # its copy, under a name that would be markup on the page
    shutil.copy(row["path"], odd)
    data = tmp_path / "labels.csv"
    data.write_text(f"path;crack;inactive\n{odd.name};{row['true_crack']};{row['true_inactive']}\n")
    code, _, _ = run_cli(["compare", str(lenient), str(tiny_onnx), "--data", str(data), "--out",
                          str(tmp_path / "two")], capsys)
    page = (tmp_path / "two" / "disagreements.html").read_text()
    assert code == 0 and "a&lt;b&gt;&amp;&#x27;x.png" in page and "a<b>" not in page
    # again into the same folder without drawings: the first run's are not left to mislead
    assert (tmp_path / "two" / "overlays").is_dir()
    run_cli(["compare", str(lenient), str(tiny_onnx), "--data", str(data), "--out", str(tmp_path / "two"),
             "--overlays", "0"], capsys)
    assert not (tmp_path / "two" / "overlays").exists() and not (tmp_path / "two" / "disagreements.html").exists()
    # a cell that cannot be read: compared on the rest, and no promotion on incomplete cells
    data.write_text(data.read_text() + "missing.png;0;0\n")
    code, out, err = run_cli(["compare", str(lenient), str(tiny_onnx), "--data", str(data), "--require",
                            "recall=crack"], capsys)
    assert code == 1 and "1 cell of " in err and "not promoted on incomplete cells" in err
    assert err.count("missing.png") == 1  # reported when the first model met it, not again for the second
    assert '{"required"' not in out  # no verdicts line a script could promote on

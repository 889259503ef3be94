"""The `elcell` command: help, configs, and one clear line for every bad input."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from elcell.cli import main
from elcell.options import flag
from elcell.training.config import TrainConfig

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--backbone", "test_resnet", "--image-size", "32", "--epochs", "1", "--pretrained", "none",
         "--no-progress", "--batch-size", "8", "--finetune-epochs", "0"]


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--recipe", "full", "--help"])
    text = capsys.readouterr().out
    for name in TrainConfig.__dataclass_fields__:
        assert any(flag(name, TrainConfig) + end in text for end in (" ", ",")), name
    assert "--from RUN" in text and "--from-run" not in text  # a field named by its own flag
    assert "--config" in text and "--print-config" in text
    assert "(default: resnet18)" in text and "(default: None)" not in text  # an unset option shows none


@pytest.mark.slow  # starts a process
def test_python_train_py_is_elcell_train():
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--print-config", "--lr", "0.5"],
                            capture_output=True, text=True, check=True)
    from elcell.training.config import default_recipe

    assert "lr: 0.5" in result.stdout and f"recipe: {default_recipe()}" in result.stdout


def test_train_without_options_is_train_config_and_spec_keeps_the_original_settings(capsys):
    from elcell.training.config import RUN_RECORD_KEY, default_recipe, recipe_defaults

    code, out, _ = run_cli(["train", "--print-config"], capsys)
    config = yaml.safe_load(out)
    assert code == 0 and config.pop(RUN_RECORD_KEY) == 2 and config["recipe"] == default_recipe()
    assert config == TrainConfig().__dict__  # one source of defaults: the CLI and the dataclass agree
    code, out, _ = run_cli(["train", "--recipe", "full", "--print-config"], capsys)
    full = yaml.safe_load(out)
    assert {k: full[k] for k in recipe_defaults("full")} == recipe_defaults("full") and full["pretrained"] == "none"
    for name in ("spec", "seed"):  # `seed` is the old name of the original specification's recipe
        code, out, _ = run_cli(["train", "--recipe", name, "--print-config"], capsys)
        spec = yaml.safe_load(out)
        assert spec["recipe"] == "spec"
        assert (spec["backbone"], spec["pretrained"], spec["image_size"], spec["lr"], spec["optimizer"],
                spec["schedule"], spec["flip_p"], spec["val_fraction"], spec["finetune_epochs"]) == \
            ("resnet50", "imagenet", 300, 1e-4, "adam", "plateau", 0.4, 0.1, 0)
    code, out, _ = run_cli(["train", "--recipe", "quick", "--print-config"], capsys)
    quick = yaml.safe_load(out)
    assert quick["epochs"] < full["epochs"] and quick["finetune_epochs"] == 0 < full["finetune_epochs"]
    assert "# two stages" not in out  # one stage: no second-stage comment


def test_help_shows_the_chosen_recipes_defaults(capsys):
    for recipe, epochs in (("full", 40), ("quick", 20)):
        with pytest.raises(SystemExit):
            main(["train", "--recipe", recipe, "--help"])
        text = capsys.readouterr().out
        assert f"maximum number of epochs (default: {epochs})" in " ".join(text.split())


def test_print_config_shows_the_second_stage_as_comments_and_still_reads_back(capsys, tmp_path):
    code, out, _ = run_cli(["train", "--recipe", "full", "--out", "runs/x", "--finetune-epochs", "7",
                            "--print-config"], capsys)
    comment = [line for line in out.splitlines() if line.startswith("#")]
    assert code == 0 and "into runs/x/pretext" in comment[0] and "into runs/x with" in comment[0]
    changed = yaml.safe_load("\n".join(line[2:] for line in comment[1:]))
    assert changed == {"pretrained": "runs/x/pretext/checkpoints/last.ckpt", "epochs": 7, "lr": 3e-4,
                       "warmup_epochs": 1, "patience": 7, "synthetic_cracks": 0.0}
    saved = tmp_path / "config.yaml"
    saved.write_text(out)
    code, again, _ = run_cli(["train", "--config", str(saved), "--print-config"], capsys)
    assert code == 0 and again == out


PROTOCOL = {"recipe", "data", "test_fraction", "val_fraction", "seed"}


def measured(name: str, folder: str = "accuracy") -> dict:
    """An experiment's settings from its YAML, without the protocol's data options."""
    path = REPO / "experiments" / folder / f"{name}.yaml"
    return {k: v for k, v in yaml.safe_load(path.read_text()).items() if k not in PROTOCOL}


def test_full_recipe_is_the_measured_winner_of_docs_accuracy(tmp_path):
    """The default must stay the configuration whose figures docs/accuracy.md
    shows: E48, which is E33's settings, then E35's fine-tuning of E33's
    backbone, on cells shrunk through a minimum filter."""
    from elcell.training.config import two_stage_configs

    full, e48 = TrainConfig.from_recipe("full"), measured("E48-full-min-downscale")
    assert {k: getattr(full, k) for k in e48} == e48 and full.shrink == "min"
    first, second = two_stage_configs(full, tmp_path / "run")
    e33, e35 = measured("E33-realistic-cracks-50pc"), measured("E35-finetune-40-epochs")
    assert {k: getattr(first, k) for k in e33} == e33
    assert e35.pop("pretrained") == "runs/accuracy/E33-realistic-cracks-50pc/checkpoints/last.ckpt"
    assert second.pretrained == str(tmp_path / "run" / "pretext" / "checkpoints" / "last.ckpt")
    assert {k: getattr(second, k) for k in e35} == e35
    assert second.synthetic_cracks == 0 and first.out == str(tmp_path / "run" / "pretext")
    assert first.shrink == second.shrink == "min"


def test_transfer_recipe_is_the_measured_transfer_run_t04():
    """The default with the ImageNet weights installed: T04 of docs/accuracy.md
    (from the spec's base values, as T04's YAML is), with K12's class weights."""
    transfer, t04 = TrainConfig.from_recipe("transfer"), measured("T04-lite0-225-20-epochs", "transfer")
    t04.pop("group")  # the cell type column of the experiment's data
    t04["recipe"] = "transfer"
    k12 = yaml.safe_load((REPO / "experiments" / "kfold" / "K12-transfer-sqrt.yaml").read_text())
    assert k12["recipe"] == "transfer" and t04["loss_weighting"] == "balanced"
    t04["loss_weighting"] = k12["loss_weighting"]  # the one change K12 measured against K07 (T04's settings)
    assert {k: getattr(transfer, k) for k in t04} == t04
    # the recall-first thresholds are chosen after training and change no weight
    after_training = {"threshold_recall": 0.95, "review_recall": 0.99, "threshold_estimator": "expected"}
    assert {k: getattr(transfer, k) for k in after_training} == after_training
    assert {k: v for k, v in transfer.__dict__.items() if k not in t04 and k not in after_training} == \
        {k: v for k, v in TrainConfig.from_recipe("spec").__dict__.items() if k not in t04 and k not in after_training}


def test_quick_recipe_is_the_measured_one_stage_recipe_cut_to_20_epochs():
    quick = TrainConfig.from_recipe("quick")
    e03 = {**measured("E03-rot90"), "epochs": 20, "patience": 20, "finetune_epochs": 0, "synthetic_cracks": 0.0}
    assert {k: getattr(quick, k) for k in e03} == e03


def test_resume_takes_the_options_of_the_run_it_continues(tiny_run, capsys):
    run_config = yaml.safe_load((tiny_run / "config.yaml").read_text())
    last = str(tiny_run / "checkpoints" / "last.ckpt")
    code, out, _ = run_cli(["train", "--resume", last, "--epochs", "5", "--print-config"], capsys)
    resumed = yaml.safe_load(out)
    assert code == 0 and resumed["epochs"] == 5 and resumed["resume"] == last
    assert {k: v for k, v in resumed.items() if k not in ("epochs", "resume", "out")} == \
        {k: v for k, v in run_config.items() if k not in ("epochs", "resume", "out")}


def test_resuming_a_run_older_than_an_option_keeps_what_the_run_did(tiny_run, tmp_path, capsys):
    """A run of the one-stage `full` recipe, from before two stages and crack shapes."""
    old = yaml.safe_load((tiny_run / "config.yaml").read_text())
    old = {k: v for k, v in old.items() if k not in ("finetune_epochs", "finetune_lr", "synthetic_crack_shape")}
    run = tmp_path / "old-run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({**old, "recipe": "full", "synthetic_cracks": 0.2}))
    last = str(run / "checkpoints" / "last.ckpt")
    code, out, _ = run_cli(["train", "--resume", last, "--print-config"], capsys)
    resumed = yaml.safe_load(out)
    assert code == 0 and resumed["recipe"] == "full" and resumed["synthetic_cracks"] == 0.2
    assert (resumed["finetune_epochs"], resumed["synthetic_crack_shape"]) == (0, "line")


def test_a_runs_config_yaml_repeats_that_run_even_after_the_recipe_changed(tiny_run, tmp_path, capsys):
    """A run of the one-stage `full` recipe, from before two stages and crack shapes:
    today's `full` must not add a second stage or realistic cracks to it."""
    old = yaml.safe_load((tiny_run / "config.yaml").read_text())
    old = {k: v for k, v in old.items() if k not in ("finetune_epochs", "finetune_lr", "synthetic_crack_shape")}
    old.update(recipe="full", synthetic_cracks=0.0, resume=str(tiny_run / "checkpoints" / "last.ckpt"))
    record = tmp_path / "config.yaml"
    record.write_text(yaml.safe_dump(old))
    code, out, _ = run_cli(["train", "--config", str(record), "--out", str(tmp_path / "again"), "--print-config"],
                           capsys)
    repeated = yaml.safe_load(out)
    assert code == 0 and repeated["finetune_epochs"] == 0 and repeated["synthetic_crack_shape"] == "line"
    assert repeated["resume"] is None  # from the start, even if the run was resumed
    assert {k: v for k, v in repeated.items() if k in old and k not in ("out", "resume")} == \
        {k: v for k, v in old.items() if k not in ("out", "resume")}
    # a hand-written file that names a few options still takes the rest from the recipe
    partial = tmp_path / "partial.yaml"
    partial.write_text("recipe: full\nepochs: 3\n")
    code, out, _ = run_cli(["train", "--config", str(partial), "--print-config"], capsys)
    assert code == 0 and yaml.safe_load(out)["finetune_epochs"] == 40


def test_config_file_sets_defaults_and_command_line_wins(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("backbone: resnet34\nbatch-size: 8\nlr: 0.01\n")
    code, out, _ = run_cli(["train", "--config", str(config), "--lr", "0.5", "--print-config"], capsys)
    assert code == 0
    assert "backbone: resnet34" in out and "batch_size: 8" in out and "lr: 0.5" in out
    config.write_text("colour: blue\n")
    code, _, err = run_cli(["train", "--config", str(config)], capsys)
    assert code == 2 and "unknown option(s) ['colour']" in err


@pytest.mark.parametrize(("line", "message"), [
    ("epochs: 2.5", "epochs: 2.5 is not a whole number"),
    ('rotate90: "no"', "rotate90: 'no' is not true or false"),
    ("batch-size: '8'", "batch_size: '8' is not a whole number"),
    ("lr: fast", "lr: 'fast' is not a number"),
    ("limit: [1, 2]", "limit: [1, 2] is not a whole number (or empty)"),
])
def test_config_values_of_the_wrong_type_are_refused_naming_file_and_key(tmp_path, capsys, line, message):
    config = tmp_path / "c.yaml"
    config.write_text(f"backbone: resnet34\n{line}\n")
    code, out, err = run_cli(["train", "--config", str(config), "--print-config"], capsys)
    assert code == 2 and out == ""
    assert err.splitlines() == [f"elcell: error: --config {config}: {message}"]


def test_config_values_read_as_the_command_line_reads_them(tmp_path, capsys):
    config = tmp_path / "c.yaml"  # YAML 1.1 reads 3e-4 as text and `no` as false; devices is text
    config.write_text("lr: 3e-4\nrotate90: no\ndevices: 2\nepochs: 7\nlimit: null\n")
    code, out, _ = run_cli(["train", "--config", str(config), "--print-config"], capsys)
    printed = yaml.safe_load(out)
    assert code == 0 and printed["lr"] == 3e-4 and printed["rotate90"] is False
    assert printed["devices"] == "2" and printed["epochs"] == 7 and printed["limit"] is None


def test_a_recipe_with_a_value_of_the_wrong_type_is_refused_naming_it(tmp_path, capsys, monkeypatch):
    from elcell.training import config

    for path in config.RECIPE_DIR.glob("*.yaml"):
        shutil.copy(path, tmp_path)
    recipe = yaml.safe_load((tmp_path / "quick.yaml").read_text())
    recipe["options"]["epochs"] = 2.5
    (tmp_path / "quick.yaml").write_text(yaml.safe_dump(recipe))
    monkeypatch.setattr(config, "RECIPE_DIR", tmp_path)
    config.recipes.cache_clear()
    try:
        code, _, err = run_cli(["train", "--recipe", "quick", "--print-config"], capsys)
    finally:
        config.recipes.cache_clear()  # the shipped recipes again for the other tests
    assert code == 2 and err.splitlines() == [f"elcell: error: {tmp_path / 'quick.yaml'}: epochs: 2.5 is not a whole number"]


def make_cells(tmp_path, elpv, count=16):
    (tmp_path / "cells").mkdir()
    lines = ["path;crack;inactive"]
    for i in range(count):
        name = f"cells/{i}.png"
        shutil.copy(elpv.paths[i], tmp_path / name)
        lines.append(f"{name};{i % 2};{int(i % 4 == 0)}")
    return lines


def assert_clean_failure(code, err, out_dir, *fragments):
    assert code == 2
    # a note may come first (training notes a busy machine: load from other processes)
    errors = [line for line in err.splitlines() if not line.startswith("elcell: note:")]
    assert errors and errors[0].startswith("elcell: error:") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err
    assert not out_dir.exists(), "a failed run must not leave a run folder behind"


@pytest.mark.parametrize("case", ["missing image", "corrupt png", "no labels", "non-binary label",
                                  "empty csv", "no positives in train", "too few to split", "offline weights"])
def test_bad_input_gets_one_clear_message(tmp_path, elpv, capsys, case):
    lines = make_cells(tmp_path, elpv)
    extra = []
    expect = []
    if case == "missing image":
        lines[5] = "cells/nowhere.png;1;0"
        expect = ["nowhere.png", "not found"]
    elif case == "corrupt png":
        (tmp_path / "cells" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
        expect = ["3.png", "not a readable image"]
    elif case == "no labels":
        lines = [line.split(";")[0] for line in lines]
        expect = ["data.csv", "only one column"]
    elif case == "non-binary label":
        lines[7] = "cells/6.png;1.5;0"
        expect = ["data.csv line 8", "label 'crack' is '1.5'"]
    elif case == "empty csv":
        lines = []
        expect = ["data.csv", "empty"]
    elif case == "no positives in train":
        lines = [lines[0]] + [line.rsplit(";", 1)[0] + ";0" for line in lines[1:]]
        expect = ["label 'inactive' has no positive example in the train split", "add positive cells"]
    elif case == "too few to split":  # both kinds in the file, but one cell each: the split takes one
        lines = lines[:3]
        expect = ["these cells have 1 positive and 1 negative ones, and the split left one kind out of train"]
    elif case == "offline weights":
        extra = ["--pretrained", "http://127.0.0.1:9/resnet18-f37072fd.pth"]
        expect = ["Could not download ImageNet weights", "--pretrained none"]
    csv_path = tmp_path / "data.csv"
    csv_path.write_text("\n".join(lines) + ("\n" if lines else ""))
    out = tmp_path / "run"
    code, _, err = run_cli(["train", "--data", str(csv_path), "--out", str(out), *QUICK, *extra], capsys)
    assert_clean_failure(code, err, out, *expect)


def test_an_out_that_is_a_file_is_refused_before_a_cell_is_read(tmp_path, elpv, capsys):
    lines = make_cells(tmp_path, elpv)
    lines[3] = "cells/nowhere.png;1;0"  # named first, were the cells read before --out is checked
    (tmp_path / "data.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    out.write_text("a file")
    code, _, err = run_cli(["train", "--data", str(tmp_path / "data.csv"), "--out", str(out), *QUICK], capsys)
    assert code == 2 and f"--out {out}: exists and is not a folder" in err and "nowhere" not in err


@pytest.mark.slow
def test_bad_input_exits_non_zero_without_traceback_in_a_real_process(tmp_path):
    csv_path = tmp_path / "data.csv"
    csv_path.write_text("path;crack\na.png;2\n")
    result = subprocess.run([sys.executable, "-m", "elcell.cli", "train", "--data", str(csv_path),
                             "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"elcell: error: {csv_path} line 2: label 'crack' is '2'; labels must be 0 or 1, or a soft label in [0, 1]"]


def test_existing_run_folder_is_not_overwritten(tmp_path, capsys, seed_csv):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    code, _, err = run_cli(["train", "--data", str(seed_csv), "--out", str(out), *QUICK], capsys)
    assert code == 2 and "not empty" in err and (out / "keep.txt").read_text() == "x"


def test_version_and_every_default_shown(capsys):
    from elcell import __version__

    with pytest.raises(SystemExit) as stopped:
        main(["--version"])
    assert stopped.value.code == 0 and capsys.readouterr().out.strip() == f"elcell {__version__}"
    for command, shown in ((["explain"], "(default: 0.5)"), (["export"], "(default: 200)"),
                           (["predict"], "(default: 16)")):
        with pytest.raises(SystemExit):
            main([*command, "--help"])
        assert shown in " ".join(capsys.readouterr().out.split()), command


def test_train_help_is_grouped(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    sections = [line[:-1] for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    from elcell.training.config import GROUPS

    assert [s for s in sections if s in GROUPS] == list(GROUPS)


def test_ctrl_c_says_how_to_resume(tmp_path, capsys, monkeypatch):
    import elcell.training.train

    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")

    def interrupted(config):
        raise KeyboardInterrupt

    monkeypatch.setattr(elcell.training.train, "main", interrupted)
    assert main(["train", "--recipe", "quick", "--out", str(run)]) == 130
    err = capsys.readouterr().err
    assert err.strip() == f"elcell: interrupted; continue with: elcell train --resume {run / 'checkpoints' / 'last.ckpt'}"

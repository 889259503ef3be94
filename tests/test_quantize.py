"""int8 export: static QDQ quantisation calibrated on real cells, checked against the float model."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import pytest

import elcell.infer.quantize as quantize_module
from elcell.cells.images import Decoding, load_cell
from elcell.cells.labels import load_table
from elcell.cli import main
from elcell.infer.cpuinfo import cpu_flags, has_vnni
from elcell.infer.modelinfo import INPUT_NAME, read_info
from elcell.infer.runtime import decide, open_model

pytestmark = pytest.mark.slow  # trains models


@pytest.fixture(scope="module")
def exported(tiny_run, seed_csv, tmp_path_factory):
    """`elcell export CKPT --int8` as a user runs it: float + int8 files and what it printed."""
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    checkpoint = next((tiny_run / "checkpoints").glob("best-*.ckpt"))
    status = main(["export", str(checkpoint), "--out", str(out), "--int8", "--calibration", str(seed_csv),
                   "--calibration-count", "32", "--no-progress"])
    return status, out, out.with_name("model.int8.onnx")


def test_int8_export_writes_a_quantised_model(exported, capsys):
    status, float_path, int8_path = exported
    assert status == 0 and float_path.is_file() and int8_path.is_file()
    graph = onnx.load(str(int8_path)).graph
    ops = {node.op_type for node in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= ops
    weights = {init.name: init for init in graph.initializer}
    per_channel = [node for node in graph.node if node.op_type == "DequantizeLinear"
                   and node.input[0] in weights and weights[node.input[0]].data_type == onnx.TensorProto.INT8
                   and len(weights[node.input[1]].dims) == 1 and weights[node.input[1]].dims[0] > 1]
    assert per_channel, "weights are quantised per output channel"
    info, float_info = read_info(int8_path), read_info(float_path)
    assert (info.labels, info.thresholds, info.decoding.size) == (float_info.labels, float_info.thresholds,
                                                               float_info.decoding.size)
    assert info.extra["quantization"]["calibration_cells"] == 32
    # 7-bit weights: no product pair can saturate ONNX Runtime's u8s8 kernels on CPUs without VNNI
    assert info.extra["quantization"]["reduce_range"] is True and info.extra["quantization"]["scheme"] == "qdq-u8-s7"
    int8_weights = [onnx.numpy_helper.to_array(w) for w in graph.initializer if w.data_type == onnx.TensorProto.INT8]
    assert int8_weights and max(int(np.abs(w.astype(np.int32)).max()) for w in int8_weights) <= 64

    # every convolution's weights are int8, a quarter of float ones; the heatmap's
    # backward pass through the last stage keeps its own int8 copy of that stage's
    # weights (about half of a ResNet's), so about half the float bytes, not a
    # quarter. The head's small matrices stay float.
    def conv_bytes(path, dtype):
        return sum(len(w.raw_data) for w in onnx.load(str(path)).graph.initializer
                   if len(w.dims) == 4 and w.data_type == dtype)

    assert conv_bytes(int8_path, onnx.TensorProto.FLOAT) == 0
    assert conv_bytes(int8_path, onnx.TensorProto.INT8) < 0.55 * conv_bytes(float_path, onnx.TensorProto.FLOAT)


def test_8bit_weights_are_recorded_and_warned_about_without_vnni(exported, seed_csv, tmp_path, monkeypatch):
    """The scheme that saturates without VNNI, kept for measuring it
    (benchmarks/int8_emulated_cpu.py): its file says so, and opening it on such a
    CPU warns."""
    import elcell.infer.runtime as runtime

    _, float_path, _ = exported
    cells = np.stack([load_cell(p, Decoding(read_info(float_path).decoding.size))
                      for p in load_table(str(seed_csv)).paths[:8]])
    path = quantize_module.quantize(float_path, tmp_path / "s8.onnx", cells, reduce_range=False)
    quantization = read_info(path).extra["quantization"]
    assert (quantization["scheme"], quantization["reduce_range"]) == ("qdq-u8-s8", False)
    int8_weights = [onnx.numpy_helper.to_array(w) for w in onnx.load(str(path)).graph.initializer
                    if w.data_type == onnx.TensorProto.INT8]
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in int8_weights) > 64  # the full 8-bit range
    monkeypatch.setattr(runtime, "has_vnni", lambda: False)
    with pytest.warns(UserWarning, match="without VNNI"):
        open_model(path)


def test_int8_agrees_with_float_on_real_cells(exported, elpv):
    _, float_path, int8_path = exported
    float_model, int8_model = open_model(float_path), open_model(int8_path)
    cells = np.stack([load_cell(p, Decoding(float_model.info.decoding.size)) for p in elpv.paths[-40:]])
    a, b = float_model.run(cells), int8_model.run(cells)  # batch of 40, cells not calibrated on
    assert np.abs(a - b).max() < 0.05
    assert (decide(a, float_model.info.thresholds, float_model.info.review_thresholds) == decide(b, float_model.info.thresholds, float_model.info.review_thresholds)).mean() >= 0.9
    # The same int8 graph run as its QDQ definition says (every node in float, no fused
    # int8 kernels): the same on every CPU. The fused kernels of this CPU must match it,
    # which 8-bit weights do not on CPUs without VNNI (they saturate there).
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    reference = ort.InferenceSession(str(int8_path), options, providers=["CPUExecutionProvider"])
    r = reference.run(["probs"], {INPUT_NAME: cells[:, None]})[0]
    assert np.abs(b - r).max() < 0.01, f"int8 kernels of this CPU ({cpu_flags() and has_vnni()}) differ"
    assert (decide(a, float_model.info.thresholds, float_model.info.review_thresholds) ==
            decide(r, float_model.info.thresholds, float_model.info.review_thresholds)).mean() >= 0.9
    _, heat_a = float_model.run(cells[:4], heatmaps=True)
    _, heat_b = int8_model.run(cells[:4], heatmaps=True)
    assert heat_a.shape == heat_b.shape
    # the coarse module map survives quantisation, and its probabilities are the probs session's
    assert int8_model.has_coarse
    probs_b, coarse_b = int8_model.run(cells[:4], heatmaps=True, views=1, detail="coarse")
    assert coarse_b.shape == float_model.run(cells[:4], heatmaps=True, views=1, detail="coarse")[1].shape
    assert np.abs(probs_b - b[:4]).max() < 1e-5 and np.isfinite(coarse_b).all()


def test_recall_drop_refused_unless_allowed(exported, seed_csv, tmp_path, monkeypatch, capsys):
    """Quantising an ONNX file (no checkpoint, no torch) with a forced recall drop."""
    _, float_path, _ = exported
    real_compare = quantize_module.compare

    def worse(*args, **kwargs):
        comparison = real_compare(*args, **kwargs)
        label = next(iter(comparison["per_label"]))
        comparison["per_label"][label]["recall_int8"] -= 0.05
        comparison["per_label"][label]["recall_drop"] += 0.05
        comparison["per_label"][label]["positives"] = max(1, comparison["per_label"][label]["positives"])
        comparison["per_label"][label]["drop_p_value"] = 0.001  # and beyond chance
        return comparison

    monkeypatch.setattr(quantize_module, "compare", worse)
    out = tmp_path / "refused.int8.onnx"
    args = ["export", str(float_path), "--int8", "--calibration", str(seed_csv), "--calibration-count", "16",
            "--int8-out", str(out), "--no-progress"]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert "recall drops" in captured.err and "--allow-recall-drop" in captured.err
    assert "F1 fp32" in captured.out  # the comparison is shown before refusing
    assert not out.exists() and not list(tmp_path.glob(".*"))
    assert main(args + ["--allow-recall-drop"]) == 0
    assert open_model(out).info.labels == load_table(seed_csv).names
    assert main(["export", str(float_path), "--int8"]) == 2  # no calibration data
    assert main(["export", str(float_path)]) == 2  # an ONNX file has nothing to re-export


def test_int8_keeps_the_per_cell_standardisation_in_float(seed_csv, elpv, tmp_path):
    """--input-norm cell divides by the cell's standard deviation: quantised, a
    blank cell's zero deviation (and the floor that guards it) would round away."""
    from elcell.training.config import TrainConfig
    from elcell.training.train import train

    summary = train(TrainConfig.from_recipe("spec", data=str(seed_csv), out=str(tmp_path / "run"), backbone="resnet18",
                                pretrained="none", image_size=64, batch_size=16, epochs=1, input_norm="cell",
                                progress=False))
    float_path = tmp_path / "run" / summary["onnx"]
    cells = np.stack([load_cell(p, Decoding(64)) for p in elpv.paths[:24]])
    int8_path = quantize_module.quantize(float_path, tmp_path / "model.int8.onnx", cells, source="test")
    nodes = [node.op_type for node in onnx.load(str(int8_path)).graph.node]
    before_quantising = set(nodes[:nodes.index("QuantizeLinear")])
    assert {"ReduceMean", "Sqrt", "Clip", "Div"} <= before_quantising
    float_model, int8_model = open_model(float_path), open_model(int8_path)
    blank = np.full((2, 64, 64), 128, dtype=np.uint8)
    for batch in (blank, cells[:8]):
        a, b = float_model.run(batch), int8_model.run(batch)
        assert np.isfinite(b).all() and np.abs(a - b).max() < 0.05


def test_an_unreadable_calibration_cell_is_named_once(exported, seed_csv, tmp_path, capsys):
    """Calibrated and compared on the same cells, a broken one is named once on
    stderr; with other --eval-data cells, the comparison names it."""
    import shutil

    _, float_path, _ = exported
    shutil.copytree(seed_csv.parent, tmp_path / "data")
    broken = tmp_path / "data" / load_table(str(seed_csv)).paths[0].relative_to(seed_csv.parent)
    broken.write_bytes(b"not a png")
    args = ["export", str(float_path), "--int8", "--calibration", str(tmp_path / "data" / "data.csv"),
            "--calibration-count", "64", "--int8-out", str(tmp_path / "model.int8.onnx"), "--no-progress"]
    assert main(args) == 1  # written from the others, and the status says one was left out
    assert (tmp_path / "model.int8.onnx").is_file()
    captured = capsys.readouterr()
    assert captured.err.count("(skipped)") == 1 and str(broken) in captured.err and str(broken) not in captured.out
    assert main([*args, "--eval-data", str(seed_csv)]) == 2  # the int8 model is there already
    assert "exists: pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--eval-data", str(seed_csv), "--overwrite"]) == 1
    captured = capsys.readouterr()
    assert str(broken) not in captured.err
    assert f"1 calibration image(s) could not be read and were left out: {broken}" in captured.out
    assert main(["export", str(tmp_path / "model.int8.onnx"), "--int8", "--calibration", str(seed_csv),
                 "--int8-out", str(tmp_path / "twice.onnx")]) == 2
    assert "is already an int8 model" in capsys.readouterr().err


def test_quantising_needs_neither_torch_nor_sympy(exported, elpv, tmp_path):
    """As on an inspection PC: sympy arrives only with PyTorch. In a fresh process,
    because this one imported torch long ago (training the tiny model): blocking it
    here would not stop modules already holding it."""
    import subprocess
    import sys

    _, float_path, _ = exported
    # the packages look absent, as on that PC (a None in sys.modules instead would
    # break libraries that look torch up there, scipy.stats among them)
    script = f"""
import importlib.abc
import sys
class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("torch", "sympy") or name == "onnxruntime.tools.symbolic_shape_infer":
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, NotInstalled())
import numpy as np
from elcell.cells.images import Decoding, load_cell
from elcell.infer.quantize import quantize
from elcell.infer.runtime import open_model
cells = np.stack([load_cell(p, Decoding({read_info(float_path).decoding.size})) for p in {[str(p) for p in elpv.paths[:16]]!r}])
path = quantize({str(float_path)!r}, {str(tmp_path / "model.int8.onnx")!r}, cells, source="test")
print(open_model(path).run(cells[:2]).shape, sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "sympy")))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["(2,", "2)", "[]"]


def test_calibration_cells_are_decoded_as_the_model_shrinks_them(seed_csv):
    table = load_table(str(seed_csv))
    plain, _ = quantize_module.calibration_cells(table, Decoding(64), count=8, seed=3)
    filtered, _ = quantize_module.calibration_cells(table, Decoding(64, "min"), count=8, seed=3)
    assert plain.shape == filtered.shape == (8, 64, 64)
    assert filtered.mean() < plain.mean() - 2  # the same cells, dark lines widened (about 5 grey levels)


def test_a_csv_begun_with_the_float_model_is_not_continued_with_its_int8_model(exported, seed_csv, tmp_path,
                                                                                 capsys):
    """The int8 model decides almost alike, so re-scored probabilities cannot tell the two apart;
    the hash of the weights in every row can."""
    _, float_path, int8_path = exported
    cells = [line.split(";")[0] for line in seed_csv.read_text().splitlines()[1:]]
    first = tmp_path / "first.csv"
    first.write_text("path\n" + "\n".join(str(seed_csv.parent / c) for c in cells[:20]) + "\n")
    out = tmp_path / "preds.csv"
    assert main(["predict", str(float_path), str(first), "--out", str(out), "--no-progress"]) == 0
    before = out.read_text()
    assert main(["predict", str(int8_path), str(seed_csv), "--out", str(out), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "written by another model" in err and int8_path.name in err
    assert out.read_text() == before
    assert main(["predict", str(float_path), str(seed_csv), "--out", str(out), "--resume", "--no-progress"]) == 0


def test_a_run_folder_is_quantised_as_its_best_model(tiny_run, seed_csv, tmp_path, capsys):
    """`elcell export RUN --int8`, as predict takes RUN: its best ONNX model is quantised."""
    out = tmp_path / "run.int8.onnx"
    assert main(["export", str(tiny_run), "--int8", "--calibration", str(seed_csv), "--calibration-count", "16",
                 "--int8-out", str(out), "--no-progress"]) == 0
    best = next(tiny_run.glob("best_model_epoch*.onnx"))
    assert read_info(out).extra["quantization"]["float_model"] == best.name
    assert main(["export", str(tiny_run)]) == 2  # without --int8 there is nothing to do: said so
    err = capsys.readouterr().err  # with the way on: its val.csv calibrates, its checkpoint exports again
    best = json.loads((tiny_run / "summary.json").read_text())["best_checkpoint"]  # the model's, not last.ckpt
    assert "already ONNX: pass --int8 to quantise it" in err and f"give {tiny_run / best} to export it again" in err
    model = tiny_run / json.loads((tiny_run / "summary.json").read_text())["onnx"]
    assert main(["export", str(model)]) == 2  # the run's model named as a file: the same way back
    assert f"give {tiny_run / best} to export it again" in capsys.readouterr().err



def test_a_failed_parity_check_keeps_the_checkpoint_and_says_how_to_export(tiny_run, tmp_path, capsys):
    checkpoint = next((tiny_run / "checkpoints").glob("best-*.ckpt"))
    out = tmp_path / "strict.onnx"
    # no export matches PyTorch within a negative tolerance: the check must fail
    assert main(["export", str(checkpoint), "--out", str(out), "--parity-tolerance", "-1"]) == 2
    err = capsys.readouterr().err
    assert "does not match PyTorch" in err and f"elcell export {checkpoint} --parity-tolerance" in err
    assert checkpoint.is_file() and not out.exists()
    assert main(["export", str(checkpoint), "--out", str(out), "--parity-tolerance", "1e-3"]) == 0
    assert out.is_file()

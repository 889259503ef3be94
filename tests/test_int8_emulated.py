"""int8 on a CPU without VNNI, whatever CPU the tests run on: ONNX Runtime run
under QEMU's user-mode emulation of an AMD EPYC-Milan (Zen 3: AVX2, no
AVX-512, no VNNI), so its int8 convolutions take the u8s8 kernels that
multiply pairs into int16 with saturation (vpmaddubsw).

A convolution whose uint8 activations and int8 weights are both at the top of
their range is where a pair of products (2 x 255 x 127 = 64,770) overflows
int16. With 8-bit weights the emulated Zen 3 must differ from the QDQ graph
run in float (the definition of the int8 model, the same on every CPU), which
shows the emulation reaches the kernels that saturate; with elcell's 7-bit
weights (2 x 255 x 63 = 32,130) it must not differ.

Needs `qemu-x86_64` (Debian's qemu-user 7.2 or later, which emulates AVX2;
installed by .ci/run); skipped, with the reason, where it is missing or does
not run this Python as that CPU."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

QEMU = shutil.which("qemu-x86_64")
CPU = "EPYC-Milan"  # AMD Zen 3, the CPU without VNNI
pytestmark = [pytest.mark.slow,  # two emulated Pythons
              pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 not installed (apt-get install qemu-user)")]

# The CPU features an emulated process sees (numpy's runtime dispatch reads CPUID).
FEATURES = """
try:
    from numpy._core._multiarray_umath import __cpu_features__ as cpu
except ImportError:  # numpy 1.x
    from numpy.core._multiarray_umath import __cpu_features__ as cpu
print(" ".join(k for k in ("AVX2", "AVX512F", "AVX512VNNI") if cpu.get(k)))
"""
# Then the model on the input, in the same emulated process.
SCORE = FEATURES + """
import sys, numpy as np, onnxruntime as ort
session = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
np.save(sys.argv[3], session.run(None, {"x": np.load(sys.argv[2])})[0])
"""


@pytest.fixture(scope="module")
def emulated_cpu():
    """Skip unless QEMU runs this Python as a CPU with AVX2 and neither AVX-512 nor VNNI."""
    try:
        done = subprocess.run([QEMU, "-cpu", CPU, sys.executable, "-c", FEATURES], capture_output=True, text=True,
                              timeout=120)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"qemu-x86_64 -cpu {CPU} does not run {sys.executable}: {err}")
    if done.returncode != 0 or done.stdout.split() != ["AVX2"]:
        pytest.skip(f"qemu-x86_64 -cpu {CPU} is not an AVX2 CPU without VNNI here: {done.stdout or done.stderr}")


class _Reader(CalibrationDataReader):
    def __init__(self, batches):
        self.batches = iter(batches)

    def get_next(self):
        return next(self.batches, None)


def _conv_model(path: Path, channels: int = 32) -> None:
    """x (1, C, 6, 6) -> 3 x 3 convolution to 4 channels. Every weight positive,
    so each channel's largest weights quantise to the top of the int8 range."""
    rng = np.random.default_rng(0)
    weight = rng.uniform(0.5, 1.0, (4, channels, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 6, 6])],
        [numpy_helper.from_array(weight, "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _quantized(tmp_path: Path, reduce_range: bool) -> Path:
    """elcell's quantisation settings (static QDQ, uint8 activations, int8 weights
    per channel), calibrated on inputs in [0, 1]."""
    float_path, out = tmp_path / "conv.onnx", tmp_path / f"conv-{'s7' if reduce_range else 's8'}.onnx"
    _conv_model(float_path)
    rng = np.random.default_rng(1)
    # the all-ones input the test scores is calibrated on, so no output is clipped at its range
    calibration = [{"x": rng.uniform(0, 1, (1, 32, 6, 6)).astype(np.float32)} for _ in range(4)]
    calibration.append({"x": np.ones((1, 32, 6, 6), np.float32)})
    quantize_static(str(float_path), str(out), _Reader(calibration), quant_format=QuantFormat.QDQ,
                    per_channel=True, reduce_range=reduce_range,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def _reference(model: Path, x: np.ndarray) -> np.ndarray:
    """The QDQ graph node by node in float: no fused int8 kernel, no CPU dependence."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _emulated(model: Path, x: np.ndarray, tmp_path: Path) -> np.ndarray:
    x_path, y_path = tmp_path / "x.npy", tmp_path / f"y-{model.stem}.npy"
    np.save(x_path, x)
    done = subprocess.run([QEMU, "-cpu", CPU, sys.executable, "-c", SCORE, str(model), str(x_path), str(y_path)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[:1] == ["AVX2"] and "AVX512VNNI" not in done.stdout  # the CPU it ran as
    return np.load(y_path)


@pytest.mark.parametrize("reduce_range", [False, True])
def test_int8_on_an_emulated_cpu_without_vnni(emulated_cpu, tmp_path, reduce_range):
    model = _quantized(tmp_path, reduce_range)
    x = np.ones((1, 32, 6, 6), np.float32)  # every activation at the calibrated maximum: uint8 255
    reference, emulated = _reference(model, x), _emulated(model, x, tmp_path)
    clipped = reference >= reference.max() * (1 - 1e-6)
    assert clipped.mean() < 0.2, "the output's range clips most positions: the test would see only the rest"
    error = np.abs(emulated - reference).max() / np.abs(reference).max()
    if reduce_range:  # elcell's scheme: the no-VNNI kernels compute the model as defined
        assert error < 1e-3, f"7-bit weights differ from the QDQ reference on {CPU}: {error:.3g} of the peak"
    else:  # 8-bit weights: int16 pair sums saturate there
        assert error > 0.1, f"8-bit weights did not saturate on the emulated {CPU} ({error:.3g}): not its kernels?"

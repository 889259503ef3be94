"""What the in-graph Grad-CAM costs a caller who only wants probabilities.

Exports the same ResNet twice -- the elcell graph (outputs `probs` and
`heatmap`) and a graph without the heatmap (`probs` only) -- and times ONNX
Runtime asking the full model for `probs` alone against the probs-only model,
in alternating rounds so that a busy machine slows both alike. Also times the
full model asked for both outputs. Prints images/s and the overhead in %.

    python benchmarks/heatmap_overhead.py [--backbone resnet50] [--size 300] [--batch 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from elcell.cells.images import Decoding
from elcell.infer.modelinfo import INPUT_NAME, ModelInfo
from elcell.training.export import InferenceGraph, _quiet_exporter, export_onnx
from elcell.training.nets.build import ResNet


class ProbsOnly(InferenceGraph):
    """The elcell graph without the heatmap: the baseline."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = (images.float() / 255.0 - self.mean) / self.std
        return torch.sigmoid(self.model(x))


def export_probs_only(model: ResNet, size: int, out: Path) -> None:
    graph = ProbsOnly(model, 0.5, 0.25).eval()
    example = torch.zeros(2, 1, size, size, dtype=torch.uint8)
    with _quiet_exporter():  # the exporter's own narration, as in elcell.training.export
        torch.onnx.export(graph, (example,), str(out), input_names=[INPUT_NAME],
                          output_names=["probs"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                          dynamo=True, external_data=False, verbose=False)


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()  # as elcell.infer.runtime.open_model
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--size", type=int, default=300)
    parser.add_argument("--labels", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7, help="alternating rounds (median is reported)")
    parser.add_argument("--runs", type=int, default=3, help="session.run calls per model per round")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = ResNet(args.backbone, args.labels).eval()
    for module in model.modules():  # trained-like BN: no all-zero residual branches
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
    info = ModelInfo(labels=[f"label{i}" for i in range(args.labels)], decoding=Decoding(args.size),
                     mean=0.5, std=0.25, thresholds=[0.5] * args.labels,
                     review_thresholds=[0.5] * args.labels, backbone=args.backbone)
    images = np.random.default_rng(0).integers(0, 256, (args.batch, 1, args.size, args.size),
                                               dtype=np.uint8)
    with tempfile.TemporaryDirectory() as tmp:
        full_path, base_path = Path(tmp, "full.onnx"), Path(tmp, "probs_only.onnx")
        export_onnx(model, info, full_path)
        export_probs_only(model, args.size, base_path)
        full, base = session(full_path, args.threads), session(base_path, args.threads)
        cases = {
            "probs-only model": lambda: base.run(["probs"], {INPUT_NAME: images}),
            "full model, probs requested": lambda: full.run(["probs"], {INPUT_NAME: images}),
            "full model, probs + heatmap": lambda: full.run(["probs", "heatmap"], {INPUT_NAME: images}),
        }
        a = cases["probs-only model"]()[0]
        b = cases["full model, probs requested"]()[0]
        assert np.abs(a - b).max() < 1e-4, "the two graphs disagree"
        for run in cases.values():  # warm-up
            run()
        times: dict[str, list[float]] = {name: [] for name in cases}
        for round_ in range(args.rounds):
            order = list(cases) if round_ % 2 == 0 else list(reversed(cases))
            for name in order:
                start = time.perf_counter()
                for _ in range(args.runs):
                    cases[name]()
                times[name].append((time.perf_counter() - start) / args.runs)

    print(f"{args.backbone} at {args.size}x{args.size}, {args.labels} labels, batch {args.batch}, "
          f"ONNX Runtime {ort.__version__} CPU, {args.rounds} alternating rounds x {args.runs} runs")
    medians = {name: statistics.median(values) for name, values in times.items()}
    fastest = {name: min(values) for name, values in times.items()}
    for name in cases:
        print(f"  {name:<29} median {args.batch / medians[name]:7.2f} images/s "
              f"({(medians[name] / medians['probs-only model'] - 1) * 100:+5.1f} %)   "
              f"best {args.batch / fastest[name]:7.2f} images/s "
              f"({(fastest[name] / fastest['probs-only model'] - 1) * 100:+5.1f} %)")
    print("  (% = time per batch relative to the probs-only model)")

if __name__ == "__main__":
    main()

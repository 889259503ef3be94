"""Inference throughput: PyTorch eager fp32 vs ONNX Runtime fp32 vs ONNX Runtime int8.

All three run in this one process on the same real ELPV cells, in alternating
rounds (so a neighbour's load hits them alike), with the same thread count.
Prints images/s, the ratios, peak memory, the time for one 72-cell module
(decoding included) and, with --checkpoint, F1 of float vs int8 on cells the
model did not train on (without it: a randomly initialised model and only the
agreement of the two).

    python benchmarks/infer_throughput.py --backbone resnet50 --image-size 300 --threads 2
    python benchmarks/infer_throughput.py --checkpoint runs/X/checkpoints/best-....ckpt

Figures only; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """Peak resident memory since the last reset_peak() (VmHWM), else since start."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak() -> None:
    """Start the peak over (Linux), so export and quantisation do not count."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def build_model(args):
    """(InferenceGraph, ModelInfo, held-out LabelTable or None)."""
    import torch

    from elcell.cells.labels import LabelTable
    from elcell.training.export import InferenceGraph, info_from_hparams
    from elcell.training.nets.build import ResNet

    if args.checkpoint:
        from elcell.training.lightning_module import ELCellModule

        state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
        module = ELCellModule(**state["hyper_parameters"])
        module.load_state_dict(state["state_dict"])
        info = info_from_hparams(module.hparams, int(state["epoch"]))
        model = module.model
        held_out = None
        split = Path(args.checkpoint).resolve().parent.parent / "split.csv"
        if split.is_file():  # the run's own split: score on the cells it did not train on
            rows = [line.split(";") for line in split.read_text().splitlines()[1:] if line.strip()]
            rows = [r for r in rows if r[1] != "train"]
            held_out = LabelTable(paths=[Path(r[0]) for r in rows], names=info.labels,
                                  targets=np.array([[float(v) for v in r[2:]] for r in rows], np.float32),
                                  source=f"{split} (val+test)")
        print(f"model: {args.checkpoint} ({info.backbone}, {info.decoding.size} px, --shrink {info.decoding.shrink}, "
              f"labels {info.labels})")
    else:
        torch.manual_seed(0)
        model = ResNet(args.backbone, 2)
        # Training-like weights: without this every residual block starts as the identity.
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.data.uniform_(0.5, 1.0)
                m.running_var.data.uniform_(0.5, 2.0)
        info = info_from_hparams({"label_names": ["crack", "inactive"], "image_size": args.image_size,
                                  "mean": 0.55, "std": 0.2, "backbone": args.backbone,
                                  "shrink": args.shrink}, -1)
        held_out = None
        print(f"model: randomly initialised {args.backbone} at {args.image_size} px, --shrink {args.shrink} "
              "(speed and agreement only; pass --checkpoint for F1)")
    model.eval()
    return InferenceGraph(model, info.mean, info.std).eval(), info, held_out


def timed(run, images: np.ndarray, batch_size: int, batches: int) -> float:
    """Images per second over `batches` batches."""
    started = time.perf_counter()
    for b in range(batches):
        start = (b * batch_size) % (len(images) - batch_size + 1)
        run(images[start:start + batch_size])
    return batches * batch_size / (time.perf_counter() - started)


def main() -> None:
    from elcell.cells.images import SHRINKS, load_cell

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="resnet50", choices=["resnet18", "resnet34", "resnet50"])
    parser.add_argument("--image-size", type=int, default=300)
    parser.add_argument("--shrink", default="bilinear", choices=SHRINKS,
                        help="how cells are shrunk to --image-size (a --checkpoint brings its own)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timing rounds")
    parser.add_argument("--batches", type=int, default=4, help="batches per engine per round")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: PyTorch on the GPU and ONNX Runtime's CUDA provider when present")
    parser.add_argument("--checkpoint", help="trained Lightning checkpoint: also F1 of float vs int8")
    parser.add_argument("--calibration", default="elpv", help="labels CSV or 'elpv' to calibrate int8 on")
    parser.add_argument("--calibration-count", type=int, default=64)
    parser.add_argument("--eval-count", type=int, default=200,
                        help="held-out cells for F1 / agreement of float vs int8")
    parser.add_argument("--module-cells", type=int, default=72)
    parser.add_argument("--spin", action="store_true",
                        help="let idle threads spin-wait (the libraries' default). Without it both "
                             "run without spinning (OMP_WAIT_POLICY=PASSIVE for torch, allow_spinning=0 "
                             "for ONNX Runtime): on shared cores torch's spinning OpenMP threads "
                             "otherwise collapse, e.g. 5.6 instead of 73 images/s here")
    args = parser.parse_args()
    if not args.spin:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch starts OpenMP

    import onnxruntime as ort
    import torch

    from elcell.cells.labels import load_table
    from elcell.infer.metrics import fmt
    from elcell.infer.quantize import calibration_cells, compare, quantize
    from elcell.infer.runtime import decide, open_model, score_files
    from elcell.training.export import export_onnx

    torch.set_num_threads(args.threads)
    print(f"threads: {args.threads}; spin-waiting: {'on' if args.spin else 'off'} "
          f"(OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'default')})")
    graph, info, held_out = build_model(args)
    cells_table = load_table("elpv")
    rng = np.random.default_rng(1)
    pick = rng.permutation(len(cells_table))
    bench_paths = [cells_table.paths[i] for i in pick[:max(args.module_cells, 4 * args.batch_size)]]

    def decode(paths) -> np.ndarray:
        return np.stack([load_cell(p, info.decoding) for p in paths])

    images = decode(bench_paths)

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda: PyTorch sees no GPU")
    workdir = Path(tempfile.mkdtemp(prefix="elcell-bench-"))
    float_path, int8_path = workdir / "float.onnx", workdir / "int8.onnx"
    export_onnx(graph.model, info, float_path, check_images=images[:4])
    calibration = load_table(args.calibration)
    cells, _ = calibration_cells(calibration, info.decoding, args.calibration_count, seed=7)
    started = time.perf_counter()
    quantize(float_path, int8_path, cells, source=args.calibration)
    print(f"int8 quantisation (calibrated on {len(cells)} cells of {args.calibration}): "
          f"{time.perf_counter() - started:.0f} s")

    device = torch.device("cuda" if cuda else "cpu")
    graph = graph.to(device)

    def run_torch(batch: np.ndarray):
        with torch.inference_mode():
            probs, *_ = graph(torch.from_numpy(np.ascontiguousarray(batch)[:, None]).to(device))
            return probs.cpu().numpy()

    print(f"peak RSS during export and quantisation: {peak_rss_mib():.0f} MiB")
    reset_peak()
    providers = ["CPUExecutionProvider"]
    if cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    engines = {"torch fp32": run_torch}
    memory = {}
    for name, path in (("ort fp32", float_path), ("ort int8", int8_path)):
        before = rss_mib()
        model = open_model(path, providers=providers, threads=args.threads, spin=args.spin)
        model.run(images[:args.batch_size])
        memory[name] = rss_mib() - before
        engines[name] = model.run
        print(f"{name}: provider {model.provider}")
    before = rss_mib()
    run_torch(images[:args.batch_size])
    memory["torch fp32"] = rss_mib() - before

    rates: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(args.rounds):
        for name, run in engines.items():
            rates[name].append(timed(run, images, args.batch_size, args.batches))
    median = {name: statistics.median(r) for name, r in rates.items()}
    print(f"\nthroughput, {args.threads} threads, batch {args.batch_size}, {args.rounds} rounds x "
          f"{args.batches} batches (median; all rounds in brackets):")
    for name, rate in median.items():
        print(f"  {name:<11} {rate:8.1f} images/s  [{', '.join(f'{r:.1f}' for r in rates[name])}]  "
              f"memory added ~{memory[name]:.0f} MiB")
    base = median["torch fp32"]
    print(f"  ratio ort fp32 / torch fp32: {median['ort fp32'] / base:.2f}x")
    print(f"  ratio ort int8 / torch fp32: {median['ort int8'] / base:.2f}x")
    print(f"  ratio ort int8 / ort fp32:   {median['ort int8'] / median['ort fp32']:.2f}x")
    print(f"  peak RSS of this process while the three engines ran: {peak_rss_mib():.0f} MiB")

    module_paths = bench_paths[:args.module_cells]
    for shrink in SHRINKS:  # one thread, as one decoding worker
        started = time.perf_counter()
        decode(module_paths, shrink)
        print(f"decoding alone, --shrink {shrink}: {1000 * (time.perf_counter() - started) / len(module_paths):.2f} "
              "ms per cell")
    for name, path in (("ort int8", int8_path), ("ort fp32", float_path)):
        model = open_model(path, providers=providers, threads=args.threads, spin=args.spin)
        started = time.perf_counter()
        for _ in score_files(model, module_paths, args.batch_size, workers=2):
            pass
        print(f"one {args.module_cells}-cell module, {name}, decoding included: "
              f"{time.perf_counter() - started:.2f} s")
    started = time.perf_counter()
    for b in range(0, args.module_cells, args.batch_size):
        run_torch(decode(module_paths[b:b + args.batch_size]))
    print(f"one {args.module_cells}-cell module, torch fp32, decoding included: "
          f"{time.perf_counter() - started:.2f} s")

    float_model = open_model(float_path, providers=providers, threads=args.threads, spin=args.spin)
    int8_model = open_model(int8_path, providers=providers, threads=args.threads, spin=args.spin)
    if held_out is not None:
        table = held_out.subset(np.arange(min(args.eval_count, len(held_out))))
        result = compare(float_model, int8_model, table, args.batch_size, progress=False)
        print(f"\nF1 on {result['cells']} held-out cells of {held_out.source}:")
        for label, m in result["per_label"].items():
            print(f"  {label}: F1 fp32 {fmt(m['f1_float'], '.4f')}, int8 {fmt(m['f1_int8'], '.4f')}; recall fp32 "
                  f"{fmt(m['recall_float'], '.4f')}, int8 {fmt(m['recall_int8'], '.4f')}; decisions agree "
                  f"{m['decision_agreement']:.3f}")
        a, b = result["mean_f1_float"], result["mean_f1_int8"]
        print(f"  mean F1 fp32 {fmt(a, '.4f')}, int8 {fmt(b, '.4f')} "
              f"(difference {fmt(None if a is None or b is None else b - a, '+.4f')})")
    else:
        rest = [cells_table.paths[i] for i in pick[-args.eval_count:]]
        eval_images = decode(rest)
        a, b = float_model.run(eval_images), int8_model.run(eval_images)
        agree = (decide(a, info.thresholds, info.review_thresholds) == decide(b, info.thresholds, info.review_thresholds)).mean()
        print(f"\nagreement on {len(rest)} ELPV cells: max |prob diff| {np.abs(a - b).max():.4f}, "
              f"mean {np.abs(a - b).mean():.5f}; decisions agree on {100 * agree:.1f}% of cell labels")


if __name__ == "__main__":
    main()

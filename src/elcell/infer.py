"""ONNX Runtime inference on elcell models. Never imports torch.

The core every torch-free command shares: open a model with its metadata,
run uint8 cells through it, and turn probabilities into decisions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from elcell.errors import DataError
from elcell.modelinfo import INPUT_NAME, ModelInfo, read_info

DEFECT, REVIEW, OK = "defect", "review", "ok"


@dataclass
class Model:
    """An open ONNX Runtime session with the model's metadata."""

    session: ort.InferenceSession
    info: ModelInfo
    path: Path

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def run(self, images: np.ndarray, heatmaps: bool = False):
        """Probabilities [B, N] for uint8 cells [B, H, W] (H = W = info.image_size);
        with heatmaps=True also the Grad-CAM maps [B, N, h, w]."""
        batch = np.ascontiguousarray(images, dtype=np.uint8)[:, None]
        outputs = ["probs", "heatmap"] if heatmaps else ["probs"]
        result = self.session.run(outputs, {INPUT_NAME: batch})
        return (result[0], result[1]) if heatmaps else result[0]


def open_model(path: str | Path, providers: list[str] | None = None, threads: int = 0) -> Model:
    """Open an elcell ONNX file; the fastest available provider (CUDA, then CPU) by default."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: model file not found")
    try:
        info = read_info(path)
    except ValueError as err:
        raise DataError(str(err)) from None
    except Exception as err:  # onnx raises protobuf DecodeError and others for a bad file
        raise DataError(f"{path}: not an ONNX model ({type(err).__name__})") from None
    if providers is None:
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    return Model(session=session, info=info, path=path)


def decide(probs: np.ndarray, info: ModelInfo, thresholds: list[float] | None = None,
           review_thresholds: list[float] | None = None) -> np.ndarray:
    """`defect` / `review` / `ok` per cell and label, from the model's thresholds
    (or the ones given). [B, N] array of strings."""
    high = np.asarray(thresholds if thresholds is not None else info.thresholds, dtype=np.float64)
    low = np.asarray(review_thresholds if review_thresholds is not None else info.review_thresholds,
                     dtype=np.float64)
    low = np.minimum(low, high)
    return np.where(probs >= high, DEFECT, np.where(probs >= low, REVIEW, OK))

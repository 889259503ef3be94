"""The model at inference: open an elcell ONNX file, score cells, decide. Never
imports torch.

`score_cells` is the one in-memory API: decoded cells (arrays) in;
probabilities, `defect` / `review` / `ok` decisions and heatmaps out. Files
(`score_files`), module photos (elcell.pvmodules.judge) and HTTP uploads
(elcell.station.app) are only different ways of getting arrays to it.
"""

from __future__ import annotations

import json
import os
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx.utils
import onnxruntime as ort

from elcell.cells.images import Decoding, to_cell, to_uint8
from elcell.cells.inputs import decode_batches
from elcell.errors import DataError
from elcell.infer.cpuinfo import has_vnni
from elcell.infer.modelinfo import COARSE_OUTPUT, INPUT_NAME, ModelInfo, info_from_model
from elcell.options import MAP_DETAILS

DEFECT, REVIEW, OK = "defect", "review", "ok"


HEATMAP_CELLS = 16  # cells per heatmap call (Model.run)


def _swap(a: np.ndarray) -> np.ndarray:
    return np.swapaxes(a, -1, -2)


def _same(a: np.ndarray) -> np.ndarray:
    return a


# The symmetries of a square as (view, undo) on [..., H, W], in the order of the
# training code's (elcell.training.nets.cellnet.VIEWS): the four flips (any
# model), then the transposed four (models trained with 90-degree rotations).
# `undo` turns a view's heatmap back onto the cell.
VIEWS = (
    (_same, _same),
    (lambda a: a[..., ::-1], lambda a: a[..., ::-1]),
    (lambda a: a[..., ::-1, :], lambda a: a[..., ::-1, :]),
    (lambda a: a[..., ::-1, ::-1], lambda a: a[..., ::-1, ::-1]),
    (_swap, _swap),
    (lambda a: _swap(a)[..., ::-1], lambda a: _swap(a[..., ::-1])),
    (lambda a: _swap(a)[..., ::-1, :], lambda a: _swap(a[..., ::-1, :])),
    (lambda a: _swap(a)[..., ::-1, ::-1], lambda a: _swap(a[..., ::-1, ::-1])),
)


@dataclass
class Model:
    """An elcell model open in ONNX Runtime, with its metadata.

    ONNX Runtime computes every output of a graph whatever the caller asks for,
    and the heatmap costs more than the probabilities (a backward pass over
    several views). So `session` runs a copy of the graph cut down to `probs`,
    and the whole graph gets a session of its own the first time heatmaps are
    asked for; the coarse maps (no backward pass) a cut-down copy of their own."""

    session: ort.InferenceSession
    info: ModelInfo
    path: Path
    options: ort.SessionOptions | None = None
    providers: list[str] | None = None
    has_coarse: bool = False  # the graph also gives coarse maps (models exported since they exist)
    _full: ort.InferenceSession | None = field(default=None, repr=False)
    _coarse: ort.InferenceSession | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    @property
    def full_session(self) -> ort.InferenceSession:
        with self._lock:  # the service asks from several threads
            if self._full is None:
                self._full = ort.InferenceSession(str(self.path), sess_options=self.options,
                                                  providers=self.providers)
            return self._full

    @property
    def coarse_session(self) -> ort.InferenceSession:
        with self._lock:
            if self._coarse is None:
                part = cut_graph(onnx.load(str(self.path)), ["probs", COARSE_OUTPUT])
                self._coarse = ort.InferenceSession(part.SerializeToString(), sess_options=self.options,
                                                    providers=self.providers)
            return self._coarse

    @property
    def decoding(self) -> Decoding:
        return self.info.decoding

    @property
    def heatmap_views(self) -> int:
        """How many symmetric views a heatmap averages unless told otherwise."""
        return int((self.info.extra.get("heatmap") or {}).get("views", 1))

    @property
    def graph_views(self) -> int:
        """How many views the graph averages itself: models exported before
        `graph_views` was stored do all of theirs inside it."""
        settings = self.info.extra.get("heatmap") or {}
        return int(settings.get("graph_views", settings.get("views", 1)))

    def run(self, images: np.ndarray, heatmaps: bool = False, views: int | None = None, detail: str = "fine"):
        """Probabilities [B, N] for uint8 cells [B, H, W] (H = W = decoding.size);
        with heatmaps=True also the heatmaps [B, N, h, w], averaged over the first
        `views` symmetric views (default `heatmap_views`; at most those, and a
        model whose graph averages its own views does all of them). detail
        "coarse": the coarse maps where the model has them (`has_coarse`; else
        its fine ones), about the cost of the probabilities alone."""
        if not heatmaps:
            return self.session.run(["probs"], {INPUT_NAME: np.ascontiguousarray(images, dtype=np.uint8)[:, None]})[0]
        if views is not None and views < 1:
            raise ValueError(f"views {views}: at least 1")
        if detail not in MAP_DETAILS:
            raise ValueError(f"detail {detail!r}: one of {', '.join(MAP_DETAILS)}")
        n = 1 if self.graph_views > 1 else min(views or self.heatmap_views, self.heatmap_views)
        coarse = detail == "coarse" and self.has_coarse
        probs, total = None, None
        for view, undo in VIEWS[:n]:
            p, maps = self._heatmaps(view(images), coarse)
            probs = p if probs is None else probs  # the cells as given
            total = undo(maps) if total is None else total + undo(maps)
        return probs, np.ascontiguousarray(total / n, dtype=np.float32)

    def _heatmaps(self, images: np.ndarray, coarse: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The graph's probabilities and heatmaps (or coarse maps), a few cells a
        call: ONNX Runtime's arena keeps the largest call's memory for good
        (inspecting 144 flagged half-cells peaked at 9.6 GB with one call of a graph
        doing 8 views, 5.5 GB with HEATMAP_CELLS a call, in the same time)."""
        batch = np.ascontiguousarray(images, dtype=np.uint8)[:, None]
        session, output = (self.coarse_session, COARSE_OUTPUT) if coarse else (self.full_session, "heatmap")
        parts = [session.run(["probs", output], {INPUT_NAME: batch[i:i + HEATMAP_CELLS]})
                 for i in range(0, max(len(batch), 1), HEATMAP_CELLS)]
        return np.concatenate([p for p, _ in parts]), np.concatenate([m for _, m in parts])

    def run_views(self, images: np.ndarray) -> np.ndarray:
        """Probabilities of the other views of the cells that training showed the
        model, [V, B, N]: flipped left-right, up-down and both; with a model trained
        with 90-degree rotations also the four transposed views (all eight
        symmetries of a square). With the plain run they make the TTA mean."""
        views = VIEWS[1:8 if self.info.extra.get("rotate90") else 4]
        return np.stack([self.run(view(images)) for view, _ in views])

    def decide(self, probs: np.ndarray, thresholds: Sequence[float] | None = None,
               review_thresholds: Sequence[float] | None = None) -> np.ndarray:
        """`decide` with the model's thresholds unless others are given."""
        return decide(probs, self.info.thresholds if thresholds is None else thresholds,
                      self.info.review_thresholds if review_thresholds is None else review_thresholds)


def resolve_model_path(path: str | Path) -> Path:
    """A model file, or a run folder standing for its best model (summary.json's
    `onnx`, else its one best_model_epoch{N}.onnx)."""
    path = Path(path)
    if not path.is_dir():
        return path
    summary = path / "summary.json"
    if summary.is_file():
        name = json.loads(summary.read_text()).get("onnx")
        if name and (path / name).is_file():
            return path / name
    found = sorted(p for p in path.glob("best_model_epoch*.onnx") if p.stem.removeprefix("best_model_epoch").isdigit())
    if len(found) == 1:
        return found[0]
    raise DataError(f"{path}: a folder, and not a finished run folder with one best_model_epoch{{N}}.onnx; "
                    "give the model file")


def warn_saturating_int8(info: ModelInfo, path: Path) -> None:
    """An int8 model with full 8-bit weights (elcell before 7-bit weights) loses
    accuracy on CPUs without VNNI, where ONNX Runtime's kernels saturate."""
    quantization = info.extra.get("quantization")
    if quantization and not quantization.get("reduce_range") and has_vnni() is False:
        warnings.warn(f"{path}: an int8 model with 8-bit weights, on a CPU without VNNI: its probabilities "
                      "saturate here (mean F1 fell 0.10 on one such CPU). Quantise the float model again "
                      "with this elcell (elcell export MODEL --int8), which keeps weights to 7 bits",
                      stacklevel=3)


def cut_graph(graph: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """The graph cut down to `outputs`: ONNX Runtime computes every output a graph
    has, whatever a caller fetches (see Model)."""
    return onnx.utils.Extractor(graph).extract_model([INPUT_NAME], outputs)


def open_model(path: str | Path, providers: list[str] | None = None, threads: int = 0,
               spin: bool = True) -> Model:
    """Open an elcell ONNX file (or a run folder's best model); the fastest
    available provider (CUDA, then CPU) by default.

    spin=False stops idle worker threads from spin-waiting: slightly slower on a
    machine of one's own, much faster when other processes share the cores."""
    path = resolve_model_path(path)
    if not path.is_file():
        raise DataError(f"{path}: model file not found")
    try:
        graph = onnx.load(str(path), load_external_data=False)
        info = info_from_model(graph, path)
    except ValueError as err:
        raise DataError(str(err)) from None
    except Exception as err:  # onnx raises protobuf DecodeError and others for a bad file
        hint = f"; export it first: elcell export {path}" if path.suffix == ".ckpt" else ""
        raise DataError(f"{path}: not an ONNX model ({type(err).__name__}){hint}") from None
    warn_saturating_int8(info, path)
    if providers is None:
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    probs_only = cut_graph(graph, ["probs"])
    session = ort.InferenceSession(probs_only.SerializeToString(), sess_options=options, providers=providers)
    has_coarse = COARSE_OUTPUT in {output.name for output in graph.graph.output}
    return Model(session=session, info=info, path=path, options=options, providers=providers, has_coarse=has_coarse)


def decide(probs: np.ndarray, thresholds: Sequence[float], review_thresholds: Sequence[float]) -> np.ndarray:
    """`defect` / `review` / `ok` per cell and label: [B, N] array of strings."""
    high = np.asarray(thresholds, dtype=np.float64)
    low = np.minimum(np.asarray(review_thresholds, dtype=np.float64), high)
    return np.where(probs >= high, DEFECT, np.where(probs >= low, REVIEW, OK))


def parse_thresholds(values: list[str] | None, labels: list[str], current: list[float],
                     option: str = "--threshold") -> list[float]:
    """Thresholds from `0.3` (every label) and/or `crack=0.3` (one label); labels not
    named keep `current`."""
    result = list(current)
    for value in values or []:
        name, sep, number = value.rpartition("=")
        try:
            threshold = float(number)
        except ValueError:
            threshold = float("nan")
        if not 0 <= threshold <= 1:
            raise DataError(f"{option} {value}: need a probability in [0, 1], as 0.3 or LABEL=0.3")
        if not sep:
            result = [threshold] * len(labels)
        elif name in labels:
            result[labels.index(name)] = threshold
        else:
            raise DataError(f"{option} {value}: the model has no label {name!r}; its labels are {labels}")
    return result


def chosen_thresholds(info: ModelInfo, threshold: list[str] | None,
                      review_threshold: list[str] | None) -> tuple[list[float], list[float]]:
    """The model's thresholds and review thresholds with --threshold and
    --review-threshold applied."""
    return (parse_thresholds(threshold, info.labels, info.thresholds),
            parse_thresholds(review_threshold, info.labels, info.review_thresholds, option="--review-threshold"))


def default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


# --------------------------------------------------------------------------- scoring
@dataclass
class CellScores:
    """Cells scored by `score_cells`, one row per cell."""

    probs: np.ndarray  # float32 [B, N], the TTA mean when tta
    plain: np.ndarray  # float32 [B, N] without TTA (the same array when not tta)
    decisions: np.ndarray  # str [B, N]: defect / review / ok
    heatmaps: np.ndarray | None = None  # float32 [B, N, h, w] of the unflipped cells
    cells: np.ndarray | None = None  # uint8 [B, S, S]: the cells as the model saw them


def as_model_input(cells: np.ndarray | Sequence[np.ndarray], decoding: Decoding) -> np.ndarray:
    """uint8 [B, S, S] as the model takes it, from a stacked batch already in that
    form or from gray arrays of any size and depth (uint8, uint16 read as
    `decoding.bit_depth`-bit, or floats in [0, 1]), converted as files are."""
    size = decoding.size
    if isinstance(cells, np.ndarray) and cells.dtype == np.uint8 and cells.shape[1:] == (size, size):
        return cells
    converted = [to_cell(to_uint8(np.asarray(cell), decoding.bit_depth, f"cell {i}"), decoding)
                 for i, cell in enumerate(cells)]
    return np.stack(converted) if converted else np.zeros((0, size, size), dtype=np.uint8)


def score_cells(model: Model, cells: np.ndarray | Sequence[np.ndarray], *, tta: bool = False,
                heatmaps: bool = False, thresholds: Sequence[float] | None = None,
                review_thresholds: Sequence[float] | None = None, map_views: int | None = None,
                map_detail: str = "fine") -> CellScores:
    """Score decoded cells (see `as_model_input`): probabilities, decisions and,
    with heatmaps=True, the heatmaps (averaged over `map_views` views, as fine or
    coarse as `map_detail`, see Model.run), from one ONNX Runtime call a view
    (plus the other views with tta). Decisions use the model's thresholds unless
    others are given."""
    batch = as_model_input(cells, model.decoding)
    if len(batch) == 0:
        n = len(model.info.labels)
        empty = np.zeros((0, n), dtype=np.float32)
        return CellScores(empty, empty, model.decide(empty, thresholds, review_thresholds), None, batch)
    maps = None
    if heatmaps:
        plain, maps = model.run(batch, heatmaps=True, views=map_views, detail=map_detail)
    else:
        plain = model.run(batch)
    probs = np.concatenate([plain[None], model.run_views(batch)]).mean(0) if tta else plain
    return CellScores(probs, plain, model.decide(probs, thresholds, review_thresholds), maps, batch)


@dataclass
class ScoredBatch:
    """One batch of files scored: probabilities per path (NaN rows where the image
    could not be used, with the reason in `errors`). `scores` covers the readable
    cells only, in order (row k belongs to the k-th path whose error is None)."""

    paths: list[Path]
    probs: np.ndarray  # float32 [B, N], the TTA mean when tta; NaN rows for errors
    plain: np.ndarray  # float32 [B, N] without TTA
    errors: list[str | None]
    scores: CellScores

    @property
    def ok(self) -> np.ndarray:
        return np.array([e is None for e in self.errors], dtype=bool)


def score_files(model: Model, paths: Iterable[Path], batch_size: int = 16, workers: int = 2,
                tta: bool = False, heatmaps: bool = False, thresholds: Sequence[float] | None = None,
                review_thresholds: Sequence[float] | None = None) -> Iterator[ScoredBatch]:
    """Stream image files through `score_cells` batch by batch, decoded in threads
    as the model's decoding says; images that cannot be used get NaN rows."""
    n = len(model.info.labels)
    for batch in decode_batches(paths, model.decoding, batch_size, workers):
        scores = score_cells(model, batch.images, tta=tta, heatmaps=heatmaps, thresholds=thresholds,
                             review_thresholds=review_thresholds)
        probs = np.full((len(batch.paths), n), np.nan, dtype=np.float32)
        plain = probs.copy()
        probs[batch.ok], plain[batch.ok] = scores.probs, scores.plain
        yield ScoredBatch(batch.paths, probs, plain, batch.errors, scores)

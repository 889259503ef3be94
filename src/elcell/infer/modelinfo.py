"""What an elcell ONNX file promises, and the metadata stored in it. Torch-free.

Graph: input `images` uint8 [batch, 1, H, W] (gray, H = W = decoding.size);
outputs `probs` float [batch, N] (sigmoid applied), `heatmap` float
[batch, N, h, w] (each label's map as `extra.heatmap` says; see
elcell.training.nets.cellnet) and, in models exported since module maps got
it, `heatmap_coarse` [batch, N, h32, w32] (LayerCAM on the last map). Normalisation
happens inside the graph, so a caller only decodes (`elcell.cells.images.load_cell`
with the model's `decoding`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import onnx

from elcell.cells.images import SHRINKS, Decoding
from elcell.io import atomic_path

INPUT_NAME = "images"
# "heatmap_coarse" (models exported since coarse module maps, elcell.options.MAP_DETAIL)
COARSE_OUTPUT = "heatmap_coarse"
OUTPUT_NAMES = ("probs", "heatmap", COARSE_OUTPUT)
# "2": cells must be shrunk as `shrink` says; "3": 16-bit cells must be read as
# `bit_depth`-bit ones. elcell versions without them refuse such a model instead
# of decoding it the old way. Models that need neither stay "1", readable by all.
FORMAT_VERSIONS = ("1", "2", "3")
# The decoding travels as three flat keys, as elcell has always stored it.
_DECODING_KEYS = {"image_size": "size", "shrink": "shrink", "bit_depth": "bit_depth"}


@dataclass
class ModelInfo:
    """The metadata an elcell model carries. A cell's label is `defect` when its
    probability >= threshold, `review` when >= review_threshold (below the
    threshold), else `ok`. review_threshold == threshold means no review band."""

    labels: list[str]
    decoding: Decoding
    mean: float
    std: float
    thresholds: list[float]
    review_thresholds: list[float]
    backbone: str = ""
    epoch: int = -1
    extra: dict = field(default_factory=dict)
    # sha256 of the graph (weights included, metadata not): the same for a copy
    # with tuned thresholds, different for retrained or int8 weights. Read, not stored.
    identity: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        n = len(self.labels)
        if len(self.thresholds) != n or len(self.review_thresholds) != n:
            raise ValueError(f"need one threshold and one review threshold per label ({n})")
        for label, low, high in zip(self.labels, self.review_thresholds, self.thresholds):
            if not 0 <= low <= high <= 1:
                raise ValueError(
                    f"label {label!r}: need 0 <= review threshold ({low}) <= threshold ({high}) <= 1"
                )

    @property
    def short_id(self) -> str:
        return self.identity[:16]

    def to_props(self) -> dict[str, str]:
        d = self.decoding
        version = "3" if d.bit_depth != 16 else "2" if d.shrink != "bilinear" else "1"
        values = {k: v for k, v in asdict(self).items() if k not in ("decoding", "identity")}
        values.update({key: getattr(d, attr) for key, attr in _DECODING_KEYS.items()})
        return {"elcell_format": version, **{key: json.dumps(value) for key, value in values.items()}}

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "model") -> ModelInfo:
        version = props.get("elcell_format")
        if version is None:
            raise ValueError(f"{source}: not an elcell model (no elcell metadata in the ONNX file)")
        if version not in FORMAT_VERSIONS:
            raise ValueError(f"{source}: elcell model format {version} is newer than this elcell's; upgrade elcell")
        values = {key: json.loads(props[key]) for key in cls.__dataclass_fields__ if key in props}
        # before format "3" the stored bit_depth was always 8 and meant nothing
        flat = {key: json.loads(props[key]) for key in _DECODING_KEYS if key in props
                and not (key == "bit_depth" and version in ("1", "2"))}
        if flat.get("shrink", "bilinear") not in SHRINKS:
            raise ValueError(f"shrink {flat['shrink']!r} is not one of {list(SHRINKS)}: written by a newer elcell?")
        values["decoding"] = Decoding(**{_DECODING_KEYS[k]: v for k, v in flat.items()})
        values.pop("identity", None)
        return cls(**values)


def graph_identity(model: onnx.ModelProto) -> str:
    return hashlib.sha256(model.graph.SerializeToString()).hexdigest()


def info_from_model(model: onnx.ModelProto, source: str | Path = "model") -> ModelInfo:
    info = ModelInfo.from_props({p.key: p.value for p in model.metadata_props}, source=str(source))
    return replace(info, identity=graph_identity(model))


def read_info(path: str | Path) -> ModelInfo:
    return info_from_model(onnx.load(str(path), load_external_data=False), path)


def write_info(source: str | Path, target: str | Path, info: ModelInfo) -> None:
    """Copy the ONNX file at `source` to `target` (atomically) with new metadata."""
    model = onnx.load(str(source))
    del model.metadata_props[:]
    for key, value in info.to_props().items():
        model.metadata_props.add(key=key, value=value)
    with atomic_path(target) as tmp:
        onnx.save(model, str(tmp))

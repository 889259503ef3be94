"""What an elcell ONNX file promises, and the metadata stored in it. Torch-free.

Graph: input `images` uint8 [batch, 1, H, W] (gray, H = W = image_size);
outputs `probs` float [batch, N] (sigmoid applied) and `heatmap` float
[batch, N, h, w] (Grad-CAM of each label on the last ResNet stage).
Normalisation happens inside the graph, so a caller only decodes and resizes
(`elcell.images.load_cell` with the model's `shrink` and `bit_depth`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

from elcell.images import BIT_DEPTHS, SHRINKS
from elcell.io import atomic_path

INPUT_NAME = "images"
OUTPUT_NAMES = ("probs", "heatmap")
# "2": cells must be shrunk as `shrink` says; "3": 16-bit cells must be read as
# `bit_depth`-bit ones. elcell versions without them refuse such a model instead
# of decoding it the old way. Models that need neither stay "1", readable by all.
FORMAT_VERSIONS = ("1", "2", "3")


@dataclass
class ModelInfo:
    """The metadata an elcell model carries. A cell's label is `defect` when its
    probability >= threshold, `review` when >= review_threshold (below the
    threshold), else `ok`. review_threshold == threshold means no review band."""

    labels: list[str]
    image_size: int
    mean: float
    std: float
    thresholds: list[float]
    review_thresholds: list[float]
    backbone: str = ""
    shrink: str = "bilinear"  # how load_cell shrinks larger cells; models older than it: bilinear
    # how load_cell reads 16-bit cells; before format "3" this field was always 8 and meant nothing
    bit_depth: int = 16
    epoch: int = -1
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.shrink not in SHRINKS:
            raise ValueError(f"shrink {self.shrink!r} is not one of {list(SHRINKS)}: written by a newer elcell?")
        if self.bit_depth not in BIT_DEPTHS:
            raise ValueError(f"bit depth {self.bit_depth} is not one of {list(BIT_DEPTHS)}")
        n = len(self.labels)
        if len(self.thresholds) != n or len(self.review_thresholds) != n:
            raise ValueError(f"need one threshold and one review threshold per label ({n})")
        for label, low, high in zip(self.labels, self.review_thresholds, self.thresholds):
            if not 0 <= low <= high <= 1:
                raise ValueError(
                    f"label {label!r}: need 0 <= review threshold ({low}) <= threshold ({high}) <= 1"
                )

    def to_props(self) -> dict[str, str]:
        version = "3" if self.bit_depth != 16 else "2" if self.shrink != "bilinear" else "1"
        props = {"elcell_format": version}
        props.update({key: json.dumps(value) for key, value in asdict(self).items()})
        return props

    @classmethod
    def from_props(cls, props: dict[str, str], source: str = "model") -> ModelInfo:
        version = props.get("elcell_format")
        if version is None:
            raise ValueError(f"{source}: not an elcell model (no elcell metadata in the ONNX file)")
        if version not in FORMAT_VERSIONS:
            raise ValueError(f"{source}: elcell model format {version} is newer than this elcell's; upgrade elcell")
        names = set(cls.__dataclass_fields__) - ({"bit_depth"} if version in ("1", "2") else set())
        return cls(**{key: json.loads(props[key]) for key in names if key in props})


def read_info(path: str | Path) -> ModelInfo:
    model = onnx.load(str(path), load_external_data=False)
    return ModelInfo.from_props({p.key: p.value for p in model.metadata_props}, source=str(path))


def write_info(source: str | Path, target: str | Path, info: ModelInfo) -> None:
    """Copy the ONNX file at `source` to `target` (atomically) with new metadata."""
    model = onnx.load(str(source))
    del model.metadata_props[:]
    for key, value in info.to_props().items():
        model.metadata_props.add(key=key, value=value)
    with atomic_path(target) as tmp:
        onnx.save(model, str(tmp))

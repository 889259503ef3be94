"""The shapes of the service's JSON (pydantic models), which /docs and the
OpenAPI schema show and the tests check answers against. Torch-free."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

Probability = Annotated[float, Field(ge=0, le=1)]


class Error(BaseModel):
    detail: str = Field(description="what is wrong, naming the file or field")


ERRORS = {
    400: {"model": Error, "description": "no upload is a readable image"},
    401: {"model": Error, "description": "missing or wrong token (when the service has one)"},
    404: {"model": Error, "description": "unknown id or label, or the review loop is off"},
    410: {"model": Error, "description": "the review cell is no longer known (the answer was not saved)"},
    413: {"model": Error, "description": "request body over the upload limit"},
    422: {"model": Error, "description": "malformed request (a grid that is not ROWSxCOLS), or a module photo "
                                        "that cannot be inspected"},
    503: {"model": Error, "description": "queue full: retry after the Retry-After header's seconds"},
}


class CellOut(BaseModel):
    id: str | None = Field(description="result id: its image and overlays are kept under it for a while")
    name: str = Field(description="the uploaded file's name")
    width: int | None = None
    height: int | None = None
    probs: dict[str, Probability] = Field(description="per label, the probability")
    decisions: dict[str, str] = Field(description="per label: ok, review or defect")
    boxes: dict[str, list[int] | None] = Field(
        description="per label (not ok ones by default), [x0, y0, x1, y1] around where the model looked, in "
                    "the uploaded image's pixels (x1, y1 exclusive); null when nothing speaks for the label")
    error: str | None = Field(description="why this file could not be scored; null when it was")
    image: str | None = Field(None, description="URL of the cell as PNG")
    overlays: dict[str, str] = Field(default_factory=dict, description="per label, URL of its heatmap overlay")
    review: str | None = Field(None, description="review item id, when the cell waits for an operator")


class CellsOut(BaseModel):
    cells: list[CellOut]


class ModuleCellOut(BaseModel):
    row: int = Field(description="from 1, top to bottom")
    col: int = Field(description="from 1, left to right")
    id: str | None = Field(description="result id of the cell as cut")
    corners: list[list[float]] = Field(description="[[x, y]] TL, TR, BR, BL in the photo's pixels")
    probs: dict[str, Probability]
    decisions: dict[str, str]
    dark_area: float = Field(description="share of the cell darker than half the module's typical brightness")
    map_box: list[float] = Field(description="[x0, y0, x1, y1] of the cell in the map PNG's pixels")
    image: str | None = None
    review: str | None = None


class ModuleOut(BaseModel):
    id: str
    name: str
    grid: str
    rows: int
    cols: int
    grade: str
    rule: str = Field(description="the grading rule that gave the grade")
    counts: dict[str, int | float]
    seconds: float
    map: str = Field(description="URL of the module's map PNG")
    map_size: list[int]
    labels: list[str]
    cells: list[ModuleCellOut]


class Decoding(BaseModel):
    size: int
    shrink: str
    bit_depth: int


class ModelOut(BaseModel):
    model: str = Field(description="file name @ hash of the weights")
    labels: list[str]
    thresholds: dict[str, Probability]
    review_thresholds: dict[str, Probability]
    size: int = Field(description="the model's input: size x size pixels")
    decoding: Decoding
    backbone: str
    version: str = Field(description="elcell version")
    review: bool = Field(description="whether the review loop is on (--labels-out)")
    max_upload_mb: float
    max_files: int


class Health(BaseModel):
    status: str
    in_flight: int
    queued: int = Field(description="cells waiting for the model")
    batches: int
    cells: int
    mean_batch: float


class ReviewStatus(BaseModel):
    enabled: bool
    labels: list[str]
    waiting: int = 0
    answered: int = Field(0, description="cells answered: rows in labels.csv")
    dropped: int = 0
    rows: int = Field(0, description="rows in labels.csv")
    csv: str | None = None


class ReviewItemOut(BaseModel):
    id: str = Field(description="the cell's key: a hash of its pixels, the same however often it is scored")
    name: str
    probs: dict[str, Probability]
    decisions: dict[str, str]
    reason: str = Field(description="why it was chosen, e.g. 'uncertain: crack 0.47 near 0.50' or "
                                    "'random check of an ok cell'")
    random: bool = Field(description="drawn at random among the cells the model decided ok")
    image: str
    overlays: dict[str, str]


class ReviewNext(BaseModel):
    item: ReviewItemOut | None
    waiting: int
    answered: int
    dropped: int


class ReviewAnswer(BaseModel):
    # strict: `true`, "1" or 1.0 would be read as 1, and a typo in a client
    # would write a label nobody chose into labels.csv
    labels: dict[str, Annotated[int, Field(ge=0, le=1, strict=True)]] = Field(
        default_factory=dict, description="1 for each label the cell has (the number 0 or 1); "
                                          "a label left out is 0; {} is ok")


class ReviewSaved(BaseModel):
    id: str
    path: str = Field(description="the cell image, relative to labels.csv")
    labels: dict[str, int]
    rows: int
    waiting: int
    replaced: dict[str, int] | None = Field(None, description="the earlier, different answer this one replaced")
    same: bool = Field(False, description="the cell had this answer already: nothing was written")

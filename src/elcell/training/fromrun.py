"""`elcell train --from RUN`, the torch-free half: which checkpoint a run stands
for, which of its options a fine-tuning inherits, and the cells it trained on
(replayed so that the old line is not forgotten).

Torch-free, so that the command line builds `train --from`'s defaults (shown
by --help and --print-config) without importing PyTorch.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import numpy as np

from elcell.cells.labels import LabelTable, file_key, read_labels_csv
from elcell.errors import DataError
from elcell.judging.folds import PROTOCOL

ADAPT_RECIPE = "adapt"
SPLIT_CSV = "split.csv"  # every cell a run saw, with its part (train/val/test): the run's data record

# What a fine-tuning does not take from the run it starts from: its own data and
# folder, the protocol the run belonged to, and the starting weights (the run's
# network is the start). Everything else (network, decoding, augmentation,
# thresholds' recall) goes on as the run trained, so its features see cells as
# they learned them.
NOT_INHERITED = frozenset((
    "recipe", "data", "group", "out", "resume", "limit", "folds", "fold", "teacher", "teacher_weight",
    "test_fraction", "pretrained", "synthetic_cracks", "finetune_epochs", "from_run", "replay", "cache_dir",
    "init_seed"))


def _is_torch_archive(path: Path) -> bool:
    """Whether `path` is in torch.save's zip format (what Lightning writes), read
    without PyTorch: a zip holding a pickle at <archive>/data.pkl."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("/data.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def find_checkpoint(source: str) -> Path:
    """The checkpoint `source` stands for: a .ckpt file, or a run folder's best
    checkpoint (summary.json's, else the best-scored one in RUN/checkpoints,
    else last.ckpt). DataError naming what is missing otherwise."""
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"--from {source}: no such run folder or checkpoint")
    if path.is_file():
        if path.suffix.lower() == ".onnx":
            raise DataError(f"--from {source}: an ONNX file holds no training state; give the run folder it "
                            "was exported from (or its checkpoints/*.ckpt)")
        if not _is_torch_archive(path):  # named before its folder's config.yaml is looked for
            raise DataError(f"--from {source}: not a checkpoint of `elcell train`; give a run folder or "
                            "its checkpoints/*.ckpt")
        return path
    if (path / PROTOCOL).is_file():
        raise DataError(f"--from {source}: a k-fold protocol holds one model per fold; give one fold "
                        f"({path / 'fold0'}) or a model distilled from them")
    summary = path / "summary.json"
    if summary.is_file():
        best = path / json.loads(summary.read_text()).get("best_checkpoint", "")
        if best.is_file():
            return best
    scored = sorted(path.glob("checkpoints/best-*.ckpt"), key=_checkpoint_score)
    if scored:
        return scored[-1]
    if (path / "checkpoints" / "last.ckpt").is_file():
        return path / "checkpoints" / "last.ckpt"
    raise DataError(f"--from {source}: no checkpoint in {path / 'checkpoints'} (a run folder of `elcell train` "
                    "that finished at least one epoch)")


def _checkpoint_score(path: Path) -> float:
    """The validation F1 a best-epoch<E>-f1<F>.ckpt name carries."""
    match = re.search(r"-f1([0-9.]+?)(?:-v\d+)?\.ckpt$", path.name)
    return float(match.group(1)) if match else -1.0


def run_folder(checkpoint: Path) -> Path:
    """RUN/checkpoints/x.ckpt -> RUN."""
    return checkpoint.resolve().parent.parent


def inherited(record: dict) -> dict:
    """The options of a run's record that a fine-tuning from it starts with."""
    return {k: v for k, v in record.items() if k not in NOT_INHERITED}


def replay_cells(run: Path, source: str) -> LabelTable:
    """The cells the run recorded in RUN/split.csv, their part as the group
    (train/val/test). DataError if the record or its images are missing: the
    caller may go on without replay only when told to (--replay 0)."""
    record = run / SPLIT_CSV
    hint = "; give --replay 0 to fine-tune on the new cells alone (the old line may then be forgotten)"
    if not record.is_file():
        raise DataError(f"--from {source}: the run does not record its cells ({record} is missing){hint}")
    table = read_labels_csv(record, group="split")
    missing = [p for p in table.paths if not p.is_file()]
    if missing:
        raise DataError(f"--from {source}: {len(missing)} of the {len(table)} cells in {record} are gone "
                        f"(first: {missing[0]}){hint}")
    return table


def widen(table: LabelTable, names: list[str]) -> LabelTable:
    """`table` with the label columns `names`, unknown (NaN) where it has none:
    a label a cell was never judged on is not a negative."""
    targets = np.full((len(table), len(names)), np.nan, dtype=np.float32)
    for j, name in enumerate(names):
        if name in table.names:
            targets[:, j] = table.targets[:, table.names.index(name)]
    return LabelTable(paths=list(table.paths), names=list(names), targets=targets, groups=table.groups,
                      source=table.source)


def replay_count(share: float, new_cells: int, available: int) -> int:
    """How many old cells make up `share` of a part that holds `new_cells` new ones."""
    if share <= 0 or new_cells == 0:
        return 0
    return min(available, int(round(share / (1 - share) * new_cells)))


def stratified_draw(strata: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """`count` of the rows, sorted, each label combination drawn in proportion to
    its share (largest remainders first), so a rare label (inactive: 6 % of
    ELPV's cells) is replayed even into a few dozen cells."""
    keys = [tuple(row) for row in strata]
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(key, []).append(i)
    exact = {key: count * len(rows) / len(keys) for key, rows in groups.items()} if keys else {}
    taken = {key: int(value) for key, value in exact.items()}
    by_remainder = sorted(exact, key=lambda key: (exact[key] - taken[key], len(groups[key])), reverse=True)
    for key in by_remainder[:count - sum(taken.values())]:
        taken[key] += 1
    drawn = [i for key, rows in groups.items() for i in rng.permutation(rows)[:taken[key]]]
    return np.sort(np.asarray(drawn, dtype=np.int64))


def with_replay(new: LabelTable, split: np.ndarray, old: LabelTable | None, old_names: list[str],
                share: float, seed: int) -> tuple[LabelTable, np.ndarray]:
    """The new cells (split as given) and, drawn with `seed`, old training cells
    into train and old validation cells into val at `share` of each part, all
    with the old labels first and the new ones after (so the head's old outputs
    keep their places). Old test cells, and old cells the new data lists again,
    are never drawn."""
    names = list(old_names) + [n for n in new.names if n not in old_names]
    parts = [widen(new, names)]
    split_parts = [np.asarray(split, dtype=object)]
    if old is not None and share > 0:
        rng = np.random.default_rng(seed)
        relabelled = {file_key(p) for p in new.paths}  # the new label wins over the old
        fresh = np.array([file_key(p) not in relabelled for p in old.paths], dtype=bool)
        for part in ("train", "val"):
            pool = np.flatnonzero((np.asarray(old.groups) == part) & fresh)
            count = replay_count(share, int((split == part).sum()), len(pool))
            drawn = pool[stratified_draw(old.strata[pool], count, rng)]
            parts.append(widen(old.subset(drawn), names))
            split_parts.append(np.full(len(drawn), part, dtype=object))
    groups = None
    if new.groups is not None:  # the new cells keep their group; replayed ones are named as such
        groups = list(new.groups) + ["replay"] * sum(len(p) for p in parts[1:])
    merged = LabelTable(paths=[p for t in parts for p in t.paths], names=names,
                        targets=np.concatenate([t.targets for t in parts]), groups=groups,
                        source=f"{new.source} + replay" if len(parts) > 1 else new.source)
    return merged, np.concatenate(split_parts).astype(str)

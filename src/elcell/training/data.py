"""Splits, the decoded-image cache, and the batches that feed training.

Images are decoded once into a uint8 N x H x W array on disk and memory-mapped,
so an epoch costs a memory read instead of a PNG decode per cell, and RAM does
not grow with the data set. Augmentation happens later, on the device
(augment.py), on whole batches.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from elcell.cells.images import Decoding, load_cell, open_image
from elcell.cells.labels import LabelTable, label_fields
from elcell.errors import DataError, ImageError
from elcell.io import atomic_write_text
from elcell.judging.folds import assign_folds

SPLITS = ("train", "val", "test")


# --------------------------------------------------------------------------- split
def stratified_split(
    table: LabelTable, val_fraction: float, seed: int, test_fraction: float = 0.0
) -> np.ndarray:
    """Assign each row to train/val/test, stratified by label combination (and group);
    an unknown label is its own value in the combination, not a negative.

    Returns an array of split names. Deterministic for a given seed and table.
    """
    if not 0 < val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise DataError(
            f"--val-fraction {val_fraction} and --test-fraction {test_fraction} must be in (0, 1) and sum below 1"
        )
    keys = [tuple(row) for row in table.strata]
    if table.groups is not None:
        keys = [key + (group,) for key, group in zip(keys, table.groups)]
    rng = np.random.default_rng(seed)
    split = np.full(len(table), "train", dtype=object)
    for key in sorted(set(keys), key=str):
        members = np.flatnonzero([k == key for k in keys])
        members = rng.permutation(members)
        n_test = int(round(len(members) * test_fraction))
        n_val = int(round(len(members) * val_fraction))
        split[members[:n_test]] = "test"
        split[members[n_test : n_test + n_val]] = "val"
    for name, fraction in (("val", val_fraction), ("test", test_fraction)):
        # Tiny sets can round every stratum to zero; a split asked for is never empty.
        if fraction > 0 and not (split == name).any():
            train = np.flatnonzero(split == "train")
            if len(train) < 2:
                raise DataError(f"{table.source}: {len(table)} images are too few to split")
            split[rng.choice(train)] = name
    return split.astype(str)


def fold_split(table: LabelTable, k: int, fold: int, val_fraction: float, seed: int) -> np.ndarray:
    """The split of fold `fold`: its cells are `test`, and of the others a
    stratified `val_fraction` is `val` (early stopping, the best checkpoint and
    the thresholds are chosen on those), the rest `train`."""
    if not 0 <= fold < k:
        raise DataError(f"--fold {fold}: must be in 0..{k - 1} for --folds {k}")
    folds = assign_folds(table, k, seed)
    split = np.full(len(table), "test", dtype=object)
    rest = np.flatnonzero(folds != fold)
    split[rest] = stratified_split(table.subset(rest), val_fraction, seed + fold)
    return split.astype(str)


def write_split_csv(run: Path, table: LabelTable, split: np.ndarray) -> None:
    """RUN/split.csv: every cell with its part; and RUN/val.csv, RUN/test.csv: the
    held-out cells in the training format (absolute paths, the labels as given,
    soft ones included, unknown ones empty), for `evaluate --data`,
    `export --calibration` and tuning."""
    lines = [";".join(["path", "split", *table.names])]
    for image, part, targets in zip(table.paths, split, table.targets):
        lines.append(";".join([str(image), part, *label_fields(targets)]))
    atomic_write_text(run / "split.csv", "\n".join(lines) + "\n")
    for part in ("val", "test"):
        rows = np.flatnonzero(split == part)
        if len(rows):
            lines = [";".join(["path", *table.names])] + [
                ";".join([str(Path(table.paths[i]).resolve()), *label_fields(table.targets[i])])
                for i in rows]
            atomic_write_text(run / f"{part}.csv", "\n".join(lines) + "\n")


def limit_table(table: LabelTable, limit: int, seed: int) -> LabelTable:
    """A stratified random subset of `limit` cells (quick runs, tests)."""
    if limit >= len(table):
        return table
    split = stratified_split(table, val_fraction=limit / len(table), seed=seed)
    return table.subset(np.flatnonzero(split == "val"))


def check_labels(table: LabelTable, split: np.ndarray) -> None:
    """Every label needs known positive and negative cells in the train split;
    cells whose label is unknown (empty) count as neither."""
    train = split == "train"
    for i, name in enumerate(table.names):
        known = table.known[train, i]
        cells = f"{int(known.sum())} train cells with a known {name!r}"
        if not known.any():
            raise DataError(f"{table.source}: label {name!r} is unknown (empty) on all {int(train.sum())} "
                            "train cells; label some cells or drop the column")
        positives = int(table.positives[train, i][known].sum())
        # both kinds in the file, one kind in train: the split took the others to validation or test
        everywhere = table.positives[table.known[:, i], i] == 1
        split_off = (f"; these cells have {int(everywhere.sum())} positive and {int((~everywhere).sum())} "
                     "negative ones, and the split left one kind out of train: label more cells"
                     if everywhere.any() and not everywhere.all() else "")
        if positives == 0:
            raise DataError(
                f"{table.source}: label {name!r} has no positive example in the train split "
                f"({cells}){split_off or '; add positive cells or drop the column'}"
            )
        if positives == int(known.sum()):
            raise DataError(f"{table.source}: label {name!r} is positive on every train cell ({cells}){split_off}")


def pos_weights(targets: np.ndarray, weighting: str = "balanced") -> list[float]:
    """BCE pos_weight per label: negatives / positives among the cells whose label
    is known (not NaN), counted with soft targets (ELPV probabilities); its
    square root ('sqrt'); or 1 (no weighting)."""
    if weighting == "none":
        return [1.0] * targets.shape[1]
    positive = np.nansum(targets, axis=0)
    known = (~np.isnan(targets)).sum(axis=0)
    ratio = (known - positive) / positive
    return [float(w) for w in (np.sqrt(ratio) if weighting == "sqrt" else ratio)]


# --------------------------------------------------------------------------- cache
def default_cache_dir() -> Path:
    return Path(os.environ.get("ELCELL_CACHE", Path.home() / ".cache" / "elcell"))


def cache_key(paths: list[Path], decoding: Decoding) -> str:
    """Content hash of every image plus how they are decoded: any changed file gives a new cache."""
    # the default decoding keeps the key it had before --shrink and --bit-depth existed
    how = (f"size={decoding.size}" + ("" if decoding.shrink == "bilinear" else f" shrink={decoding.shrink}")
           + ("" if decoding.bit_depth == 16 else f" bit_depth={decoding.bit_depth}"))
    digest = hashlib.blake2b(f"elcell-cache-v1 {how}".encode(), digest_size=16)
    errors, found = [], []  # every missing file at once, not one per run
    for path in paths:
        try:
            digest.update(hashlib.blake2b(Path(path).read_bytes(), digest_size=16).digest())
            found.append(path)
        except FileNotFoundError:
            errors.append(f"{path}: image file not found")
        except OSError as err:
            errors.append(f"{path}: cannot read image ({err})")
    if errors:  # and the files that are there but no image, rather than in the next run
        raise DataError(_listed(errors + [error for error in map(_not_an_image, found) if error]))
    return digest.hexdigest()


def _not_an_image(path: Path) -> str | None:
    """Why `path` does not open as an image (its header only), or None."""
    try:
        with open_image(path, path):
            return None
    except ImageError as err:
        return str(err)
    except (OSError, SyntaxError, ValueError) as err:  # Pillow's UnidentifiedImageError among them
        return f"{path}: not a readable image ({err})"


def _listed(errors: list[str], shown: int = 10) -> str:
    more = f"\n  ... and {len(errors) - shown} more" if len(errors) > shown else ""
    return f"{len(errors)} image(s) cannot be used:\n  " + "\n  ".join(errors[:shown]) + more


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive lock so ranks on one node build the cache once and then share it."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _decode_chunk(job: tuple[list[int], list[str], Decoding]) -> tuple[list[int], np.ndarray, list[str]]:
    indices, paths, decoding = job
    out = np.zeros((len(paths), decoding.size, decoding.size), dtype=np.uint8)
    errors = []
    for row, path in enumerate(paths):
        try:
            out[row] = load_cell(path, decoding)
        except ImageError as err:
            errors.append(str(err))
    return indices, out, errors


def build_cache(
    paths: list[Path],
    decoding: Decoding,
    cache_dir: Path | None = None,
    workers: int | None = None,
    chunk: int = 128,
    progress: bool = True,
) -> np.ndarray:
    """Decode `paths` into a memory-mapped uint8 [N, size, size] array, or reuse it.

    Built in parallel processes, in chunks whose completion is recorded, so an
    interrupted build resumes where it stopped. Any unreadable image stops the
    build with a message naming the files.
    """
    cache_dir = Path(cache_dir or default_cache_dir())
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key(paths, decoding)
    final = cache_dir / f"{key}.npy"
    with _file_lock(cache_dir / f"{key}.lock"):
        if not final.exists():
            _fill_cache(paths, decoding, cache_dir / key, workers, chunk, progress)
    return np.load(final, mmap_mode="r")


def _fill_cache(
    paths: list[Path], decoding: Decoding, stem: Path, workers: int | None, chunk: int, progress: bool
) -> None:
    size = decoding.size
    partial = stem.with_suffix(".partial.npy")
    done_file = stem.with_suffix(".done.npy")
    shape = (len(paths), size, size)
    if partial.exists() and done_file.exists():
        images = np.lib.format.open_memmap(partial, mode="r+")
        done = np.load(done_file)
    else:
        images = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)
        done = np.zeros(len(paths), dtype=bool)
    todo = np.flatnonzero(~done)
    jobs = [
        (todo[i : i + chunk].tolist(), [str(paths[j]) for j in todo[i : i + chunk]], decoding)
        for i in range(0, len(todo), chunk)
    ]
    workers = workers or min(os.cpu_count() or 1, 8)
    errors: list[str] = []
    bar = tqdm(total=len(paths), initial=int(done.sum()), desc="Decoding images", unit="img",
               disable=not progress, leave=False)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for indices, decoded, chunk_errors in pool.map(_decode_chunk, jobs):
            if chunk_errors:
                errors.extend(chunk_errors)
                continue
            images[indices] = decoded
            images.flush()
            done[indices] = True
            _save_atomic(done_file, done)
            bar.update(len(indices))
    bar.close()
    if errors:
        raise DataError(_listed(errors))
    del images
    os.replace(partial, stem.with_suffix(".npy"))
    done_file.unlink()


def _save_atomic(path: Path, array: np.ndarray) -> None:
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def pixel_stats(images: np.ndarray, index: np.ndarray, chunk: int = 256) -> tuple[float, float]:
    """Mean and std (in [0, 1] units) of the cells in `index`, read chunk by chunk."""
    total = total_sq = 0.0
    count = 0
    for start in range(0, len(index), chunk):
        block = images[np.sort(index[start : start + chunk])].astype(np.float64) / 255.0
        total += block.sum()
        total_sq += np.square(block).sum()
        count += block.size
    mean = total / count
    return float(mean), float(np.sqrt(max(total_sq / count - mean * mean, 1e-12)))


# --------------------------------------------------------------------------- batches
class CachedCells(Dataset):
    """Rows of the image cache with their targets; fetched a whole batch at a time."""

    def __init__(self, images: np.ndarray, targets: np.ndarray, index: np.ndarray):
        self.images = images
        self.targets = torch.from_numpy(np.ascontiguousarray(targets, dtype=np.float32))
        self.index = np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        images, targets = self.__getitems__([i])
        return images[0], targets[0]

    def __getitems__(self, batch: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        # One fancy-index read of the memmap per batch instead of one per cell.
        rows = self.index[np.asarray(batch)]
        images = torch.from_numpy(np.ascontiguousarray(self.images[rows]))[:, None]
        return images, self.targets[rows]


def _keep_batch(batch):
    """collate_fn for CachedCells: __getitems__ already returns a stacked batch."""
    return batch


def cell_loader(images: np.ndarray, targets: np.ndarray, index: np.ndarray, batch_size: int,
                shuffle: bool, workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """Batches of the cache rows `index`, whole batches read at once."""
    dataset = CachedCells(images, targets, index)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        # A training batch of one cell breaks BatchNorm; drop a ragged last batch.
        drop_last=shuffle and len(dataset) > batch_size,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        collate_fn=_keep_batch,
    )


class CellDataModule(L.LightningDataModule):
    """Train/val loaders over the cache; uint8 batches, augmented on the device.
    (Test cells are scored through the exported model, not here.)"""

    def __init__(
        self,
        images: np.ndarray,
        table: LabelTable,
        split: np.ndarray,
        batch_size: int,
        workers: int = 0,
        pin_memory: bool = False,
    ):
        super().__init__()
        self.images, self.table, self.split = images, table, split
        self.batch_size, self.workers, self.pin_memory = batch_size, workers, pin_memory

    def _loader(self, part: str, shuffle: bool) -> DataLoader:
        return cell_loader(self.images, self.table.targets, np.flatnonzero(self.split == part),
                           self.batch_size, shuffle, self.workers, self.pin_memory)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

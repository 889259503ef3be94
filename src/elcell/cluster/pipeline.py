"""The Ray Data pipeline both commands share: inputs listed, decoded in tasks,
scored by a pool of actors that each hold one ONNX Runtime session, and the
results streamed back to the driver, which writes them as it gets them.

Sizing: an actor's ONNX Runtime session gets `threads` intra-op threads and
reserves about as many CPUs from Ray, so actors never run more threads than
the cluster has cores; decoding tasks reserve a fraction of a CPU each
(decoding a cell takes a few per cent of scoring it), so that they are
scheduled beside a full actor pool instead of waiting for a free core.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from elcell.cells.images import echo_worker_warning, hand_back_warnings, take_worker_warning
from elcell.cluster.session import Cluster, import_ray
from elcell.infer.runtime import Model, open_model

DECODE_CPUS = 0.25  # what one decoding task reserves
CHUNK = 200_000  # items per Ray Data run: the driver's list of an archive stays out of Ray
ACTOR_SHARE = 0.75  # of its threads' CPUs an actor reserves: the rest (a quarter) is left to decoding tasks


@dataclass
class Plan:
    """How many actors, with how many ONNX Runtime threads each."""

    actors: int
    threads: int

    @classmethod
    def for_cluster(cls, cluster: Cluster, actors: int | None = None, threads: int | None = None) -> Plan:
        # two threads per actor by default: on 2 cores one actor x 2 threads scored 0.82 of the
        # local rate, two actors x 1 thread 0.66 (benchmarks/ray_throughput.py, docs/scaling.md)
        threads = threads or min(2, max(1, cluster.cpus))
        return cls(actors or max(1, cluster.cpus // threads), threads)

    def describe(self) -> str:
        return f"{self.actors} actor{'s' if self.actors != 1 else ''} x {self.threads} ONNX Runtime thread" + \
            ("s" if self.threads != 1 else "")


def warning_column(rows: int) -> np.ndarray:
    """A batch's `warning` column: what the worker said while making it, on its first row."""
    column = np.full(rows, "", dtype=object)
    if rows:
        column[0] = take_worker_warning()
    return column


def echo_warnings(batch: dict[str, np.ndarray]) -> None:
    """The driver says what the workers said (their stderr goes to Ray's logs only)."""
    for message in batch["warning"]:
        echo_worker_warning(str(message))


class ModelActor:
    """Holds one ONNX Runtime session, opened from the model's bytes (a worker on
    another node may not see the driver's files) with `threads` intra-op threads
    and no spin-waiting (other actors and decoding tasks share the cores)."""

    def __init__(self, model_bytes: bytes, name: str, threads: int):
        hand_back_warnings()
        self.folder = tempfile.TemporaryDirectory(prefix="elcell-actor-")
        path = Path(self.folder.name) / name
        path.write_bytes(model_bytes)
        self.model: Model = open_model(path, threads=threads, spin=False)


def stream(model: Model, items: list[dict[str, Any]], decode: Callable, decode_kwargs: dict[str, Any],
           actor: type, actor_kwargs: dict[str, Any], batch_size: int, plan: Plan) -> Iterator[dict[str, np.ndarray]]:
    """Run `items` through decode (tasks) and `actor` (the pool); yields the
    actors' output batches as they finish, in no particular order. An archive
    goes through in chunks of CHUNK items, so that Ray's copy of the list stays
    small; each chunk starts its actors again (seconds per hour of work)."""
    model_bytes = model.path.read_bytes()
    for start in range(0, len(items), CHUNK):
        yield from _run(items[start:start + CHUNK], decode, decode_kwargs, actor,
                        dict(model_bytes=model_bytes, name=model.path.name, threads=plan.threads, **actor_kwargs),
                        batch_size, plan)


def _run(items: list[dict[str, Any]], decode: Callable, decode_kwargs: dict[str, Any], actor: type,
         actor_kwargs: dict[str, Any], batch_size: int, plan: Plan) -> Iterator[dict[str, np.ndarray]]:
    ray = import_ray()
    # enough blocks that every actor has work and a block's results come back soon
    blocks = max(1, min(len(items) // batch_size + 1, 4 * plan.actors + len(items) // (batch_size * 8)))
    dataset = ray.data.from_items(items, override_num_blocks=blocks)
    dataset = dataset.map_batches(decode, fn_kwargs=decode_kwargs, batch_size=batch_size, batch_format="numpy",
                                  num_cpus=DECODE_CPUS)
    dataset = dataset.map_batches(actor, fn_constructor_kwargs=actor_kwargs, batch_size=batch_size,
                                  batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=plan.actors),
                                  num_cpus=ACTOR_SHARE * plan.threads)
    yield from dataset.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1)

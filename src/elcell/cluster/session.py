"""Connecting to Ray: a local Ray on this machine, or an existing cluster.

A local Ray gets a modest object store: Ray's default (30 % of memory) would
claim gigabytes of a shared 24 GiB machine for batches of a few MB each. Its
workers also run at normal priority: Ray starts them at niceness 15 to keep
its own daemons responsive on a cluster's nodes, which on a workstation
shared with other jobs would make `--ray` slower than the same command
without it for no gain.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from elcell.errors import DataError

LOCAL = "local"
LOCAL_OBJECT_STORE = 512 * 2**20  # bytes: a few dozen batches of cells or module photos in flight


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401  (the extra installs ray[data]; plain ray lacks it)
    except ModuleNotFoundError:
        raise DataError("--ray needs Ray Data: pip install 'elcell[cluster]' (ray[data])") from None
    return ray


@dataclass
class Cluster:
    """What the scorers size their actors by."""

    address: str
    cpus: int
    gpus: int
    started_here: bool  # this process started Ray, so it stops it


def connect(address: str = LOCAL) -> Cluster:
    """Start a local Ray (address `local`) or join one (`auto`, `ray://host:10001`,
    host:6379). Quiet: Ray's progress bars would interleave with elcell's lines."""
    ray = import_ray()
    started_here = not ray.is_initialized()  # a caller (a test, a notebook) may have connected already
    if started_here:
        options = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
        try:
            if address == LOCAL:
                ray.init(num_cpus=os.cpu_count(), object_store_memory=LOCAL_OBJECT_STORE,
                         _system_config={"worker_niceness": 0}, **options)
            else:
                ray.init(address=address, **options)
        except (ConnectionError, RuntimeError, ValueError) as err:
            raise DataError(f"--ray {address}: cannot connect to a Ray cluster there ({err})") from None
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # a line per dataset run otherwise
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    resources = ray.cluster_resources()
    return Cluster(address, int(resources.get("CPU", 1)), int(resources.get("GPU", 0)), started_here)


def shutdown() -> None:
    ray = import_ray()
    if ray.is_initialized():
        ray.shutdown()

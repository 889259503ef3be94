"""`elcell predict --ray` and `elcell inspect --ray`: connect, size the actor
pool, and run the commands' own code with Ray's scorer or inspector."""

from __future__ import annotations

import sys

from elcell.cluster.cells import ray_scorer
from elcell.cluster.modules import ray_inspector
from elcell.cluster.pipeline import Plan
from elcell.cluster.session import LOCAL, connect, shutdown
from elcell.errors import DataError
from elcell.infer import predict
from elcell.pvmodules import inspect


def main(args) -> int:
    if getattr(args, "heatmaps", None):
        raise DataError("--heatmaps with --ray: overlays are drawn where the files are; run the flagged "
                        "cells through `elcell predict --heatmaps` or `elcell explain` without --ray")
    cluster = connect(args.ray)
    try:
        plan = Plan.for_cluster(cluster, args.actors, args.threads or None)
        where = "a local Ray" if args.ray == LOCAL else f"the Ray cluster at {args.ray}"
        print(f"elcell: {where}: {cluster.cpus} CPUs, {plan.describe()}", file=sys.stderr)
        if args.command == "predict":
            return predict.main(args, scorer=ray_scorer(plan))
        return inspect.main(args, inspector=ray_inspector(plan))
    finally:
        if cluster.started_here:
            shutdown()

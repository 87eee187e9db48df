"""Starting or joining Ray: the embedded local instance by default, a cluster when RAY_ADDRESS is set."""

from __future__ import annotations

import logging
import os


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by ``RAY_ADDRESS`` (set by ``ray job submit``), else start a local instance.

    A local instance gets ``num_cpus`` logical CPUs (default: the machine's cores, at least 4 logical CPUs so
    that Ray Data map tasks still find a CPU beside 2 Train workers; see docs/troubleshooting.md).
    """
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    if num_cpus is None:
        num_cpus = max(4, os.cpu_count() or 1)
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=False,
        logging_level=logging.WARNING,
        log_to_driver=True,
        configure_logging=True,
    )

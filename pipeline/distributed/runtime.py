"""Starting or joining Ray, quietly: a private local instance by default, a cluster only when RAY_ADDRESS says so.

The decision (docs/troubleshooting.md): without ``RAY_ADDRESS`` a job always starts its own local Ray instance,
even when a cluster started with ``ray start`` runs on this machine (or a stale ``ray_current_cluster`` file of
one that died is left in Ray's temp folder); it says so in one line. ``RAY_ADDRESS`` (set by ``ray job submit``,
or by hand: ``host:port``, ``auto``, ``ray://...``) joins that cluster; a cluster that cannot be reached is a
one-line error. Either way the terminal shows the job's own lines (including the progress lines with ETA that
training workers print: rank 0 of Ray Train, the evaluation's fold tasks), Ray's errors about the job and a
progress bar where the job draws one (``progress_bar``, in an interactive terminal): Ray's INFO lines, Ray
Data's plan, progress bars and progress log blocks and Ray Train's controller chatter stay in Ray's log folder
(``<temp dir>/ray/session_latest/logs``). ``ANATDIFF_RAY_LOGS=1`` forwards them to the terminal again, for
debugging.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

from pipeline.config import UserError

#: set to 1 to see every Ray worker's output and Ray's INFO lines in the terminal (debugging)
VERBOSE_ENV = "ANATDIFF_RAY_LOGS"


def _verbose() -> bool:
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes")


def _reachable(address: str, timeout_s: float = 0.5) -> bool:
    """True when something accepts a TCP connection at ``host:port``."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def _recorded_address() -> tuple[str, str | None]:
    """(path, address) of the cluster ``ray start`` recorded in Ray's temp folder (``ray_current_cluster``)."""
    from ray._common.utils import get_ray_address_file

    path = get_ray_address_file(None)
    try:
        with open(path) as f:
            return path, f.read().strip() or None
    except OSError:
        return path, None


def local_cluster_note() -> str | None:
    """One line about a cluster recorded by ``ray start`` (which a bare ``ray.init()`` would attach to), or
    None when there is none."""
    path, address = _recorded_address()
    if address is None:
        return None
    if _reachable(address):
        return (f"a Ray cluster started with `ray start` runs at {address}; this job starts its own local Ray "
                "instance (to run it on that cluster instead: RAY_ADDRESS=auto)")
    return (f"ignoring {path}: the Ray cluster it names ({address}) is gone; this job starts its own local Ray "
            "instance")


def _has_local_token() -> bool:
    from ray._raylet import AuthenticationTokenLoader

    return bool(AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True))


def _join_cluster(address: str, options: dict) -> None:
    """``ray.init`` on the cluster named by RAY_ADDRESS (read by Ray itself, so that a local cluster's token
    is used as for ``ray.init()``); a TCP check first, so that a dead address fails at once, in one line."""
    import ray

    target = _recorded_address()[1] if address == "auto" else address
    if target is None or (not target.startswith("ray://") and not _reachable(target, timeout_s=3.0)):
        raise UserError(f"no Ray cluster answers at RAY_ADDRESS={address}" + (f" ({target})" if target not in
                        (None, address) else "") + ": start that cluster, or unset RAY_ADDRESS to run on a "
                        "local Ray instance")
    if target == _recorded_address()[1] and "RAY_AUTH_MODE" not in os.environ and _has_local_token():
        # this machine's `ray start` cluster: use the local token, as Ray does for an address it found itself
        from ray._private.authentication.authentication_token_setup import _enable_token_auth

        _enable_token_auth()
    try:
        ray.init(**options)
    except (ConnectionError, RuntimeError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"cannot join the Ray cluster at RAY_ADDRESS={address} ({first}); check its address "
                        "and token (~/.ray/auth_token), or unset RAY_ADDRESS to run on a local Ray instance") from None


class _DropProgressNotice(logging.Filter):
    """Ray Data's one-line notice that its own progress bars are off (the jobs draw their own)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith("Progress bars disabled")


def _quiet_ray_data() -> None:
    """Ray Data's console handler at WARNING (its plan / progress log blocks go to ``ray-data.log`` only) and
    its own progress bars off (a job that wants one draws it: ``progress_bar``)."""
    import ray.data

    from ray._private.log import PlainRayHandler

    ray.data.DataContext.get_current().enable_progress_bars = _verbose()
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, PlainRayHandler):
            handler.setLevel(logging.INFO if _verbose() else logging.WARNING)
            handler.addFilter(_DropProgressNotice())


#: the lines workers print for the terminal (progress with ETA, probe scores) start with 6 spaces, as the
#: jobs' own stage lines do; anything else a worker prints (library INFO, warnings) stays in Ray's log files
JOB_LINE = r"^ {6}\S"


def job_line(text: str) -> None:
    """Write one line for the terminal from a worker (or the driver): indented to ``JOB_LINE``, straight to
    stdout (Ray Train's print patch would also copy a ``print`` into its logger: every line twice)."""
    sys.stdout.write("      " + text.lstrip() + "\n")
    sys.stdout.flush()


def _only_job_lines_from_workers() -> None:
    """Forward only ``JOB_LINE`` lines of the workers' output to the terminal (Ray's log deduplicator: allowed
    lines pass undeduplicated, the rest are skipped); ``ANATDIFF_RAY_LOGS=1`` forwards everything."""
    import re

    from ray._private import ray_logging

    if _verbose():
        return
    for dedup in (ray_logging.stdout_deduplicator, ray_logging.stderr_deduplicator):
        dedup.allow_re, dedup.skip_re = re.compile(JOB_LINE), re.compile("")


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True):
    """A tqdm bar on stderr, drawn only in an interactive terminal (and when ``enabled``); use as a context
    manager and ``update(n)``."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=not (enabled and sys.stderr.isatty()))


def init_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by ``RAY_ADDRESS``, else start a private local instance (see the module doc).

    A local instance gets ``num_cpus`` logical CPUs (default: the machine's cores, at least 4 logical CPUs so
    that Ray Data map tasks still find a CPU beside 2 Train workers; see docs/troubleshooting.md).
    Raises UserError (one line) when ``RAY_ADDRESS`` names a cluster that cannot be joined.
    """
    import ray

    if ray.is_initialized():
        return
    # worker output reaches the terminal: the training workers' progress lines are the job's own lines
    quiet = {"log_to_driver": True, "logging_level": logging.INFO if _verbose() else logging.ERROR,
             "configure_logging": True}
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address:
        _join_cluster(address, quiet)
    else:
        note = local_cluster_note()
        if note:
            print(f"anatdiff: {note}", file=sys.stderr, flush=True)
        ray.init(address="local", num_cpus=num_cpus or max(4, os.cpu_count() or 1), include_dashboard=False,
                 **quiet)
    _quiet_ray_data()
    _only_job_lines_from_workers()

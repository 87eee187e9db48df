"""Shared plumbing of the job entry points: --config/--set parsing and user-error handling."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable

from pipeline.config import StrictModel, UserError, load_config, parse_set_overrides


def job_parser(prog: str, description: str, default_config: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"anatdiff {prog}", description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    default = f" (default preset: {default_config})" if default_config else ""
    parser.add_argument("--config", default=default_config, metavar="FILE|PRESET",
                        help=f"YAML config file or preset name under jobs/configs{default}")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config field, e.g. --set optim.steps=10 (repeatable)")
    return parser


def resolve(model: type[StrictModel], args: argparse.Namespace, cli: dict[str, Any]) -> StrictModel:
    """Preset/file, then CLI flags that were given, then --set overrides."""
    overrides = {k: v for k, v in cli.items() if v is not None}
    overrides.update(parse_set_overrides(args.set))
    return load_config(model, args.config, overrides)


def _user_error(exc: BaseException) -> UserError | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, UserError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__  # Ray wraps task errors (RayTaskError.cause)
    return None


def guarded(prog: str, fn: Callable[[], int | None]) -> int:
    """Run ``fn``; a user error is one clear line on stderr and exit code 2, never a traceback."""
    try:
        return int(fn() or 0)
    except KeyboardInterrupt:
        print(f"anatdiff {prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001
        user = _user_error(e)
        if user is None:
            raise
        for line in str(user).splitlines() or [""]:
            print(f"anatdiff {prog}: error: {line}", file=sys.stderr)
        return 2

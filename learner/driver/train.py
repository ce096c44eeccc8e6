"""``rlfleet train --config job.yaml [--set a.b=c ...] [--resume-from URI|latest] [--verbose]``.

Every check of the config (and the one read of the dataset) happens before Ray starts, so a bad
config exits with status 2 and one line naming the key, without starting anything. A job that
fails once running exits with status 1 and one line (which actor, what to do); its traceback goes
to ``<output_dir>/error.log`` (and to stderr with ``--verbose``).
"""

from __future__ import annotations

import argparse
import re
import sys
import traceback
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from rlfleet.common.config import JobConfig, load_job_config
from rlfleet.learner.driver.checks import ConfigError, one_line
from rlfleet.learner.driver.cluster import init_ray
from rlfleet.learner.driver.data import checked_rows
from rlfleet.learner.driver.loop import DispatchHook, JobResult, PPOJob
from rlfleet.learner.group import first_line


def run_job(
    config: JobConfig,
    resume_from: str | None = None,
    on_dispatch: DispatchHook | None = None,
    rows: list[dict[str, Any]] | None = None,
) -> JobResult:
    """Starts the actors on the connected Ray cluster and trains; ``resume_from`` is a
    checkpoint URI, or ``"latest"`` under ``checkpoint.uri``. ``rows`` are the dataset's rows
    (read and checked here when not given)."""
    if rows is None:
        rows = checked_rows(config)
    resume_uri = resolve_resume(config, resume_from)
    job = PPOJob(config, rows, on_dispatch=on_dispatch)
    try:
        if resume_uri:
            job.resume(resume_uri)
        return job.train()
    finally:
        job.shutdown()


def resolve_resume(config: JobConfig, resume_from: str | None) -> str | None:
    """The checkpoint URI to resume from: ``resume_from`` itself, or for ``"latest"`` the
    ``checkpoint.uri`` (the learner loads the newest checkpoint under it)."""
    if resume_from != "latest":
        return resume_from
    if config.checkpoint.uri is None:
        raise ConfigError("checkpoint.uri: --resume-from latest needs a checkpoint URI")
    return config.checkpoint.uri


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="job config (YAML)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. generators.num_actors=4 (repeatable)",
    )
    parser.add_argument(
        "--resume-from",
        metavar="URI|latest",
        help="resume from a checkpoint URI, or the latest one under checkpoint.uri",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="print the full traceback of an error (it always goes to <output_dir>/error.log)",
    )


def run(args: argparse.Namespace) -> int:
    """The ``rlfleet train`` command: 0 when the job finished (or had nothing left to do), 1
    when it failed while running, 2 for an invalid config."""
    try:
        config = load_job_config(args.config, args.overrides)
        rows = checked_rows(config)
        resolve_resume(config, args.resume_from)
    except (ValueError, OSError) as exc:
        print(
            f"rlfleet train: invalid job config {args.config}: {config_error_line(exc)}",
            file=sys.stderr,
        )
        return 2
    try:
        init_ray(config)
        result = run_job(config, args.resume_from, rows=rows)
    except Exception as exc:  # noqa: BLE001 - any failure of a running job becomes one line
        log = write_error_log(Path(config.output_dir), exc)
        print(f"rlfleet train: {job_error_line(exc)}; {what_to_do(config, log)}", file=sys.stderr)
        if args.verbose:
            traceback.print_exception(exc, file=sys.stderr)
        return 1
    print(summary(config, result))
    return 0


def summary(config: JobConfig, result: JobResult) -> str:
    """The closing line: this run's iterations and rollouts (not those of the runs it resumed)."""
    if not result.stats:
        return (
            f"nothing to do: the checkpoint is at iteration {config.iterations} = iterations; "
            "raise iterations to train further"
        )
    first, last = result.stats[0], result.stats[-1]
    rollouts = sum(line["samples"] for line in result.stats)
    return (
        f"done: {len(result.stats)} iterations ({first['iteration']}..{last['iteration']}), "
        f"{rollouts} rollouts, reward {first['reward_mean']:.3f} -> {last['reward_mean']:.3f}, "
        f"stats in {Path(config.output_dir) / 'stats.jsonl'}"
    )


def config_error_line(exc: BaseException) -> str:
    """A config error as one line: each pydantic error as ``key: message (got value)``; a check
    across sections (``JobConfig``'s own) names its keys in its message."""
    if isinstance(exc, ValidationError):
        return "; ".join(map(validation_error_line, exc.errors()))
    if isinstance(exc, FileNotFoundError):
        return f"no such file: {exc.filename}"
    return one_line(exc)


def validation_error_line(error: dict[str, Any]) -> str:
    if not error["loc"]:
        return error["msg"].removeprefix("Value error, ")
    line = f"{'.'.join(map(str, error['loc']))}: {error['msg']}"
    return line if error["type"] == "missing" else f"{line} (got {error['input']!r})"


def job_error_line(exc: BaseException) -> str:
    """A running job's error as one line: the actor method that raised it, when an actor did,
    and the first line of the original error."""
    import ray.exceptions

    if isinstance(exc, ray.exceptions.RayTaskError):
        task = re.search(r"ray::([\w.]+)\(", str(exc))  # the only place a dual instance keeps it
        where = task.group(1) if task else "a Ray task"
        return f"{where}: {type(exc.cause).__name__}: {first_line(exc.cause)}"
    if isinstance(exc, ray.exceptions.RayActorError):
        actor = re.search(r"class_name: (\w+)", str(exc))
        return f"{actor.group(1) if actor else 'an actor'} died: {first_line(exc)}"
    return f"{type(exc).__name__}: {first_line(exc)}"


def write_error_log(output_dir: Path, exc: BaseException) -> Path:
    """Writes the full traceback to ``output_dir/error.log``; returns its path."""
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / "error.log"
    path.write_text("".join(traceback.format_exception(exc)))
    return path


def what_to_do(config: JobConfig, log: Path) -> str:
    again = "--resume-from latest" if config.checkpoint.uri is not None else "the same command"
    return f"traceback in {log} (or rerun with --verbose); fix the cause, then run {again}"

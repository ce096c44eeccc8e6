"""``rlfleet train --config job.yaml [--set a.b=c ...] [--resume-from URI|latest]``.

Every check of the config (and the one read of the dataset) happens before Ray starts, so a bad
config exits with status 2 and a message naming the key, without starting anything.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from rlfleet.common.config import JobConfig, load_job_config
from rlfleet.learner.driver.checks import ConfigError, check_config
from rlfleet.learner.driver.cluster import init_ray
from rlfleet.learner.driver.data import read_prompt_rows
from rlfleet.learner.driver.loop import DispatchHook, JobResult, PPOJob


def run_job(
    config: JobConfig,
    resume_from: str | None = None,
    on_dispatch: DispatchHook | None = None,
    rows: list[dict[str, Any]] | None = None,
) -> JobResult:
    """Starts the actors on the connected Ray cluster and trains; ``resume_from`` is a
    checkpoint URI, or ``"latest"`` under ``checkpoint.uri``. ``rows`` are the dataset's rows
    (read and checked here when not given)."""
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


def run(args: argparse.Namespace) -> int:
    """The ``rlfleet train`` command: 0 when the job finished, 2 for an invalid config."""
    try:
        config = load_job_config(args.config, args.overrides)
        check_config(config)
        rows = read_prompt_rows(config.dataset.path, config.dataset.prompt_field)
        resolve_resume(config, args.resume_from)
    except (ValidationError, ConfigError, OSError) as exc:
        print(f"rlfleet train: invalid job config {args.config}:\n{exc}", file=sys.stderr)
        return 2
    init_ray(config)
    result = run_job(config, args.resume_from, rows=rows)
    last = result.stats[-1]
    print(
        f"done: {len(result.stats)} iterations, {len(result.consumed_rollout_ids)} rollouts, "
        f"reward {result.stats[0]['reward_mean']:.3f} -> {last['reward_mean']:.3f}, "
        f"stats in {Path(config.output_dir) / 'stats.jsonl'}"
    )
    return 0

"""What a job writes about each iteration: stats.jsonl, samples.jsonl and the experiment trackers.

``JobReport.record`` takes an iteration's stats line and its scored rollouts:

- ``output_dir/stats.jsonl`` gets the line;
- ``output_dir/samples.jsonl`` gets ``logging.samples_per_iteration`` of the rollouts, one line
  each (iteration, rollout id, policy version, prompt text, response text, reward, the reward's
  components when it has some, and a chat prompt's messages beside its rendered text). They are
  the rollouts with the lowest ids (the first prompts' samples, a whole group when
  ``samples_per_iteration`` is at least ``n_samples_per_prompt``): the same ones on every run
  and resume, and no random stream is drawn from;
- the trackers of ``logging`` (TensorBoard, W&B) get the line's numbers at step ``iteration``
  (lists such as ``rollout_ids`` are left out; so is ``iteration`` itself, the step).

Both files get their lines before the checkpoint of the iteration is saved (``durable``: on
disk), so a checkpoint never holds an iteration the files lack. A job that trains again from a
checkpoint at iteration k (a resume, a restarted learner) calls ``keep_through(k)``: both files
drop their lines after k, and the trackers are rewound to step k + 1 (``Trackers.rewind``):
TensorBoard's reader discards the steps logged before and shows them as logged again; W&B cannot
take steps back (a resumed job is a new W&B run; after a learner restart within one run, W&B
ignores the iterations trained again below the last step it had, and shows the others).
"""

from __future__ import annotations

import json
import logging
import os
from numbers import Real
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from rlfleet.common.chat import MESSAGES_METADATA_KEY
from rlfleet.common.config import GROUPED_ALGORITHMS, JobConfig
from rlfleet.common.trackers import TensorBoardTracker, Tracker, Trackers, WandbTracker
from rlfleet.job.checks import check_trackers_installed

logger = logging.getLogger(__name__)

ZERO_STD_GROUPS = "critic_free/reward/frac_zero_std_groups"
"""The share of a grouped algorithm's prompts whose samples all got the same reward (so an
advantage of 0 each)."""

SAMPLE_COLUMNS = (
    "rollout_id",
    "policy_version",
    "prompt",
    "metadata",
    "response",
    "score",
    "score_components",
)
"""The rollout columns a samples.jsonl line is made of (not the token ids and logprobs)."""


def open_job_trackers(config: JobConfig) -> Trackers:
    """The trackers ``config.logging`` names, given the job's config; none when it names none.
    W&B's files go to ``logging.wandb.dir`` (``output_dir`` when unset), the run named after
    the job."""
    check_trackers_installed(config)
    logging, settings = config.logging, config.model_dump(mode="json")
    trackers: list[Tracker] = []
    if logging.tensorboard is not None:
        trackers.append(TensorBoardTracker(logging.tensorboard, settings))
    if logging.wandb is not None:
        wandb = logging.wandb
        trackers.append(
            WandbTracker(
                project=wandb.project,
                directory=wandb.dir or config.output_dir,
                config=settings,
                mode=wandb.mode,
                entity=wandb.entity,
                name=config.name,
            )
        )
    return Trackers(trackers)


def tracker_scalars(stats: dict[str, Any]) -> dict[str, float]:
    """The numbers of a stats line, but its ``iteration`` (the trackers' step)."""
    return {
        key: value
        for key, value in stats.items()
        if isinstance(value, Real) and not isinstance(value, bool) and key != "iteration"
    }


def sample_lines(
    iteration: int, scored: pa.RecordBatch, count: int, chat: bool
) -> list[dict[str, Any]]:
    """samples.jsonl's lines of an iteration: its ``count`` rollouts with the lowest ids; with
    ``chat`` each prompt's messages too (they travel in the metadata)."""
    lowest_ids = pc.sort_indices(scored.column("rollout_id"))[:count]
    rows = scored.select(SAMPLE_COLUMNS).take(lowest_ids).to_pylist()
    return [sample_line(iteration, row, chat) for row in rows]


def sample_line(iteration: int, row: dict[str, Any], chat: bool) -> dict[str, Any]:
    line: dict[str, Any] = {
        "iteration": iteration,
        "rollout_id": row["rollout_id"],
        "policy_version": row["policy_version"],
        "prompt": row["prompt"],
    }
    if chat:
        line["messages"] = json.loads(row["metadata"])[MESSAGES_METADATA_KEY]
    line["response"] = row["response"]
    line["reward"] = row["score"]
    if row["score_components"]:
        line["reward_components"] = dict(row["score_components"])
    return line


class JsonLines:
    """A JSONL file of lines that each have an ``iteration``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def append(self, lines: list[dict[str, Any]], durable: bool) -> None:
        """Appends ``lines``; with ``durable``, on disk when this returns."""
        with self.path.open("a") as out:
            out.writelines(json.dumps(line) + "\n" for line in lines)
            out.flush()
            if durable:
                os.fsync(out.fileno())

    def keep_through(self, iteration: int) -> list[int]:
        """Drops the lines after ``iteration`` (an absent file is then an empty one); returns the
        iterations of the lines kept."""
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        kept = [line for line in lines if json.loads(line)["iteration"] <= iteration]
        self.path.write_text("".join(f"{line}\n" for line in kept))
        return [json.loads(line)["iteration"] for line in kept]


class JobReport:
    """stats.jsonl, samples.jsonl and the trackers of one job (see the module's docstring)."""

    def __init__(
        self,
        output_dir: Path,
        samples_per_iteration: int,
        chat: bool,
        trackers: Trackers,
        grouped: bool = False,
    ) -> None:
        output_dir.mkdir(parents=True, exist_ok=True)
        self.stats = JsonLines(output_dir / "stats.jsonl")
        self.samples = JsonLines(output_dir / "samples.jsonl")
        self.samples_per_iteration = samples_per_iteration
        self.chat = chat
        self.trackers = trackers
        self.stats_lines: list[dict[str, Any]] = []
        """This run's lines of stats.jsonl."""
        self.warn_zero_std = grouped
        """Whether a batch of zero-variance groups only is still to be warned of (once)."""

    @classmethod
    def open(cls, config: JobConfig) -> JobReport:
        """The job's report; a ``ConfigError`` when a tracker's package is missing."""
        return cls(
            Path(config.output_dir),
            config.logging.samples_per_iteration,
            config.dataset.messages_field is not None,
            open_job_trackers(config),
            grouped=config.algorithm in GROUPED_ALGORITHMS,
        )

    @property
    def stats_path(self) -> Path:
        return self.stats.path

    @property
    def samples_path(self) -> Path:
        return self.samples.path

    def start_fresh(self) -> None:
        """Empties both files for a job that starts at iteration 0."""
        self.stats.keep_through(-1)
        self.samples.keep_through(-1)
        self.stats_lines = []

    def record(
        self, stats: dict[str, Any], scored: pa.RecordBatch | None = None, durable: bool = False
    ) -> None:
        """The iteration's samples (of ``scored``, when given) and stats line into their files
        (on disk, with ``durable``, before the checkpoint that holds the iteration is saved),
        then its numbers into the trackers."""
        iteration = stats["iteration"]
        if scored is not None and self.samples_per_iteration:
            lines = sample_lines(iteration, scored, self.samples_per_iteration, self.chat)
            self.samples.append(lines, durable)
        self.stats.append([stats], durable)
        self.stats_lines.append(stats)
        self.trackers.log(tracker_scalars(stats), step=iteration)
        if self.warn_zero_std and stats.get(ZERO_STD_GROUPS) == 1:
            self.warn_zero_std = False
            logger.warning(
                "iteration %d: %s is 1: every prompt's samples got the same reward, so every "
                "advantage is 0 and the batch gave no policy gradient; if that goes on, raise "
                "generators.temperature or generators.n_samples_per_prompt, or check the "
                "reward (said once)",
                iteration,
                ZERO_STD_GROUPS,
            )

    def keep_through(self, iteration: int) -> list[int]:
        """Drops the lines after ``iteration`` (trained again from a checkpoint at it) and
        rewinds the trackers to the step after it; the iterations of the stats lines kept."""
        kept = self.stats.keep_through(iteration)
        self.samples.keep_through(iteration)
        self.stats_lines = [line for line in self.stats_lines if line["iteration"] <= iteration]
        self.trackers.rewind(iteration + 1)
        return kept

    def close(self) -> None:
        """Closes the trackers (the W&B run finishes)."""
        self.trackers.close()

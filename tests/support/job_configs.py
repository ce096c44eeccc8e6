"""Job configs sized for the test machines, and reading a job's stats.jsonl."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from rlfleet.common.config import JobConfig

REPO = Path(__file__).resolve().parents[2]
DEMO_CONFIG = REPO / "examples" / "demo.yaml"
PROMPTS = REPO / "examples" / "demo_prompts.jsonl"


CRITIC_FREE_SECTIONS = {
    "generators": {"n_samples_per_prompt": 4},
    "critic_free": {"batch_size": 8, "learning_rate": 1e-3},
}
"""A critic-free ``small_job``'s own sections: 2 prompts x 4 samples, in place of ``ppo``."""


def small_job(model_dir: Path, out: Path, **fields: Any) -> JobConfig:
    """A short job sized for 2 cores: 8 samples x 8 tokens, one PPO epoch (or, with a critic-free
    ``algorithm``, 2 prompts x 4 samples and one GRPO-family step), fractional CPUs so that 2
    generators + 2 reward actors + the learner fit the 4-CPU test cluster. ``fields`` replace
    top-level keys; a dict updates that section."""
    raw: dict[str, Any] = {
        "model": str(model_dir),
        "dataset": {"path": str(PROMPTS)},
        "generators": {"num_actors": 1, "num_cpus": 0.5, "max_new_tokens": 8},
        "reward": {"function": "rlfleet.reward.functions:sentiment", "num_cpus": 0.5},
        "learner": {"num_cpus": 0.5},
        "ppo": {"batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 1, "learning_rate": 1e-3},
        "iterations": 2,
        "output_dir": str(out),
    }
    if fields.get("algorithm", "ppo") != "ppo":
        del raw["ppo"]
        for section, defaults in CRITIC_FREE_SECTIONS.items():
            raw[section] = {**raw.get(section, {}), **defaults}
    for section, value in fields.items():
        if isinstance(value, dict):
            raw[section] = {**raw.get(section, {}), **value}
        else:
            raw[section] = value
    return JobConfig.model_validate(raw)


def quiet_job(model_dir: Path, out: Path, **fields: Any) -> JobConfig:
    """``small_job`` with metrics off unless ``fields`` ask for them: no metrics endpoint or
    discovery file (the fake actors of tests/job/driver_fakes.py ignore models and rewards, so
    any ``model_dir`` does for them)."""
    return small_job(model_dir, out, **{"metrics": {"enabled": False}, **fields})


def read_stats(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]


def write_config(path: Path, config: JobConfig) -> Path:
    path.write_text(yaml.safe_dump(config.model_dump(exclude_unset=True, mode="json")))
    return path


def train_recording(job: Any) -> list[Any]:
    """Trains ``job`` (a ``TrainingJob``) to its end and stops it, even when training fails;
    returns each scored batch the learner was given, in order."""
    trained: list[Any] = []
    score = job.score
    job.score = lambda rollouts: trained.append(score(rollouts)) or trained[-1]
    try:
        job.train()
    finally:
        job.shutdown()
    return trained

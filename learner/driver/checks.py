"""Checks of a job config that pydantic cannot make: they run before any actor starts.

They look at files (the model directory, the reward model) and import the reward function; the
dataset's rows are read (and checked) once, by ``rlfleet.learner.driver.data.read_prompt_rows``.
"""

from __future__ import annotations

from pathlib import Path

from rlfleet.common.config import JobConfig


class ConfigError(ValueError):
    """A job config that validates but cannot run; the message starts with the key."""


def check_config(config: JobConfig) -> None:
    """Raises ``ConfigError`` for a model directory, reward function or reward model that
    cannot be loaded."""
    if not is_model_dir(config.model):
        raise ConfigError(f"model: {config.model} is not a model directory (no config.json)")
    if config.reward.function:
        from rlfleet.reward.functions import load_function

        try:
            load_function(config.reward.function)
        except ValueError as exc:
            raise ConfigError(f"reward.function: {exc}") from exc
    if config.reward.model and not is_model_dir(config.reward.model):
        raise ConfigError(f"reward.model: {config.reward.model} is not a model directory")


def is_model_dir(path: str) -> bool:
    return (Path(path) / "config.json").is_file()

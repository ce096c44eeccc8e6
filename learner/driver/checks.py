"""Checks of a job config that pydantic cannot make: they run before any actor starts.

They look at files (the model directory and its tokenizer, the reward model), the model's
context and attention head size, import the reward function and probe-write the checkpoint
location. The dataset's rows are read (and checked) once, by
``rlfleet.learner.driver.data.read_prompt_rows``; ``check_reward_arguments`` checks their field
names against the reward function's arguments.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rlfleet.common.config import CheckpointConfig, JobConfig

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt", "spiece.model")
"""A model directory has a tokenizer when it holds at least one of these."""


class ConfigError(ValueError):
    """A job config that validates but cannot run; the message starts with the key."""


def check_config(config: JobConfig) -> None:
    """Raises ``ConfigError`` for what would otherwise fail after the actors started: a model
    directory without weights config or tokenizer, GPUs asked of a local Ray instance on a
    machine without any, a generation budget that fills the context,
    a model the generators' engine cannot serve, a reward function or model that cannot be
    loaded, a checkpoint location that cannot be written."""
    check_model_dir("model", config.model)
    check_local_gpus(config)
    check_generation_fits_context(config)
    check_engine_serves_model(config)
    for key, source in reward_sources(config):
        check_reward_source(key, source)
    if config.checkpoint.uri is not None:
        check_checkpoint_writable(config.checkpoint)


def check_local_gpus(config: JobConfig, gpus: int | None = None) -> None:
    """A job on a local Ray instance (no ``ray_address``, no ``RAY_ADDRESS``) can use only this
    machine's GPUs (``gpus``: their count, else torch's): asking for one without any would wait
    for the learner's placement group until ``learner.timeout_s``."""
    if config.ray_address or os.environ.get("RAY_ADDRESS"):
        return
    wanted = [
        key
        for key, amount in (
            ("learner.num_gpus", config.learner.num_gpus),
            ("generators.num_gpus", config.generators.num_gpus),
            ("reward.num_gpus", config.reward.num_gpus),
        )
        if amount > 0
    ]
    if not wanted:
        return
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    if gpus == 0:
        raise ConfigError(
            f"{wanted[0]}: this machine has no GPU and the job starts a local Ray instance; set "
            f"{' and '.join(wanted)} to 0, or join a cluster with GPUs (ray_address)"
        )


def reward_sources(config: JobConfig) -> list[tuple[str, Any]]:
    """``(config key, source)`` for the job's reward and for each of its components; a source
    has ``function``, ``model`` and ``kwargs``."""
    components = config.reward.components or []
    if not components:
        return [("reward", config.reward)]
    return [(f"reward.components[{i}] ({c.name})", c) for i, c in enumerate(components)]


def check_reward_source(key: str, source: Any) -> None:
    """The reward function imports, the reward model directory is one."""
    if source.function:
        from rlfleet.reward.functions import load_function

        try:
            load_function(source.function)
        except ValueError as exc:
            raise ConfigError(f"{key}.function: {exc}") from exc
    if source.model:
        check_model_dir(f"{key}.model", source.model)


def is_model_dir(path: str) -> bool:
    return (Path(path) / "config.json").is_file()


def check_model_dir(key: str, path: str) -> None:
    """A Hugging Face model directory: config.json and the files of a tokenizer."""
    if not is_model_dir(path):
        raise ConfigError(f"{key}: {path} is not a model directory (no config.json)")
    if not any((Path(path) / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(
            f"{key}: {path} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save one "
            f"there with tokenizer.save_pretrained({path!r})"
        )


def context_length(model_dir: str) -> int:
    """The model's context in tokens, from its config.json (unbounded when it names none)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(config.get("n_positions") or config.get("max_position_embeddings") or 1 << 30)


def check_generation_fits_context(config: JobConfig) -> None:
    """``generators.max_new_tokens`` must leave room for at least a one-token prompt."""
    context = context_length(config.model)
    if config.generators.max_new_tokens >= context:
        raise ConfigError(
            f"generators.max_new_tokens: {config.generators.max_new_tokens} leaves no room for a "
            f"prompt in the model's context of {context} tokens; set it to at most {context - 1}"
        )


def check_engine_serves_model(config: JobConfig) -> None:
    """vLLM generators on CPU (``num_gpus: 0``) need an attention head size its CPU build
    serves; the hf engine serves any."""
    if config.generators.engine != "vllm" or config.generators.num_gpus > 0:
        return
    from rlfleet.actors.vllm_engine import cpu_serve_problem

    problem = cpu_serve_problem(config.model)
    if problem:
        raise ConfigError(f"generators.engine: {config.model}: {problem}")


def check_checkpoint_writable(config: CheckpointConfig) -> None:
    """Writes and deletes a small file under ``checkpoint.uri`` (local or s3), so that a
    location the job cannot write fails now rather than after the first training step."""
    from rlfleet.common.storage import open_storage

    probe = f".rlfleet-write-probe-{uuid.uuid4().hex}"
    try:
        storage = open_storage(config.uri, config.s3_endpoint_override)
        storage.write_bytes(probe, b"rlfleet")
        storage.delete(probe)
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"checkpoint.uri: cannot write to {config.uri} ({one_line(exc)}); make it writable "
            "or choose another location"
        ) from exc


def check_reward_arguments(config: JobConfig, field_names: Iterable[str]) -> None:
    """A reward function gets the dataset's fields (all but the prompt) as keyword arguments
    beside ``prompts``, ``responses`` and ``reward.kwargs``: a field of the same name as one
    of those would clash on the first score."""
    fields = set(field_names) - {config.dataset.prompt_field}
    for key, source in reward_sources(config):
        if not source.function:
            continue
        clashing = sorted(fields & {"prompts", "responses", *source.kwargs})
        if clashing:
            raise ConfigError(
                f"dataset.path: {config.dataset.path} has fields {clashing} that clash with the "
                f"reward function's arguments (prompts, responses, {key}.kwargs); rename them in "
                f"the dataset or in {key}.kwargs"
            )


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (whitespace runs, newlines included, become one
    space)."""
    return " ".join(str(exc).split()) or type(exc).__name__

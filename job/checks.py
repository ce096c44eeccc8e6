"""Checks of a job config that pydantic cannot make: they run before any actor starts.

They look at files (the model directory and its tokenizer, the reward model), the model's
context and attention head size, import the reward function and probe-write the checkpoint
location. The dataset's rows are read (and checked) once, by
``rlfleet.job.data.read_prompt_rows``; ``check_reward_arguments`` checks their field
names against the reward function's arguments.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import os
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from rlfleet.common.config import CheckpointConfig, JobConfig, RewardConfig
from rlfleet.common.errors import first_line, one_line
from rlfleet.trainers.lora import check_lora_job

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "vocab.txt", "spiece.model")
"""A model directory has a tokenizer when it holds at least one of these."""


class ConfigError(ValueError):
    """A job config that validates but cannot run; the message starts with the key."""


def check_config(config: JobConfig) -> None:
    """Raises ``ConfigError`` for what would otherwise fail after the actors started: a model
    directory without weights config or tokenizer, or with a ``model_type`` transformers cannot
    load (without ``trust_remote_code``), GPUs asked of a local Ray instance on a
    machine without any, a generation budget (or eval's) that fills the context,
    a model the generators' engine cannot serve, a reward function or model (or eval's) that
    cannot be loaded, a checkpoint location, ``output_dir`` or ``metrics.file_sd_dir``
    that cannot be written, a tracker whose package is missing, a LoRA
    job that cannot run (peft missing, a ``lora.target_modules`` name the model lacks). Warns
    (once, at start) of actors a batch leaves idle."""
    check_model_dir("model", config.model)
    check_model_type_known("model", config.model, config.trust_remote_code)
    check_local_gpus(config)
    check_generation_fits_context(config)
    check_engine_serves_model(config)
    for key, source in reward_sources(config):
        check_reward_source(key, source, config.reward.timeout_s)
    check_eval(config)
    check_env(config)
    if config.checkpoint.uri is not None:
        check_checkpoint_writable(config.checkpoint)
    check_writable_dir("output_dir", config.output_dir)
    if config.metrics.enabled:
        check_writable_dir("metrics.file_sd_dir", config.metrics.file_sd_dir)
        check_job_name_names_a_file(config)
    check_trackers_installed(config)
    try:
        check_lora_job(config)
    except ValueError as error:
        raise ConfigError(str(error)) from None
    check_lora_target_modules(config)
    warn_idle_actors(config)


def warn_idle_actors(config: JobConfig) -> None:
    """A batch is split into one shard per generator (and per reward actor), a shard at least
    one sample: a batch smaller than the pool leaves the rest of it idle every iteration."""
    samples = config.samples_per_iteration
    for key, actors in (
        ("generators.num_actors", config.generators.num_actors),
        ("reward.num_actors", config.reward.num_actors),
    ):
        if samples < actors:
            logger.warning(
                "%s: %d samples per iteration for %s %d: %d of them get no sample and stay "
                "idle; set %s to at most %d or raise %s",
                config.batch_key,
                samples,
                key,
                actors,
                actors - samples,
                key,
                samples,
                config.batch_key,
            )


LORA_MODULE_TYPES = (
    "Linear",
    "Embedding",
    "Conv1d",
    "Conv2d",
    "Conv3d",
    "MultiheadAttention",
    "Conv1D",
)
"""The classes of the modules peft's LoRA adapts (torch's, and transformers' ``Conv1D``)."""


def check_lora_target_modules(config: JobConfig) -> None:
    """Each name of a ``lora.target_modules`` list must name (as peft matches it: the module's
    name or its last dotted parts) a module of the model that LoRA adapts: peft skips an
    unknown name silently when another one matches, and fails the learner's start (again at
    each restart) when none does."""
    lora = config.lora
    if lora is None or lora.target_modules == "all-linear":
        return
    names = adaptable_module_names(config.model, config.trust_remote_code)
    for target in lora.target_modules:
        if any(name == target or name.endswith(f".{target}") for name in names):
            continue
        suffixes = sorted({name.rpartition(".")[2] for name in names})
        close = difflib.get_close_matches(target, suffixes, n=3, cutoff=0.5)
        valid = [*close, *(suffix for suffix in suffixes if suffix not in close)]
        few = ", ".join(valid[:8]) + (", ..." if len(valid) > 8 else "")
        raise ConfigError(
            f"lora.target_modules: {target!r} names no module of {config.model} that LoRA can "
            f"adapt; its modules are named {few} (or all-linear)"
        )


def adaptable_module_names(model_dir: str, trust_remote_code: bool = False) -> list[str]:
    """The names of the causal LM's modules that LoRA adapts (``LORA_MODULE_TYPES``), from the
    model built on the meta device from its config.json: no weights are read."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        model_config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(
                model_config, trust_remote_code=trust_remote_code
            )
    except (ValueError, OSError, KeyError) as exc:
        raise ConfigError(
            f"model: cannot build {model_dir} from its config.json to check "
            f"lora.target_modules ({one_line(exc)})"
        ) from exc
    return [
        name
        for name, module in model.named_modules()
        if any(cls.__name__ in LORA_MODULE_TYPES for cls in type(module).__mro__)
    ]


def model_vocab_size(model_dir: str) -> int | None:
    """The rows of the model's embedding: ``vocab_size`` in its config.json (its text
    config's, for a multimodal one); None when it names none."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    return int(size) if size else None


def check_tokenizer_fits_model(key: str, model_dir: str, tokenizer: Any) -> None:
    """Every id of the model directory's tokenizer (``len(tokenizer)``, added tokens too) must
    have a row in the model's embedding: a larger tokenizer would give a prompt ids past it,
    an IndexError in the first forward, after every actor started."""
    vocab_size = model_vocab_size(model_dir)
    tokens = len(tokenizer)
    if vocab_size is not None and tokens > vocab_size:
        raise ConfigError(
            f"{key}: the tokenizer in {model_dir} has {tokens} tokens but the model's embedding "
            f"has {vocab_size} (vocab_size in its config.json), so ids {vocab_size}..{tokens - 1} "
            "have none; save the model's own tokenizer there, or resize the embedding "
            f"(model.resize_token_embeddings({tokens})) and save the model"
        )


TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
"""The package each ``logging`` tracker needs (the ``trackers`` extra)."""


def check_trackers_installed(config: JobConfig) -> None:
    """A ``ConfigError`` naming the ``logging`` key whose tracker's package is missing."""
    for key, package in TRACKER_PACKAGES.items():
        if getattr(config.logging, key) is not None and importlib.util.find_spec(package) is None:
            raise ConfigError(
                f"logging.{key}: the {package!r} package is not installed; install it "
                f"(pip install 'rlfleet[trackers]') or remove logging.{key}"
            )


def check_local_gpus(config: JobConfig, gpus: int | None = None) -> None:
    """A job on a local Ray instance (no ``ray_address``, no ``RAY_ADDRESS``) can use only this
    machine's GPUs (``gpus``: their count, else torch's): asking for one without any would wait
    for the learner's placement group until ``learner.timeout_s``."""
    if config.ray_address or os.environ.get("RAY_ADDRESS"):
        return
    eval_reward = config.eval.reward if config.eval else None
    wanted = [
        key
        for key, amount in (
            ("learner.num_gpus", config.learner.num_gpus),
            ("generators.num_gpus", config.generators.num_gpus),
            ("reward.num_gpus", config.reward.num_gpus),
            ("eval.reward.num_gpus", eval_reward.num_gpus if eval_reward else 0),
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
    return reward_config_sources("reward", config.reward)


def reward_config_sources(key: str, reward: RewardConfig) -> list[tuple[str, Any]]:
    """``reward_sources`` of the reward section at ``key``."""
    components = reward.components or []
    if not components:
        return [(key, reward)]
    return [(f"{key}.components[{i}] ({c.name})", c) for i, c in enumerate(components)]


def check_reward_source(key: str, source: Any, timeout_s: float = 30.0) -> None:
    """The reward function imports, the reward model directory is one, the scorer at the reward
    URL accepts connections (within ``timeout_s``)."""
    if source.url:
        check_url_accepts_connections(f"{key}.url", source.url, timeout_s)
    if source.function:
        from rlfleet.reward.functions import load_function

        try:
            load_function(source.function)
        except ValueError as exc:
            raise ConfigError(f"{key}.function: {exc}") from exc
    if source.model:
        check_model_dir(f"{key}.model", source.model)


def check_url_accepts_connections(key: str, url: str, timeout_s: float) -> None:
    """A TCP connection to the host and port of ``url`` opens (nothing is sent), retried until
    ``timeout_s``: a scorer that is down or a mistyped URL fails now, not at the first score
    after every actor started. Not checked when a proxy serves the URL (the job's requests go
    through it)."""
    import socket
    import time
    import urllib.parse
    import urllib.request

    from rlfleet.common.secrets import masked_url

    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if urllib.request.getproxies().get(parts.scheme) and not urllib.request.proxy_bypass(host):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout_s)):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"{key}: cannot connect to {masked_url(url)} within {timeout_s:g} s "
                    f"(reward.timeout_s): {exc}; start the scorer or fix the URL"
                ) from exc
            time.sleep(min(1.0, timeout_s))


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


def check_model_type_known(key: str, model_dir: str, trust_remote_code: bool) -> None:
    """transformers must load the config of the ``model_type`` that the model's config.json
    names (``AutoConfig``) without running the directory's own code: a type it does not know
    fails every actor's start, and each restart. A config.json that names its own code
    (``auto_map``) loads only with ``trust_remote_code``, which lets that code run in the
    actors (not here)."""
    try:
        raw = json.loads((Path(model_dir) / "config.json").read_text())
    except ValueError:
        return  # not JSON: context_length says so
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    own_code = bool(raw.get("auto_map")) if isinstance(raw, dict) else False
    if not model_type or (trust_remote_code and own_code):
        return
    import transformers
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    except (ValueError, OSError, KeyError) as exc:
        known = f"transformers {transformers.__version__}"
        if own_code:
            raise ConfigError(
                f"{key}: {model_dir} has model_type {model_type!r}, which {known} does not "
                "know, and its config.json names its own code (auto_map), which runs only with "
                "trust_remote_code: true; set trust_remote_code: true if you trust that code, "
                "or use a model transformers supports"
            ) from exc
        raise ConfigError(
            f"{key}: {known} cannot load the config of {model_dir} (model_type "
            f"{model_type!r}): {first_line(exc)}"
        ) from exc


def context_length(model_dir: str) -> int:
    """The model's context in tokens, from its config.json (unbounded when it names none)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(config.get("n_positions") or config.get("max_position_embeddings") or 1 << 30)


def check_generation_fits_context(config: JobConfig) -> None:
    """``generators.max_new_tokens`` must leave room for at least a one-token prompt."""
    check_budget_fits_context("generators.max_new_tokens", config.generators.max_new_tokens, config)


def check_budget_fits_context(key: str, max_new_tokens: int, config: JobConfig) -> None:
    """A token budget (at ``key``) must leave room for at least a one-token prompt."""
    context = context_length(config.model)
    if max_new_tokens >= context:
        raise ConfigError(
            f"{key}: {max_new_tokens} leaves no room for a prompt in the model's context of "
            f"{context} tokens; set it to at most {context - 1}"
        )


def check_env(config: JobConfig) -> None:
    """A multi-turn job's environment (``env:``): importable, with the methods it needs, tools
    whose schemas serialize, a known tool parser, a constructor that takes ``env.kwargs``, and
    a chat template that renders the tools (envs/loading.py); and a total token budget that
    fits the context."""
    if config.env is None:
        return
    from rlfleet.envs.loading import (
        EnvConfigError,
        check_environment,
        check_template_supports_tools,
    )

    check_budget_fits_context("env.max_total_tokens", config.env.max_total_tokens, config)
    if config.env.tools is not None and config.dataset.messages_field is None:
        raise ConfigError(
            "env.tools: tools reach the model through the chat template, but the dataset's "
            "prompts are text; set dataset.messages_field to the rows' conversations"
        )
    try:
        schemas = check_environment(config.env)
        if schemas is not None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(
                config.model, trust_remote_code=config.trust_remote_code
            )
            check_template_supports_tools(tokenizer, config.model, schemas)
    except EnvConfigError as error:
        raise ConfigError(str(error)) from None


def check_eval(config: JobConfig) -> None:
    """Held-out evaluation's own token budget and reward, when the job evaluates (its prompts
    are checked when they are read: ``evaluation.EvalPrompts.from_config``)."""
    evaluation = config.eval
    if evaluation is None:
        return
    if evaluation.max_new_tokens is not None:
        check_budget_fits_context("eval.max_new_tokens", evaluation.max_new_tokens, config)
    if evaluation.reward is not None:
        for key, source in reward_config_sources("eval.reward", evaluation.reward):
            check_reward_source(key, source)


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


def check_writable_dir(key: str, path: str) -> None:
    """The directory ``path`` (config key ``key``), or its nearest existing parent when it is
    not there yet, must be a directory the job can write: probed with a directory made and
    removed there (nothing stays), so that a location the job cannot write fails now rather
    than after the actors started."""
    existing = Path(path).expanduser().absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{key}: {existing} is a file, not a directory; choose another {key}")
    probe = existing / f".rlfleet-write-probe-{uuid.uuid4().hex}"
    try:
        probe.mkdir()
        probe.rmdir()
    except OSError as exc:
        raise ConfigError(
            f"{key}: cannot write to {existing} ({one_line(exc)}); make it writable or choose "
            f"another {key}"
        ) from exc


def check_job_name_names_a_file(config: JobConfig) -> None:
    """With metrics on, the job's ``name`` names its discovery file
    (``<metrics.file_sd_dir>/<name>.json``)."""
    from rlfleet.common.metrics import file_sd_path

    try:
        file_sd_path(config.name, config.metrics.file_sd_dir)
    except ValueError as exc:
        raise ConfigError(f"name: {exc}") from exc


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

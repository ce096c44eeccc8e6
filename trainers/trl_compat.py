"""TRL v0.11's ``PPOTrainer`` surface beyond ``step``: what scripts reach for.

:class:`TRLCompatMixin` (a base of :class:`rlfleet.trainers.ppo.PPOTrainer`) carries
``log_stats``, ``save_pretrained``, an ``accelerator`` and the plain attributes TRL set in
``__init__``. Where rlfleet deliberately differs from TRL v0.11.4, it says so in that class's
docstring, the one place that lists the differences.

:func:`generate` is TRL v0.11.4's ``PPOTrainer.generate``: sample responses with Hugging Face
``generate``. Sampling draws from torch's global RNG, as Hugging Face's ``generate`` does: seed it
to repeat.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from rlfleet.algorithms.masked import std
from rlfleet.common.trackers import Table, Tracker, Trackers, open_trackers, plain

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

DEFAULT_LOGGING_DIR = "rlfleet_logs"

WHERE_THE_MATH_IS = (
    "the math is in rlfleet.algorithms: masked statistics in .masked, KL penalties in "
    ".kl, per-token rewards in .rewards, GAE in .advantages, clipped losses in .losses"
)
STEP_INTERNALS = f"PPOTrainer.step runs this itself; {WHERE_THE_MATH_IS}"
NO_HUB = (
    "rlfleet's trainer does not talk to the Hugging Face Hub: save with "
    "ppo_trainer.save_pretrained(directory), then upload that folder with huggingface_hub "
    "(HfApi().upload_folder) or call model.push_to_hub(...)"
)
NO_ACCELERATE = (
    "rlfleet's PPOTrainer runs in one process without accelerate or DeepSpeed; to train on "
    "several processes or GPUs run a distributed job (`rlfleet train --config job.yaml`)"
)
NO_COLUMN_REMOVAL = (
    "rlfleet never drops dataset columns (PPOConfig.remove_unused_columns has no effect): the "
    "dataloader yields every column through your data_collator"
)

UNSUPPORTED_TRAINER_NAMES = {
    "batched_forward_pass": STEP_INTERNALS,
    "compute_rewards": STEP_INTERNALS,
    "compute_advantages": STEP_INTERNALS,
    "loss": STEP_INTERNALS,
    "train_minibatch": STEP_INTERNALS,
    "record_step_stats": STEP_INTERNALS,
    "prepare_model_inputs": STEP_INTERNALS,
    "_kl_penalty": STEP_INTERNALS,
    "_step_safety_checker": STEP_INTERNALS,
    "_early_stop": STEP_INTERNALS,
    "push_to_hub": NO_HUB,
    "push_to_hub_kwargs": NO_HUB,
    "create_model_card": NO_HUB,
    "compare_step": NO_HUB,
    "highest_reward": NO_HUB,
    "_prepare_deepspeed": NO_ACCELERATE,
    "_remove_unused_columns": NO_COLUMN_REMOVAL,
    "_set_signature_columns_if_needed": NO_COLUMN_REMOVAL,
    "_signature_columns": NO_COLUMN_REMOVAL,
}


class UnsupportedAPIError(AttributeError):
    """A TRL or accelerate name rlfleet deliberately does not provide; the message says what to
    use instead. An ``AttributeError``, so ``hasattr`` and ``getattr(..., default)`` still work."""


@dataclass(frozen=True)
class SingleProcessState:
    """accelerate's ``AcceleratorState`` for one process without DeepSpeed or FSDP."""

    device: torch.device
    distributed_type: str = "NO"
    num_processes: int = 1
    process_index: int = 0
    local_process_index: int = 0
    mixed_precision: str = "no"
    deepspeed_plugin: None = None
    fsdp_plugin: None = None


class SingleProcessAccelerator:
    """What TRL scripts use of ``accelerate.Accelerator``, as it behaves in a single process.

    ``device`` is the trainer's model's device; this is the main (and only) process; ``gather``,
    ``gather_for_metrics`` and ``reduce`` return their input; ``unwrap_model`` returns the model;
    ``prepare`` returns its arguments, models moved to ``device``; the process-ordering context
    managers do nothing. ``log`` writes to the trackers of :func:`open_trackers` in the trainer's
    ``run_dir``, opened on first use; ``end_training`` closes them.
    """

    num_processes = 1
    process_index = 0
    local_process_index = 0
    is_main_process = True
    is_local_main_process = True
    distributed_type = "NO"
    use_distributed = False
    mixed_precision = "no"
    sync_gradients = True

    def __init__(self, trainer: TRLCompatMixin) -> None:
        self._trainer = trainer
        self._trackers: Trackers | None = None

    @property
    def device(self) -> torch.device:
        return self._trainer.current_device

    @property
    def state(self) -> SingleProcessState:
        return SingleProcessState(device=self.device)

    @property
    def gradient_accumulation_steps(self) -> int:
        return self._trainer.config.gradient_accumulation_steps

    # ----------------------------------------------------------------- one process: identities

    def unwrap_model(self, model: nn.Module, keep_fp32_wrapper: bool = True) -> nn.Module:
        return model

    def prepare(self, *args: Any, device_placement: Any = None) -> Any:
        prepared = tuple(a.to(self.device) if isinstance(a, nn.Module) else a for a in args)
        return prepared[0] if len(prepared) == 1 else prepared

    def gather(self, tensor: Any) -> Any:
        return tensor

    def gather_for_metrics(self, input_data: Any, use_gather_object: bool = False) -> Any:
        return input_data

    def reduce(self, tensor: Any, reduction: str = "sum", scale: float = 1.0) -> Any:
        return tensor

    def wait_for_everyone(self) -> None:
        """Nothing to wait for."""

    def main_process_first(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def local_main_process_first(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def autocast(self, *args: Any, **kwargs: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def accumulate(self, *models: nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> None:
        loss.backward(**kwargs)

    def clip_grad_norm_(
        self, parameters: Iterable[torch.Tensor], max_norm: float, norm_type: float = 2.0
    ) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm, norm_type=norm_type)

    def print(self, *args: Any, **kwargs: Any) -> None:
        print(*args, **kwargs)

    # ----------------------------------------------------------------- trackers

    def _open_trackers(self) -> Trackers:
        if self._trackers is None:
            config = self._trainer.config
            self._trackers = open_trackers(
                self._trainer.run_dir,
                log_with=config.log_with,
                project=config.tracker_project_name,
                config=config.to_dict(),
                init_kwargs=config.tracker_kwargs,
            )
        return self._trackers

    @property
    def trackers(self) -> list[Tracker]:
        return self._open_trackers().trackers

    def get_tracker(self, name: str, unwrap: bool = False) -> Any:
        """The tracker called ``name`` ("jsonl", "tensorboard", "wandb"); with ``unwrap`` its
        ``SummaryWriter`` or W&B run, as accelerate's ``get_tracker``."""
        tracker = self._open_trackers().get(name)
        if unwrap:
            return getattr(tracker, "writer", None) or getattr(tracker, "run", tracker)
        return tracker

    def log(
        self, values: Mapping[str, Any], step: int | None = None, log_kwargs: Any = None
    ) -> None:
        """Log to every tracker at ``step`` (default: the trainer's ``current_step``)."""
        self._open_trackers().log(values, self._trainer.current_step if step is None else step)

    def end_training(self) -> None:
        """Close the trackers (the W&B run finishes); a later ``log`` opens them again."""
        if self._trackers is not None:
            self._trackers.close()
            self._trackers = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise UnsupportedAPIError(
            f"Accelerator.{name} is not available: {NO_ACCELERATE}. This accelerator has only "
            "the single-process behaviour scripts rely on (device, is_main_process, "
            "num_processes, unwrap_model, prepare, gather, gather_for_metrics, print, log)."
        )


class TRLCompatMixin:
    """Attributes and methods TRL v0.11 scripts reach for on a ``PPOTrainer``.

    Supported as in TRL v0.11.4: ``log_stats``, ``save_pretrained``, ``accelerator``,
    ``gather_stats``, ``model_params``, ``is_distributed``, ``is_peft_model``,
    ``is_encoder_decoder``, ``optional_peft_ctx`` (and, on the trainer itself, ``generate``,
    ``step``, ``dataloader``, ``current_device``, ``prepare_dataloader``, ``kl_ctl``, ``running``,
    ``optimizer``, ``lr_scheduler``, ``ref_model``, ``tokenizer``, ``config``).

    Where rlfleet deliberately differs (this is the one list; README.md's in-process section
    points here):

    - One process, no accelerate. ``accelerator`` is a :class:`SingleProcessAccelerator`: what
      accelerate does with one process (``num_processes == 1``, ``is_main_process``,
      ``gather`` returns its input, ``state.deepspeed_plugin is None``, ...). Accelerate
      features with no single-process meaning (DeepSpeed, FSDP, ``accelerator_kwargs``) raise
      :class:`UnsupportedAPIError`; the distributed job (``rlfleet train``) is the way to scale.
    - ``current_device`` is the model's device.
    - Creating the trainer does not seed the global RNGs (TRL's called ``set_seed(config.seed)``):
      call :func:`rlfleet.core.set_seed` first, as TRL's examples do.
    - ``log_stats`` always appends one JSON line to ``run_dir/stats.jsonl`` (``run_dir`` is
      ``project_kwargs["logging_dir"]`` (else ``project_dir``, else ``./rlfleet_logs``) /
      ``exp_name``): ``step``, ``time``, the scalar stats, ``env/reward_mean``,
      ``env/reward_std`` and the ``game_log`` table (``columns_to_log`` + ``reward``). With
      ``log_with="tensorboard"`` event files go to ``run_dir`` (scalars, histograms, and the
      table as Markdown text; TRL's tensorboard dropped arrays and the table); with ``"wandb"``
      a W&B run goes to ``run_dir/wandb``, offline unless ``tracker_kwargs={"wandb":
      {"mode": ...}}`` or ``WANDB_MODE`` says otherwise. The step logged is the number of PPO
      steps done. ``env/reward_std`` is 0, not NaN, for one reward.
    - ``save_pretrained`` writes the model (value head included) and the tokenizer; no model
      card and no Hub upload (``push_to_hub`` and ``push_to_hub_if_best_kwargs`` are
      unsupported: save, then upload the folder).
    - Causal LMs without PEFT only: ``is_peft_model`` and ``is_encoder_decoder`` are False.
    - TRL's step internals (``compute_rewards``, ``compute_advantages``, ``loss``,
      ``batched_forward_pass``, ...) raise :class:`UnsupportedAPIError` pointing at
      :mod:`rlfleet.algorithms`.
    """

    is_distributed = False
    is_peft_model = False
    is_encoder_decoder = False
    optional_peft_ctx = contextlib.nullcontext
    """TRL's adapter-disabling context for PEFT models: a no-op without PEFT."""

    @cached_property
    def accelerator(self) -> SingleProcessAccelerator:
        return SingleProcessAccelerator(self)

    @property
    def run_dir(self) -> Path:
        """Where ``log_stats`` writes: ``<logging_dir>/<exp_name>``."""
        project = self.config.project_kwargs
        logging_dir = project.get("logging_dir") or project.get("project_dir")
        return Path(logging_dir or DEFAULT_LOGGING_DIR) / self.config.exp_name

    @property
    def model_params(self) -> Iterator[nn.Parameter]:
        return (p for p in self.model.parameters() if p.requires_grad)

    def gather_stats(self, stats: dict[str, Any]) -> dict[str, Any]:
        """Stats averaged over processes: with one process, ``stats`` itself."""
        return stats

    def log_stats(
        self,
        stats: dict[str, Any],
        batch: dict[str, Any],
        rewards: list[torch.Tensor] | torch.Tensor,
        columns_to_log: Iterable[str] = ("query", "response"),
    ) -> None:
        """Log ``step``'s stats, the rewards' mean, std and distribution, and a ``game_log``
        table of ``columns_to_log`` from ``batch`` plus each sample's reward (see the class
        docstring for where they go)."""
        rewards = reward_vector(rewards)
        values: dict[str, Any] = dict(stats)
        table = self._game_log(batch, rewards, list(columns_to_log))
        if table is not None:
            values["game_log"] = table
        values["env/reward_mean"] = rewards.mean().item()
        values["env/reward_std"] = std(rewards).item()
        values["env/reward_dist"] = rewards.numpy()
        self.accelerator.log(values, step=self.current_step)

    def _game_log(
        self, batch: Mapping[str, Any], rewards: torch.Tensor, columns: list[str]
    ) -> Table | None:
        """The table of samples, or None (with TRL's warning) when ``batch`` lacks columns;
        TRL raised then only when logging to W&B, and so does this."""
        if "query" not in batch and "response" not in batch:
            warnings.warn(
                "The game logs will not be logged because the batch does not contain the keys "
                "'query' and 'response'.",
                stacklevel=3,
            )
            return None
        missing = [column for column in columns if column not in batch]
        if missing:
            message = f"Columns to log {missing} are not present in the batch {list(batch)}."
            if self.config.log_with == "wandb":
                raise ValueError(message)
            warnings.warn(message + " The game log is left out.", stacklevel=3)
            return None
        cells = [batch[column] for column in columns]
        rows = [[plain(v) for v in row] for row in zip(*cells, rewards.tolist(), strict=False)]
        return Table(columns=[*columns, "reward"], rows=rows)

    def save_pretrained(self, save_directory: str | os.PathLike[str], push_to_hub: bool = False):
        """Save the model (with its value head) and the tokenizer into ``save_directory``."""
        if push_to_hub:
            raise UnsupportedAPIError(f"save_pretrained(push_to_hub=True): {NO_HUB}")
        Path(save_directory).mkdir(parents=True, exist_ok=True)
        self._save_pretrained(save_directory)

    def _save_pretrained(self, save_directory: str | os.PathLike[str]) -> None:
        self.accelerator.unwrap_model(self.model).save_pretrained(save_directory)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(save_directory)

    def __getattr__(self, name: str) -> Any:
        if name in UNSUPPORTED_TRAINER_NAMES:
            raise UnsupportedAPIError(
                f"PPOTrainer.{name} (TRL v0.11) is not supported by rlfleet: "
                f"{UNSUPPORTED_TRAINER_NAMES[name]}."
            )
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")


def reward_vector(rewards: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Rewards as a flat float32 CPU tensor, from a tensor or a list of numbers/0-d tensors."""
    if isinstance(rewards, torch.Tensor):
        return rewards.detach().float().cpu().flatten()
    return torch.tensor([float(reward) for reward in rewards], dtype=torch.float32)


def generate(
    models: list[nn.Module],
    query_tensor: torch.Tensor | list[torch.Tensor],
    tokenizer: PreTrainedTokenizerBase | None,
    length_sampler: Callable[[], int] | None,
    batch_size: int,
    return_prompt: bool,
    generation_kwargs: dict[str, Any],
) -> list[torch.Tensor] | list[list[torch.Tensor]]:
    """Each model's generations for the same queries.

    A 1-D query gives a ``(1, length)`` tensor per model (one sampled length for all). A list
    gives a list of 1-D tensors per model, generated ``batch_size`` at a time with left padding,
    each cut after its first EOS (kept).
    """
    device = next(models[0].parameters()).device
    if isinstance(query_tensor, (list, tuple)):
        queries = [q.to(device) for q in query_tensor]
        return [
            generate_batched(
                model,
                queries,
                tokenizer,
                length_sampler,
                batch_size,
                return_prompt,
                generation_kwargs,
            )
            for model in models
        ]
    if query_tensor.dim() != 1:
        raise ValueError(
            "query_tensor must be a 1-D tensor or a list of 1-D tensors, got shape "
            f"{tuple(query_tensor.shape)}"
        )
    if length_sampler is not None:
        generation_kwargs["max_new_tokens"] = length_sampler()
    input_ids = query_tensor.to(device).unsqueeze(0)
    outputs = [model.generate(input_ids=input_ids, **generation_kwargs) for model in models]
    return outputs if return_prompt else [output[:, len(query_tensor) :] for output in outputs]


def generate_batched(
    model: nn.Module,
    queries: list[torch.Tensor],
    tokenizer: PreTrainedTokenizerBase | None,
    length_sampler: Callable[[], int] | None,
    batch_size: int,
    return_prompt: bool,
    generation_kwargs: dict[str, Any],
) -> list[torch.Tensor]:
    """Left-padded batches of ``queries``; ``length_sampler`` picks each batch's
    ``max_new_tokens``."""
    if tokenizer is None:
        raise ValueError("generate needs the tokenizer (pass tokenizer= to PPOTrainer)")
    eos_token_id = tokenizer.eos_token_id
    pad_token_id = eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    outputs = []
    for start in range(0, len(queries), batch_size):
        if length_sampler is not None:
            generation_kwargs["max_new_tokens"] = length_sampler()
        chunk = queries[start : start + batch_size]
        input_ids, attention_mask = left_padded(chunk, pad_token_id)
        generations = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, **generation_kwargs
        )
        width = input_ids.shape[1]
        for query, generation in zip(chunk, generations, strict=True):
            response = generation[width:]
            if eos_token_id is not None and (response == eos_token_id).any():
                first_eos = int(torch.nonzero(response == eos_token_id)[0, 0])
                response = response[: first_eos + 1]
            outputs.append(torch.cat([query, response]) if return_prompt else response)
    return outputs


def left_padded(
    queries: list[torch.Tensor], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with each query right-aligned, padding before it."""
    width = max(len(q) for q in queries)
    device = queries[0].device
    input_ids = torch.full((len(queries), width), pad_token_id, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for row, query in enumerate(queries):
        input_ids[row, width - len(query) :] = query
        attention_mask[row, width - len(query) :] = 1
    return input_ids, attention_mask

"""``PPOTrainer``: TRL v0.11.4's classic in-process PPO API on rlfleet's algorithms.

``step`` reads top to bottom: checked inputs, the rollout forward (old logprobs and values,
reference logprobs, per-token KL), rewards, advantages, epochs of minibatch updates, stats. The
math is :mod:`rlfleet.algorithms`, the forward :mod:`rlfleet.trainers.forward`. The
default optimizer is the fused Adam kernel (same update as TRL's ``Adam``). ``step`` touches no
global RNG: the minibatch order comes from the trainer's own seeded generator (``generate``
samples from torch's global RNG, as Hugging Face's ``generate`` does).

Truncated importance sampling (``config.tis_cap``, rlfleet's own) corrects for the generator's
policy differing from the learner's old one (a stale policy with ``one_step_off``, or vLLM's
numerics): given the generator's ``behaviour_logprobs``, each token's policy loss is weighted by
``min(exp(old - behaviour), tis_cap)`` after the PPO clip, as the critic-free trainer does
(trainers/critic_free.py). The clip keeps the update near the learner's old policy; the weight
makes the behaviour policy's samples stand for the old policy's.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlfleet.algorithms.advantages import AdvantageConfig
from rlfleet.algorithms.kl import AdaptiveKLController, FixedKLController
from rlfleet.algorithms.losses import (
    MICRO_BATCH_SHARES,
    LossConfig,
    truncated_importance_weights,
)
from rlfleet.algorithms.ppo import (
    PPOLossOutput,
    early_stop,
    ppo_advantages,
    ppo_loss,
    ppo_objective,
)
from rlfleet.algorithms.rewards import RunningMoments, per_token_rewards, scaled_scores
from rlfleet.common.config import PPOConfig
from rlfleet.trainers import generation
from rlfleet.trainers.critic_free_inputs import checked_behaviour_logprobs
from rlfleet.trainers.critic_free_stats import behaviour_mismatch_stats
from rlfleet.trainers.distributed import DataParallel
from rlfleet.trainers.forward import (
    PackedRows,
    ResponseBatch,
    ResponseOutputs,
    TrainingLayout,
    lm_head_of,
    rollout_forward,
    split_backward,
)
from rlfleet.trainers.guards import NonFiniteError, check_finite_loss, finite_grad_norm
from rlfleet.trainers.ppo_inputs import checked_step_inputs
from rlfleet.trainers.ppo_stats import StepTimer, as_python, step_stats
from rlfleet.trainers.reference import create_reference_model, frozen_reference, reference_forward
from rlfleet.trainers.shuffle import Shuffler
from rlfleet.trainers.trl_compat import TRLCompatMixin
from rlfleet.trainers.value_head import AutoModelForCausalLMWithValueHead

__all__ = ["PPOTrainer", "create_reference_model"]


class PPOTrainer(TRLCompatMixin):
    """PPO for a causal LM with a value head against a frozen reference, TRL v0.11.4's API.

    ``step`` runs one PPO iteration on a batch of ``(query, response, score)``; ``generate``
    samples responses. ``optimizer`` and ``lr_scheduler`` are plain attributes; everything else
    needed to resume exactly is in :meth:`training_state`.
    """

    def __init__(
        self,
        config: PPOConfig,
        model: AutoModelForCausalLMWithValueHead,
        ref_model: AutoModelForCausalLMWithValueHead | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        dataset: torch.utils.data.Dataset | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        data_collator: Callable | None = None,
        num_shared_layers: int | None = None,
        lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        *,
        parallel: DataParallel | None = None,
        dtype: torch.dtype = torch.float32,
        gradient_checkpointing: bool = False,
        max_tokens_per_microbatch: int | None = None,
    ) -> None:
        """``parallel``: train as this rank of the learner's group, the policy (value head
        included) and the reference sharded with FSDP2 on ``parallel.device``, the optimizer
        made over the sharded parameters (``optimizer`` and ``lr_scheduler`` must be None);
        ``dtype`` bfloat16 (with ``parallel``) computes in bfloat16 on float32 master weights;
        ``gradient_checkpointing`` recomputes each block's activations in the backward pass;
        ``max_tokens_per_microbatch`` bounds a forward's padded tokens (rows times the longest).
        The defaults train in this process exactly as without them."""
        layout = TrainingLayout(parallel, dtype, gradient_checkpointing, max_tokens_per_microbatch)
        if not isinstance(config, PPOConfig):
            raise ValueError(f"config must be a PPOConfig, got {type(config).__name__}")
        if not isinstance(model, AutoModelForCausalLMWithValueHead):
            raise ValueError(
                f"model must be an AutoModelForCausalLMWithValueHead, got {type(model).__name__}"
            )
        if tokenizer is not None and not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise ValueError(
                f"tokenizer must be a transformers tokenizer, got {type(tokenizer).__name__}"
            )
        if lr_scheduler is not None and not isinstance(
            lr_scheduler, torch.optim.lr_scheduler.LRScheduler
        ):
            raise ValueError("lr_scheduler must be a torch.optim.lr_scheduler.LRScheduler")
        check_no_optimizer_when_sharded(layout, optimizer, lr_scheduler)
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        if ref_model is None:
            self.ref_model = frozen_reference(model, num_shared_layers)
        elif isinstance(ref_model, (AutoModelForCausalLMWithValueHead, PreTrainedModel)):
            if num_shared_layers is not None:
                warnings.warn("num_shared_layers is ignored when ref_model is given", stacklevel=2)
            self.ref_model = ref_model.eval()
        else:
            raise ValueError(
                f"ref_model must be an AutoModelForCausalLMWithValueHead, a transformers causal "
                f"LM or None, got {type(ref_model).__name__}"
            )
        self.layout = layout
        self.policy, reference = layout.forwards(model, self.ref_model)
        self.reference = reference_forward(self.policy, reference)
        self.optimizer = optimizer or torch.optim.Adam(
            [p for p in model.parameters() if p.requires_grad], lr=config.learning_rate, fused=True
        )
        self.lr_scheduler = lr_scheduler
        self.dataset = dataset
        self.data_collator = data_collator
        self.dataloader = (
            None if dataset is None else self.prepare_dataloader(dataset, data_collator)
        )
        if config.adap_kl_ctrl:
            self.kl_ctl = AdaptiveKLController(config.init_kl_coef, config.target, config.horizon)
        else:
            self.kl_ctl = FixedKLController(config.init_kl_coef)
        self.running = RunningMoments()
        self.shuffler = Shuffler(config.seed)
        self.current_step = 0
        self.nonfinite_skipped_steps = 0

    @property
    def current_device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def parallel(self) -> DataParallel:
        """This rank's place in the learner's group (rank 0 of 1 in this process)."""
        return self.layout.local(self.current_device)

    def prepare_dataloader(
        self, dataset: torch.utils.data.Dataset, data_collator: Callable | None = None
    ) -> torch.utils.data.DataLoader:
        """Shuffled batches of ``config.batch_size`` (last partial batch dropped)."""
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=self.config.batch_size,
            collate_fn=data_collator,
            shuffle=True,
            drop_last=True,
            generator=torch.Generator().manual_seed(self.config.seed),
        )

    def generate(
        self,
        query_tensor: torch.Tensor | list[torch.Tensor],
        length_sampler: Callable[[], int] | None = None,
        batch_size: int = 4,
        return_prompt: bool = True,
        generate_ref_response: bool = False,
        **generation_kwargs,
    ):
        """Sample responses with the policy (and the reference, if asked).

        A 1-D query gives a ``(1, length)`` tensor. A list gives a list of 1-D tensors, generated
        ``batch_size`` at a time with left padding, each cut after its first EOS (kept).
        """
        if self.layout.sharded:
            raise RuntimeError("generate needs whole models; a trainer given parallel has shards")
        if generate_ref_response and self.ref_model is None:
            raise ValueError(
                "generate_ref_response: a LoRA policy has no reference copy to sample with"
            )
        models = [self.model] + ([self.ref_model] if generate_ref_response else [])
        outputs = generation.generate(
            models,
            query_tensor,
            self.tokenizer,
            length_sampler,
            batch_size,
            return_prompt,
            generation_kwargs,
        )
        return tuple(outputs) if generate_ref_response else outputs[0]

    def step(
        self,
        queries: list[torch.Tensor],
        responses: list[torch.Tensor],
        scores: list[torch.Tensor],
        response_masks: list[torch.Tensor] | None = None,
        behaviour_logprobs: list[torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """One PPO iteration: rollout statistics, advantages, ``ppo_epochs`` of minibatch updates.

        ``behaviour_logprobs`` are the generator's per-token logprobs of each response (for
        truncated importance sampling when ``config.tis_cap`` is set).
        Returns TRL v0.11.4's stats: single values as Python floats, distributions as arrays;
        with ``behaviour_logprobs`` also ``rollout/logprob_diff_mean`` (mean |old - behaviour|)
        and ``rollout/tis_capped_fraction`` (tokens whose weight the cap cut).
        """
        config = self.config
        vocab_size = lm_head_of(self.model).weight.shape[0]
        inputs = checked_step_inputs(
            queries,
            responses,
            scores,
            response_masks,
            config.batch_size,
            vocab_size,
            self.current_device,
        )
        behaviour = checked_behaviour_logprobs(
            behaviour_logprobs, inputs.responses, self.current_device
        )
        scores = scaled_scores(
            inputs.scores,
            self.running,
            config.use_score_scaling,
            config.use_score_norm,
            config.score_clip,
        )
        timer = StepTimer()
        batch = ResponseBatch.build(inputs.queries, inputs.responses, inputs.response_masks)
        with eval_mode(self.model):  # dropout off in every pass, as in TRL
            with timer.phase("forward_pass"):
                rollout = rollout_forward(
                    self.policy,
                    self.reference,
                    batch,
                    config.mini_batch_size,
                    config.kl_penalty,
                    self.layout,
                )
            with timer.phase("compute_rewards"):
                kl_coef = self.kl_ctl.value
                rewards, non_score_reward = per_token_rewards(
                    scores, rollout.kls, batch.mask, kl_coef
                )
            with timer.phase("compute_advantages"):
                old_values, advantages, returns = ppo_advantages(
                    rewards,
                    rollout.values,
                    batch.mask,
                    AdvantageConfig(gamma=config.gamma, lam=config.lam),
                    whiten_rewards=config.whiten_rewards,
                )
            tis_weights = None
            if behaviour is not None and config.tis_cap is not None:
                tis_weights = truncated_importance_weights(
                    rollout.logprobs, behaviour, config.tis_cap
                )
            with timer.phase("optimize_step"):
                targets = PPOTargets(
                    rollout.logprobs, old_values, advantages, returns, batch.mask, tis_weights
                )
                minibatch_stats = self._train(batch, targets)
        with timer.phase("calc_stats"):
            stats = step_stats(
                batch,
                scores,
                rollout,
                non_score_reward,
                minibatch_stats,
                kl_coef,
                learning_rate=self.optimizer.param_groups[0]["lr"],
            )
            if behaviour is not None:
                mismatch = behaviour_mismatch_stats(
                    rollout.logprobs, behaviour, batch.mask, config.tis_cap
                )
                stats.update({key: as_python(value) for key, value in mismatch.items()})
        self.kl_ctl.update(stats["objective/kl"], config.batch_size)
        stats.update(timer.stats())
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.current_step += 1
        return stats

    def _train(self, batch: ResponseBatch, targets: PPOTargets) -> list[dict[str, torch.Tensor]]:
        """``ppo_epochs`` passes over shuffled minibatches, one optimizer step per
        ``backward_batch_size`` rows, each token's policy loss weighted by the TIS weights when
        given; returns each minibatch's stats."""
        config = self.config
        loss_config = LossConfig(
            cliprange=config.cliprange,
            cliprange_value=config.cliprange_value,
            vf_coef=config.vf_coef,
            ratio_threshold=config.ratio_threshold,
        )
        all_stats: list[dict[str, torch.Tensor]] = []
        for epoch in range(config.ppo_epochs):
            permutation = self.shuffler.permutation(config.batch_size)
            for start in range(0, config.batch_size, config.backward_batch_size):
                outcomes = []
                end = start + config.backward_batch_size
                for mini_start in range(start, end, config.mini_batch_size):
                    rows = permutation[mini_start : mini_start + config.mini_batch_size]
                    where = self._where(epoch, mini_start // config.mini_batch_size)
                    result, outcome = self._minibatch(batch, rows, targets, loss_config, where)
                    outcomes.append(outcome)
                    all_stats.append(result.stats)
                where = self._where(epoch, start // config.mini_batch_size)
                self._optimizer_step(
                    zero_fill_missing_grads="skipped" in outcomes,
                    finite="nonfinite" not in outcomes,
                    where=where,
                )
            if config.early_stopping and early_stop(
                all_stats[-1]["policy/policykl"], config.target_kl
            ):
                break
        return all_stats

    def _minibatch(
        self,
        batch: ResponseBatch,
        rows: list[int],
        targets: PPOTargets,
        loss_config: LossConfig,
        where: str,
    ) -> tuple[PPOLossOutput, Outcome]:
        """One minibatch's forward and backward (gradients accumulating): its loss, stats, and
        whether it was trained on, skipped (mean ratio over the threshold) or not finite.

        In one piece (one rank, within the token budget) the loss is decided on before the
        backward, as in TRL. Split (over ranks or micro-batches), each micro-batch's backward
        comes first, then the loss and stats of the whole minibatch from the gathered outputs
        decide; a skipped minibatch's gradients are taken back out."""
        accumulation = self.config.gradient_accumulation_steps
        micro_batches = self.layout.micro_batches(batch, rows)
        index = torch.tensor(rows, device=batch.mask.device)
        if self.parallel.world_size == 1 and len(micro_batches) == 1:
            outputs = self.policy(
                PackedRows.build(batch, rows), with_values=True, with_entropy=True
            )
            result = targets.loss(outputs, index, loss_config)
            if result.loss is None:
                return result, "skipped"
            if not self._guarded(check_finite_loss, result.loss, where):
                return result, "nonfinite"
            (result.loss / accumulation).backward()
            return result, "trained"
        share = MICRO_BATCH_SHARES[loss_config.aggregation]

        def loss_of(outputs: ResponseOutputs, micro_rows: torch.Tensor) -> torch.Tensor:
            part = share(targets.mask[micro_rows], targets.mask[index])
            return targets.objective(outputs, micro_rows, loss_config) * part / accumulation

        before = gradients(self.optimizer)
        outputs = split_backward(
            self.policy,
            batch,
            rows,
            micro_batches,
            loss_of,
            self.parallel,
            with_values=True,
            with_entropy=True,
        )
        result = targets.loss(outputs, index, loss_config)
        if result.loss is None:
            restore_gradients(self.optimizer, before)
            return result, "skipped"
        if not self._guarded(check_finite_loss, result.loss, where):
            return result, "nonfinite"
        return result, "trained"

    def _optimizer_step(self, zero_fill_missing_grads: bool, finite: bool, where: str) -> None:
        """Clip (if ``max_grad_norm``), step and zero the gradients of the trainable parameters.

        After a skipped minibatch, parameters without a gradient get a zero one, so the optimizer
        still steps them as TRL's ``0 * loss`` backward did (minus its NaN when the loss is inf).
        A non-finite loss (``finite`` False) or gradient norm skips the step under
        ``ppo.nonfinite: skip`` (counted in ``nonfinite_skipped_steps``); under ``error`` the
        gradient norm check raises ``NonFiniteError`` naming ``where``.
        """
        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        if zero_fill_missing_grads:
            for parameter in parameters:
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
        if not (finite and self._guarded(finite_grad_norm, parameters, where)):
            self.optimizer.zero_grad()
            self.nonfinite_skipped_steps += 1
            return
        if self.config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(parameters, self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()

    def _guarded(self, check: Callable[..., Any], value: Any, where: str) -> bool:
        """Runs a ``trainers/guards.py`` check: True when the value is finite; False under
        ``ppo.nonfinite: skip``, else its ``NonFiniteError`` propagates."""
        try:
            check(value, where)
        except NonFiniteError:
            if self.config.nonfinite == "error":
                self.optimizer.zero_grad()  # nothing of the failed step carries into the next
                raise
            return False
        return True

    def _where(self, epoch: int, minibatch: int) -> str:
        return f"PPO step {self.current_step + 1}, epoch {epoch}, minibatch {minibatch}"

    def training_state(self) -> dict[str, Any]:
        """All but weights, optimizer and scheduler needed to resume exactly (JSON-able)."""
        return {
            "current_step": self.current_step,
            "kl_coef": self.kl_ctl.value,
            "running_moments": self.running.state(),
            "shuffle_rng": self.shuffler.state(),
        }

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`training_state` returned."""
        self.current_step = int(state["current_step"])
        self.kl_ctl.value = float(state["kl_coef"])
        self.running.load_state(state["running_moments"])
        self.shuffler.load_state(state["shuffle_rng"])


Outcome = Literal["trained", "skipped", "nonfinite"]


@dataclass
class PPOTargets:
    """What the PPO loss compares a minibatch's outputs with, ``[batch, width]`` each."""

    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    mask: torch.Tensor
    tis_weights: torch.Tensor | None

    def at(self, rows: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """The targets of ``rows`` as the loss functions name them."""
        return {
            "old_logprobs": self.old_logprobs[rows],
            "old_values": self.old_values[rows],
            "advantages": self.advantages[rows],
            "returns": self.returns[rows],
            "mask": self.mask[rows],
            "importance_weights": None if self.tis_weights is None else self.tis_weights[rows],
        }

    def loss(
        self, outputs: ResponseOutputs, rows: torch.Tensor, config: LossConfig
    ) -> PPOLossOutput:
        """The minibatch's loss (None when skipped) and stats."""
        return ppo_loss(
            logprobs=outputs.logprobs,
            vpreds=outputs.values,
            entropy=outputs.entropy,
            config=config,
            **self.at(rows),
        )

    def objective(
        self, outputs: ResponseOutputs, rows: torch.Tensor, config: LossConfig
    ) -> torch.Tensor:
        """The loss of some rows, no skipping, no stats."""
        return ppo_objective(
            logprobs=outputs.logprobs, vpreds=outputs.values, config=config, **self.at(rows)
        ).loss


def check_no_optimizer_when_sharded(
    layout: TrainingLayout,
    optimizer: torch.optim.Optimizer | None,
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler | None,
) -> None:
    if layout.sharded and (optimizer is not None or lr_scheduler is not None):
        raise ValueError(
            "with parallel the trainer makes its optimizer over the sharded parameters: pass "
            "neither optimizer nor lr_scheduler"
        )


Gradients = list[torch.Tensor | None]


def gradients(optimizer: torch.optim.Optimizer) -> Gradients:
    """A copy of the optimizer's parameters' gradients (None where there is none)."""
    return [
        None if p.grad is None else p.grad.detach().clone()
        for group in optimizer.param_groups
        for p in group["params"]
    ]


def restore_gradients(optimizer: torch.optim.Optimizer, saved: Gradients) -> None:
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    for parameter, grad in zip(parameters, saved, strict=True):
        parameter.grad = grad


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model.eval()`` for the block, then every submodule's own mode back."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training

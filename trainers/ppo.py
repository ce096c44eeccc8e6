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
makes the behaviour policy's samples stand for the old policy's. ``config.rollout_correction``
picks another correction of algorithms/corrections.py instead (resolved once, at construction):
its weights take the TIS weights' place, and the tokens it drops (``seq_mis``'s rejected rows)
leave the mask of the advantages' whitening and of both losses, as veRL 0.9.1 drops them from its
``response_mask`` (the KL penalty in the reward still counts them, as veRL's does).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlfleet.algorithms.advantages import ADVANTAGE_ESTIMATORS, AdvantageConfig
from rlfleet.algorithms.corrections import CorrectionOutput, ResolvedCorrection
from rlfleet.algorithms.kl import AdaptiveKLController, FixedKLController
from rlfleet.algorithms.losses import MICRO_BATCH_SHARES, LossConfig
from rlfleet.algorithms.ppo import (
    PPOLossOutput,
    early_stop,
    ppo_advantages,
    ppo_loss,
    ppo_objective,
)
from rlfleet.algorithms.rewards import RunningMoments, per_token_rewards, scaled_scores
from rlfleet.common.config import PPOConfig
from rlfleet.trainers.distributed import DataParallel
from rlfleet.trainers.forward import (
    ResponseBatch,
    ResponseOutputs,
    TrainingLayout,
    lm_head_of,
    rollout_forward,
)
from rlfleet.trainers.guards import PPO_ADVICE
from rlfleet.trainers.inputs import (
    checked_behaviour_logprobs,
    checked_loss_masks,
    checked_step_inputs,
    checked_token_rewards,
)
from rlfleet.trainers.minibatch import (
    MinibatchTrainer,
    Shuffler,
    check_no_optimizer_when_sharded,
    eval_mode,
    optimizer_steps,
)
from rlfleet.trainers.reference import create_reference_model, frozen_reference, reference_forward
from rlfleet.trainers.stats import (
    StepTimer,
    as_python,
    behaviour_mismatch_stats,
    correction_stats,
    step_stats,
)
from rlfleet.trainers.trl_compat import TRLCompatMixin, generate
from rlfleet.trainers.value_head import AutoModelForCausalLMWithValueHead

__all__ = ["PPOTrainer", "create_reference_model"]


class PPOTrainer(TRLCompatMixin, MinibatchTrainer):
    """PPO for a causal LM with a value head against a frozen reference, TRL v0.11.4's API.

    ``step`` runs one PPO iteration on a batch of ``(query, response, score)``; ``generate``
    samples responses. ``optimizer`` and ``lr_scheduler`` are plain attributes; everything else
    needed to resume exactly is in :meth:`training_state`. The minibatches' forward, backward
    and optimizer steps are trainers/minibatch.py's, shared with ``CriticFreeTrainer``.
    """

    advice = PPO_ADVICE

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
        self.correction = ResolvedCorrection(*config.correction)
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
    def skip_nonfinite(self) -> bool:
        """``ppo.nonfinite: skip``: a non-finite loss or gradient norm skips its optimizer step
        (counted in ``nonfinite_skipped_steps``) instead of failing the step."""
        return self.config.nonfinite == "skip"

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
        outputs = generate(
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
        *,
        loss_masks: list[torch.Tensor] | None = None,
        token_rewards: list[torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """One PPO iteration: rollout statistics, advantages, ``ppo_epochs`` of minibatch updates.

        ``behaviour_logprobs`` are the generator's per-token logprobs of each response (for
        truncated importance sampling when ``config.tis_cap`` is set).
        ``response_masks`` are TRL v0.11.4's: its exact semantics (GAE over every position,
        the masked-out ones holding zeros). ``loss_masks`` are a multi-turn job's (1: a token the
        policy sampled, 0: an environment token, context only; not with ``response_masks``):
        veRL 0.9.1's semantics for a response mask with holes, the KL penalty, the losses and
        every stat over the mask-1 tokens only, GAE skipping the mask-0 tokens
        (``masked_gae``), and no LM or value head run on them. ``token_rewards`` (each
        response's shape, 0 on mask-0 tokens; the environment's turn rewards on each turn's last
        sampled token) are added to the per-token rewards, after the score's scaling.
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
        loss_masks = checked_loss_masks(loss_masks, inputs.responses, self.current_device)
        extra_rewards = checked_token_rewards(
            token_rewards, loss_masks, inputs.responses, self.current_device
        )
        scores = scaled_scores(
            inputs.scores,
            self.running,
            config.use_score_scaling,
            config.use_score_norm,
            config.score_clip,
        )
        timer = StepTimer()
        batch = ResponseBatch.build(
            inputs.queries, inputs.responses, inputs.response_masks, loss_masks
        )
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
                    scores, rollout.kls, batch.mask, kl_coef, extra_rewards
                )
            correction = self._correct(rollout.logprobs, behaviour, batch.mask)
            policy_mask = (
                batch.mask if correction.keep_mask is None else batch.mask * correction.keep_mask
            )
            with timer.phase("compute_advantages"):
                old_values, advantages, returns = ppo_advantages(
                    rewards,
                    rollout.values,
                    policy_mask,
                    AdvantageConfig(gamma=config.gamma, lam=config.lam),
                    whiten_rewards=config.whiten_rewards,
                    estimator=ADVANTAGE_ESTIMATORS["masked_gae" if batch.sampled_only else "gae"],
                )
            with timer.phase("optimize_step"):
                targets = PPOTargets(
                    rollout.logprobs,
                    old_values,
                    advantages,
                    returns,
                    policy_mask,
                    correction.weights,
                    loss_config(config),
                    config.gradient_accumulation_steps,
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
                mismatch = {
                    **behaviour_mismatch_stats(
                        rollout.logprobs, behaviour, batch.mask, self.correction.token_cap
                    ),
                    **correction_stats(rollout.logprobs, behaviour, batch.mask, self.correction),
                }
                stats.update({key: as_python(value) for key, value in mismatch.items()})
        self.kl_ctl.update(stats["objective/kl"], config.batch_size)
        stats.update(timer.stats())
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.current_step += 1
        return stats

    def _correct(
        self, old_logprobs: torch.Tensor, behaviour: torch.Tensor | None, mask: torch.Tensor
    ) -> CorrectionOutput:
        """The correction's weights and keep mask (neither without behaviour logprobs); a
        correction that drops every sampled token leaves nothing to train on: an error."""
        if behaviour is None:
            return CorrectionOutput(None, None, {})
        correction = self.correction(old_logprobs, behaviour, mask)
        if correction.keep_mask is not None and not (mask * correction.keep_mask).any():
            raise ValueError(
                f"PPO step {self.current_step + 1}: rollout_correction {self.correction.name} "
                f"{dict(self.correction.params)} dropped every sequence of the batch, nothing to "
                "train on (widen its bounds)"
            )
        return correction

    def _train(self, batch: ResponseBatch, targets: PPOTargets) -> list[dict[str, torch.Tensor]]:
        """``ppo_epochs`` passes over shuffled minibatches, one optimizer step per
        ``backward_batch_size`` rows, each token's policy loss weighted by the correction's
        weights when given; returns each minibatch's stats. A minibatch whose mask the
        correction emptied is left out (no forward, no stats; an optimizer step of only such
        minibatches is not taken).

        A minibatch is trained on, skipped (mean ratio over the threshold) or not finite
        (trainers/minibatch.py). After a skipped one the optimizer still steps the parameters
        without a gradient (a zero one, as TRL's ``0 * loss`` backward); after a non-finite one,
        under ``ppo.nonfinite: skip``, the optimizer step is skipped and counted."""
        config = self.config
        all_stats: list[dict[str, torch.Tensor]] = []
        for epoch in range(config.ppo_epochs):
            permutation = self.shuffler.permutation(config.batch_size)
            for minibatches in optimizer_steps(
                permutation, config.backward_batch_size, config.mini_batch_size
            ):
                outcomes = []
                for index, rows in minibatches:
                    if not targets.mask[rows].any():
                        continue
                    where = self._where(epoch, index)
                    _, result, outcome = self._forward_backward(
                        batch, rows, targets, where, with_values=True, with_entropy=True
                    )
                    outcomes.append(outcome)
                    all_stats.append(result.stats)
                if not outcomes:
                    continue
                norm = self._optimizer_step(
                    config.max_grad_norm,
                    self._where(epoch, minibatches[0][0]),
                    finite="nonfinite" not in outcomes,
                    zero_fill_missing_grads="skipped" in outcomes,
                )
                if norm is None:
                    self.nonfinite_skipped_steps += 1
            if (
                config.early_stopping
                and all_stats
                and early_stop(all_stats[-1]["policy/policykl"], config.target_kl)
            ):
                break
        return all_stats

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


def loss_config(config: PPOConfig) -> LossConfig:
    return LossConfig(
        cliprange=config.cliprange,
        cliprange_value=config.cliprange_value,
        vf_coef=config.vf_coef,
        ratio_threshold=config.ratio_threshold,
    )


@dataclass
class PPOTargets:
    """What the PPO loss compares a minibatch's outputs with, ``[batch, width]`` each; the
    minibatch loss (``minibatch.MinibatchLoss``) of ``PPOTrainer``."""

    old_logprobs: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    mask: torch.Tensor
    tis_weights: torch.Tensor | None
    """The correction's per-token weights of the policy loss (None: all ones)."""
    config: LossConfig
    accumulation: int
    """``gradient_accumulation_steps``: each minibatch's loss is divided by it."""
    may_skip: ClassVar[bool] = True
    """The ratio threshold may skip a minibatch."""

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

    def whole(self, outputs: ResponseOutputs, rows: torch.Tensor) -> PPOLossOutput:
        """The minibatch's loss (None when skipped) and stats."""
        return ppo_loss(
            logprobs=outputs.logprobs,
            vpreds=outputs.values,
            entropy=outputs.entropy,
            config=self.config,
            **self.at(rows),
        )

    def part(
        self, outputs: ResponseOutputs, micro_rows: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """A micro-batch's share of its minibatch's loss, no skipping, no stats."""
        share = MICRO_BATCH_SHARES[self.config.aggregation](self.mask[micro_rows], self.mask[rows])
        objective = ppo_objective(
            logprobs=outputs.logprobs,
            vpreds=outputs.values,
            config=self.config,
            **self.at(micro_rows),
        ).loss
        return objective * share / self.accumulation

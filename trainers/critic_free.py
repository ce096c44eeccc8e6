"""``CriticFreeTrainer``: GRPO, RLOO, REINFORCE++ and REINFORCE++-baseline in one process.

``step`` reads top to bottom: checked inputs, the forward passes that are needed (old-policy and
reference logprobs), per-token rewards, advantages from the estimator the algorithm names,
``num_iterations`` passes of minibatch updates with TRL 1.16's GRPO loss, stats. The math is
:mod:`rlfleet.algorithms` (``advantages``, ``grpo``), the forward
:mod:`rlfleet.trainers.forward`. The model is a plain causal LM: no value head, and no reference
model at all unless ``beta`` or ``kl_coef`` asks for a KL.

Old-policy logprobs come from a no-grad forward only when the policy can move before a token is
trained on (``num_iterations > 1``, several optimizer steps per batch) or the reward needs them
(``kl_coef``). Otherwise, as in TRL's ``GRPOTrainer``, the one training forward gives them:
``old = logprobs.detach()``, the same weights on the same tokens.

Truncated importance sampling (``tis_cap``) corrects for the generator's policy differing from the
learner's (a stale policy with ``one_step_off``, or vLLM's numerics): each token's policy loss is
weighted by ``min(exp(old - behaviour), tis_cap)``, after the PPO clip and before the KL term is
added, exactly where TRL 1.16 applies its ``vllm_importance_sampling_correction`` in its
``token_truncate`` mode (``GRPOTrainer._compute_loss``). The clip keeps the update near the
learner's old policy; the weight makes the samples of the behaviour policy stand for the old one.
``rollout_correction`` picks another correction of algorithms/corrections.py instead (resolved
once, at construction): its weights multiply the policy term in the same place, and a correction
that drops tokens (``seq_mis``) takes them out of the loss mask before the advantages, as the
truncation mask does (its keep mask is known before the first minibatch: such a correction
always has the old-policy forward).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlfleet.algorithms.advantages import ADVANTAGE_ESTIMATORS, AdvantageConfig
from rlfleet.algorithms.corrections import ResolvedCorrection
from rlfleet.algorithms.grpo import (
    LOSS_TYPE_SHARES,
    CriticFreeLossConfig,
    CriticFreeLossOutput,
    critic_free_loss,
)
from rlfleet.algorithms.kl import KL_PENALTIES
from rlfleet.algorithms.losses import truncated_importance_weights  # noqa: F401 (re-exported)
from rlfleet.algorithms.masked import masked_mean
from rlfleet.algorithms.rewards import per_token_rewards
from rlfleet.common.config import CriticFreeConfig
from rlfleet.trainers.distributed import DataParallel
from rlfleet.trainers.forward import (
    ResponseBatch,
    ResponseOutputs,
    TrainingLayout,
    batch_logprobs,
    lm_head_of,
)
from rlfleet.trainers.guards import CRITIC_FREE_ADVICE
from rlfleet.trainers.inputs import (
    checked_behaviour_logprobs,
    checked_group_ids,
    checked_loss_masks,
    checked_response_lengths,
    checked_step_inputs,
    checked_token_rewards,
    checked_truncated,
)
from rlfleet.trainers.minibatch import (
    MinibatchTrainer,
    Shuffler,
    check_no_optimizer_when_sharded,
    eval_mode,
    optimizer_steps,
)
from rlfleet.trainers.reference import frozen_reference, reference_forward
from rlfleet.trainers.stats import (
    StepTimer,
    batch_stats,
    behaviour_mismatch_stats,
    correction_stats,
    mean_metrics,
)
from rlfleet.trainers.value_head import AutoModelForCausalLMWithValueHead

__all__ = ["CriticFreeTrainer"]


class CriticFreeTrainer(MinibatchTrainer):
    """Critic-free RL for a Hugging Face causal LM; ``step`` trains on one batch of samples.

    ``optimizer`` defaults to AdamW (TRL's, with its zero weight decay). Everything besides the
    weights and the optimizer needed to resume exactly is in :meth:`training_state`. The
    minibatches' forward, backward and optimizer steps are trainers/minibatch.py's, shared with
    ``PPOTrainer``.
    """

    advice = CRITIC_FREE_ADVICE

    def __init__(
        self,
        config: CriticFreeConfig,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase | None = None,
        ref_model: PreTrainedModel | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        parallel: DataParallel | None = None,
        dtype: torch.dtype = torch.float32,
        gradient_checkpointing: bool = False,
        max_tokens_per_microbatch: int | None = None,
    ) -> None:
        """The keyword-only arguments lay the models out as for ``PPOTrainer`` (trainers/ppo.py):
        FSDP2 across the ranks of ``parallel`` (then ``optimizer`` must be None), compute
        ``dtype``, gradient checkpointing, a token budget per forward."""
        layout = TrainingLayout(parallel, dtype, gradient_checkpointing, max_tokens_per_microbatch)
        check_no_optimizer_when_sharded(layout, optimizer, None)
        if not isinstance(config, CriticFreeConfig):
            raise ValueError(f"config must be a CriticFreeConfig, got {type(config).__name__}")
        if not isinstance(model, PreTrainedModel) or isinstance(
            model, AutoModelForCausalLMWithValueHead
        ):
            raise ValueError(
                f"model must be a transformers causal LM without value head, got "
                f"{type(model).__name__}"
            )
        self.config = config
        self.correction = ResolvedCorrection(*config.correction)
        self.model = model
        self.tokenizer = tokenizer
        self.ref_model = self._reference(model, ref_model)
        self.layout = layout
        self.policy, reference = layout.forwards(model, self.ref_model)
        self.reference = (
            reference_forward(self.policy, reference) if config.uses_reference else None
        )
        self.optimizer = optimizer or torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=config.learning_rate,
            weight_decay=0.0,
            fused=True,
        )
        self.lr_scheduler = None
        self.shuffler = Shuffler(config.seed)
        self.current_step = 0

    def _reference(
        self, model: PreTrainedModel, ref_model: PreTrainedModel | None
    ) -> PreTrainedModel | None:
        """The frozen reference, only when a KL needs one: with ``beta`` and ``kl_coef`` both 0,
        none is created (its memory is saved)."""
        if not self.config.uses_reference:
            if ref_model is not None:
                warnings.warn("beta and kl_coef are 0: ref_model is not used", stacklevel=3)
            return None
        if ref_model is None:
            return frozen_reference(model)
        return ref_model.requires_grad_(False).eval()

    @property
    def minibatches_per_iteration(self) -> int:
        return self.config.batch_size // self.config.optimizer_batch_size

    @property
    def needs_old_forward(self) -> bool:
        """Whether the old-policy logprobs need their own forward pass (see the module doc)."""
        config = self.config
        policy_moves = config.num_iterations > 1 or self.minibatches_per_iteration > 1
        return policy_moves or config.kl_coef > 0 or self.correction.drops_tokens

    def step(
        self,
        queries: list[torch.Tensor],
        responses: list[torch.Tensor],
        scores: list[torch.Tensor],
        group_ids: Sequence[int] | torch.Tensor | None,
        behaviour_logprobs: Sequence[torch.Tensor] | None = None,
        truncated: Sequence[bool] | torch.Tensor | None = None,
        *,
        loss_masks: Sequence[torch.Tensor] | None = None,
        token_rewards: Sequence[torch.Tensor] | None = None,
    ) -> dict[str, float]:
        """One iteration on ``batch_size`` samples: ``group_ids`` marks the samples of one prompt,
        ``behaviour_logprobs`` are the generator's per-token logprobs (for truncated importance
        sampling), ``truncated`` flags responses cut at the length limit. Returns stats as floats.

        A multi-turn job's ``loss_masks`` (1: a token the policy sampled, 0: an environment
        token, context only) make every loss and stat count the mask-1 tokens only (TRL 1.16's
        ``tool_mask``), and no LM head run on the mask-0 ones; the score sits on the last mask-1
        token. ``token_rewards`` (0 on mask-0 tokens; the turn rewards on each turn's last
        sampled token) join the per-token rewards: a sequence-level estimator's return is the
        score plus their sum, REINFORCE++ discounts them from where they sit.
        """
        config = self.config
        device = self.current_device
        vocab_size = lm_head_of(self.model).weight.shape[0]
        inputs = checked_step_inputs(
            queries, responses, scores, None, config.batch_size, vocab_size, device
        )
        checked_response_lengths(inputs.responses, config.max_completion_length)
        group_ids = checked_group_ids(group_ids, config.algorithm, config.batch_size, device)
        behaviour = checked_behaviour_logprobs(behaviour_logprobs, inputs.responses, device)
        truncated = checked_truncated(truncated, config.batch_size, device)
        loss_masks = checked_loss_masks(loss_masks, inputs.responses, device)
        extra_rewards = checked_token_rewards(token_rewards, loss_masks, inputs.responses, device)
        timer = StepTimer(prefix=self.config.algorithm)
        batch = ResponseBatch.build(inputs.queries, inputs.responses, None, loss_masks)
        loss_mask = batch.mask
        if config.mask_truncated_completions:
            loss_mask = batch.mask * ~truncated.unsqueeze(1)
        with eval_mode(self.model):  # dropout off: old and current logprobs from one function
            with timer.phase("forward_pass"):
                old_logprobs, ref_logprobs = self._rollout_logprobs(batch)
            with timer.phase("compute_rewards"):
                rewards, reward_kl = self._token_rewards(
                    inputs.scores, old_logprobs, ref_logprobs, batch.mask, extra_rewards
                )
            policy_mask = self._kept(loss_mask, old_logprobs, behaviour, batch.mask)
            with timer.phase("compute_advantages"):
                advantage_config = AdvantageConfig(
                    gamma=config.gamma,
                    scale_rewards=config.scale_rewards,
                    normalize_advantages=config.normalize_advantages,
                )
                estimator = ADVANTAGE_ESTIMATORS[config.algorithm]
                advantages, _ = estimator(rewards, policy_mask, None, group_ids, advantage_config)
            with timer.phase("optimize_step"):
                minibatch_metrics, old_logprobs = self._train(
                    batch, policy_mask, old_logprobs, ref_logprobs, advantages, behaviour
                )
        stats = {
            **mean_metrics(minibatch_metrics),
            **batch_stats(
                batch,
                policy_mask,
                returns(inputs.scores, extra_rewards),
                group_ids,
                truncated,
                advantages,
            ),
            "learning_rate": self.optimizer.param_groups[0]["lr"],
        }
        if reward_kl is not None:
            stats["kl_in_reward"] = masked_mean(reward_kl, batch.mask)
        if behaviour is not None:
            cap = self.correction.token_cap
            stats.update(behaviour_mismatch_stats(old_logprobs, behaviour, loss_mask, cap))
            stats.update(correction_stats(old_logprobs, behaviour, batch.mask, self.correction))
        stats.update(timer.stats())
        self.current_step += 1
        return {key: float(value) for key, value in stats.items()}

    def _kept(
        self,
        loss_mask: torch.Tensor,
        old_logprobs: torch.Tensor | None,
        behaviour: torch.Tensor | None,
        sampled: torch.Tensor,
    ) -> torch.Tensor:
        """``loss_mask`` less the tokens the correction drops (``seq_mis``'s rejected rows); the
        sequence ratios are over every ``sampled`` token of a row."""
        if behaviour is None or not self.correction.drops_tokens:
            return loss_mask
        keep = self.correction(old_logprobs, behaviour, sampled).keep_mask
        return loss_mask * keep.to(loss_mask.dtype)

    def _rollout_logprobs(
        self, batch: ResponseBatch
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Old-policy logprobs (None when the training forward gives them) and reference ones
        (None without a reference), ``[batch, width]``."""
        chunk_size = self.config.optimizer_batch_size
        old, ref = None, None
        if self.needs_old_forward:
            old = batch_logprobs(self.policy, batch, chunk_size, self.layout)
        if self.reference is not None:
            ref = batch_logprobs(self.reference, batch, chunk_size, self.layout)
        return old, ref

    def _token_rewards(
        self,
        scores: torch.Tensor,
        old_logprobs: torch.Tensor | None,
        ref_logprobs: torch.Tensor | None,
        mask: torch.Tensor,
        extra_rewards: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The score on each response's last (mask-1) token and the ``extra_rewards``, minus
        ``kl_coef * KL_t`` on every mask-1 token when the reward carries the KL; returns
        ``(rewards, KL_t or None)``."""
        config = self.config
        kl = None
        if config.kl_coef > 0:
            kl = KL_PENALTIES[config.kl_penalty](old_logprobs, ref_logprobs) * mask
        no_kl = torch.zeros_like(mask, dtype=torch.float)
        rewards, _ = per_token_rewards(
            scores, no_kl if kl is None else kl, mask, config.kl_coef, extra_rewards
        )
        return rewards, kl

    def _train(
        self,
        batch: ResponseBatch,
        loss_mask: torch.Tensor,
        old_logprobs: torch.Tensor | None,
        ref_logprobs: torch.Tensor | None,
        advantages: torch.Tensor,
        behaviour: torch.Tensor | None,
    ) -> tuple[list[dict[str, torch.Tensor]], torch.Tensor]:
        """``num_iterations`` passes over shuffled minibatches, one optimizer step each; returns
        each minibatch's metrics and the old-policy logprobs the loss used."""
        config = self.config
        loss_config = CriticFreeLossConfig(
            loss_type=config.loss_type,
            epsilon=config.epsilon,
            epsilon_high=config.epsilon_high,
            beta=config.beta,
            importance_sampling_level=config.importance_sampling_level,
            use_bias_correction_kl=config.use_bias_correction_kl,
            max_completion_length=config.max_completion_length,
            steps_per_generation=self.minibatches_per_iteration,
        )
        fill_old = old_logprobs is None  # then the one training forward gives them
        targets = CriticFreeTargets(
            old_logprobs=torch.zeros_like(loss_mask, dtype=torch.float)
            if fill_old
            else old_logprobs,
            fill_old=fill_old,
            ref_logprobs=ref_logprobs,
            advantages=advantages,
            mask=loss_mask,
            sampled=batch.mask,
            behaviour=behaviour,
            correction=self.correction,
            config=loss_config,
            num_items_in_batch=loss_mask.sum(),
        )
        all_metrics: list[dict[str, torch.Tensor]] = []
        size = config.optimizer_batch_size
        for iteration in range(config.num_iterations):
            permutation = self.shuffler.permutation(config.batch_size)
            for [(index, rows)] in optimizer_steps(permutation, size, size):
                where = f"step {self.current_step}, iteration {iteration}, minibatch {index}"
                mask = loss_mask[torch.tensor(rows, device=loss_mask.device)]
                if not mask.any():
                    continue  # every sample masked (truncated): nothing to learn from
                outputs, result, _ = self._forward_backward(
                    batch, rows, targets, where, with_entropy=True
                )
                grad_norm = self._optimizer_step(config.max_grad_norm, where)
                all_metrics.append(
                    {
                        "loss": result.loss.detach(),
                        "entropy": masked_mean(outputs.entropy, mask),
                        "grad_norm": result.loss.new_tensor(grad_norm),
                        **result.metrics,
                    }
                )
        return all_metrics, targets.old_logprobs

    def training_state(self) -> dict[str, Any]:
        """All but weights and optimizer needed to resume exactly (JSON-able)."""
        return {"current_step": self.current_step, "shuffle_rng": self.shuffler.state()}

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`training_state` returned."""
        self.current_step = int(state["current_step"])
        self.shuffler.load_state(state["shuffle_rng"])


def returns(scores: torch.Tensor, extra_rewards: torch.Tensor | None) -> torch.Tensor:
    """Each sample's whole reward: its score plus its turn rewards (what the reward stats
    describe)."""
    return scores if extra_rewards is None else scores + extra_rewards.sum(-1)


@dataclass
class CriticFreeTargets:
    """What the loss compares a minibatch's logprobs with, ``[batch, width]`` each; the minibatch
    loss (``minibatch.MinibatchLoss``) of ``CriticFreeTrainer``."""

    old_logprobs: torch.Tensor
    """Filled by the training forward itself when ``fill_old``."""
    fill_old: bool
    ref_logprobs: torch.Tensor | None
    advantages: torch.Tensor
    mask: torch.Tensor
    sampled: torch.Tensor
    """Every token the policy sampled (the correction's sequence ratios run over them)."""
    behaviour: torch.Tensor | None
    correction: ResolvedCorrection
    config: CriticFreeLossConfig
    num_items_in_batch: torch.Tensor
    accumulation: ClassVar[int] = 1
    may_skip: ClassVar[bool] = False

    def part(
        self, outputs: ResponseOutputs, micro_rows: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """A micro-batch's share of its minibatch's loss (``loss_type``'s share of the tokens or
        samples)."""
        share = LOSS_TYPE_SHARES[self.config.loss_type](self.mask[micro_rows], self.mask[rows])
        return self.whole(outputs, micro_rows).loss * share

    def whole(self, outputs: ResponseOutputs, rows: torch.Tensor) -> CriticFreeLossOutput:
        """The loss of ``rows`` given their outputs, the policy term weighted by the correction
        against the behaviour logprobs when given (its weights depend on each row alone)."""
        if self.fill_old:
            self.old_logprobs[rows] = outputs.logprobs.detach()
        old = self.old_logprobs[rows]
        tis_weights = None
        if self.behaviour is not None:
            tis_weights = self.correction(old, self.behaviour[rows], self.sampled[rows]).weights
        return critic_free_loss(
            outputs.logprobs,
            old,
            None if self.ref_logprobs is None else self.ref_logprobs[rows],
            self.advantages[rows],
            self.mask[rows],
            self.config,
            num_items_in_batch=self.num_items_in_batch,
            importance_sampling_ratio=tis_weights,
        )

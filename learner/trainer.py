"""``PPOTrainer``: TRL v0.11.4's classic in-process PPO API on rlfleet's PPO math.

The math is :mod:`rlfleet.learner.ppo`; this module feeds it. Speed comes from touching the
vocabulary only where it matters: the transformer runs on each (minibatch-, not batch-) padded
sequence, right-padded so no attention mask is needed, then the LM head, log-softmax and entropy
run on the hidden states of response positions only, packed as ``[n_tokens, hidden]``, with one
softmax shared by logprob, entropy and gradient (:class:`TokenLogprobs`). The default optimizer
is the fused Adam kernel (same update as TRL's ``Adam``). Per-sample tensors use a
``[batch, max_response_len]`` layout with a token mask; the masked statistics are the same as
TRL's over its ``[batch, padded_len - 1]`` layout.
"""

from __future__ import annotations

import copy
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from rlfleet.common.config import PPOConfig
from rlfleet.learner import ppo
from rlfleet.learner.value_head import AutoModelForCausalLMWithValueHead

LAYER_PATTERNS = (
    "transformer.h.{layer}",
    "model.decoder.layers.{layer}",
    "gpt_neox.layers.{layer}",
    "model.layers.{layer}",
)


@dataclass
class ResponseBatch:
    """Queries and responses of a batch, responses laid out as ``[batch, max_response_len]``."""

    queries: list[torch.Tensor]
    responses: list[torch.Tensor]
    response_ids: torch.Tensor
    mask: torch.Tensor
    """1 on response tokens that count (all of them unless ``response_masks`` zeroes some)."""
    lengths: torch.Tensor
    """Response lengths; ``mask`` may zero tokens within them."""

    @classmethod
    def build(
        cls,
        queries: list[torch.Tensor],
        responses: list[torch.Tensor],
        response_masks: list[torch.Tensor] | None,
    ) -> ResponseBatch:
        lengths = torch.tensor([len(r) for r in responses])
        width = int(lengths.max())
        device = responses[0].device
        response_ids = torch.zeros(len(responses), width, dtype=torch.long, device=device)
        mask = torch.zeros(len(responses), width, dtype=torch.long, device=device)
        for row, response in enumerate(responses):
            response_ids[row, : len(response)] = response
            mask[row, : len(response)] = 1 if response_masks is None else response_masks[row]
        return cls(queries, responses, response_ids, mask, lengths)


@dataclass
class ResponseOutputs:
    """A model's outputs at the response positions of some rows: ``[rows, width]`` tensors."""

    logprobs: torch.Tensor
    values: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    full_logprobs: torch.Tensor | None = None
    """``[n_tokens, vocab]`` log-softmax, packed row by row (only for the ``"full"`` KL)."""


def response_forward(
    model: AutoModelForCausalLMWithValueHead | PreTrainedModel,
    batch: ResponseBatch,
    rows: Sequence[int],
    width: int,
    with_values: bool = False,
    with_entropy: bool = False,
    with_full_logprobs: bool = False,
) -> ResponseOutputs:
    """Run ``model`` on ``query + response`` of ``rows`` and read out the response positions.

    The hidden state at position ``len(query) - 1 + i`` predicts response token ``i``; only those
    states go through the LM head (and the value head), packed into ``[n_tokens, hidden]``.
    """
    queries = [batch.queries[r] for r in rows]
    responses = [batch.responses[r] for r in rows]
    sequences = [torch.cat([q, a]) for q, a in zip(queries, responses, strict=True)]
    device = sequences[0].device
    input_ids = torch.zeros(len(rows), max(len(s) for s in sequences), dtype=torch.long)
    row_index, hidden_index, out_index = [], [], []
    for i, (sequence, query, response) in enumerate(
        zip(sequences, queries, responses, strict=True)
    ):
        input_ids[i, : len(sequence)] = sequence
        row_index += [i] * len(response)
        hidden_index += range(len(query) - 1, len(query) - 1 + len(response))
        out_index += range(len(response))
    rows_t = torch.tensor(row_index, device=device)
    # Right padding: causal attention never lets a real token see the padding after it.
    hidden = backbone_of(model)(input_ids=input_ids.to(device), use_cache=False).last_hidden_state
    packed = hidden[rows_t, torch.tensor(hidden_index, device=device)]
    logits = lm_head_of(model)(packed).float()
    labels = torch.cat(responses)

    def unpack(values: torch.Tensor) -> torch.Tensor:
        out = values.new_zeros(len(rows), width)
        out[rows_t, torch.tensor(out_index, device=device)] = values
        return out

    if with_full_logprobs:
        full_logprobs = torch.log_softmax(logits, dim=-1)
        logprobs = full_logprobs.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        outputs = ResponseOutputs(logprobs=unpack(logprobs), full_logprobs=full_logprobs)
    else:
        logprobs, entropy = TokenLogprobs.apply(logits, labels)
        outputs = ResponseOutputs(logprobs=unpack(logprobs))
        if with_entropy:
            outputs.entropy = unpack(entropy)
    if with_values:
        outputs.values = unpack(model.v_head(packed).squeeze(-1))
    return outputs


class TokenLogprobs(torch.autograd.Function):
    """``log softmax(logits)[label]`` and the (non-differentiable) entropy per row.

    One softmax serves the logprob, the entropy ``logsumexp(x) - sum(p * x)`` and the backward
    pass ``d logprob / d x = onehot(label) - p``, instead of autograd's separate passes over the
    ``[n_tokens, vocab]`` logits.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, labels: torch.Tensor):
        log_normalizer = torch.logsumexp(logits, dim=-1, keepdim=True)
        probs = torch.exp(logits - log_normalizer)
        logprobs = (logits.gather(-1, labels.unsqueeze(-1)) - log_normalizer).squeeze(-1)
        entropy = log_normalizer.squeeze(-1) - torch.linalg.vecdot(probs, logits)
        ctx.save_for_backward(probs, labels)
        ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs: torch.Tensor, _grad_entropy: torch.Tensor):
        probs, labels = ctx.saved_tensors
        grad_logits = probs * -grad_logprobs.unsqueeze(-1)
        grad_logits.scatter_add_(-1, labels.unsqueeze(-1), grad_logprobs.unsqueeze(-1))
        return grad_logits, None


def backbone_of(model: nn.Module) -> nn.Module:
    if isinstance(model, AutoModelForCausalLMWithValueHead):
        return model.backbone
    return model.base_model


def lm_head_of(model: nn.Module) -> nn.Module:
    if isinstance(model, AutoModelForCausalLMWithValueHead):
        return model.lm_head
    return model.get_output_embeddings()


def create_reference_model(
    model: AutoModelForCausalLMWithValueHead, num_shared_layers: int | None = None
) -> AutoModelForCausalLMWithValueHead:
    """A frozen copy of ``model`` in eval mode.

    With ``num_shared_layers`` the policy's parameters before that layer are frozen too, so the
    first layers stay identical in both (TRL's semantics).
    """
    reference = copy.deepcopy(model)
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
    if num_shared_layers is not None:
        names = [name for name, _ in model.named_parameters()]
        candidates = [p.format(layer=num_shared_layers) for p in LAYER_PATTERNS]
        pattern = next((c for c in candidates if any(c in name for name in names)), None)
        if pattern is None:
            raise ValueError(f"num_shared_layers={num_shared_layers}: no layer pattern matched")
        for name, parameter in model.named_parameters():
            if pattern in name:
                break
            parameter.requires_grad_(False)
    return reference.eval()


class PPOTrainer:
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
    ) -> None:
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
        torch.manual_seed(config.seed)
        config.world_size = 1
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        if ref_model is None:
            self.ref_model = create_reference_model(model, num_shared_layers)
        elif isinstance(ref_model, (AutoModelForCausalLMWithValueHead, PreTrainedModel)):
            if num_shared_layers is not None:
                warnings.warn("num_shared_layers is ignored when ref_model is given", stacklevel=2)
            self.ref_model = ref_model.eval()
        else:
            raise ValueError(
                f"ref_model must be an AutoModelForCausalLMWithValueHead, a transformers causal "
                f"LM or None, got {type(ref_model).__name__}"
            )
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
            self.kl_ctl = ppo.AdaptiveKLController(
                config.init_kl_coef, config.target, config.horizon
            )
        else:
            self.kl_ctl = ppo.FixedKLController(config.init_kl_coef)
        self.running = ppo.RunningMoments()
        self.shuffle_rng = np.random.RandomState(config.seed)
        self.current_step = 0

    @property
    def current_device(self) -> torch.device:
        return next(self.model.parameters()).device

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

    # ------------------------------------------------------------------ generation

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
        models = [self.model] + ([self.ref_model] if generate_ref_response else [])
        if isinstance(query_tensor, (list, tuple)):
            outputs = [
                self._generate_batched(
                    model,
                    list(query_tensor),
                    length_sampler,
                    batch_size,
                    return_prompt,
                    **generation_kwargs,
                )
                for model in models
            ]
        else:
            if query_tensor.dim() != 1:
                raise ValueError(
                    "query_tensor must be a 1-D tensor or a list of 1-D tensors, got shape "
                    f"{tuple(query_tensor.shape)}"
                )
            if length_sampler is not None:
                generation_kwargs["max_new_tokens"] = length_sampler()
            input_ids = query_tensor.to(self.current_device).unsqueeze(0)
            outputs = []
            for model in models:
                output = model.generate(input_ids=input_ids, **generation_kwargs)
                outputs.append(output if return_prompt else output[:, len(query_tensor) :])
        return tuple(outputs) if generate_ref_response else outputs[0]

    def _generate_batched(
        self,
        model: nn.Module,
        queries: list[torch.Tensor],
        length_sampler: Callable[[], int] | None,
        batch_size: int,
        return_prompt: bool,
        **generation_kwargs,
    ) -> list[torch.Tensor]:
        if self.tokenizer is None:
            raise ValueError("generate needs the tokenizer (pass tokenizer= to PPOTrainer)")
        eos_token_id = self.tokenizer.eos_token_id
        pad_token_id = self.tokenizer.pad_token_id
        pad_token_id = eos_token_id if pad_token_id is None else pad_token_id
        outputs = []
        for start in range(0, len(queries), batch_size):
            if length_sampler is not None:
                generation_kwargs["max_new_tokens"] = length_sampler()
            chunk = [q.to(self.current_device) for q in queries[start : start + batch_size]]
            width = max(len(q) for q in chunk)
            input_ids = torch.full((len(chunk), width), pad_token_id, device=self.current_device)
            attention_mask = torch.zeros_like(input_ids)
            for row, query in enumerate(chunk):
                input_ids[row, width - len(query) :] = query
                attention_mask[row, width - len(query) :] = 1
            generations = model.generate(
                input_ids=input_ids, attention_mask=attention_mask, **generation_kwargs
            )
            for query, generation in zip(chunk, generations, strict=True):
                response = generation[width:]
                if eos_token_id is not None and (response == eos_token_id).any():
                    first_eos = int(torch.nonzero(response == eos_token_id)[0, 0])
                    response = response[: first_eos + 1]
                outputs.append(torch.cat([query, response]) if return_prompt else response)
        return outputs

    # ------------------------------------------------------------------ the PPO step

    def step(
        self,
        queries: list[torch.Tensor],
        responses: list[torch.Tensor],
        scores: list[torch.Tensor],
        response_masks: list[torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """One PPO iteration: rollout statistics, advantages, ``ppo_epochs`` of minibatch updates.

        Returns TRL v0.11.4's stats: single values as Python floats, distributions as arrays.
        """
        config = self.config
        queries, responses, scores, response_masks = self._checked_inputs(
            queries, responses, scores, response_masks
        )
        scores = self._scaled_scores(scores)
        timing = {}
        t0 = time.time()
        batch = ResponseBatch.build(queries, responses, response_masks)
        module_modes = {module: module.training for module in self.model.modules()}
        self.model.eval()  # dropout off in every pass, as in TRL
        try:
            t = time.time()
            rollout = self._rollout_forward(batch)
            timing["time/ppo/forward_pass"] = time.time() - t

            t = time.time()
            kl_coef = self.kl_ctl.value
            rewards, non_score_reward = ppo.per_token_rewards(
                scores, rollout["kls"], batch.mask, kl_coef
            )
            timing["time/ppo/compute_rewards"] = time.time() - t

            t = time.time()
            values, advantages, returns = ppo.generalized_advantages(
                rollout["values"],
                rewards,
                batch.mask,
                config.gamma,
                config.lam,
                config.whiten_rewards,
            )
            timing["time/ppo/compute_advantages"] = time.time() - t

            t = time.time()
            train_stats = self._optimize(batch, rollout["logprobs"], values, advantages, returns)
            timing["time/ppo/optimize_step"] = time.time() - t
        finally:
            for module, training in module_modes.items():
                module.training = training

        t = time.time()
        stats = self._step_stats(
            batch, scores, rollout, non_score_reward, train_stats, kl_coef=kl_coef
        )
        timing["time/ppo/calc_stats"] = time.time() - t
        stats["ppo/learning_rate"] = self.optimizer.param_groups[0]["lr"]
        self.kl_ctl.update(stats["objective/kl"], config.batch_size)
        timing["time/ppo/total"] = time.time() - t0
        stats.update(timing)
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.current_step += 1
        return stats

    def _checked_inputs(self, queries, responses, scores, response_masks):
        """Validate ``step``'s inputs; a ValueError names the offending list and index."""
        expected = self.config.batch_size
        named = {"queries": queries, "responses": responses, "scores": scores}
        if response_masks is not None:
            named["response_masks"] = response_masks
        for name, items in named.items():
            if not isinstance(items, (list, tuple)):
                raise ValueError(f"{name} must be a list of tensors, got {type(items).__name__}")
            if len(items) != expected:
                raise ValueError(
                    f"{name} has {len(items)} elements but config.batch_size is {expected}"
                )
        vocab_size = lm_head_of(self.model).weight.shape[0]
        device = self.current_device
        for name, items in (("queries", queries), ("responses", responses)):
            for i, ids in enumerate(items):
                if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.is_floating_point():
                    raise ValueError(f"{name}[{i}] must be a 1-D tensor of integer token ids")
                if len(ids) == 0:
                    raise ValueError(f"{name}[{i}] is empty")
            every_id = torch.cat([ids.cpu() for ids in items])
            if every_id.min() < 0 or every_id.max() >= vocab_size:
                bad = next(
                    i for i, ids in enumerate(items) if ids.min() < 0 or ids.max() >= vocab_size
                )
                raise ValueError(f"{name}[{bad}] has token ids outside [0, {vocab_size})")
        checked_scores = []
        for i, score in enumerate(scores):
            score = torch.as_tensor(score)
            if score.dim() > 1 or score.numel() != 1:
                raise ValueError(
                    f"scores[{i}] must be a scalar (0-D or 1-element 1-D tensor), got shape "
                    f"{tuple(score.shape)}"
                )
            if not torch.isfinite(score).all():
                raise ValueError(f"scores[{i}] is {score.item()}; scores must be finite")
            checked_scores.append(score.reshape(()).float())
        if response_masks is not None:
            for i, (mask, response) in enumerate(zip(response_masks, responses, strict=True)):
                if mask.shape != response.shape:
                    raise ValueError(f"response_masks[{i}] must have the shape of responses[{i}]")
            response_masks = [mask.to(device) for mask in response_masks]
        return (
            [q.to(device) for q in queries],
            [r.to(device) for r in responses],
            torch.stack(checked_scores).to(device),
            response_masks,
        )

    def _scaled_scores(self, scores: torch.Tensor) -> torch.Tensor:
        """Optional running-std scaling (and mean normalisation), then optional clipping."""
        if self.config.use_score_scaling:
            self.running.update(scores)
            factor = (
                torch.tensor(self.running.std, dtype=scores.dtype) + torch.finfo(scores.dtype).eps
            )
            if self.config.use_score_norm:
                scores = (scores - torch.tensor(self.running.mean, dtype=scores.dtype)) / factor
            else:
                scores = scores / factor
        if self.config.score_clip is not None:
            scores = torch.clip(scores, -self.config.score_clip, self.config.score_clip)
        return scores

    @torch.no_grad()
    def _rollout_forward(self, batch: ResponseBatch) -> dict[str, torch.Tensor]:
        """Old-policy logprobs and values, reference logprobs and per-token KL for the batch.

        Rows go through in chunks of ``mini_batch_size``, sorted by length to cut padding.
        """
        size, width = len(batch.responses), batch.response_ids.shape[1]
        full = self.config.kl_penalty == "full"
        logprobs = torch.zeros(size, width, device=batch.mask.device)
        ref_logprobs, values, kls = (torch.zeros_like(logprobs) for _ in range(3))
        total_lengths = [
            len(q) + len(r) for q, r in zip(batch.queries, batch.responses, strict=True)
        ]
        order = sorted(range(size), key=total_lengths.__getitem__)
        for start in range(0, size, self.config.mini_batch_size):
            rows = order[start : start + self.config.mini_batch_size]
            policy = response_forward(
                self.model, batch, rows, width, with_values=True, with_full_logprobs=full
            )
            reference = response_forward(
                self.ref_model, batch, rows, width, with_full_logprobs=full
            )
            logprobs[rows], values[rows] = policy.logprobs, policy.values
            ref_logprobs[rows] = reference.logprobs
            if full:
                token_kl = ppo.full_kl(policy.full_logprobs, reference.full_logprobs)
                chunk_kl = torch.zeros(len(rows), width, device=logprobs.device)
                chunk_kl[_length_mask(batch, rows, width)] = token_kl
                kls[rows] = chunk_kl
            else:
                kls[rows] = ppo.kl_penalty(
                    policy.logprobs, reference.logprobs, self.config.kl_penalty
                )
        return {"logprobs": logprobs, "ref_logprobs": ref_logprobs, "values": values, "kls": kls}

    def _optimize(
        self,
        batch: ResponseBatch,
        old_logprobs: torch.Tensor,
        old_values: torch.Tensor,
        advantages: torch.Tensor,
        returns: torch.Tensor,
    ) -> list[dict[str, torch.Tensor]]:
        """``ppo_epochs`` passes over shuffled minibatches; returns each minibatch's stats."""
        config = self.config
        width = batch.response_ids.shape[1]
        all_stats: list[dict[str, torch.Tensor]] = []
        for _ in range(config.ppo_epochs):
            permutation = self.shuffle_rng.permutation(config.batch_size)
            for start in range(0, config.batch_size, config.backward_batch_size):
                backward_rows = permutation[start : start + config.backward_batch_size]
                skipped = False
                for mini_start in range(0, config.backward_batch_size, config.mini_batch_size):
                    rows = backward_rows[mini_start : mini_start + config.mini_batch_size].tolist()
                    outputs = response_forward(
                        self.model, batch, rows, width, with_values=True, with_entropy=True
                    )
                    loss, stats = self._minibatch_loss(
                        outputs,
                        old_logprobs[rows],
                        old_values[rows],
                        batch.mask[rows],
                        advantages[rows],
                        returns[rows],
                    )
                    if loss is None:
                        skipped = True
                    else:
                        (loss / config.gradient_accumulation_steps).backward()
                    all_stats.append(stats)
                self._optimizer_step(zero_fill_missing_grads=skipped)
            if config.early_stopping and all_stats[-1]["policy/policykl"] > 1.5 * config.target_kl:
                self.optimizer.zero_grad()
                break
        return all_stats

    def _minibatch_loss(
        self,
        outputs: ResponseOutputs,
        old_logprobs: torch.Tensor,
        old_values: torch.Tensor,
        mask: torch.Tensor,
        advantages: torch.Tensor,
        returns: torch.Tensor,
    ) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """The clipped PPO loss and its stats; the loss is None when the minibatch is skipped
        because its mean ratio exceeds ``ratio_threshold`` (stats then report zero losses)."""
        config = self.config
        vf_loss, vf_clipfrac = ppo.clipped_value_loss(
            outputs.values, old_values, returns, mask, config.cliprange_value
        )
        pg_loss, pg_clipfrac, ratio = ppo.clipped_policy_loss(
            outputs.logprobs, old_logprobs, advantages, mask, config.cliprange
        )
        loss = pg_loss + config.vf_coef * vf_loss
        avg_ratio = ppo.masked_mean(ratio, mask).item()
        if avg_ratio > config.ratio_threshold:
            warnings.warn(
                f"The average ratio of batch ({avg_ratio:.2f}) exceeds threshold "
                f"{config.ratio_threshold:.2f}. Skipping batch.",
                stacklevel=2,
            )
            pg_loss, vf_loss, loss = pg_loss * 0.0, vf_loss * 0.0, loss * 0.0
            trained_loss = None
        else:
            trained_loss = loss
        logprobs = outputs.logprobs.detach()
        vpreds = outputs.values.detach()
        real = mask.bool()
        stats = {
            "loss/policy": pg_loss.detach(),
            "loss/value": vf_loss.detach(),
            "loss/total": loss.detach(),
            "policy/entropy": ppo.masked_mean(outputs.entropy, mask),
            "policy/approxkl": 0.5 * ppo.masked_mean((logprobs - old_logprobs) ** 2, mask),
            "policy/policykl": ppo.masked_mean(old_logprobs - logprobs, mask),
            "policy/clipfrac": pg_clipfrac.detach(),
            "policy/advantages": advantages[real],
            "policy/advantages_mean": ppo.masked_mean(advantages, mask),
            "policy/ratio": ratio.detach()[real],
            "returns/mean": ppo.masked_mean(returns, mask),
            "returns/var": ppo.masked_var(returns, mask),
            "val/vpred": ppo.masked_mean(vpreds, mask),
            "val/error": ppo.masked_mean((vpreds - returns) ** 2, mask),
            "val/clipfrac": vf_clipfrac.detach(),
            "val/mean": ppo.masked_mean(old_values, mask),
            "val/var": ppo.masked_var(old_values, mask),
        }
        return trained_loss, stats

    def _optimizer_step(self, zero_fill_missing_grads: bool) -> None:
        """Clip (if ``max_grad_norm``), step and zero the gradients of the trainable parameters.

        After a skipped minibatch, parameters without a gradient get a zero one, so the optimizer
        still steps them as TRL's ``0 * loss`` backward did (minus its NaN when the loss is inf).
        """
        parameters = [p for group in self.optimizer.param_groups for p in group["params"]]
        if zero_fill_missing_grads:
            for parameter in parameters:
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
        if self.config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(parameters, self.config.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()

    def _step_stats(
        self,
        batch: ResponseBatch,
        scores: torch.Tensor,
        rollout: dict[str, torch.Tensor],
        non_score_reward: torch.Tensor,
        train_stats: list[dict[str, torch.Tensor]],
        kl_coef: float,
    ) -> dict[str, Any]:
        mask = batch.mask
        kl_per_sample = (rollout["kls"] * mask).sum(axis=-1)
        mean_kl = kl_per_sample.mean()
        if mean_kl.item() < -1.0:
            warnings.warn(
                f"KL divergence is starting to become negative: {mean_kl.item():.2f} - this might "
                "be a precursor for failed training. Check the generation kwargs and the "
                "training hyperparameters.",
                stacklevel=3,
            )
        query_lens = torch.tensor([len(q) for q in batch.queries], dtype=torch.float)
        response_lens = batch.lengths.float()
        stats: dict[str, Any] = {
            "objective/kl": mean_kl,
            "objective/kl_dist": kl_per_sample,
            "objective/logprobs": rollout["logprobs"],
            "objective/ref_logprobs": rollout["ref_logprobs"],
            "objective/kl_coef": kl_coef,
            "objective/entropy": (-rollout["logprobs"] * mask).sum(axis=-1).mean(),
            "ppo/mean_non_score_reward": ppo.masked_mean(non_score_reward, mask),
            "ppo/mean_scores": scores.mean(),
            "ppo/std_scores": ppo.std(scores),
            "tokens/queries_len_mean": query_lens.mean(),
            "tokens/queries_len_std": ppo.std(query_lens),
            "tokens/queries_dist": query_lens,
            "tokens/responses_len_mean": response_lens.mean(),
            "tokens/responses_len_std": ppo.std(response_lens),
            "tokens/responses_dist": response_lens,
        }
        for key in train_stats[0]:
            values = [s[key] for s in train_stats]
            if values[0].dim() == 0:
                stats[f"ppo/{key}"] = torch.stack(values).mean()
            else:
                stats[f"ppo/{key}"] = torch.cat(values)
        returns_var = stats["ppo/returns/var"]
        stats["ppo/val/var_explained"] = (
            1 - stats["ppo/val/error"] / returns_var if returns_var > 0 else torch.zeros(())
        )
        return {key: _as_python(value) for key, value in stats.items()}

    # ------------------------------------------------------------------ resumable state

    def training_state(self) -> dict[str, Any]:
        """All but weights, optimizer and scheduler needed to resume exactly (JSON-able)."""
        name, keys, position, has_gauss, cached_gaussian = self.shuffle_rng.get_state()
        return {
            "current_step": self.current_step,
            "kl_coef": self.kl_ctl.value,
            "running_moments": self.running.state(),
            "shuffle_rng": {
                "name": name,
                "keys": keys.tolist(),
                "position": int(position),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached_gaussian),
            },
            "torch_rng": torch.get_rng_state().tolist(),
        }

    def load_training_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`training_state` returned."""
        self.current_step = int(state["current_step"])
        self.kl_ctl.value = float(state["kl_coef"])
        self.running.load_state(state["running_moments"])
        rng = state["shuffle_rng"]
        self.shuffle_rng.set_state(
            (
                rng["name"],
                np.asarray(rng["keys"], dtype=np.uint32),
                rng["position"],
                rng["has_gauss"],
                rng["cached_gaussian"],
            )
        )
        torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))


def _length_mask(batch: ResponseBatch, rows: Sequence[int], width: int) -> torch.Tensor:
    """True on the first ``len(response)`` positions of each of ``rows``."""
    positions = torch.arange(width, device=batch.mask.device)
    return positions < batch.lengths[list(rows)].to(positions.device).unsqueeze(1)


def _as_python(value: Any) -> Any:
    """Single values to Python floats, anything longer to a NumPy array (TRL's convention)."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().float().numpy()
    if isinstance(value, np.ndarray) and value.size == 1 and value.ndim <= 1:
        return float(value.reshape(()))
    if isinstance(value, (np.floating, int, float)):
        return float(value)
    return value

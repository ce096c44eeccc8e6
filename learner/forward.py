"""The packed response forward: a model's logprobs, values and entropy on response tokens only.

Speed comes from touching the vocabulary only where it matters: the transformer runs on each
chunk's (not the batch's) right-padded ``query + response`` sequences, so no attention mask is
needed, then the LM head, log-softmax and entropy run on the hidden states of response positions
only, packed as ``[n_tokens, hidden]``, with one softmax shared by logprob, entropy and gradient
(:class:`TokenLogprobs`). Per-sample outputs use a ``[batch, max_response_len]`` layout with a
token mask; every tensor is made on the model's device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedModel

from rlfleet.learner.algorithms.kl import KL_PENALTIES, needs_full_distributions
from rlfleet.learner.value_head import AutoModelForCausalLMWithValueHead


@dataclass
class ResponseBatch:
    """Queries and responses of a batch; per-token tensors are ``[batch, max_response_len]``."""

    queries: list[torch.Tensor]
    responses: list[torch.Tensor]
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
        device = responses[0].device
        lengths = torch.tensor([len(r) for r in responses], device=device)
        if response_masks is None:
            positions = torch.arange(int(lengths.max()), device=device)
            mask = (positions < lengths.unsqueeze(1)).long()
        else:
            mask = pad_sequence([m.long() for m in response_masks], batch_first=True)
        return cls(queries, responses, mask, lengths)

    @property
    def width(self) -> int:
        return self.mask.shape[1]


@dataclass
class PackedRows:
    """Some rows of a batch as the model reads them, and where their response tokens sit.

    The hidden state at position ``len(query) - 1 + i`` predicts response token ``i``; token
    ``k`` of the packed ``[n_tokens]`` order (row by row) is ``labels[k]``.
    """

    rows: torch.Tensor
    """The rows' indices in the batch."""
    input_ids: torch.Tensor
    """``query + response`` per row, right-padded with 0."""
    labels: torch.Tensor
    hidden_index: tuple[torch.Tensor, torch.Tensor]
    """(row, position) of the hidden state that predicts each label."""
    out_index: tuple[torch.Tensor, torch.Tensor]
    """(row, response position) of each label in the ``[rows, width]`` layout."""
    width: int

    @classmethod
    def build(cls, batch: ResponseBatch, rows: Sequence[int]) -> PackedRows:
        queries = [batch.queries[r] for r in rows]
        responses = [batch.responses[r] for r in rows]
        device = responses[0].device
        row_index, hidden_positions, out_positions = [], [], []
        for i, (query, response) in enumerate(zip(queries, responses, strict=True)):
            row_index += [i] * len(response)
            hidden_positions += range(len(query) - 1, len(query) - 1 + len(response))
            out_positions += range(len(response))
        row_index_t = torch.tensor(row_index, device=device)
        return cls(
            rows=torch.tensor(list(rows), device=device),
            input_ids=pad_sequence(
                [torch.cat([q, a]) for q, a in zip(queries, responses, strict=True)],
                batch_first=True,
            ),
            labels=torch.cat(responses),
            hidden_index=(row_index_t, torch.tensor(hidden_positions, device=device)),
            out_index=(row_index_t, torch.tensor(out_positions, device=device)),
            width=batch.width,
        )

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """``[n_tokens]`` to ``[rows, width]``, zero off the response tokens."""
        out = packed.new_zeros(len(self.rows), self.width)
        out[self.out_index] = packed
        return out


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
    packed: PackedRows,
    with_values: bool = False,
    with_entropy: bool = False,
    with_full_logprobs: bool = False,
) -> ResponseOutputs:
    """Run ``model`` on the packed rows and read out the response positions only."""
    # Right padding: causal attention never lets a real token see the padding after it.
    hidden = backbone_of(model)(input_ids=packed.input_ids, use_cache=False).last_hidden_state
    hidden = hidden[packed.hidden_index]
    logits = lm_head_of(model)(hidden).float()
    if with_full_logprobs:
        full_logprobs = torch.log_softmax(logits, dim=-1)
        logprobs = full_logprobs.gather(-1, packed.labels.unsqueeze(-1)).squeeze(-1)
        outputs = ResponseOutputs(logprobs=packed.unpack(logprobs), full_logprobs=full_logprobs)
    else:
        logprobs, entropy = TokenLogprobs.apply(logits, packed.labels)
        outputs = ResponseOutputs(logprobs=packed.unpack(logprobs))
        if with_entropy:
            outputs.entropy = packed.unpack(entropy)
    if with_values:
        outputs.values = packed.unpack(model.v_head(hidden).squeeze(-1))
    return outputs


@dataclass
class Rollout:
    """The policy and the reference on a batch before any update, ``[batch, width]`` each."""

    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    kls: torch.Tensor
    """Per-token KL penalty between policy and reference."""


@torch.no_grad()
def rollout_forward(
    model: AutoModelForCausalLMWithValueHead,
    ref_model: AutoModelForCausalLMWithValueHead | PreTrainedModel,
    batch: ResponseBatch,
    chunk_size: int,
    kl_penalty: str,
) -> Rollout:
    """Old-policy logprobs and values, reference logprobs and per-token KL for the batch.

    Rows go through in chunks of ``chunk_size``, sorted by length to cut padding.
    """
    full = needs_full_distributions(kl_penalty)
    penalty = KL_PENALTIES[kl_penalty]
    logprobs = torch.zeros(len(batch.responses), batch.width, device=batch.mask.device)
    ref_logprobs, values, kls = (torch.zeros_like(logprobs) for _ in range(3))
    total_lengths = [len(q) + len(r) for q, r in zip(batch.queries, batch.responses, strict=True)]
    order = sorted(range(len(batch.responses)), key=total_lengths.__getitem__)
    for start in range(0, len(order), chunk_size):
        packed = PackedRows.build(batch, order[start : start + chunk_size])
        policy = response_forward(model, packed, with_values=True, with_full_logprobs=full)
        reference = response_forward(ref_model, packed, with_full_logprobs=full)
        logprobs[packed.rows], values[packed.rows] = policy.logprobs, policy.values
        ref_logprobs[packed.rows] = reference.logprobs
        if full:
            kls[packed.rows] = packed.unpack(penalty(policy.full_logprobs, reference.full_logprobs))
        else:
            kls[packed.rows] = penalty(policy.logprobs, reference.logprobs)
    return Rollout(logprobs, ref_logprobs, values, kls)


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
    """The transformer without its LM head, of a value-head model or a plain causal LM."""
    if isinstance(model, AutoModelForCausalLMWithValueHead):
        return model.backbone
    return model.base_model


def lm_head_of(model: nn.Module) -> nn.Module:
    if isinstance(model, AutoModelForCausalLMWithValueHead):
        return model.lm_head
    return model.get_output_embeddings()

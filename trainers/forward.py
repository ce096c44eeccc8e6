"""The packed response forward: a model's logprobs, values and entropy on response tokens only.

Speed comes from touching the vocabulary only where it matters: the transformer runs on each
chunk's (not the batch's) right-padded ``query + response`` sequences, so no attention mask is
needed, then the LM head, log-softmax and entropy run on the hidden states of response positions
only, packed as ``[n_tokens, hidden]``, with one softmax shared by logprob, entropy and gradient
(:class:`TokenLogprobs`). With a multi-turn job's loss masks the heads run only on the tokens the
policy sampled: the environment's are context, their outputs 0. Per-sample outputs use a
``[batch, max_response_len]`` layout with a token mask; every tensor is made on the model's
device.

A trainer runs its models through :class:`ResponseForward` modules laid out by
:class:`TrainingLayout` (sharded or not, micro-batches by token budget, gradient checkpointing):
:func:`rollout_forward` and :func:`batch_logprobs` without gradients, :func:`split_backward` for a
minibatch split over ranks or micro-batches (trainers/distributed.py says who runs which rows).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedModel

from rlfleet.algorithms.kl import KL_PENALTIES, needs_full_distributions
from rlfleet.trainers.distributed import (
    DataParallel,
    MicroBatch,
    checkpoint_blocks,
    rank_micro_batches,
    reshard,
    shard,
)
from rlfleet.trainers.value_head import AutoModelForCausalLMWithValueHead


@dataclass
class ResponseBatch:
    """Queries and responses of a batch; per-token tensors are ``[batch, max_response_len]``."""

    queries: list[torch.Tensor]
    responses: list[torch.Tensor]
    mask: torch.Tensor
    """1 on response tokens that count (all of them unless ``response_masks`` or ``loss_masks``
    zero some)."""
    lengths: torch.Tensor
    """Response lengths; ``mask`` may zero tokens within them."""
    sampled_only: bool = False
    """The mask is the job's loss masks: the heads run only where it is 1 (a mask-0 token, an
    environment observation, is context that nothing is computed on)."""

    @classmethod
    def build(
        cls,
        queries: list[torch.Tensor],
        responses: list[torch.Tensor],
        response_masks: list[torch.Tensor] | None,
        loss_masks: list[torch.Tensor] | None = None,
    ) -> ResponseBatch:
        """``response_masks``: TRL's (the tokens that count; every output still computed);
        ``loss_masks``: a multi-turn job's (1: sampled by the policy, 0: the environment's, where
        no output is computed). At most one of them."""
        if response_masks is not None and loss_masks is not None:
            raise ValueError("pass response_masks (TRL's) or loss_masks (multi-turn), not both")
        device = responses[0].device
        lengths = torch.tensor([len(r) for r in responses], device=device)
        masks = response_masks if loss_masks is None else loss_masks
        if masks is None:
            positions = torch.arange(int(lengths.max()), device=device)
            mask = (positions < lengths.unsqueeze(1)).long()
        else:
            mask = pad_sequence([m.long() for m in masks], batch_first=True)
        return cls(queries, responses, mask, lengths, sampled_only=loss_masks is not None)

    @property
    def width(self) -> int:
        return self.mask.shape[1]

    @property
    def total_lengths(self) -> list[int]:
        """``len(query) + len(response)`` per row: the tokens the model reads."""
        return [len(q) + len(r) for q, r in zip(self.queries, self.responses, strict=True)]


@dataclass
class PackedRows:
    """Some rows of a batch as the model reads them, and where their response tokens sit.

    The hidden state at position ``len(query) - 1 + i`` predicts response token ``i``; token
    ``k`` of the packed ``[n_tokens]`` order (row by row) is ``labels[k]``. Of a batch built
    with loss masks only the mask-1 tokens are labels: the hidden states that predict the
    environment's tokens are gathered out before the LM head, whose ``[n_tokens, vocab]``
    logits are most of a forward's memory and time.
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
        for i, (row, query) in enumerate(zip(rows, queries, strict=True)):
            positions = labelled_positions(batch, row)
            row_index.append(torch.full_like(positions, i))
            hidden_positions.append(positions + (len(query) - 1))
            out_positions.append(positions)
        row_index_t = torch.cat(row_index)
        out_positions_t = torch.cat(out_positions)
        return cls(
            rows=torch.tensor(list(rows), device=device),
            input_ids=pad_sequence(
                [torch.cat([q, a]) for q, a in zip(queries, responses, strict=True)],
                batch_first=True,
            ),
            labels=torch.cat([r[p] for r, p in zip(responses, out_positions, strict=True)]),
            hidden_index=(row_index_t, torch.cat(hidden_positions)),
            out_index=(row_index_t, out_positions_t),
            width=batch.width,
        )

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """``[n_tokens]`` to ``[rows, width]``, zero off the response tokens."""
        out = packed.new_zeros(len(self.rows), self.width)
        out[self.out_index] = packed
        return out


def labelled_positions(batch: ResponseBatch, row: int) -> torch.Tensor:
    """The response positions of ``row`` whose outputs are computed: all of them, or with loss
    masks those of the tokens the policy sampled."""
    length = len(batch.responses[row])
    positions = torch.arange(length, device=batch.mask.device)
    if batch.sampled_only:
        positions = positions[batch.mask[row, :length].bool()]
    return positions


class ResponseOutputs(NamedTuple):
    """A model's outputs at the response positions of some rows: ``[rows, width]`` tensors (a
    tuple, so that FSDP2 finds the tensors it hooks for the backward)."""

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
    values = packed.unpack(model.v_head(hidden).squeeze(-1)) if with_values else None
    if with_full_logprobs:
        full_logprobs = torch.log_softmax(logits, dim=-1)
        logprobs = full_logprobs.gather(-1, packed.labels.unsqueeze(-1)).squeeze(-1)
        return ResponseOutputs(packed.unpack(logprobs), values, full_logprobs=full_logprobs)
    logprobs, entropy = TokenLogprobs.apply(logits, packed.labels)
    entropy = packed.unpack(entropy) if with_entropy else None
    return ResponseOutputs(packed.unpack(logprobs), values, entropy)


class ResponseForward(nn.Module):
    """:func:`response_forward` of ``model`` as one module call.

    The root FSDP2 unit of a sharded model: the embeddings, LM head and final norm are used
    outside the model's own ``forward``, so only a root whose forward runs the whole response
    forward has them gathered when they are needed."""

    def __init__(self, model: AutoModelForCausalLMWithValueHead | PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        packed: PackedRows,
        with_values: bool = False,
        with_entropy: bool = False,
        with_full_logprobs: bool = False,
    ) -> ResponseOutputs:
        return response_forward(self.model, packed, with_values, with_entropy, with_full_logprobs)


def as_forward(model: nn.Module) -> ResponseForward:
    return model if isinstance(model, ResponseForward) else ResponseForward(model)


@dataclass(frozen=True)
class TrainingLayout:
    """How a trainer lays its models out: sharded with FSDP2 across the ranks of ``parallel``'s
    group, or whole in this process (``parallel`` None, or one rank in no group); computing in
    ``dtype``; with gradient checkpointing; in micro-batches of at most
    ``max_tokens_per_microbatch`` padded tokens (None: one per minibatch share)."""

    parallel: DataParallel | None = None
    dtype: torch.dtype = torch.float32
    gradient_checkpointing: bool = False
    max_tokens_per_microbatch: int | None = None

    def __post_init__(self) -> None:
        if self.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {self.dtype}")
        if self.dtype != torch.float32 and not self.sharded:
            raise ValueError(
                "dtype bfloat16 keeps float32 master weights through FSDP2's mixed precision: "
                "call rlfleet.trainers.distributed.init_process_group (world_size 1 too) and pass "
                "parallel=DataParallel.current(device)"
            )
        if self.max_tokens_per_microbatch is not None and self.max_tokens_per_microbatch < 1:
            raise ValueError("max_tokens_per_microbatch must be a positive number of tokens")

    @property
    def sharded(self) -> bool:
        """Whether the models are sharded with FSDP2 over the ranks' group."""
        return self.parallel is not None and self.parallel.in_group

    def local(self, device: torch.device) -> DataParallel:
        """``parallel``, or rank 0 of 1 on ``device`` when training in this process."""
        return self.parallel or DataParallel(0, 1, device)

    def forwards(
        self, model: nn.Module, ref_model: nn.Module | None
    ) -> tuple[ResponseForward, ResponseForward | None]:
        """The policy's and the reference's forward modules, checkpointed and sharded as asked
        (the policy's parameters in float32, the reference's in ``dtype``)."""
        policy = ResponseForward(model)
        reference = None if ref_model is None else ResponseForward(ref_model)
        if self.gradient_checkpointing:
            checkpoint_blocks(model)
        if self.sharded:
            mesh = self.parallel.mesh()
            shard(model.float(), policy, self.parallel, mesh, self.dtype)
            if ref_model is not None:
                shard(ref_model.to(self.dtype), reference, self.parallel, mesh, self.dtype)
        return policy, reference

    def micro_batches(
        self, batch: ResponseBatch, rows: Sequence[int], max_rows: int | None = None
    ) -> list[MicroBatch]:
        """This rank's micro-batches of ``rows`` (see trainers/distributed.py)."""
        parallel = self.local(batch.mask.device)
        budget = self.max_tokens_per_microbatch
        return rank_micro_batches(rows, batch.total_lengths, parallel, budget, max_rows)


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
    model: nn.Module,
    ref_model: nn.Module,
    batch: ResponseBatch,
    chunk_size: int,
    kl_penalty: str,
    layout: TrainingLayout | None = None,
) -> Rollout:
    """Old-policy logprobs and values, reference logprobs and per-token KL for the batch.

    ``model`` and ``ref_model`` are models or their :class:`ResponseForward`. Rows go through in
    chunks of at most ``chunk_size`` rows (and the layout's token budget), sorted by length to
    cut padding; on several ranks each runs its share and the rows are summed over the ranks.
    """
    layout = layout or TrainingLayout()
    policy, reference = as_forward(model), as_forward(ref_model)
    full = needs_full_distributions(kl_penalty)
    penalty = KL_PENALTIES[kl_penalty]
    logprobs = torch.zeros(len(batch.responses), batch.width, device=batch.mask.device)
    ref_logprobs, values, kls = (torch.zeros_like(logprobs) for _ in range(3))
    total_lengths = batch.total_lengths
    order = sorted(range(len(batch.responses)), key=total_lengths.__getitem__)
    for micro in layout.micro_batches(batch, order, max_rows=chunk_size):
        packed = PackedRows.build(batch, micro.rows)
        own = policy(packed, with_values=True, with_full_logprobs=full)
        ref = reference(packed, with_full_logprobs=full)
        if micro.dummy:
            continue
        logprobs[packed.rows], values[packed.rows] = own.logprobs, own.values
        ref_logprobs[packed.rows] = ref.logprobs
        if full:
            kls[packed.rows] = packed.unpack(penalty(own.full_logprobs, ref.full_logprobs))
        else:
            kls[packed.rows] = penalty(own.logprobs, ref.logprobs)
    reshard(policy)
    reshard(reference)
    parallel = layout.local(batch.mask.device)
    return Rollout(*parallel.sum_rows([logprobs, ref_logprobs, values, kls]))


@torch.no_grad()
def batch_logprobs(
    model: nn.Module,
    batch: ResponseBatch,
    chunk_size: int,
    layout: TrainingLayout | None = None,
) -> torch.Tensor:
    """``model``'s logprobs of every response token, ``[batch, width]``, chunked and shared out
    among the ranks as in :func:`rollout_forward`."""
    layout = layout or TrainingLayout()
    forward = as_forward(model)
    logprobs = torch.zeros_like(batch.mask, dtype=torch.float)
    order = sorted(range(len(batch.responses)), key=batch.total_lengths.__getitem__)
    for micro in layout.micro_batches(batch, order, max_rows=chunk_size):
        packed = PackedRows.build(batch, micro.rows)
        outputs = forward(packed)
        if not micro.dummy:
            logprobs[packed.rows] = outputs.logprobs
    reshard(forward)
    (logprobs,) = layout.local(batch.mask.device).sum_rows([logprobs])
    return logprobs


MicroBatchLoss = Callable[[ResponseOutputs, torch.Tensor], torch.Tensor]
"""``(outputs, rows) -> loss``: a micro-batch's share of its minibatch's loss."""


def split_backward(
    forward: ResponseForward,
    batch: ResponseBatch,
    rows: Sequence[int],
    micro_batches: list[MicroBatch],
    loss_of: MicroBatchLoss,
    parallel: DataParallel,
    with_values: bool = False,
    with_entropy: bool = False,
) -> ResponseOutputs:
    """Forward and backward of this rank's ``micro_batches`` of the minibatch ``rows``, the
    gradients accumulating; returns the whole minibatch's outputs ``[len(rows), width]``,
    detached and summed over the ranks (every rank gets them all)."""
    fields = ["logprobs"] + ["values"] * with_values + ["entropy"] * with_entropy
    gathered = torch.zeros(len(fields), len(rows), batch.width, device=batch.mask.device)
    position = {row: i for i, row in enumerate(rows)}
    for micro in micro_batches:
        packed = PackedRows.build(batch, micro.rows)
        outputs = forward(packed, with_values=with_values, with_entropy=with_entropy)
        loss = loss_of(outputs, packed.rows)
        (loss * 0.0 if micro.dummy else loss).backward()
        if not micro.dummy:
            index = torch.tensor([position[row] for row in micro.rows], device=gathered.device)
            for i, field in enumerate(fields):
                gathered[i, index] = getattr(outputs, field).detach()
    parallel.sum(gathered)
    return ResponseOutputs(**dict(zip(fields, gathered, strict=True)))


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

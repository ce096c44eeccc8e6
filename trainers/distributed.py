"""The learner's ranks: one ``torch.distributed`` group, models sharded with FSDP2, and which rows
each rank runs.

Every rank holds the whole batch's token ids and runs the forward (and backward) only on its
share of each minibatch's rows; per-row outputs are summed over the ranks (each row is non-zero on
one rank only, so the sum is exact), so that rewards, advantages, whitening, the KL controller and
stats are computed on full tensors, identically on every rank. Gradients are summed over the
ranks (not averaged): a rank's micro-batch contributes its share of the minibatch's loss (see
``MICRO_BATCH_SHARES`` in algorithms/losses.py), so N ranks compute one rank's update.

FSDP2 units: each transformer block, the value head (in float32 whatever ``dtype``), and the
root, a :class:`~rlfleet.trainers.forward.ResponseForward` around the model, which holds the
embeddings, the (tied) LM head and the final norm. Parameters are kept in float32 (the master
weights, and so the optimizer state); ``dtype`` bfloat16 casts them for the forward and backward
and reduces gradients in float32 (``MixedPrecisionPolicy``). The reference model is sharded the
same way, stored in ``dtype`` (it is never trained). A LoRA model's adapters share their block's
unit with its frozen base weights (FSDP2 reduces only the gradients there are); its reference is
the policy's own root with the adapters disabled (trainers/lora.py).

FSDP2's collectives need every rank to run the same forwards and backwards in the same order:
:func:`rank_micro_batches` pads a rank's micro-batches with dummy ones (outputs dropped, loss
times zero) up to the largest count of any rank; every rank computes every rank's plan from the
batch it holds, so no communication decides it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel

from rlfleet.common.transport.rendezvous import listening_store, local_address, pin_gloo_to


def init_process_group(
    rank: int,
    world_size: int,
    master_addr: str,
    master_port: int,
    device: torch.device,
    timeout_s: float,
) -> None:
    """Join the learner's group: nccl when ``device`` is a GPU (made the current one), else gloo.

    Rank 0 serves the group's store on ``master_addr:master_port`` and listens there only (not
    on every interface, as ``init_method="tcp://..."`` would: ``listening_store``); gloo's
    connections listen on the interface of the address that reaches it (``pin_gloo_to``). A
    local job's ``master_addr`` is 127.0.0.1, a cluster's the node's address.

    A collective that waits longer than ``timeout_s`` (a dead or stalled rank) fails."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=timeout_s)
    if rank == 0:
        store = listening_store(master_addr, master_port, world_size, timeout)
    else:
        store = dist.TCPStore(master_addr, master_port, world_size, False, timeout=timeout)
    if not cuda:
        pin_gloo_to(local_address(master_addr, master_port))
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        store=store,
        rank=rank,
        world_size=world_size,
        timeout=timeout,
        device_id=device if cuda else None,
    )


@dataclass(frozen=True)
class DataParallel:
    """This rank's place in the learner's group and the device it trains on."""

    rank: int
    world_size: int
    device: torch.device
    in_group: bool = True
    """Whether the ranks form a ``torch.distributed`` group (the models are then sharded with
    FSDP2, one rank too); False: one rank training in this process, nothing sharded."""

    @classmethod
    def current(cls, device: torch.device) -> DataParallel:
        """From the initialized default group; rank 0 of 1, in no group, when there is none."""
        if not dist.is_available() or not dist.is_initialized():
            return cls(0, 1, torch.device(device), in_group=False)
        return cls(dist.get_rank(), dist.get_world_size(), torch.device(device))

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks, in place (nothing to do on one rank)."""
        if self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum_rows(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Per-row tensors of one shape, each rank's rows filled and the rest zero, summed over
        the ranks in one collective (exact: every row is non-zero on one rank only)."""
        if self.world_size == 1:
            return list(tensors)
        return list(self.sum(torch.stack(list(tensors))))

    def mesh(self) -> DeviceMesh:
        """The 1-D mesh of the whole group, FSDP2's sharding dimension."""
        if not dist.is_initialized():
            raise RuntimeError(
                "parallel training needs torch.distributed: call "
                "rlfleet.trainers.distributed.init_process_group(...) on every rank first (with "
                "world_size 1 too)"
            )
        if dist.get_world_size() != self.world_size or dist.get_rank() != self.rank:
            raise ValueError(
                f"parallel says rank {self.rank} of {self.world_size}, the process group rank "
                f"{dist.get_rank()} of {dist.get_world_size()}: use DataParallel.current(device)"
            )
        return init_device_mesh(self.device.type, (self.world_size,))


def full_state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """Each entry of ``model.state_dict()`` whole, one at a time, sharded ones gathered.

    Collective when the model is sharded: every rank iterates it to the end (rank 0 may be the
    only one to keep the tensors). Only one gathered tensor exists at a time, never the model."""
    for name, tensor in model.state_dict().items():
        yield name, gathered(tensor)


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole: a sharded one (a DTensor) gathered from every rank (a collective), any
    other as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


# ----------------------------------------------------------------------------------------------
# Sharding and gradient checkpointing


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks (decoder layers), found generically: the modules Hugging Face
    lists in ``_no_split_modules`` (``GPT2Block``, ``LlamaDecoderLayer``, ...), outermost only,
    else the children of the largest ``ModuleList`` (``transformer.h``, ``model.layers``)."""
    pretrained = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    names = set(getattr(pretrained, "_no_split_modules", None) or ())
    blocks: list[nn.Module] = []
    inside: set[nn.Module] = set()
    for module in model.modules():
        if type(module).__name__ in names and module not in inside:
            blocks.append(module)
            inside.update(module.modules())
    if blocks:
        return blocks
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(model).__name__}: no transformer blocks found to shard")
    return list(max(lists, key=lambda m: sum(p.numel() for p in m.parameters())))


def checkpoint_blocks(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them.

    Hugging Face's ``gradient_checkpointing_enable`` acts only in training mode, and the trainers
    run in eval mode (no dropout), so each block's own ``forward`` is wrapped instead; the
    module tree (and so every parameter name) stays as it was. Apply it after any copy of the
    model (``create_reference_model``): a copy would call the original's blocks."""
    for block in transformer_blocks(model):
        block.forward = functools.partial(_checkpointed, block.forward)


def _checkpointed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def shard(
    model: nn.Module,
    root: nn.Module,
    parallel: DataParallel,
    mesh: DeviceMesh,
    dtype: torch.dtype,
) -> None:
    """FSDP2 over ``root`` (a module around ``model`` whose forward runs the whole forward):
    each block its own unit, the value head (if any) one in float32, the rest the root's.

    Parameters keep the dtype they have (float32 master weights for a trained model, ``dtype``
    for the reference); the forward and backward compute in ``dtype``, gradients are reduced in
    float32 and summed over the ranks (SUM only: gloo has no pre-multiplied sum)."""
    model.to(parallel.device)
    same_on_every_rank(model, parallel)
    compute = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in transformer_blocks(model):
        fully_shard(block, mesh=mesh, mp_policy=compute)
    value_head = getattr(model, "v_head", None)
    if value_head is not None:
        full_precision = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
        fully_shard(value_head, mesh=mesh, mp_policy=full_precision)
    fully_shard(root, mesh=mesh, mp_policy=compute)
    for module in root.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


@torch.no_grad()
def same_on_every_rank(model: nn.Module, parallel: DataParallel) -> None:
    """Rank 0's parameters and buffers on every rank: a model loaded from one checkpoint is the
    same everywhere, but a freshly initialised part (a new value head) is not unless seeded."""
    if parallel.world_size == 1:
        return
    for tensor in [*model.parameters(), *model.buffers()]:
        dist.broadcast(tensor.data, src=0)


def reshard(root: nn.Module) -> None:
    """Free the root's gathered parameters after forwards with no backward (FSDP2 keeps the
    root's gathered until its backward)."""
    if isinstance(root, FSDPModule):
        root.reshard()


# ----------------------------------------------------------------------------------------------
# Which rows each rank runs


@dataclass(frozen=True)
class MicroBatch:
    """Rows of the batch that go through the model together."""

    rows: list[int]
    dummy: bool = False
    """Run only to keep the ranks' collectives in step: outputs dropped, loss times zero."""


def split_among_ranks(
    rows: Sequence[int], lengths: Sequence[int], world_size: int
) -> list[list[int]]:
    """``rows`` dealt to ``world_size`` ranks, the longest first to the least loaded (tokens),
    each share in the order of ``rows``; one rank gets them all as they are."""
    if world_size == 1:
        return [list(rows)]
    loads = [0] * world_size
    shares: list[list[int]] = [[] for _ in range(world_size)]
    for position in sorted(range(len(rows)), key=lambda i: -lengths[rows[i]]):
        rank = min(range(world_size), key=loads.__getitem__)
        shares[rank].append(position)
        loads[rank] += lengths[rows[position]]
    return [[rows[position] for position in sorted(share)] for share in shares]


def micro_batches(
    rows: Sequence[int],
    lengths: Sequence[int],
    max_tokens: int | None,
    max_rows: int | None = None,
) -> list[list[int]]:
    """``rows`` in consecutive groups of at most ``max_rows`` rows and ``max_tokens`` padded
    tokens (rows times the longest); a row longer than ``max_tokens`` goes alone. With a token
    budget the rows are sorted by length first (less padding)."""
    if max_tokens is not None:
        rows = sorted(rows, key=lengths.__getitem__)
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for row in rows:
        grown = max(longest, lengths[row])
        too_many = max_rows is not None and len(current) + 1 > max_rows
        too_long = max_tokens is not None and (len(current) + 1) * grown > max_tokens
        if current and (too_many or too_long):
            groups.append(current)
            current, grown = [], lengths[row]
        current.append(row)
        longest = grown
    if current:
        groups.append(current)
    return groups


def rank_micro_batches(
    rows: Sequence[int],
    lengths: Sequence[int],
    parallel: DataParallel,
    max_tokens: int | None,
    max_rows: int | None = None,
) -> list[MicroBatch]:
    """This rank's micro-batches of ``rows``, padded with dummy ones (the shortest row) to the
    count of the rank with the most, so that every rank runs as many forwards."""
    shares = split_among_ranks(rows, lengths, parallel.world_size)
    plans = [micro_batches(share, lengths, max_tokens, max_rows) for share in shares]
    count = max(len(plan) for plan in plans)
    dummy = MicroBatch([min(rows, key=lengths.__getitem__)], dummy=True)
    own = [MicroBatch(group) for group in plans[parallel.rank]]
    return own + [dummy] * (count - len(own))

"""Guards against non-finite training: a NaN or inf loss, gradient or weight stops the step.

A trainer checks each minibatch's loss before its backward pass (``check_finite_loss``) and the
gradient norm before each optimizer step (``check_finite_grad_norm`` on ``total_grad_norm``, the
norm that clipping then uses; trainers/minibatch.py); ``ppo.nonfinite`` says whether a non-finite
value fails the step (``error``, the default) or only skips that optimizer step (``skip``). The
learner checks the weights before they are published or checkpointed (``check_finite_weights``),
so a broken policy never reaches a generator or a checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

PPO_ADVICE = "lower ppo.learning_rate or set ppo.max_grad_norm, or set ppo.nonfinite: skip"
CRITIC_FREE_ADVICE = "lower critic_free.learning_rate or critic_free.max_grad_norm"


class NonFiniteError(FloatingPointError):
    """Training produced a NaN or an infinity; the message says where and what to do."""


def is_finite(value: torch.Tensor) -> bool:
    return bool(torch.isfinite(value).all())


def check_finite_loss(loss: torch.Tensor, where: str, advice: str = PPO_ADVICE) -> None:
    """Raises ``NonFiniteError`` naming ``where`` (e.g. ``step 3, epoch 0, minibatch 1``)."""
    if not is_finite(loss):
        raise NonFiniteError(f"{where}: the loss is {loss.item()}; {advice}")


def total_grad_norm(parameters: Iterable[nn.Parameter]) -> torch.Tensor:
    """The L2 norm of all gradients together (parameters without a gradient add nothing) as
    ``torch.nn.utils.get_total_norm`` computes it for ``clip_grad_norm_``; over every rank's
    shard for sharded (FSDP2) gradients, a collective then. A zero without gradients."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads, norm_type=2.0)


def grad_norm(parameters: Iterable[nn.Parameter]) -> float:
    """``total_grad_norm`` as a float."""
    return float(total_grad_norm(parameters))


def check_finite_grad_norm(norm: float, where: str, advice: str = PPO_ADVICE) -> None:
    """Raises ``NonFiniteError`` naming ``where`` when the gradient norm is NaN or inf."""
    if not math.isfinite(norm):
        raise NonFiniteError(f"{where}: the gradient norm is {norm}; {advice}")


def finite_grad_norm(
    parameters: Iterable[nn.Parameter], where: str, advice: str = PPO_ADVICE
) -> float:
    """The gradient norm; raises ``NonFiniteError`` naming ``where`` when it is NaN or inf."""
    norm = grad_norm(parameters)
    check_finite_grad_norm(norm, where, advice)
    return norm


@torch.no_grad()
def check_finite_weights(model: nn.Module, where: str, advice: str = PPO_ADVICE) -> None:
    """Raises ``NonFiniteError`` naming ``where`` and the first parameter holding a NaN or an
    infinity. One reduction over every parameter (one host sync per step, not one per tensor);
    the parameters are searched only when it fails. Sharded (FSDP2) weights are checked shard by
    shard and the verdicts combined over the ranks: collective, every rank calls it."""
    parameters = list(model.named_parameters())
    finite = torch.stack([torch.isfinite(local_part(p)).all() for _, p in parameters])
    if any(isinstance(p, DTensor) for _, p in parameters):
        finite = finite.to(torch.int32)
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if bool(finite.all()):
        return
    name = next(name for (name, _), ok in zip(parameters, finite.tolist(), strict=True) if not ok)
    raise NonFiniteError(
        f"{where}: weight {name} is not finite; it was neither published nor checkpointed; {advice}"
    )


def local_part(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a sharded tensor, else the tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor

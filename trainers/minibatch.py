"""The update loop both trainers share: the seeded order of the rows, a minibatch's forward and
backward, and the guarded optimizer step.

:class:`MinibatchTrainer` is the base of ``PPOTrainer`` (trainers/ppo.py) and
``CriticFreeTrainer`` (trainers/critic_free.py). Each trainer keeps its own loop over epochs
(PPO) or iterations (GRPO's mu) and its loss; the path a minibatch takes is this one:

- The order: ``Shuffler``, the trainer's private seeded generator. TRL v0.11.4 draws each epoch's
  order with ``np.random.permutation`` from NumPy's global RNG, seeded by
  ``set_seed(config.seed)``; a private ``np.random.RandomState(seed)`` draws the same sequence
  without touching any global RNG. ``optimizer_steps`` cuts one pass into optimizer steps of
  minibatches.
- The forward and backward (``_forward_backward``): in one piece (one rank, within the token
  budget) the loss is decided on before its backward, as in TRL; split over ranks or
  micro-batches (``forward.split_backward``), each micro-batch backpropagates its share of the
  minibatch's loss first, then the loss of the whole minibatch from the gathered outputs
  decides, and a skipped minibatch's gradients are taken back out.
- The guards (``_guarded``, trainers/guards.py): a NaN or an infinity in a loss or the gradient
  norm fails the step, no gradient of it carried into the next; with ``skip_nonfinite`` (PPO's
  ``nonfinite: skip``) it only skips that optimizer step.
- The optimizer step (``_optimizer_step``): the gradient norm (checked), clipping to
  ``max_grad_norm`` with that norm (``torch.nn.utils.clip_grad_norm_``'s arithmetic, the norm
  computed once), step, zero.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, Protocol

import numpy as np
import torch

from rlfleet.trainers.distributed import DataParallel
from rlfleet.trainers.forward import (
    PackedRows,
    ResponseBatch,
    ResponseForward,
    ResponseOutputs,
    TrainingLayout,
    split_backward,
)
from rlfleet.trainers.guards import (
    NonFiniteError,
    check_finite_grad_norm,
    check_finite_loss,
    total_grad_norm,
)


class Shuffler:
    """Seeded permutations of a batch's rows, with a JSON-able state for exact resume."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.RandomState(seed)

    def permutation(self, size: int) -> list[int]:
        return self.rng.permutation(size).tolist()

    def state(self) -> dict[str, Any]:
        name, keys, position, has_gauss, cached_gaussian = self.rng.get_state()
        return {
            "name": name,
            "keys": keys.tolist(),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.rng.set_state(
            (
                state["name"],
                np.asarray(state["keys"], dtype=np.uint32),
                state["position"],
                state["has_gauss"],
                state["cached_gaussian"],
            )
        )


Minibatch = tuple[int, list[int]]
"""``(index, rows)``: a minibatch's place in its pass (0, 1, ...) and its rows of the batch."""


def optimizer_steps(
    permutation: list[int], step_size: int, minibatch_size: int
) -> list[list[Minibatch]]:
    """One pass over the rows in ``permutation`` order: optimizer steps of ``step_size`` rows,
    each the list of its minibatches of ``minibatch_size`` rows."""
    return [
        [
            (start // minibatch_size, permutation[start : start + minibatch_size])
            for start in range(first, first + step_size, minibatch_size)
        ]
        for first in range(0, len(permutation), step_size)
    ]


Outcome = Literal["trained", "skipped", "nonfinite"]
"""What became of a minibatch: its gradients accumulated, skipped by the loss (PPO's ratio
threshold; no gradients), or a non-finite loss under ``skip_nonfinite`` (no step)."""


class LossResult(Protocol):
    loss: torch.Tensor | None
    """None: the loss skips this minibatch."""


class MinibatchLoss(Protocol):
    """A trainer's loss as ``_forward_backward`` runs it."""

    accumulation: int
    """The one-piece backward divides the loss by this (PPO's gradient accumulation steps)."""
    may_skip: bool
    """Whether ``whole`` may skip a minibatch (then split gradients are saved to take back)."""

    def whole(self, outputs: ResponseOutputs, rows: torch.Tensor) -> LossResult:
        """The minibatch's loss and stats from its outputs (rows in minibatch order)."""
        ...

    def part(
        self, outputs: ResponseOutputs, micro_rows: torch.Tensor, rows: torch.Tensor
    ) -> torch.Tensor:
        """A micro-batch's share of the minibatch's loss, to backpropagate (accumulation
        included)."""
        ...


class MinibatchTrainer:
    """What a trainer with a policy forward, a layout and an optimizer updates with.

    The trainer sets ``model``, ``policy`` (the training forward), ``layout``, ``optimizer``,
    ``shuffler`` and ``advice`` (what to do about a non-finite value: trainers/guards.py).
    """

    model: torch.nn.Module
    policy: ResponseForward
    layout: TrainingLayout
    optimizer: torch.optim.Optimizer
    shuffler: Shuffler
    advice: str
    skip_nonfinite: bool = False
    """A non-finite loss or gradient norm skips its optimizer step instead of failing."""

    @property
    def current_device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def parallel(self) -> DataParallel:
        """This rank's place in the learner's group (rank 0 of 1 in this process)."""
        return self.layout.local(self.current_device)

    def _forward_backward(
        self,
        batch: ResponseBatch,
        rows: list[int],
        loss: MinibatchLoss,
        where: str,
        **forward_options: bool,
    ) -> tuple[ResponseOutputs, Any, Outcome]:
        """One minibatch's forward and backward (gradients accumulating): its outputs, its loss
        result and its outcome (see the module doc for the two ways)."""
        micro_batches = self.layout.micro_batches(batch, rows)
        index = torch.tensor(rows, device=batch.mask.device)
        if self.parallel.world_size == 1 and len(micro_batches) == 1:
            outputs = self.policy(PackedRows.build(batch, rows), **forward_options)
            result = loss.whole(outputs, index)
            outcome = self._outcome(result, where)
            if outcome == "trained":
                (result.loss / loss.accumulation).backward()
            return outputs, result, outcome

        def part(outputs: ResponseOutputs, micro_rows: torch.Tensor) -> torch.Tensor:
            return loss.part(outputs, micro_rows, index)

        before = gradients(self.optimizer) if loss.may_skip else []
        outputs = split_backward(
            self.policy, batch, rows, micro_batches, part, self.parallel, **forward_options
        )
        result = loss.whole(outputs, index)
        outcome = self._outcome(result, where)
        if outcome == "skipped":
            restore_gradients(self.optimizer, before)
        return outputs, result, outcome

    def _outcome(self, result: LossResult, where: str) -> Outcome:
        if result.loss is None:
            return "skipped"
        if not self._guarded(check_finite_loss, result.loss, where):
            return "nonfinite"
        return "trained"

    def _guarded(self, check: Callable[..., Any], value: Any, where: str) -> bool:
        """Runs a trainers/guards.py check: True when the value is finite; False under
        ``skip_nonfinite``, else its ``NonFiniteError`` propagates (nothing of the failed step
        carries into the next)."""
        try:
            check(value, where, self.advice)
        except NonFiniteError:
            if not self.skip_nonfinite:
                self.optimizer.zero_grad()
                raise
            return False
        return True

    def _optimizer_step(
        self,
        max_grad_norm: float | None,
        where: str,
        finite: bool = True,
        zero_fill_missing_grads: bool = False,
    ) -> float | None:
        """Clip (if ``max_grad_norm``), step and zero the gradients of the trainable parameters;
        the gradient norm before clipping, None when the step was skipped.

        ``zero_fill_missing_grads``: parameters without a gradient get a zero one, so the
        optimizer still steps them (PPO after a skipped minibatch, as TRL's ``0 * loss``
        backward did). A non-finite loss (``finite`` False) or gradient norm skips the step under
        ``skip_nonfinite``, else the gradient norm's ``NonFiniteError`` names ``where``."""
        parameters = trainable(self.optimizer)
        if zero_fill_missing_grads:
            for parameter in parameters:
                if parameter.grad is None:
                    parameter.grad = torch.zeros_like(parameter)
        if finite:
            total = total_grad_norm(parameters)
            norm = float(total)
            finite = self._guarded(check_finite_grad_norm, norm, where)
        if not finite:
            self.optimizer.zero_grad()
            return None
        if max_grad_norm is not None:
            torch.nn.utils.clip_grads_with_norm_(parameters, max_grad_norm, total)
        self.optimizer.step()
        self.optimizer.zero_grad()
        return norm


def trainable(optimizer: torch.optim.Optimizer) -> list[torch.nn.Parameter]:
    """The parameters the optimizer steps."""
    return [p for group in optimizer.param_groups for p in group["params"]]


Gradients = list[torch.Tensor | None]


def gradients(optimizer: torch.optim.Optimizer) -> Gradients:
    """A copy of the optimizer's parameters' gradients (None where there is none)."""
    return [None if p.grad is None else p.grad.detach().clone() for p in trainable(optimizer)]


def restore_gradients(optimizer: torch.optim.Optimizer, saved: Gradients) -> None:
    """Puts back what ``gradients`` copied (a loss that may skip saves them first)."""
    for parameter, grad in zip(trainable(optimizer), saved, strict=True):
        parameter.grad = grad


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


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model.eval()`` for the block, then every submodule's own mode back (dropout off in
    every pass of a step, as in TRL)."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training

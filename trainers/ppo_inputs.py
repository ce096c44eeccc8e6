"""The checks of ``PPOTrainer.step``'s inputs: a ValueError names the offending list and index
before anything is trained on."""

from __future__ import annotations

from typing import NamedTuple

import torch


class StepInputs(NamedTuple):
    """``step``'s inputs on the model's device, scores as one float32 ``[batch]`` tensor."""

    queries: list[torch.Tensor]
    responses: list[torch.Tensor]
    scores: torch.Tensor
    response_masks: list[torch.Tensor] | None


def checked_step_inputs(
    queries: list[torch.Tensor],
    responses: list[torch.Tensor],
    scores: list[torch.Tensor],
    response_masks: list[torch.Tensor] | None,
    batch_size: int,
    vocab_size: int,
    device: torch.device,
) -> StepInputs:
    named = {"queries": queries, "responses": responses, "scores": scores}
    if response_masks is not None:
        named["response_masks"] = response_masks
    for name, items in named.items():
        if not isinstance(items, (list, tuple)):
            raise ValueError(f"{name} must be a list of tensors, got {type(items).__name__}")
        if len(items) != batch_size:
            raise ValueError(
                f"{name} has {len(items)} elements but config.batch_size is {batch_size}"
            )
    queries = checked_token_ids("queries", queries, vocab_size, device)
    responses = checked_token_ids("responses", responses, vocab_size, device)
    checked = checked_scores(scores, device)
    if response_masks is not None:
        for i, (mask, response) in enumerate(zip(response_masks, responses, strict=True)):
            if mask.shape != response.shape:
                raise ValueError(f"response_masks[{i}] must have the shape of responses[{i}]")
        response_masks = [mask.to(device) for mask in response_masks]
    return StepInputs(queries, responses, checked, response_masks)


def checked_token_ids(
    name: str, items: list[torch.Tensor], vocab_size: int, device: torch.device
) -> list[torch.Tensor]:
    """Non-empty 1-D integer tensors of ids in ``[0, vocab_size)``, moved to ``device``."""
    for i, ids in enumerate(items):
        if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.is_floating_point():
            raise ValueError(f"{name}[{i}] must be a 1-D tensor of integer token ids")
        if len(ids) == 0:
            raise ValueError(f"{name}[{i}] is empty")
    items = [ids.to(device) for ids in items]
    every_id = torch.cat(items)
    if every_id.min() < 0 or every_id.max() >= vocab_size:
        bad = next(i for i, ids in enumerate(items) if ids.min() < 0 or ids.max() >= vocab_size)
        raise ValueError(f"{name}[{bad}] has token ids outside [0, {vocab_size})")
    return items


def checked_scores(scores: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Finite scalars (0-D or 1-element 1-D) as one float32 ``[batch]`` tensor on ``device``."""
    for i, score in enumerate(scores):
        shape = torch.as_tensor(score).shape
        if len(shape) > 1 or shape.numel() != 1:
            raise ValueError(
                f"scores[{i}] must be a scalar (0-D or 1-element 1-D tensor), got shape "
                f"{tuple(shape)}"
            )
    stacked = torch.stack(
        [torch.as_tensor(score).to(device).reshape(()).float() for score in scores]
    )
    finite = torch.isfinite(stacked)
    if not finite.all():
        bad = int((~finite).nonzero()[0, 0])
        raise ValueError(f"scores[{bad}] is {stacked[bad].item()}; scores must be finite")
    return stacked

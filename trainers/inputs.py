"""The checks of the trainers' ``step`` inputs: a ValueError names the offending list and index
before anything is trained on. ``checked_step_inputs`` is every trainer's (queries, responses,
scores); the rest are the critic-free trainer's (group ids, truncation flags, the completion
limit) and the generator's logprobs that either trainer takes for truncated importance sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch.nn.utils.rnn import pad_sequence

from rlfleet.common.config import GROUPED_ALGORITHMS


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


def checked_group_ids(
    group_ids: Sequence[int] | torch.Tensor | None,
    algorithm: str,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor | None:
    """``[batch]`` long tensor; every group of at least two samples for a grouped algorithm."""
    if group_ids is None:
        if algorithm in GROUPED_ALGORITHMS:
            raise ValueError(f"{algorithm} needs group_ids: the samples of one prompt share one")
        return None
    ids = torch.as_tensor(group_ids)
    if ids.dim() != 1 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError("group_ids must be a 1-D sequence of integers")
    if len(ids) != batch_size:
        raise ValueError(f"group_ids has {len(ids)} elements but config.batch_size is {batch_size}")
    ids = ids.to(device=device, dtype=torch.long)
    if algorithm in GROUPED_ALGORITHMS:
        _, index, counts = torch.unique(ids, return_inverse=True, return_counts=True)
        alone = (counts[index] < 2).nonzero()
        if len(alone):
            i = int(alone[0, 0])
            raise ValueError(
                f"group_ids[{i}] ({int(ids[i])}) is the only sample of its group; {algorithm} "
                "compares each sample with the others of its prompt, so every group needs two"
            )
    return ids


def checked_behaviour_logprobs(
    behaviour_logprobs: Sequence[torch.Tensor] | None,
    responses: list[torch.Tensor],
    device: torch.device,
) -> torch.Tensor | None:
    """The generator's per-token logprobs as ``[batch, max_response_len]`` (0 on padding)."""
    if behaviour_logprobs is None:
        return None
    if len(behaviour_logprobs) != len(responses):
        raise ValueError(
            f"behaviour_logprobs has {len(behaviour_logprobs)} elements for {len(responses)} "
            "responses"
        )
    rows = []
    for i, (logprobs, response) in enumerate(zip(behaviour_logprobs, responses, strict=True)):
        logprobs = torch.as_tensor(logprobs)
        if logprobs.shape != response.shape or not logprobs.is_floating_point():
            raise ValueError(
                f"behaviour_logprobs[{i}] must be a float tensor of the shape of responses[{i}] "
                f"{tuple(response.shape)}, got {logprobs.dtype} {tuple(logprobs.shape)}"
            )
        if not torch.isfinite(logprobs).all() or (logprobs > 0).any():
            raise ValueError(f"behaviour_logprobs[{i}] must be finite logprobs (<= 0)")
        rows.append(logprobs.to(device=device, dtype=torch.float32))
    return pad_sequence(rows, batch_first=True)


def checked_truncated(
    truncated: Sequence[bool] | torch.Tensor | None, batch_size: int, device: torch.device
) -> torch.Tensor:
    """``[batch]`` bool: which responses stopped at the length limit (all False when None)."""
    if truncated is None:
        return torch.zeros(batch_size, dtype=torch.bool, device=device)
    flags = torch.as_tensor(truncated)
    if flags.dim() != 1 or len(flags) != batch_size:
        raise ValueError(f"truncated must be {batch_size} flags, got shape {tuple(flags.shape)}")
    if flags.dtype != torch.bool:
        raise ValueError(f"truncated must hold booleans, got {flags.dtype}")
    return flags.to(device)


def checked_response_lengths(
    responses: list[torch.Tensor], max_completion_length: int | None
) -> None:
    if max_completion_length is None:
        return
    for i, response in enumerate(responses):
        if len(response) > max_completion_length:
            raise ValueError(
                f"responses[{i}] has {len(response)} tokens, more than max_completion_length "
                f"({max_completion_length})"
            )


def checked_loss_masks(
    loss_masks: Sequence[torch.Tensor] | None, responses: list[torch.Tensor], device: torch.device
) -> list[torch.Tensor] | None:
    """Each response's loss mask: 0/1 integers of its shape, and at least one 1 in the batch. A
    row of zeros is trained on nothing (a dropped agent trajectory, actors/agent_rollout.py):
    it counts in no loss, no whitening and no statistic over tokens."""
    if loss_masks is None:
        return None
    if len(loss_masks) != len(responses):
        raise ValueError(
            f"loss_masks has {len(loss_masks)} elements for {len(responses)} responses"
        )
    checked = []
    for i, (mask, response) in enumerate(zip(loss_masks, responses, strict=True)):
        mask = torch.as_tensor(mask)
        if mask.shape != response.shape or mask.is_floating_point():
            raise ValueError(
                f"loss_masks[{i}] must be integers of the shape of responses[{i}] "
                f"{tuple(response.shape)}, got {mask.dtype} {tuple(mask.shape)}"
            )
        if ((mask != 0) & (mask != 1)).any():
            raise ValueError(f"loss_masks[{i}] must hold 0s and 1s")
        checked.append(mask.to(device=device, dtype=torch.long))
    if not any(bool(mask.any()) for mask in checked):
        raise ValueError("loss_masks are 0 everywhere: the batch has no token to train on")
    return checked


def checked_token_rewards(
    token_rewards: Sequence[torch.Tensor] | None,
    loss_masks: list[torch.Tensor] | None,
    responses: list[torch.Tensor],
    device: torch.device,
) -> torch.Tensor | None:
    """Per-token rewards ``[batch, max_response_len]`` (0 on padding): finite floats of each
    response's shape, 0 on its mask-0 tokens (a reward there would be lost: the advantages skip
    those tokens)."""
    if token_rewards is None:
        return None
    if len(token_rewards) != len(responses):
        raise ValueError(
            f"token_rewards has {len(token_rewards)} elements for {len(responses)} responses"
        )
    rows = []
    for i, (rewards, response) in enumerate(zip(token_rewards, responses, strict=True)):
        rewards = torch.as_tensor(rewards)
        if rewards.shape != response.shape or not rewards.is_floating_point():
            raise ValueError(
                f"token_rewards[{i}] must be floats of the shape of responses[{i}] "
                f"{tuple(response.shape)}, got {rewards.dtype} {tuple(rewards.shape)}"
            )
        rewards = rewards.to(device=device, dtype=torch.float32)
        if not torch.isfinite(rewards).all():
            raise ValueError(f"token_rewards[{i}] must be finite")
        if loss_masks is not None and (rewards[loss_masks[i] == 0] != 0).any():
            raise ValueError(f"token_rewards[{i}] is not 0 on a token loss_masks[{i}] marks 0")
        rows.append(rewards)
    return pad_sequence(rows, batch_first=True)

"""The checks of ``CriticFreeTrainer.step``'s inputs beyond PPO's (trainers/ppo_inputs.py): group
ids, the generator's logprobs and truncation flags. A ValueError names the list and the index."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from rlfleet.common.config import GROUPED_ALGORITHMS


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

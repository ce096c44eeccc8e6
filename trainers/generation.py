"""TRL v0.11.4's ``PPOTrainer.generate``: sample responses with Hugging Face ``generate``.

Sampling draws from torch's global RNG, as Hugging Face's ``generate`` does: seed it to repeat.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase


def generate(
    models: list[nn.Module],
    query_tensor: torch.Tensor | list[torch.Tensor],
    tokenizer: PreTrainedTokenizerBase | None,
    length_sampler: Callable[[], int] | None,
    batch_size: int,
    return_prompt: bool,
    generation_kwargs: dict[str, Any],
) -> list[torch.Tensor] | list[list[torch.Tensor]]:
    """Each model's generations for the same queries.

    A 1-D query gives a ``(1, length)`` tensor per model (one sampled length for all). A list
    gives a list of 1-D tensors per model, generated ``batch_size`` at a time with left padding,
    each cut after its first EOS (kept).
    """
    device = next(models[0].parameters()).device
    if isinstance(query_tensor, (list, tuple)):
        queries = [q.to(device) for q in query_tensor]
        return [
            generate_batched(
                model,
                queries,
                tokenizer,
                length_sampler,
                batch_size,
                return_prompt,
                generation_kwargs,
            )
            for model in models
        ]
    if query_tensor.dim() != 1:
        raise ValueError(
            "query_tensor must be a 1-D tensor or a list of 1-D tensors, got shape "
            f"{tuple(query_tensor.shape)}"
        )
    if length_sampler is not None:
        generation_kwargs["max_new_tokens"] = length_sampler()
    input_ids = query_tensor.to(device).unsqueeze(0)
    outputs = [model.generate(input_ids=input_ids, **generation_kwargs) for model in models]
    return outputs if return_prompt else [output[:, len(query_tensor) :] for output in outputs]


def generate_batched(
    model: nn.Module,
    queries: list[torch.Tensor],
    tokenizer: PreTrainedTokenizerBase | None,
    length_sampler: Callable[[], int] | None,
    batch_size: int,
    return_prompt: bool,
    generation_kwargs: dict[str, Any],
) -> list[torch.Tensor]:
    """Left-padded batches of ``queries``; ``length_sampler`` picks each batch's
    ``max_new_tokens``."""
    if tokenizer is None:
        raise ValueError("generate needs the tokenizer (pass tokenizer= to PPOTrainer)")
    eos_token_id = tokenizer.eos_token_id
    pad_token_id = eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    outputs = []
    for start in range(0, len(queries), batch_size):
        if length_sampler is not None:
            generation_kwargs["max_new_tokens"] = length_sampler()
        chunk = queries[start : start + batch_size]
        input_ids, attention_mask = left_padded(chunk, pad_token_id)
        generations = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, **generation_kwargs
        )
        width = input_ids.shape[1]
        for query, generation in zip(chunk, generations, strict=True):
            response = generation[width:]
            if eos_token_id is not None and (response == eos_token_id).any():
                first_eos = int(torch.nonzero(response == eos_token_id)[0, 0])
                response = response[: first_eos + 1]
            outputs.append(torch.cat([query, response]) if return_prompt else response)
    return outputs


def left_padded(
    queries: list[torch.Tensor], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)`` with each query right-aligned, padding before it."""
    width = max(len(q) for q in queries)
    device = queries[0].device
    input_ids = torch.full((len(queries), width), pad_token_id, device=device)
    attention_mask = torch.zeros_like(input_ids)
    for row, query in enumerate(queries):
        input_ids[row, width - len(query) :] = query
        attention_mask[row, width - len(query) :] = 1
    return input_ids, attention_mask

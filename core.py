"""``rlfleet.core``: the helpers TRL v0.11.4 scripts import from ``trl.core``.

``LengthSampler``, ``set_seed``, ``respond_to_batch`` and ``top_k_top_p_filtering`` behave as
TRL's (``LengthSampler`` draws from NumPy's global generator, so ``set_seed`` makes it
repeatable). TRL's other ``trl.core`` names were helpers of its own ``PPOTrainer.step``;
importing one raises an error that says where rlfleet has that math.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch import nn
from transformers import TopKLogitsWarper, TopPLogitsWarper

from rlfleet.trainers.trl_compat import WHERE_THE_MATH_IS

__all__ = ["LengthSampler", "respond_to_batch", "set_seed", "top_k_top_p_filtering"]

TRL_STEP_HELPERS = (
    "WANDB_PADDING",
    "PPODecorators",
    "add_suffix",
    "average_torch_dicts",
    "clip_by_value",
    "convert_to_scalar",
    "entropy_from_logits",
    "flatten_dict",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "pad_to_size",
    "randn_tensor",
    "stack_dicts",
    "stats_to_np",
    "whiten",
)


class LengthSampler:
    """Draws a length uniformly from ``[min_value, max_value)``."""

    def __init__(self, min_value: int, max_value: int) -> None:
        self.values = list(range(min_value, max_value))

    def __call__(self) -> int:
        return int(np.random.choice(self.values))


def set_seed(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (every device)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def top_k_top_p_filtering(
    logits: torch.Tensor,
    top_k: int = 0,
    top_p: float = 1.0,
    filter_value: float = -float("inf"),
    min_tokens_to_keep: int = 1,
) -> torch.Tensor:
    """Set ``[batch, vocab]`` logits outside the top-k (``top_k > 0``) and outside the nucleus
    of probability ``top_p`` to ``filter_value``, with transformers' logits warpers."""
    if top_k > 0:
        logits = TopKLogitsWarper(
            top_k=top_k, filter_value=filter_value, min_tokens_to_keep=min_tokens_to_keep
        )(None, logits)
    if 0 <= top_p <= 1.0:
        logits = TopPLogitsWarper(
            top_p=top_p, filter_value=filter_value, min_tokens_to_keep=min_tokens_to_keep
        )(None, logits)
    return logits


@torch.no_grad()
def respond_to_batch(
    model: nn.Module,
    queries: torch.Tensor,
    txt_len: int = 20,
    top_k: int = 0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """Sample ``txt_len`` tokens after each row of ``queries`` (``[batch, len]``, no padding)
    one at a time without a KV cache, as TRL did; returns the ``[batch, txt_len]`` samples.

    ``model(input_ids)[0]`` must be the logits: a transformers causal LM or a model with a value
    head. ``PPOTrainer.generate`` is the faster way (``model.generate`` with a cache).
    """
    input_ids = queries
    for _ in range(txt_len):
        next_token_logits = model(input_ids)[0][:, -1, :]
        next_token_logits = top_k_top_p_filtering(next_token_logits, top_k=top_k, top_p=top_p)
        probs = torch.softmax(next_token_logits, dim=-1)
        next_token = torch.multinomial(probs, num_samples=1)
        input_ids = torch.cat([input_ids, next_token], dim=-1)
    return input_ids[:, -txt_len:]


class TRLHelperNotProvided(ImportError):
    """A ``trl.core`` helper that only TRL's own ``PPOTrainer.step`` used. An ``ImportError``
    because ``from rlfleet.core import name`` would replace an ``AttributeError``'s message."""


def __getattr__(name: str):
    if name in TRL_STEP_HELPERS:
        raise TRLHelperNotProvided(
            f"rlfleet.core does not provide trl.core.{name}: it was a helper of TRL's own "
            "PPOTrainer.step. rlfleet's PPOTrainer.step does this internally; "
            f"{WHERE_THE_MATH_IS}.",
            name=name,
        )
    raise AttributeError(f"module 'rlfleet.core' has no attribute {name!r}")

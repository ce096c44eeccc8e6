"""Reference outputs for the generator tests: a plain transformers forward, special weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rlfleet.actors.engine import Completion

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14], list(range(20, 120))]
"""Prompts of very different lengths, so batched engines must pad correctly."""


def load_model(model_dir: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()


@torch.inference_mode()
def reference_greedy(
    model: torch.nn.Module, prompt_ids: list[list[int]], max_new_tokens: int
) -> list[Completion]:
    """Greedy decoding by a full forward of each sequence per step: no cache, no padding."""
    eos = model.config.eos_token_id
    completions = []
    for prompt in prompt_ids:
        ids, logprobs = list(prompt), []
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1]
            token = int(logits.argmax())
            ids.append(token)
            logprobs.append(float(torch.log_softmax(logits, -1)[token]))
            if token == eos:
                break
        finish = "stop" if ids[-1] == eos else "length"
        completions.append(Completion(ids[len(prompt) :], logprobs, finish))
    return completions


def assert_same_completions(
    actual: list[Completion], expected: list[Completion], atol: float = 1e-4
) -> None:
    assert [c.token_ids for c in actual] == [c.token_ids for c in expected]
    assert [c.finish_reason for c in actual] == [c.finish_reason for c in expected]
    for got, want in zip(actual, expected, strict=True):
        assert got.logprobs == pytest.approx(want.logprobs, abs=atol)


def always_eos_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights of ``model`` changed so that EOS wins every step by a wide margin.

    The final layer norm outputs a constant vector along EOS's (tied) embedding, so the EOS
    logit is 50 and every other logit is far smaller.
    """
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    eos_embedding = state["transformer.wte.weight"][model.config.eos_token_id]
    state["transformer.ln_f.weight"].zero_()
    state["transformer.ln_f.bias"].copy_(50 * eos_embedding / eos_embedding.dot(eos_embedding))
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state

"""Test-only probes into running actors, through Ray's ``actor.__ray_call__.remote(fn, *args)``
(``fn`` runs in the actor's process and gets the actor instance first).

The functions sent to the actors are defined inside the probes, so Ray pickles them by value:
actor processes cannot import this module (``tests/`` is not on their path).
"""

from __future__ import annotations

from typing import Any

import ray
import torch

from rlfleet.actors.engine import Completion, SamplingSpec


def learner_greedy(
    learner: ray.actor.ActorHandle, prompt_ids: list[list[int]], max_new_tokens: int
) -> list[dict[str, list]]:
    """Greedy continuations (``token_ids``) and their per-token ``logprobs`` under the learner's
    current policy: argmax decoding with full-sequence forwards, slow but exact."""

    @torch.no_grad()
    def decode(actor: Any, prompt_ids: list[list[int]], max_new_tokens: int) -> list[dict]:
        model = actor.policy
        device = next(model.parameters()).device
        was_training = model.training
        model.eval()
        decoded = []
        for prompt in prompt_ids:
            ids = torch.tensor([prompt], dtype=torch.long, device=device)
            tokens, logprobs = [], []
            for _ in range(max_new_tokens):
                logits = model(input_ids=ids).logits[0, -1].float()
                token = int(torch.argmax(logits))
                tokens.append(token)
                logprobs.append(float(torch.log_softmax(logits, dim=-1)[token]))
                if token == model.config.eos_token_id:
                    break
                ids = torch.cat([ids, torch.tensor([[token]], device=device)], dim=1)
            decoded.append({"token_ids": tokens, "logprobs": logprobs})
        model.train(was_training)
        return decoded

    return ray.get(learner.__ray_call__.remote(decode, prompt_ids, max_new_tokens))


def learner_version(learner: ray.actor.ActorHandle) -> int:
    """The policy version the learner holds (steps taken, or restored from a checkpoint)."""

    def version(actor: Any) -> int:
        return actor.version

    return ray.get(learner.__ray_call__.remote(version))


def generator_greedy(
    generator: ray.actor.ActorHandle, prompt_ids: list[list[int]], max_new_tokens: int
) -> list[Completion]:
    """The generator engine's greedy completions with the weights it holds now."""

    def greedy(actor: Any, prompt_ids: list[list[int]], max_new_tokens: int) -> list[Completion]:
        return actor._engine.generate(prompt_ids, SamplingSpec.greedy(max_new_tokens))

    return ray.get(generator.__ray_call__.remote(greedy, prompt_ids, max_new_tokens))


def generator_version(generator: ray.actor.ActorHandle) -> int:
    """The policy version the generator samples with."""

    def version(actor: Any) -> int:
        return actor._version

    return ray.get(generator.__ray_call__.remote(version))

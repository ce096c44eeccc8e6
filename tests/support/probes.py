"""Test-only probes into running actors, through Ray's ``actor.__ray_call__.remote(fn, *args)``
(``fn`` runs in the actor's process and gets the actor instance first).

The functions sent to the actors are defined inside the probes, so Ray pickles them by value:
actor processes cannot import this module (``tests/`` is not on their path).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import ray
import torch

from rlfleet.actors.engine import Completion, SamplingSpec

if TYPE_CHECKING:
    from rlfleet.job.loop import TrainingJob

Decoder = Callable[[Any, list[list[int]], int], list[dict[str, list]]]


def greedy_decoder() -> Decoder:
    """``decode(model, prompt_ids, max_new_tokens)``: greedy continuations (``token_ids``) and
    their per-token ``logprobs`` under ``model``, argmax decoding with full-sequence forwards on
    the model's device, slow but exact. A new function each call, so that the probes' functions
    that use it take it along by value."""

    @torch.no_grad()
    def decode(model: Any, prompt_ids: list[list[int]], max_new_tokens: int) -> list[dict]:
        device = next(model.parameters()).device
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
        return decoded

    return decode


def learner_greedy(
    learner: ray.actor.ActorHandle, prompt_ids: list[list[int]], max_new_tokens: int
) -> list[dict[str, list]]:
    """Greedy continuations (``token_ids``) and their per-token ``logprobs`` under the learner's
    current policy (``greedy_decoder``)."""
    greedy = greedy_decoder()

    def decode(actor: Any, prompt_ids: list[list[int]], max_new_tokens: int) -> list[dict]:
        model = actor.policy
        was_training = model.training
        model.eval()
        decoded = greedy(model, prompt_ids, max_new_tokens)
        model.train(was_training)
        return decoded

    return ray.get(learner.__ray_call__.remote(decode, prompt_ids, max_new_tokens))


def rank_greedy(rank: Any, prompt_ids: list[list[int]], max_new_tokens: int, dtype: str) -> Any:
    """A ref to greedy continuations and their logprobs under a learner rank's policy as it
    publishes it (full weights gathered from every rank: each must run this at once; merged for
    LoRA) in a plain model of ``dtype`` on the CPU, decoded on rank 0 (``greedy_decoder``; the
    other ranks answer None)."""
    greedy = greedy_decoder()

    def decode(actor: Any, prompt_ids: list[list[int]], max_new_tokens: int, dtype: str) -> Any:
        from transformers import AutoModelForCausalLM

        state = {name: tensor.detach().cpu().clone() for name, tensor in actor.published_state()}
        if actor.rank != 0:
            return None
        model = AutoModelForCausalLM.from_config(actor.policy.config)
        model.load_state_dict(state)
        model.to(getattr(torch, dtype)).eval()
        return greedy(model, prompt_ids, max_new_tokens)

    return rank.__ray_call__.remote(decode, prompt_ids, max_new_tokens, dtype)


def job_learner_greedy(
    job: TrainingJob, prompt_ids: list[list[int]], max_new_tokens: int
) -> list[dict]:
    """Greedy continuations (``token_ids``) and their ``logprobs`` under the job's learner
    policy, in the generators' dtype: what each generator must answer after a sync."""
    dtype = job.config.generator_dtype
    refs = [rank_greedy(rank, prompt_ids, max_new_tokens, dtype) for rank in job.learner.ranks]
    return ray.get(refs, timeout=300)[0]


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

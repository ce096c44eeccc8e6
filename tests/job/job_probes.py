"""Probes into a running job's learner ranks, through Ray's ``actor.__ray_call__``: the
functions sent to the ranks are defined inside the probes, so Ray pickles them by value (actor
processes cannot import this module)."""

from __future__ import annotations

from typing import Any

import ray

from rlfleet.job.loop import TrainingJob


def rank_greedy(rank: Any, prompt_ids: list[list[int]], max_new_tokens: int, dtype: str) -> Any:
    """A ref to greedy continuations and their logprobs under a learner rank's policy as it
    publishes it (full weights gathered from every rank: each must run this at once; merged for
    LoRA) in a plain model of
    ``dtype``, decoded on rank 0 with full-sequence forwards (the other ranks answer None)."""

    def decode(actor: Any, prompt_ids: list[list[int]], max_new_tokens: int, dtype: str) -> Any:
        import torch
        from transformers import AutoModelForCausalLM

        state = {name: tensor.detach().cpu().clone() for name, tensor in actor.published_state()}
        if actor.rank != 0:
            return None
        model = AutoModelForCausalLM.from_config(actor.policy.config)
        model.load_state_dict(state)
        model.to(getattr(torch, dtype)).eval()
        decoded = []
        with torch.no_grad():
            for prompt in prompt_ids:
                ids = torch.tensor([prompt], dtype=torch.long)
                tokens, logprobs = [], []
                for _ in range(max_new_tokens):
                    logits = model(input_ids=ids).logits[0, -1].float()
                    token = int(torch.argmax(logits))
                    tokens.append(token)
                    logprobs.append(float(torch.log_softmax(logits, dim=-1)[token]))
                    if token == model.config.eos_token_id:
                        break
                    ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
                decoded.append({"token_ids": tokens, "logprobs": logprobs})
        return decoded

    return rank.__ray_call__.remote(decode, prompt_ids, max_new_tokens, dtype)


def learner_greedy(
    job: TrainingJob, prompt_ids: list[list[int]], max_new_tokens: int
) -> list[dict]:
    """Greedy continuations (``token_ids``) and their ``logprobs`` under the job's learner
    policy, in the generators' dtype: what each generator must answer after a sync."""
    dtype = job.config.generator_dtype
    refs = [rank_greedy(rank, prompt_ids, max_new_tokens, dtype) for rank in job.learner.ranks]
    return ray.get(refs, timeout=300)[0]

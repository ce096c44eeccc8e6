"""rlfleet: RL fine-tuning of language models as a distributed actor/learner service on Ray.

The classic in-process API, as TRL v0.11 users import it::

    from rlfleet import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

and the critic-free family (GRPO, RLOO, REINFORCE++) as ``CriticFreeTrainer`` with its
``CriticFreeConfig``.
The rest lives in ``rlfleet.common`` (configs, rollout schema, metrics server, storage, weight
transports), ``rlfleet.actors`` (generators), ``rlfleet.reward`` (reward functions and actors) and
``rlfleet.learner`` (model, algorithms, trainer, learner actor, job driver). Names are imported
on first use, so ``import rlfleet.common.config`` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AutoModelForCausalLMWithValueHead": "rlfleet.trainers.value_head",
    "CriticFreeConfig": "rlfleet.common.trainer_configs",
    "CriticFreeTrainer": "rlfleet.trainers.critic_free",
    "PPOConfig": "rlfleet.common.trainer_configs",
    "PPOTrainer": "rlfleet.trainers.ppo",
    "create_reference_model": "rlfleet.trainers.ppo",
    "set_seed": "rlfleet.core",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rlfleet' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])

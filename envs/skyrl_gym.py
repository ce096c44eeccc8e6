"""``skyrl_gym`` text environments (``BaseTextEnv`` subclasses) as rlfleet environments.

A job names the user's class as it is (``env.environment: "mymodule:MyTextEnv"``);
envs/loading.py sees that it subclasses ``skyrl_gym.envs.base_text_env.BaseTextEnv`` and makes
each trajectory's environment a ``SkyRLGymEnvironment`` around it. Each mapping is what SkyRL's
own generator (skyrl-train's ``SkyRLGymGenerator`` agent loop, fed by its ``PromptDataset``)
does:

- **construction**, in ``reset``: SkyRL builds one env per trajectory with
  ``skyrl_gym.make(env_class, env_config=..., extras=...)``, i.e. ``MyTextEnv(env_config=,
  extras=)``. ``env_config`` is the env's section of SkyRL's config, an omegaconf ``DictConfig``
  (envs read it as ``env_config.db_path`` or ``env_config.get(...)``): here ``env.kwargs`` as a
  ``DictConfig``. ``extras`` is the dataset row less its prompt and its ``env_class`` column
  (``reward_spec``, ``extra_info``, ... as the row carries them), plus ``max_turns``, which the
  generator always sets to its own turn limit: here ``env.max_turns``. The extras are built
  from the row, so the env cannot be built before ``reset`` (nor checked before Ray starts).
- **the prompt**, ``init(prompt) -> (prompt, metadata)``: SkyRL passes a copy of the row's
  conversation and samples from what ``init`` returns; here the row's conversation is
  ``messages`` (``dataset.messages_field``, system prompt included, as rlfleet renders it) and
  ``reset`` returns ``init``'s messages. ``init``'s metadata is dropped, as SkyRL drops it.
- **a step**, ``step(action) -> BaseTextEnvStepOutput``: ``observations`` (chat messages,
  ``[]`` for none) become the ``Step``'s observation messages, appended through the chat
  template with loss mask 0; ``reward`` is the turn's reward (SkyRL puts it on the turn's last
  token too); ``done`` ends the trajectory; ``metadata``, and on the last step
  ``get_metrics()`` (the per-episode metrics SkyRL reads once the env is done), become
  ``info``, keeping only JSON values (``info`` travels as JSON with the trajectory).
- **close** is forwarded (SkyRL closes each env when its trajectory ends).

Tool groups (``init_tool_groups``, ``_execute_tool``) stay inside the env, which parses the
action and runs them in its own ``step``: they need nothing here (nor ``env.tools``).

What has no counterpart: the trajectory's ``seed`` (a SkyRL env draws nothing from the
generator; an env that needs randomness takes it from ``extras``), ``postprocessed_action``
(SkyRL re-tokenizes the rewritten text; rlfleet trains the tokens the model sampled, so it is
ignored, with a warning), and ``aggregate_metrics`` (the per-trajectory metrics stay in the
trajectory's ``env_info``).

Nothing here imports ``skyrl_gym``: a class can only subclass ``BaseTextEnv`` once the user's
module has imported it, so ``is_text_env`` looks in ``sys.modules`` and rlfleet runs without
``skyrl_gym`` installed.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
from collections.abc import Mapping
from typing import Any

from rlfleet.envs.protocol import Message, Step

logger = logging.getLogger(__name__)

BASE_TEXT_ENV_MODULE = "skyrl_gym.envs.base_text_env"
NOT_EXTRAS = ("prompt", "messages", "env_class")
"""Row fields SkyRL does not pass as ``extras``: the prompt (rlfleet's rendered text and its
conversation) and the ``env_class`` column, which SkyRL's dataset pops."""
COUNTER_KEYS = {"tool_calls": dict, "tool_errors": dict, "malformed_tool_calls": int}
"""``info`` keys the rollout loop sums as tool counters, and the type each must have."""


def text_env_base() -> type | None:
    """``skyrl_gym``'s ``BaseTextEnv``, when some module has imported it (None otherwise)."""
    module = sys.modules.get(BASE_TEXT_ENV_MODULE)
    return getattr(module, "BaseTextEnv", None)


def is_text_env(cls: type) -> bool:
    """Whether ``cls`` is a ``skyrl_gym`` text environment."""
    base = text_env_base()
    return base is not None and issubclass(cls, base)


def overrides_step(cls: type) -> bool:
    """Whether ``cls`` has its own ``step`` (``BaseTextEnv.step`` does nothing, returns None)."""
    base = text_env_base()
    return base is None or cls.step is not base.step


class SkyRLGymEnvironment:
    """One trajectory's ``env_class`` environment behind rlfleet's ``reset`` and ``step``."""

    def __init__(self, env_class: type, env_config: dict[str, Any], max_turns: int) -> None:
        from omegaconf import OmegaConf  # skyrl_gym's own dependency

        self.env_class = env_class
        self.env_config = OmegaConf.create(dict(env_config))
        self.max_turns = max_turns
        self.env: Any = None

    def reset(self, row: dict[str, Any], seed: int) -> list[Message]:
        messages = row.get("messages")
        if not isinstance(messages, list):
            raise ValueError(
                "a skyrl_gym environment starts from the row's conversation; set "
                "dataset.messages_field to the rows' prompt messages"
            )
        self.close()
        extras = {k: copy.deepcopy(v) for k, v in row.items() if k not in NOT_EXTRAS}
        extras["max_turns"] = self.max_turns
        self.env = self.env_class(env_config=self.env_config, extras=extras)
        prompt, _metadata = self.env.init(copy.deepcopy(messages))
        if not isinstance(prompt, list):
            raise TypeError(
                f"{self.env_class.__name__}.init returned {type(prompt).__name__} as the prompt, "
                "not a list of chat messages"
            )
        return prompt

    def step(self, action: str) -> Step:
        if self.env is None:
            raise RuntimeError("step() before reset()")
        output = self.env.step(action)
        if not isinstance(output, Mapping):
            raise TypeError(
                f"{self.env_class.__name__}.step returned {type(output).__name__}, not a "
                "BaseTextEnvStepOutput"
            )
        if output.get("postprocessed_action") is not None:
            _warn_postprocessed(self.env_class)
        done = bool(output["done"])
        info = dict(output.get("metadata") or {})
        if done:
            info.update(self.env.get_metrics() or {})
        return Step(
            observation=list(output.get("observations") or []) or None,
            reward=float(output["reward"]),
            done=done,
            info=json_values(info),
        )

    def close(self) -> None:
        env, self.env = self.env, None
        if env is not None:
            env.close()


def json_values(values: Mapping[Any, Any]) -> dict[str, Any]:
    """``values`` less those JSON cannot hold, and less tool counters not in the shape the
    rollout loop sums (a ``{tool: count}`` dict, a count)."""
    kept = {}
    for key, value in values.items():
        expected = COUNTER_KEYS.get(key)
        if expected is not None and not isinstance(value, expected):
            continue
        try:
            json.dumps(value)
        except (TypeError, ValueError):
            continue
        kept[str(key)] = value
    return kept


_WARNED: set[type] = set()


def _warn_postprocessed(env_class: type) -> None:
    if env_class not in _WARNED:
        _WARNED.add(env_class)
        logger.warning(
            "%s returns postprocessed_action, which rlfleet ignores: it trains the tokens the "
            "model sampled",
            env_class.__name__,
        )

"""The ``env:`` section of a job config: multi-turn trajectories against an environment or a
class of tools (envs/protocol.py), run in environment actors."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, PositiveFloat, PositiveInt, model_validator

from rlfleet.common.trainer_configs import STRICT_MODEL_CONFIG


class EnvConfig(BaseModel):
    model_config = STRICT_MODEL_CONFIG

    environment: str | None = None
    """An environment class as ``"module:Class"``: ``reset(row, seed)`` and ``step(action)``."""
    tools: str | None = None
    """A class whose public, type-hinted, documented methods are the tools, as
    ``"module:Class"``; or ``"rlfleet.envs.python_tool:PythonTool"`` for the sandboxed
    ``python`` tool (its kwargs: ``sandbox: none`` opts out of the sandbox, explicitly)."""
    agent: str | None = None
    """An agent workflow as ``"module:run"``: ``async def run(client, row, **kwargs)`` with an
    ``openai.AsyncOpenAI`` client of the policy's endpoint, returning the reward
    (envs/agents.py)."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments of the class, for every instance (one per trajectory); of an agent
    function, for every call."""
    tool_parser: str = "hermes"
    """How tool calls are read from the model's text (envs/parsers.py's registry)."""
    num_actors: PositiveInt = 1
    """Environment actors; each holds the environments of many trajectories."""
    num_cpus: float = Field(default=0.5, ge=0)
    """CPUs Ray reserves per environment actor."""
    max_turns: PositiveInt = 4
    """The most model turns of one trajectory."""
    max_total_tokens: PositiveInt = 256
    """The most tokens after the prompt (sampled and observation tokens together); a
    trajectory that reaches it ends with ``finish_reason`` ``"length"``."""
    max_tokens_per_turn: PositiveInt | None = None
    """Each turn's sampling budget (None: ``generators.max_new_tokens``)."""
    step_timeout_s: PositiveFloat = 30.0
    """The deadline of one ``reset`` or ``step``: a trajectory past it ends (``finish_reason``
    ``"env_timeout"``, counted) and never holds up the others."""
    trajectory_timeout_s: PositiveFloat = 300.0
    """The deadline of one agent's whole run (``agent``): past it the trajectory is dropped
    (``finish_reason`` ``"agent_timeout"``, counted)."""
    on_error: Literal["end_trajectory", "fail"] = "end_trajectory"
    """An environment that raises: end that trajectory (``finish_reason`` ``"env_error"``,
    counted, named in the log) or stop the job with one line naming the env, the trajectory
    and the turn."""

    @model_validator(mode="after")
    def _exactly_one_source(self) -> EnvConfig:
        given = [name for name in ("environment", "tools", "agent") if getattr(self, name)]
        if len(given) != 1:
            raise ValueError(
                f"env needs exactly one of environment, tools or agent; got {given or 'none'}"
            )
        if self.max_tokens_per_turn and self.max_tokens_per_turn > self.max_total_tokens:
            raise ValueError(
                f"env.max_tokens_per_turn ({self.max_tokens_per_turn}) exceeds "
                f"env.max_total_tokens ({self.max_total_tokens}); lower it"
            )
        return self

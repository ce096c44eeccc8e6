"""The engine interface every generator backend implements (vLLM, plain transformers).

Both engines return, per prompt, the sampled token ids, each sampled token's log-probability
under the *raw* model distribution (log-softmax of the logits before temperature, top-k and
top-p; vLLM's default ``logprobs_mode="raw_logprobs"``), and why generation stopped. Raw
logprobs are what the learner recomputes for the PPO ratio, so the two are comparable.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from typing import ClassVar, Literal, Protocol

import pyarrow as pa
import torch

from rlfleet.common.config import Dtype, GeneratorConfig

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Completion:
    token_ids: list[int]
    """The sampled tokens; when EOS ended generation it is the last one."""
    logprobs: list[float]
    """Raw-model log-probability of each sampled token (one per token id)."""
    finish_reason: str
    """``"stop"`` when EOS ended generation, ``"length"`` when ``max_new_tokens`` did."""


@dataclass(frozen=True)
class SamplingSpec:
    max_new_tokens: int
    temperature: float = 1.0
    """0 means greedy decoding."""
    top_p: float = 1.0
    top_k: int = 0
    """0 disables top-k filtering."""
    seeds: tuple[int, ...] | None = None
    """None: draw from the engine's own random stream (seeded once when it was made); else one
    seed per prompt of the call, so a prompt's sample does not depend on how it was batched."""
    stop_token_ids: tuple[int, ...] = ()
    """Ids that end generation besides the model's own EOS ids, kept as the last token (finish
    reason ``"stop"``): ``rlfleet.common.chat.stop_token_ids``, a chat model's end of turn."""

    @classmethod
    def from_config(
        cls,
        config: GeneratorConfig,
        seeds: Sequence[int] | None = None,
        stop_token_ids: Sequence[int] = (),
    ) -> SamplingSpec:
        return cls(
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
            seeds=None if seeds is None else tuple(seeds),
            stop_token_ids=tuple(stop_token_ids),
        )

    @classmethod
    def greedy(cls, max_new_tokens: int) -> SamplingSpec:
        return cls(max_new_tokens=max_new_tokens, temperature=0.0)

    def overridden_by(self, batch: pa.RecordBatch) -> SamplingSpec:
        """This spec with the temperature and budget ``batch`` asks for, if it asks (see
        ``SamplingOverride``)."""
        override = SamplingOverride.of(batch)
        return self if override is None else replace(self, **asdict(override))


@dataclass(frozen=True)
class SamplingOverride:
    """Sampling settings a prompt batch carries for its generator, in place of the generator's
    own (``GeneratorConfig``): held-out evaluation samples with its own temperature and token
    budget on the same generators. They travel in the batch's Arrow schema metadata, so the
    batch keeps the rollout schema and any shard of it (``pool.split_batch``) carries them."""

    temperature: float
    max_new_tokens: int

    METADATA_KEY: ClassVar[bytes] = b"rlfleet.sampling"

    def attach(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """``batch`` asking its generator to sample with these settings."""
        metadata = {**(batch.schema.metadata or {}), self.METADATA_KEY: json.dumps(asdict(self))}
        return batch.replace_schema_metadata(metadata)

    @classmethod
    def of(cls, batch: pa.RecordBatch) -> SamplingOverride | None:
        """The settings ``batch`` carries; None: the generator's own."""
        raw = (batch.schema.metadata or {}).get(cls.METADATA_KEY)
        return None if raw is None else cls(**json.loads(raw))


class Engine(Protocol):
    context: int
    """The most tokens (prompt and completion) one sequence may hold."""

    def generate(self, prompt_ids: list[list[int]], params: SamplingSpec) -> list[Completion]: ...

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load these tensors into the model in place (HF parameter names: all of the learner's
        weights, or one bucket of them), cast to the engine's dtype."""

    def sleep(self) -> None:
        """Free the accelerator memory the engine holds (weights and KV cache) while another
        role uses the device (a colocated learner trains); ``wake_up`` takes it back. No
        ``generate`` or ``load_weights`` in between."""

    def wake_up(self) -> None:
        """Take back what ``sleep`` freed: the weights held before it, an empty KV cache."""


def engine_dtype(dtype: Dtype | None) -> torch.dtype:
    """The torch dtype an engine computes in, given ``GeneratorConfig.dtype``; None (a config
    no job resolved against its learner) is float32."""
    return getattr(torch, dtype or "float32")


def cast_floating(
    named_tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors with every floating-point one cast to ``dtype`` (others as they are)."""
    for name, tensor in named_tensors:
        yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor


def check_prompts(prompt_ids: Sequence[Sequence[int]], params: SamplingSpec, context: int) -> None:
    """Reject empty prompts, prompts too long for ``max_new_tokens`` more tokens, and a seed
    list that does not match the prompts."""
    max_new_tokens = params.max_new_tokens
    if params.seeds is not None and len(params.seeds) != len(prompt_ids):
        raise ValueError(f"{len(params.seeds)} seeds for {len(prompt_ids)} prompts")
    for index, ids in enumerate(prompt_ids):
        if not ids:
            raise ValueError(f"prompt {index} is empty")
        if len(ids) + max_new_tokens > context:
            raise ValueError(
                f"prompt {index} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} "
                f"it exceeds the model's context of {context} tokens"
            )


class RequestEngine(Protocol):
    """Request-level generation, for the multi-turn loop (actors/rollout.py): a request joins
    the running batch as soon as it is submitted and leaves it when done, so a trajectory's next
    turn does not wait for the others' turns."""

    def submit(self, key: str, prompt_ids: list[int], params: SamplingSpec) -> None:
        """Start sampling one completion of ``prompt_ids`` (``params.seeds``: one seed or
        None)."""

    def poll(self) -> list[tuple[str, Completion]]:
        """Advance the running requests (one engine step, or more) and return those that
        finished, by key."""

    def busy(self) -> bool:
        """Whether any submitted request is unfinished."""


class QueuedRequests:
    """``RequestEngine`` over an engine that only generates whole batches (the plain
    transformers engine): ``poll`` generates every request queued so far, one ``generate`` per
    group of requests with the same settings."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._queue: list[tuple[str, list[int], SamplingSpec]] = []

    def submit(self, key: str, prompt_ids: list[int], params: SamplingSpec) -> None:
        self._queue.append((key, prompt_ids, params))

    def poll(self) -> list[tuple[str, Completion]]:
        queued, self._queue = self._queue, []
        groups: dict[SamplingSpec, list[tuple[str, list[int], int | None]]] = {}
        for key, ids, params in queued:
            seed = params.seeds[0] if params.seeds else None
            groups.setdefault(replace(params, seeds=None), []).append((key, ids, seed))
        finished = []
        for params, requests in groups.items():
            seeds = [seed for _, _, seed in requests]
            spec = params if None in seeds else replace(params, seeds=tuple(seeds))
            completions = self._engine.generate([ids for _, ids, _ in requests], spec)
            finished += [(key, c) for (key, _, _), c in zip(requests, completions, strict=True)]
        return finished

    def busy(self) -> bool:
        return bool(self._queue)

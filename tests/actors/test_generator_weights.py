"""A generator loads each bucket its transport's receiver yields, then holds the handle's version
(in process, plain transformers engine)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch
from generator_reference import PROMPTS, assert_same_completions, load_model
from generator_reference import reference_greedy as reference

from rlfleet.actors.engine import Completion
from rlfleet.actors.generator import GeneratorActor
from rlfleet.common.config import GeneratorConfig, MetricsConfig
from rlfleet.common.schema import prompt_batch
from rlfleet.common.transport import TRANSPORTS, Transport, WeightLoadError


@dataclass(frozen=True)
class InlineHandle:
    version: int
    nbytes: int
    named_tensors: tuple[tuple[str, torch.Tensor], ...]


class InlinePublisher:
    def publish(self, state_dict, version: int) -> InlineHandle:
        return InlineHandle(version, 0, tuple(state_dict.items()))


class TwoBucketReceiver:
    """Yields the weights in two buckets, as a collective transport sends them."""

    version: int | None = None

    def receive(self, handle: InlineHandle) -> Iterator[list[tuple[str, torch.Tensor]]]:
        half = len(handle.named_tensors) // 2
        yield list(handle.named_tensors[:half])
        yield list(handle.named_tensors[half:])
        self.version = handle.version


def test_generator_loads_every_bucket_and_samples_with_the_new_version(
    monkeypatch, tiny_model_dir, other_model_dir
):
    monkeypatch.setitem(
        TRANSPORTS, "two_buckets", Transport(InlinePublisher, TwoBucketReceiver, concurrent=False)
    )
    config = GeneratorConfig(engine="hf", max_new_tokens=6, temperature=0.0)
    generator = GeneratorActor(
        0,
        str(tiny_model_dir),
        config,
        0,
        metrics=MetricsConfig(enabled=False),
        weight_transport="two_buckets",
    )
    other = load_model(other_model_dir)
    handle = InlinePublisher().publish(other.state_dict(), version=4)

    assert generator.load_weights(handle) == 4

    out = generator.generate(prompt_batch(list(range(len(PROMPTS))), ["p"] * len(PROMPTS), PROMPTS))
    completions = [
        Completion(ids, logprobs, finish)
        for ids, logprobs, finish in zip(
            out.column("response_ids").to_pylist(),
            out.column("response_logprobs").to_pylist(),
            out.column("finish_reason").to_pylist(),
            strict=True,
        )
    ]
    assert_same_completions(completions, reference(other, PROMPTS, 6))
    assert out.column("policy_version").to_pylist() == [4] * len(PROMPTS)


def test_an_engine_error_while_loading_is_a_weight_load_error_naming_the_generator(
    monkeypatch, tiny_model_dir
):
    monkeypatch.setitem(
        TRANSPORTS, "two_buckets", Transport(InlinePublisher, TwoBucketReceiver, concurrent=False)
    )
    generator = GeneratorActor(
        3,
        str(tiny_model_dir),
        GeneratorConfig(engine="hf"),
        0,
        metrics=MetricsConfig(enabled=False),
        weight_transport="two_buckets",
    )
    handle = InlinePublisher().publish({"h.99.weight": torch.zeros(2)}, version=1)
    with pytest.raises(
        WeightLoadError,
        match=r"generator 3: its hf engine could not load the published weights: KeyError",
    ):
        generator.load_weights(handle)
    assert generator._version == 0

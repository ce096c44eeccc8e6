"""What every engine shares: its dtype and the cast of loaded weights to it."""

from __future__ import annotations

import torch

from rlfleet.actors.engine import cast_floating, engine_dtype


def test_engine_dtype_is_the_generators_and_float32_when_unresolved() -> None:
    assert engine_dtype("bfloat16") is torch.bfloat16
    assert engine_dtype("float32") is torch.float32
    assert engine_dtype(None) is torch.float32


def test_floating_weights_are_cast_and_integer_buffers_kept() -> None:
    weights = [("w", torch.ones(2, dtype=torch.float32)), ("ids", torch.arange(3))]
    cast = dict(cast_floating(weights, torch.bfloat16))
    assert cast["w"].dtype is torch.bfloat16 and cast["w"].tolist() == [1.0, 1.0]
    assert cast["ids"].dtype is torch.int64

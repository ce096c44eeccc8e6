"""A minimal learner actor for the weight sync tests: a tiny causal LM, a publisher of the
job's transport, and the LearnerActor's weight methods (``publish_weights``,
``join_weight_group``); ``step`` moves the weights as a training step would.

Ray pickles this module's classes by value (``register_pickle_by_value``): actor processes
cannot import it (``tests/`` is not on their path).
"""

from __future__ import annotations

import sys
from typing import Any

import ray
import ray.cloudpickle
import torch

from rlfleet.common.config import WeightSyncConfig
from rlfleet.common.transport import GroupSpec, WeightsHandle, make_publisher

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@ray.remote(num_cpus=0)
class WeightLearner:
    def __init__(
        self,
        model_dir: str,
        weight_sync: WeightSyncConfig,
        dtype: str = "float32",
        sender: bool = True,
    ):
        """``sender`` False: a learner rank other than 0 (it sends nothing)."""
        from transformers import AutoModelForCausalLM

        self.policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
        self.version = 0
        self.taken = 0
        self._publisher = make_publisher(weight_sync, dtype=dtype, sender=sender)

    def ready(self) -> int:
        return self.version

    @torch.no_grad()
    def step(self, scale: float = 0.3) -> int:
        """Moves every weight by seeded noise of ``scale`` (enough to change greedy outputs)."""
        generator = torch.Generator().manual_seed(self.version)
        for param in self.policy.parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            param.add_(noise.to(param.dtype), alpha=scale * float(param.float().std()))
        self.version += 1
        return self.version

    def publish_weights(self) -> WeightsHandle | None:
        return self._publisher.publish(self._counted(self.policy.state_dict()), self.version)

    def tensors_taken(self) -> int:
        """How many tensors publications took from this rank (each gathers them all)."""
        return self.taken

    def _counted(self, state_dict: dict[str, torch.Tensor]):
        for item in state_dict.items():
            self.taken += 1
            yield item

    def join_weight_group(self, spec: GroupSpec) -> None:
        self._publisher.join(spec)


def arm_generator_death(generator: Any, after_buckets: int) -> None:
    """Generator ``generator``'s process exits once it has received ``after_buckets`` buckets
    of its next sync (a crash in the middle of a broadcast)."""

    def arm(actor: Any, after_buckets: int) -> None:
        import os

        receive = actor._receiver.receive

        def dying_receive(handle):
            for count, bucket in enumerate(receive(handle)):
                if count == after_buckets:
                    os._exit(1)
                yield bucket

        actor._receiver.receive = dying_receive

    ray.get(generator.__ray_call__.remote(arm, after_buckets))


def arm_generator_stall(generator: Any, after_buckets: int, seconds: float) -> None:
    """Generator ``generator`` stops for ``seconds`` once it has received ``after_buckets``
    buckets of its next sync (a hang in the middle of a broadcast)."""

    def arm(actor: Any, after_buckets: int, seconds: float) -> None:
        import time

        receive = actor._receiver.receive

        def stalling_receive(handle):
            for count, bucket in enumerate(receive(handle)):
                if count == after_buckets:
                    time.sleep(seconds)
                yield bucket

        actor._receiver.receive = stalling_receive

    ray.get(generator.__ray_call__.remote(arm, after_buckets, seconds))


def keep_generator_busy(generator: Any, seconds: float) -> None:
    """Keeps the generator busy for ``seconds`` from now (its next calls wait behind)."""

    def busy(actor: Any, seconds: float) -> None:
        import time

        time.sleep(seconds)

    generator.__ray_call__.remote(busy, seconds)


def break_generator_engine(generator: Any) -> None:
    """The generator's engine raises on its next weight load."""

    def arm(actor: Any) -> None:
        def load_weights(named_tensors):
            next(iter(named_tensors))
            raise KeyError("the model has no parameters named ['h.99.weight']")

        actor._engine.load_weights = load_weights

    ray.get(generator.__ray_call__.remote(arm))

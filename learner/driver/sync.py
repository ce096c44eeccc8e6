"""Weight sync from the driver's side: when the generators need the learner's new policy, and
getting it to every one of them (a restarted generator included).

The learner publishes each version once (``publish_weights`` returns a handle with its
``version``); every generator loads that handle and answers the version it now holds. How the
weights travel is the transport's business (common/transport/).
"""

from __future__ import annotations

from typing import Any

import ray

from rlfleet.common.transport import WeightsHandle
from rlfleet.learner.driver.pool import ActorPool


def needs_sync(
    iteration: int, generators_version: int, max_policy_lag: int, one_step_off: bool
) -> bool:
    """Whether rollouts sampled next with ``generators_version`` would lag more than
    ``max_policy_lag`` versions behind the learner that trains on them: the learner is at
    version ``iteration`` (one more in one-step-off mode, where they are trained on after the
    next step)."""
    trained_at = iteration + int(one_step_off)
    return trained_at - generators_version > max_policy_lag


class WeightSync:
    """The learner's latest published weights, and the generators that must hold them."""

    def __init__(self, learner: Any) -> None:
        self.learner = learner
        self.handle: WeightsHandle | None = None

    @property
    def version(self) -> int:
        """The policy version every generator holds (0: the model directory's weights)."""
        return 0 if self.handle is None else self.handle.version

    def publish(self, generators: ActorPool) -> None:
        """Publishes the learner's policy once and waits until every generator holds it (a
        generator that died meanwhile gets it from ``load_into_restarted``)."""
        self.handle = ray.get(self.learner.publish_weights.remote())
        for index, version in enumerate(generators.call_all("load_weights", self.handle)):
            if version is not None:
                self._check_version(index, version)

    def load_into_restarted(self, index: int, generator: Any) -> None:
        """A restarted generator starts from the model directory: give it the current policy."""
        if self.handle is not None:
            self._check_version(index, ray.get(generator.load_weights.remote(self.handle)))

    def _check_version(self, index: int, version: int) -> None:
        if version != self.version:
            raise RuntimeError(
                f"generator {index} holds policy version {version}, expected {self.version}"
            )

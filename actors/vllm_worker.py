"""What runs inside every vLLM worker: rlfleet's ``worker_extension_cls``.

vLLM mixes ``WeightReceiverExtension`` into its worker class (``LLM(...,
worker_extension_cls=EXTENSION)``), and the engine calls its methods by name on every worker
through ``collective_rpc("rlfleet_...", args=...)`` (OpenRLHF's ``vllm_worker_wrap.py`` and veRL
do the same). Every name starts with ``rlfleet_``: vLLM refuses an extension whose names clash
with the worker's.

Two ways weights arrive:

- ``rlfleet_load_weights``: the engine's process hands the tensors over (the object store,
  and the collective into an engine of one worker, which runs in the generator's process).
- ``rlfleet_join_weight_group`` / ``rlfleet_receive_weights``: each worker of a tensor-parallel
  engine (separate processes) is a rank of the weight group of its own and receives every
  bucket itself; each loads the full HF tensors and its model's loaders take its shard.

Either way the tensors stream into vLLM's in-place reload as they arrive. A stream cut off in the
middle (a peer failed) leaves the layers not yet loaded unusable until the next whole reload,
which the driver's retry of the sync is (tests/actors/test_vllm_tp_worker.py checks it).

A worker never raises out of a receive: a collective failure and a load failure come back as a
``WorkerReceipt`` (vLLM's multiprocess executor would turn any exception into a plain
``RuntimeError``), so that the generator can tell a peer's failure (the driver syncs again) from
an engine that cannot load the weights (the job stops).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass
from itertools import chain

import torch

from rlfleet.common.transport import (
    CollectiveError,
    CollectiveHandle,
    CollectiveReceiver,
    GroupSpec,
)

EXTENSION = "rlfleet.actors.vllm_worker.WeightReceiverExtension"
"""The extension's qualified name, as ``worker_extension_cls`` takes it."""


@dataclass(frozen=True)
class WorkerReceipt:
    """One worker's answer to a join or a receive: the version it loaded, or why it failed."""

    rank: int
    """The worker's rank in its engine."""
    version: int | None = None
    collective_error: str | None = None
    """The group failed (a peer died or stalled, the deadline passed): worth another try."""
    load_error: str | None = None
    """The engine could not load the weights it received: never worth another try."""


def reload_worker_weights(worker, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
    """Load ``weights`` (HF names, full tensors) into ``worker``'s model in place; returns the
    number of tensors taken.

    ``Worker.reload_weights`` (the model runner's, under the worker's vLLM config) re-runs each
    layer's post-load processing, CPU GEMM repacking included, and takes each tensor-parallel
    worker's shard. A tied ``lm_head`` (GPT-2's shares ``wte``) loads no tensor of its own; on
    the vLLM CPU build its CPU GEMM handle was seen staying stale after a reload, so it is
    re-dispatched from the new weights here (about 1 ms)."""
    taken = 0

    def counted() -> Iterable[tuple[str, torch.Tensor]]:
        nonlocal taken
        for item in weights:
            taken += 1
            yield item

    worker.reload_weights(weights_iterator=counted())
    _refresh_cpu_lm_head(worker.model_runner.get_model())
    return taken


def _refresh_cpu_lm_head(model: torch.nn.Module) -> None:
    lm_head = getattr(model, "lm_head", None)
    if not hasattr(lm_head, "cpu_linear"):
        return
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

        dispatch_cpu_unquantized_gemm(lm_head, remove_weight=False)


def rank_tokens_eagerly() -> None:
    """Has vLLM's sampler count the tokens at least as likely as each sampled one (its rank)
    eagerly instead of through ``torch.compile`` (vLLM 0.32's ``batched_count_greater_than``;
    a vLLM without that function is left as it is)."""
    from vllm.v1.sample import sampler

    if hasattr(sampler, "batched_count_greater_than"):
        sampler.batched_count_greater_than = count_at_least


def count_at_least(x: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Per row of ``x``, the elements at least that row's value in ``values`` (shape (rows, 1))."""
    return (x >= values).sum(-1)


class WeightReceiverExtension:
    """Mixed into vLLM's worker class: ``self`` is the worker (``rank``, ``reload_weights``,
    ``model_runner``)."""

    def rlfleet_load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Loads tensors the engine's process hands over (an iterator only in its own
        process); returns how many."""
        return reload_worker_weights(self, weights)

    def rlfleet_rank_tokens_eagerly(self) -> None:
        """The sampler's token ranks without torch.compile in this worker's process (see
        ``rank_tokens_eagerly``)."""
        rank_tokens_eagerly()

    def rlfleet_join_weight_group(self, spec: GroupSpec, first_rank: int) -> WorkerReceipt:
        """Leaves this worker's weight group (if any) and joins ``spec``'s as
        ``first_rank + `` its rank in the engine."""
        try:
            self._rlfleet_receiver().join(spec, first_rank + self.rank)
        except CollectiveError as exc:
            return WorkerReceipt(self.rank, collective_error=str(exc))
        return WorkerReceipt(self.rank)

    def rlfleet_receive_weights(self, handle: CollectiveHandle) -> WorkerReceipt:
        """Receives one sync's buckets and loads them as they arrive, in one reload."""
        receiver, rank = self._rlfleet_receiver(), self.rank
        try:
            with closing(receiver.receive(handle)) as buckets:
                reload_worker_weights(self, chain.from_iterable(buckets))
        except CollectiveError as exc:
            return WorkerReceipt(rank, collective_error=str(exc))
        except Exception as exc:  # noqa: BLE001 - the engine's own failure, reported as such
            return WorkerReceipt(rank, load_error=f"{type(exc).__name__}: {exc}")
        if receiver.version is None:
            return WorkerReceipt(rank, load_error="the model stopped before taking every weight")
        return WorkerReceipt(rank, version=receiver.version)

    def rlfleet_leave_weight_group(self) -> None:
        self._rlfleet_receiver().close()

    def _rlfleet_receiver(self) -> CollectiveReceiver:
        receiver = getattr(self, "rlfleet_receiver", None)
        if receiver is None:
            receiver = self.rlfleet_receiver = CollectiveReceiver()
        return receiver

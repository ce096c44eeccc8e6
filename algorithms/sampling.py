"""DAPO's sampling control (Yu et al. 2025) as pure functions, veRL 0.9.1's arithmetic.

The driver calls these between generation and training; nothing here holds state.

- Soft overlong punishment, :data:`LENGTH_PENALTIES` ``"dapo_overlong"``: a penalty added to
  each score that grows linearly over the last ``overlong_buffer_len`` tokens before
  ``max_response_length`` (veRL ``workers/reward_manager/dapo.py`` ``DAPORewardManager``).
- Dynamic sampling: a group whose metric values are all equal has zero advantage under GRPO and
  teaches nothing, so it is dropped (:func:`dynamic_sampling_keep`, filter
  :data:`GROUP_FILTERS` ``"zero_std"``, veRL ``trainer/ppo/v1/replay_buffer.py``
  ``_dapo_filtered_keys``); prompts are generated again to refill the batch
  (:func:`refill_dispatch`, the sync ``ReplayBuffer.sample`` loop's credit), the kept groups past
  the batch's need are surplus (:func:`fill_batch`), and the number of generation rounds may be
  bounded (:func:`may_generate_again`, the DAPO recipe's ``max_num_gen_batches``). The driver
  accounts the dropped and surplus groups' rollout ids: never trained, never reused.
- Overlong filtering (DAPO's masking of truncated samples' loss) is not here: it is
  ``CriticFreeConfig.mask_truncated_completions`` (TRL 1.16's, ``trainers/critic_free.py``), fed
  by the rollouts' finish reasons; veRL 0.9.1 has no such mask.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Generic, Protocol, TypeVar

import numpy as np
import torch

from rlfleet.algorithms.registry import Registry

G = TypeVar("G", bound=Hashable)

SCORE_METRIC = "score"
"""The metric that is each sample's score itself (veRL's ``"reward"``: the pre-KL reward, the
overlong penalty included); any other name is one of the sample's score components (veRL's
``reward_extra_info`` fields, e.g. ``"acc"``)."""


class LengthPenalty(Protocol):
    def __call__(
        self,
        response_lengths: Sequence[int] | torch.Tensor,
        max_response_length: int,
        overlong_buffer_len: int,
        penalty_factor: float,
    ) -> torch.Tensor: ...


class GroupFilter(Protocol):
    def __call__(self, values: Sequence[float]) -> bool: ...


LENGTH_PENALTIES: Registry[LengthPenalty] = Registry("length penalty")
GROUP_FILTERS: Registry[GroupFilter] = Registry("group filter")


def _checked_lengths(
    response_lengths: Sequence[int] | torch.Tensor, max_response_length: int
) -> torch.Tensor:
    """The lengths as an int64 tensor; a ValueError for one outside ``[0, max]``, which no
    response capped at ``max_response_length`` can have (veRL would extrapolate past -factor)."""
    if isinstance(response_lengths, torch.Tensor):
        integral = not response_lengths.is_floating_point() and not response_lengths.is_complex()
        integral = integral and response_lengths.dtype != torch.bool
    else:
        integral = all(
            isinstance(n, Integral) and not isinstance(n, bool) for n in response_lengths
        )
    lengths = torch.as_tensor(response_lengths, dtype=torch.int64) if integral else None
    if lengths is None or lengths.dim() != 1:
        raise ValueError(
            f"response lengths must be a 1-d integer sequence, got {response_lengths!r}"
        )
    outside = (lengths < 0) | (lengths > max_response_length)
    if bool(outside.any()):
        bad = lengths[outside].tolist()
        raise ValueError(f"response lengths {bad} outside [0, {max_response_length}]")
    return lengths


@LENGTH_PENALTIES.register("dapo_overlong")
def overlong_penalty(
    response_lengths: Sequence[int] | torch.Tensor,
    max_response_length: int,
    overlong_buffer_len: int,
    penalty_factor: float,
) -> torch.Tensor:
    """DAPO's soft overlong punishment per sample, float32 ``[batch]``, each ``<= 0``.

    ``min(-(length - (max - buffer)) / buffer * factor, 0)``: nothing up to ``max - buffer``
    tokens, then linear down to ``-factor`` at ``max``. ``length`` is every response token (veRL
    counts the response's attention mask: the EOS and, in a multi-turn response, environment
    tokens too). The operations run in veRL's order and dtype (int64 lengths, true division to
    float32) so the values are its own bit for bit; veRL's asserts (``buffer > 0``,
    ``max >= buffer``) are ValueErrors here.
    """
    if overlong_buffer_len <= 0:
        raise ValueError(f"overlong_buffer_len must be positive, got {overlong_buffer_len}")
    if max_response_length < overlong_buffer_len:
        raise ValueError(
            f"max_response_length {max_response_length} is below overlong_buffer_len "
            f"{overlong_buffer_len}"
        )
    lengths = _checked_lengths(response_lengths, max_response_length)
    expected_len = max_response_length - overlong_buffer_len
    exceed_len = lengths - expected_len
    penalty = -exceed_len / overlong_buffer_len * penalty_factor
    return torch.clamp(penalty.to(torch.float32), max=0.0)


@GROUP_FILTERS.register("zero_std")
def has_reward_variance(values: Sequence[float]) -> bool:
    """Keep a group unless it has two or more values and ``np.std`` (float64) of them is 0.

    veRL's exact test (``len(values) > 1 and float(np.std(values)) == 0.0`` drops), so a group of
    one sample is kept, and so is a group whose equal values ``np.std`` does not see as equal:
    three samples of 0.1 have a float64 std of 1.4e-17 and are kept, four are dropped.
    """
    return len(values) <= 1 or float(np.std(np.asarray(values, dtype=np.float64))) != 0.0


@dataclass(frozen=True)
class GroupSplit(Generic[G]):
    """Group ids, each in the order of its first sample in the batch."""

    kept: tuple[G, ...]
    dropped: tuple[G, ...]


def group_values(group_ids: Sequence[G], values: Sequence[float]) -> dict[G, list[float]]:
    """Each group's values, groups in the order of their first sample."""
    if len(group_ids) != len(values):
        raise ValueError(f"{len(values)} values for {len(group_ids)} group ids")
    grouped: dict[G, list[float]] = {}
    for group, value in zip(group_ids, values, strict=True):
        grouped.setdefault(group, []).append(float(value))
    return grouped


def dynamic_sampling_keep(
    group_ids: Sequence[G], values: Sequence[float], group_filter: str = "zero_std"
) -> GroupSplit[G]:
    """Which groups to train on and which to drop, by the registered ``group_filter`` applied
    to each group's metric ``values`` (one per sample; :func:`metric_values` picks them)."""
    keep = GROUP_FILTERS[group_filter]
    grouped = group_values(group_ids, values)
    verdicts = {group: keep(group_metric) for group, group_metric in grouped.items()}
    return GroupSplit(
        kept=tuple(group for group, kept in verdicts.items() if kept),
        dropped=tuple(group for group, kept in verdicts.items() if not kept),
    )


def metric_values(
    scores: Sequence[float],
    components: Sequence[Mapping[str, float] | None] | None = None,
    metric: str = SCORE_METRIC,
) -> list[float]:
    """Each sample's dynamic-sampling metric: its score for ``"score"``, else its score component
    ``metric``. A sample without that component is a ValueError naming it (veRL raises too:
    filtering on a value some samples lack would silently keep or drop their groups)."""
    if metric == SCORE_METRIC:
        return [float(score) for score in scores]
    if components is None or len(components) != len(scores):
        raise ValueError(f"metric {metric!r} needs one score-components mapping per sample")
    missing = [index for index, parts in enumerate(components) if not parts or metric not in parts]
    if missing:
        raise ValueError(f"samples {missing[:5]} have no score component {metric!r}")
    return [float(parts[metric]) for parts in components]  # type: ignore[index]


@dataclass(frozen=True)
class BatchFill(Generic[G]):
    """The groups that make the batch, those kept beyond it (discarded, never trained, never
    reused: veRL's ``discarded_surplus_samples``) and how many groups are still missing."""

    batch: tuple[G, ...]
    surplus: tuple[G, ...]
    missing: int


def fill_batch(kept_groups: Sequence[G], target_groups: int) -> BatchFill[G]:
    """The first ``target_groups`` kept groups, oldest first (the DAPO recipe's
    ``batch[:train_batch_size * n]``; veRL 0.9.1's sync buffer takes the oldest prompts too and
    breaks ties among one step's prompts in set order, so only the count is its to compare)."""
    if target_groups < 0:
        raise ValueError(f"target_groups must be >= 0, got {target_groups}")
    kept = tuple(kept_groups)
    return BatchFill(
        batch=kept[:target_groups],
        surplus=kept[target_groups:],
        missing=max(0, target_groups - len(kept)),
    )


REFILL_PER_DROPPED = 2
"""Prompts generated again per dropped group (veRL's sync buffer: ``refill_credit += 2 * k``),
over-sampling because about as many of the new groups may be dropped again."""


def refill_dispatch(
    credit: int, dropped: int, max_inflight_prompts: int, inflight: int = 0
) -> tuple[int, int]:
    """``(prompts to generate now, credit left)`` after a round that dropped ``dropped`` groups
    while the batch is still short: the credit grows by ``REFILL_PER_DROPPED`` per dropped group
    and is spent up to the free slots, ``max_inflight_prompts`` (veRL:
    ``max_inflight_gen_batches * train_batch_size``) less the prompts in flight; what does not
    fit waits for the next round. Once the batch is full veRL zeroes the credit: call this only
    while groups are missing."""
    if min(credit, dropped, max_inflight_prompts, inflight) < 0:
        raise ValueError("credit, dropped, max_inflight_prompts and inflight must be >= 0")
    credit += REFILL_PER_DROPPED * dropped
    dispatch = min(credit, max(0, max_inflight_prompts - inflight))
    return dispatch, credit - dispatch


def may_generate_again(rounds_done: int, max_rounds: int) -> bool:
    """Whether a batch still short after ``rounds_done`` generation rounds may have another: the
    DAPO recipe's ``max_num_gen_batches`` (0 or less: no bound; past it the recipe raises). veRL
    0.9.1's sync buffer ignores that setting (``trainer/ppo/v1/trainer_base.py``) and bounds
    only the prompts in flight, which never ends on data too hard to give any signal."""
    return max_rounds <= 0 or rounds_done < max_rounds

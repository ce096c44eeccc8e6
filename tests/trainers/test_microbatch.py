"""Micro-batches by token budget and gradient checkpointing, in one process: the splits respect
the budget, and neither changes the update beyond float32 rounding (the tolerance of
tests/trainers/test_distributed.py, measured there)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_distributed import UPDATE_ERROR, assert_same_stats, make_trainer, train, update_error

from rlfleet.trainers.distributed import (
    DataParallel,
    micro_batches,
    rank_micro_batches,
    split_among_ranks,
)
from rlfleet.trainers.forward import PackedRows, ResponseBatch

LENGTHS = [5, 9, 3, 12, 7, 4, 30, 6]


def padded_tokens(rows: list[int]) -> int:
    return len(rows) * max(LENGTHS[row] for row in rows)


@pytest.mark.parametrize("budget", [1, 12, 20, 40, 1000])
def test_micro_batches_keep_to_the_budget(budget: int) -> None:
    groups = micro_batches(range(len(LENGTHS)), LENGTHS, budget)
    assert sorted(row for group in groups for row in group) == list(range(len(LENGTHS)))
    for group in groups:
        assert len(group) == 1 or padded_tokens(group) <= budget  # a longer row goes alone
    assert len(micro_batches(range(8), LENGTHS, None, max_rows=3)) == 3
    assert micro_batches([2, 0, 1], LENGTHS, None) == [[2, 0, 1]]  # no budget: order kept


def test_ranks_share_the_rows_by_tokens_and_run_as_many_forwards() -> None:
    shares = split_among_ranks(list(range(8)), LENGTHS, 2)
    assert sorted(shares[0] + shares[1]) == list(range(8))
    loads = [sum(LENGTHS[row] for row in share) for share in shares]
    assert abs(loads[0] - loads[1]) <= max(LENGTHS)
    plans = [
        rank_micro_batches(range(8), LENGTHS, DataParallel(rank, 2, torch.device("cpu")), 20)
        for rank in range(2)
    ]
    assert len(plans[0]) == len(plans[1])
    real = [row for plan in plans for micro in plan if not micro.dummy for row in micro.rows]
    assert sorted(real) == list(range(8))
    one = rank_micro_batches([3], LENGTHS, DataParallel(1, 2, torch.device("cpu")), None)
    assert [micro.dummy for micro in one] == [True]  # no row here: a dummy keeps step


@pytest.mark.parametrize("case", ["ppo_micro", "grpo_micro", "rloo_dr_grpo"])
def test_a_token_budget_changes_nothing_but_rounding(case: str, tiny_model_dir: Path) -> None:
    split = train(make_trainer(case, tiny_model_dir), case)
    whole = train(make_trainer(case, tiny_model_dir, max_tokens_per_microbatch=None), case)
    assert update_error(split, whole) < UPDATE_ERROR
    for got, want in zip(split["stats"], whole["stats"], strict=True):
        assert_same_stats(got, want)


def saved_activation_bytes(trainer, batch: ResponseBatch) -> int:
    """Bytes autograd keeps for the backward of one training forward."""
    total = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        trainer.policy(PackedRows.build(batch, range(len(batch.responses))), with_values=True)
    return total


def test_gradient_checkpointing_gives_the_same_update_with_less_memory(
    tiny_model_dir: Path,
) -> None:
    plain = make_trainer("ppo", tiny_model_dir)
    checkpointed = make_trainer("ppo", tiny_model_dir, gradient_checkpointing=True)
    generator = torch.Generator().manual_seed(0)
    queries = [torch.randint(1, 500, (40,), generator=generator) for _ in range(4)]
    responses = [torch.randint(1, 500, (40,), generator=generator) for _ in range(4)]
    batch = ResponseBatch.build(queries, responses, None)
    kept = saved_activation_bytes(checkpointed, batch)
    assert kept < saved_activation_bytes(plain, batch) / 2
    assert update_error(train(checkpointed, "ppo"), train(plain, "ppo")) < UPDATE_ERROR


@pytest.mark.parametrize("budget", [None, 12])
def test_a_skipped_minibatch_leaves_no_gradient(budget: int | None, tiny_model_dir: Path) -> None:
    """Every minibatch over the ratio threshold: whether decided before the backward (in one
    piece) or after it (split), no gradient reaches the optimizer, so Adam's first step is 0."""
    trainer = make_trainer("ppo_micro", tiny_model_dir, max_tokens_per_microbatch=budget)
    trainer.config.ratio_threshold = 1e-6
    with pytest.warns(UserWarning, match="Skipping batch"):
        result = train(trainer, "ppo_micro")
    torch.testing.assert_close(result["weights"], result["initial"], rtol=0, atol=0)

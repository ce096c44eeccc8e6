"""DAPO's sampling control against veRL 0.9.1's own numbers and decisions.

``tests/algorithms/dapo_reference/cases/`` holds what veRL's ``DAPORewardManager`` (soft overlong
punishment) and its sync ``ReplayBuffer`` (dynamic sampling's group filter and refill loop)
computed; ``make_verl_dapo_reference.py`` beside them lists every case and how it was made.

Tolerance: decisions (kept, dropped, refills, counts) exact; penalties ``atol=1e-6`` (they agree
bit for bit: both compute in veRL's order in float32).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from rlfleet.algorithms.sampling import (
    LENGTH_PENALTIES,
    dynamic_sampling_keep,
    fill_batch,
    metric_values,
    overlong_penalty,
    refill_dispatch,
)

CASES = Path(__file__).resolve().parent / "dapo_reference" / "cases"


def load(name: str):
    return json.loads((CASES / f"{name}.json").read_text())


OVERLONG = {case["name"]: case for case in load("overlong")}
SAMPLE_LOOPS = {case["name"]: case for case in load("sample_loop")}


@pytest.mark.parametrize("name", sorted(OVERLONG))
def test_overlong_penalty_equals_verl(name: str) -> None:
    case = OVERLONG[name]
    penalty = LENGTH_PENALTIES["dapo_overlong"](
        case["response_lengths"], case["max_resp_len"], case["buffer_len"], case["penalty_factor"]
    )
    assert penalty.dtype == torch.float32
    expected = torch.tensor(case["overlong_reward"], dtype=torch.float32)
    torch.testing.assert_close(penalty, expected, atol=1e-6, rtol=0)
    assert (penalty < 0).tolist() == case["overlong"]
    # the score veRL writes on the last valid token is the score plus the penalty, in float32
    shaped = torch.tensor(case["scores"], dtype=torch.float32) + penalty
    torch.testing.assert_close(
        shaped, torch.tensor(case["reward_on_last_token"]), atol=1e-6, rtol=0
    )


def test_the_stored_overlong_cases_cover_the_boundaries() -> None:
    """Each case runs from no penalty through ``max - buffer`` (still 0) to ``-factor`` at max."""
    for case in OVERLONG.values():
        by_length = dict(zip(case["response_lengths"], case["overlong_reward"], strict=True))
        start = case["max_resp_len"] - case["buffer_len"]
        assert by_length[start] == 0.0
        assert by_length[case["max_resp_len"]] == pytest.approx(-case["penalty_factor"])
        if start + 1 <= case["max_resp_len"]:
            assert by_length[start + 1] < 0


@pytest.mark.parametrize("metric", ["reward", "acc"])
def test_dynamic_sampling_drops_the_groups_verl_drops(metric: str) -> None:
    """veRL's ``"reward"`` sums float32 rm_scores (our float32 score column); ``"acc"`` is a
    Python-float component (our score components): np.std's rounding differs between them."""
    document = load("filter_groups")
    group_ids, scores, components = [], [], []
    for group, values in document["groups"].items():
        for value in values:
            group_ids.append(group)
            scores.append(float(np.float32(value)))
            components.append({"acc": value})
    values = metric_values(scores, components, "score" if metric == "reward" else "acc")
    split = dynamic_sampling_keep(group_ids, values)
    assert sorted(split.dropped) == document["dropped"][metric]
    assert set(split.kept) | set(split.dropped) == set(document["groups"])
    assert not set(split.kept) & set(split.dropped)


def test_the_stored_filter_cases_show_the_float_corner() -> None:
    """Three equal 0.1s are kept under ``acc`` (float64 std 1.4e-17) and dropped under
    ``reward`` (float32); groups of one are kept under both."""
    dropped = load("filter_groups")["dropped"]
    assert "g05" in dropped["reward"] and "g05" not in dropped["acc"]
    assert "g03" not in dropped["reward"] + dropped["acc"]


def replay_sample_loop(case: dict) -> dict:
    """veRL's sync loop on instantaneous generation, from our pure functions: filter each
    round's groups, refill by credit until enough are kept, then fill the batch."""
    batch_size, script, uids = case["train_batch_size"], case["script"], case["uids"]
    slots = case["max_inflight_gen_batches"] * batch_size
    kept: list[str] = []
    dropped: list[str] = []
    refills: list[int] = []
    credit, generated, round_size = 0, 0, batch_size
    while True:
        round_uids = uids[generated : generated + round_size]
        generated += round_size
        group_ids = [uid for uid in round_uids for _ in script[uids.index(uid)]]
        values = [v for uid in round_uids for v in script[uids.index(uid)]]
        split = dynamic_sampling_keep(group_ids, values)
        kept += split.kept
        dropped += split.dropped
        if len(kept) >= batch_size:
            break
        round_size, credit = refill_dispatch(credit, len(split.dropped), slots)
        refills.append(round_size)
        assert round_size > 0
    fill = fill_batch(kept, batch_size)
    return {
        "refills": refills,
        "generated": generated,
        "kept": kept,
        "dropped": dropped,
        "fill": fill,
    }


@pytest.mark.parametrize("name", sorted(SAMPLE_LOOPS))
def test_refill_and_fill_equal_verls_sync_loop(name: str) -> None:
    case = SAMPLE_LOOPS[name]
    ours = replay_sample_loop(case)
    assert ours["refills"] == case["refills"]
    assert ours["generated"] == case["generated"]
    assert len(ours["dropped"]) == case["evicted"]
    assert len(ours["fill"].surplus) == case["discarded_surplus"]
    assert len(ours["fill"].batch) == case["train_batch_size"] == len(case["selected"])
    assert ours["fill"].missing == 0
    # veRL breaks ties among one step's prompts in set order: its batch is some of the kept
    assert set(case["selected"]) <= set(ours["kept"])
    assert not set(ours["dropped"]) & set(case["selected"])


def test_overlong_penalty_is_the_registered_one() -> None:
    assert LENGTH_PENALTIES["dapo_overlong"] is overlong_penalty

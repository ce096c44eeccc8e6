"""learner.distributed: N gloo ranks (FSDP2) train exactly as one rank, and as the plain trainer.

The same cases run three ways: the plain single-process trainer (here), the trainer given a
1-rank FSDP2 group, and given 2 ranks (spawned processes, each one thread). After two steps the
updates and the step stats agree to float32 rounding. The tolerance is measured: the plain
trainer with 1 thread against 2 threads (a different float32 summation order, as the ranks'
sharded reductions are) gives update errors (see ``update_error``) up to 4.4e-5 and stats
differences up to 5.2e-6 over these cases; ``UPDATE_ERROR`` and ``STATS`` allow about 10 times
that (a wrong normaliser or a lost contribution gives an update error of order 1).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from support.batches import ppo_step_batch
from support.ports import free_ports
from support.spawned import run_spawned
from transformers import AutoModelForCausalLM

from rlfleet.common.config import CriticFreeConfig, PPOConfig
from rlfleet.trainers.critic_free import CriticFreeTrainer
from rlfleet.trainers.distributed import DataParallel, full_state, init_process_group
from rlfleet.trainers.ppo import PPOTrainer
from rlfleet.trainers.value_head import AutoModelForCausalLMWithValueHead

UPDATE_ERROR = 5e-4
STATS = {"abs": 5e-5, "rel": 1e-4}
TIMEOUT_S = 240.0
BATCH = 8

CASES: dict[str, dict[str, Any]] = {
    "ppo": {
        "config": {
            "batch_size": BATCH,
            "mini_batch_size": 4,
            "ppo_epochs": 2,
            "max_grad_norm": 1.0,
            "whiten_rewards": True,
            "use_score_scaling": True,
        }
    },
    "ppo_micro": {
        "config": {
            "batch_size": BATCH,
            "mini_batch_size": 2,
            "gradient_accumulation_steps": 2,
            "ppo_epochs": 2,
            "tis_cap": 2.0,
        },
        "max_tokens_per_microbatch": 12,
    },
    "grpo": {"config": {"algorithm": "grpo", "loss_type": "grpo", "beta": 0.04}},
    "grpo_micro": {
        "config": {"algorithm": "grpo", "loss_type": "grpo", "mini_batch_size": 4},
        "max_tokens_per_microbatch": 12,
    },
    "rloo_dr_grpo": {
        "config": {"algorithm": "rloo", "loss_type": "dr_grpo", "kl_coef": 0.05},
        "max_tokens_per_microbatch": 20,
    },
    "reinforce_bnpo": {"config": {"algorithm": "reinforce_pp", "loss_type": "bnpo"}},
    "ppo_holes": {
        "config": {
            "batch_size": BATCH,
            "mini_batch_size": 4,
            "ppo_epochs": 2,
            "whiten_rewards": True,
            "tis_cap": 2.0,
        },
        "max_tokens_per_microbatch": 12,
        "holes": True,
    },
    "grpo_holes": {
        "config": {"algorithm": "grpo", "loss_type": "grpo", "beta": 0.04, "mini_batch_size": 4},
        "max_tokens_per_microbatch": 12,
        "holes": True,
    },
    "dapo_checkpointed": {
        "config": {"algorithm": "grpo", "loss_type": "dapo", "num_iterations": 2},
        "gradient_checkpointing": True,
    },
}

ONE_RANK_CASES = ["ppo_micro", "grpo", "ppo_holes"]
"""FSDP2 over a group of one (the job's one-rank path) is checked on fewer cases: it shares all
but the collectives with the 2-rank runs."""


def is_ppo(case: str) -> bool:
    return case.startswith("ppo")


def with_holes(batch: dict[str, Any]) -> dict[str, Any]:
    """Multi-turn inputs: an environment token at position 1 of each response of 3 or more
    tokens, a turn reward on the token before it."""
    masks, rewards = [], []
    for i, response in enumerate(batch["responses"]):
        mask, turn = torch.ones(len(response), dtype=torch.long), torch.zeros(len(response))
        if len(response) >= 3:
            mask[1], turn[0] = 0, 0.25 * (i % 3)
        masks.append(mask)
        rewards.append(turn)
    behaviour = [lps * mask for lps, mask in zip(batch["behaviour_logprobs"], masks, strict=True)]
    return batch | {"loss_masks": masks, "token_rewards": rewards, "behaviour_logprobs": behaviour}


def make_batch(step: int, holes: bool = False) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(step)
    queries, responses, scores = ppo_step_batch(
        generator,
        BATCH,
        vocab=500,
        query_lengths=lambda i: 3 + i % 3,
        response_lengths=lambda i: 2 + i % 4,
    )
    behaviour = [-torch.rand(len(r), generator=generator) - 4.0 for r in responses]
    batch = {
        "queries": queries,
        "responses": responses,
        "scores": scores,
        "behaviour_logprobs": behaviour,
    }
    return with_holes(batch) if holes else batch


def make_trainer(case: str, model_dir: Path, **layout: Any) -> PPOTrainer | CriticFreeTrainer:
    torch.manual_seed(0)  # the value head's initial weights
    spec = CASES[case]
    options = {key: value for key, value in spec.items() if key not in ("config", "holes")}
    options |= layout
    if is_ppo(case):
        config = PPOConfig(learning_rate=1e-3, seed=3, **spec["config"])
        model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
        return PPOTrainer(config, model, **options)
    config = CriticFreeConfig(
        batch_size=BATCH, learning_rate=1e-3, max_completion_length=8, seed=3, **spec["config"]
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    return CriticFreeTrainer(config, model, **options)


def train(trainer: PPOTrainer | CriticFreeTrainer, case: str) -> dict[str, Any]:
    """Two steps; the weights before and after them (whole, every rank taking part) and the
    stats."""
    initial = {name: tensor.detach().clone() for name, tensor in full_state(trainer.model)}
    stats = []
    for step in range(2):
        batch = make_batch(step, CASES[case].get("holes", False))
        if not is_ppo(case):
            batch["group_ids"] = [i // 4 for i in range(BATCH)]
        stats.append(trainer.step(**batch))
    weights = {name: tensor.detach().clone() for name, tensor in full_state(trainer.model)}
    return {"stats": stats, "initial": initial, "weights": weights}


def update_error(actual: dict[str, Any], expected: dict[str, Any]) -> float:
    """``|update - expected update| / |expected update|`` over all weights together (Adam turns
    rounding in a gradient that is zero up to rounding, e.g. the attention's key bias, into a
    step of up to the learning rate, so single elements are no measure)."""
    difference = expected_norm = 0.0
    for name, initial in expected["initial"].items():
        update = expected["weights"][name] - initial
        difference += (actual["weights"][name] - initial - update).square().sum().item()
        expected_norm += update.square().sum().item()
    return math.sqrt(difference / expected_norm)


def run_rank(
    rank: int, world_size: int, port: int, model_dir: str, out: str, cases: list[str]
) -> None:
    """One rank (spawned): every case in turn in one gloo group; rank 0 saves the results."""
    torch.set_num_threads(1)
    device = torch.device("cpu")
    init_process_group(rank, world_size, "127.0.0.1", port, device, timeout_s=TIMEOUT_S)
    parallel = DataParallel.current(device)
    results = {}
    for case in cases:
        trainer = make_trainer(case, Path(model_dir), parallel=parallel)
        results[case] = train(trainer, case)
    if rank == 0:
        torch.save(results, out)
    torch.distributed.destroy_process_group()


def spawn_ranks(
    world_size: int,
    model_dir: Path,
    out: Path,
    *extra: Any,
    worker: Callable[..., None] = run_rank,
) -> Any:
    """``worker(rank, world_size, port, model_dir, out, *extra)`` on ``world_size`` spawned
    processes, killed if not done in ``TIMEOUT_S``; returns what rank 0 saved to ``out``."""
    (port,) = free_ports(1)
    arguments = (world_size, port, str(model_dir), str(out), *extra)
    run_spawned(worker, arguments, world_size, TIMEOUT_S, "the training steps")
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def ranked(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, Any]:
    """Every case's results on a 1-rank and a 2-rank group."""
    out = tmp_path_factory.mktemp("ranks")
    return {
        1: spawn_ranks(1, tiny_model_dir, out / "1.pt", ONE_RANK_CASES),
        2: spawn_ranks(2, tiny_model_dir, out / "2.pt", list(CASES)),
    }


@pytest.fixture(scope="module")
def plain(tiny_model_dir: Path) -> dict[str, Any]:
    """Every case's results from the plain trainer in this process."""
    return {case: train(make_trainer(case, tiny_model_dir), case) for case in CASES}


def assert_same_training(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    torch.testing.assert_close(actual["initial"], expected["initial"], rtol=0, atol=0)
    assert update_error(actual, expected) < UPDATE_ERROR
    for got, want in zip(actual["stats"], expected["stats"], strict=True):
        assert_same_stats(got, want)


def assert_same_stats(got: dict[str, Any], want: dict[str, Any]) -> None:
    timings = {key for key in want if key.startswith("time/")}
    assert set(got) == set(want)
    for key in sorted(set(want) - timings):
        expected = want[key]
        if isinstance(expected, np.ndarray):
            np.testing.assert_allclose(
                got[key], expected, atol=STATS["abs"], rtol=STATS["rel"], err_msg=key
            )
        elif not (isinstance(expected, float) and math.isnan(expected)):
            assert got[key] == pytest.approx(expected, **STATS), key


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_two_ranks_train_as_one(case: str, ranked: dict[int, Any], plain: dict[str, Any]) -> None:
    """The 2-rank update and stats equal the plain trainer's."""
    assert_same_training(ranked[2][case], plain[case])


@pytest.mark.slow
@pytest.mark.parametrize("case", ONE_RANK_CASES)
def test_a_group_of_one_rank_trains_as_the_plain_trainer(
    case: str, ranked: dict[int, Any], plain: dict[str, Any]
) -> None:
    assert_same_training(ranked[1][case], plain[case])


def test_the_cases_train(plain: dict[str, Any], tiny_model_dir: Path) -> None:
    """Every case moves the weights by far more than the tolerance (so the comparison can fail),
    and the PPO cases exercise what they are meant to: TIS and micro-batches."""
    initial = dict(full_state(AutoModelForCausalLMWithValueHead.from_pretrained(tiny_model_dir)))
    for case, result in plain.items():
        moved = max(
            (result["weights"][name] - initial[name]).abs().max().item()
            for name in result["weights"]
            if name in initial
        )
        assert moved > 1e-4, case
    assert plain["ppo_micro"]["stats"][0]["rollout/tis_capped_fraction"] >= 0.0


def test_a_parallel_of_one_rank_in_no_group_trains_in_this_process(
    tiny_model_dir: Path, plain: dict[str, Any]
) -> None:
    """``DataParallel.current`` without a process group is one rank, nothing sharded: the plain
    trainer (trained in this process too), bit for bit."""
    parallel = DataParallel.current(torch.device("cpu"))
    assert (parallel.rank, parallel.world_size, parallel.in_group) == (0, 1, False)
    trainer = make_trainer("ppo", tiny_model_dir, parallel=parallel)
    assert not any(type(p).__name__ == "DTensor" for p in trainer.model.parameters())
    torch.testing.assert_close(
        train(trainer, "ppo")["weights"], plain["ppo"]["weights"], rtol=0, atol=0
    )


def test_bfloat16_needs_a_group_and_an_optimizer_is_made_when_sharded(tiny_model_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = CriticFreeConfig(batch_size=BATCH)
    with pytest.raises(ValueError, match="init_process_group"):
        CriticFreeTrainer(config, copy.deepcopy(model), dtype=torch.bfloat16)
    parallel = DataParallel(0, 1, torch.device("cpu"))
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    with pytest.raises(ValueError, match="pass neither optimizer"):
        CriticFreeTrainer(config, model, optimizer=optimizer, parallel=parallel)

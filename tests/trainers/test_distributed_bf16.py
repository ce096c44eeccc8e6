"""bfloat16 on 2 gloo ranks: float32 master weights and optimizer state, float32 logprobs, and
a policy that learns what its rewards ask for; the finite-weights guard on sharded weights."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from support.batches import ppo_step_batch
from test_distributed import spawn_ranks

from rlfleet.common.config import PPOConfig
from rlfleet.trainers.distributed import (
    DataParallel,
    full_state,
    init_process_group,
    reshard,
)
from rlfleet.trainers.forward import PackedRows, ResponseBatch
from rlfleet.trainers.guards import NonFiniteError, check_finite_weights
from rlfleet.trainers.ppo import PPOTrainer
from rlfleet.trainers.value_head import AutoModelForCausalLMWithValueHead

STEPS = 4
BATCH = 8


def fixed_batch() -> dict[str, Any]:
    """One batch, trained on repeatedly: responses of score +1 and -1."""
    signs = [1.0 if i % 2 == 0 else -1.0 for i in range(BATCH)]
    queries, responses, scores = ppo_step_batch(
        0, BATCH, vocab=500, query_lengths=4, response_lengths=4, scores=signs
    )
    return {"queries": queries, "responses": responses, "scores": scores}


def preference(trainer: PPOTrainer, batch: dict[str, Any]) -> float:
    """Mean logprob of the rewarded responses minus that of the punished ones."""
    responses = ResponseBatch.build(batch["queries"], batch["responses"], None)
    with torch.no_grad():
        logprobs = trainer.policy(PackedRows.build(responses, range(BATCH))).logprobs
    reshard(trainer.policy)
    assert logprobs.dtype == torch.float32
    per_row = logprobs.sum(-1)
    return float(per_row[0::2].mean() - per_row[1::2].mean())


def run_bf16_rank(rank: int, world_size: int, port: int, model_dir: str, out: str) -> None:
    torch.set_num_threads(1)
    device = torch.device("cpu")
    init_process_group(rank, world_size, "127.0.0.1", port, device, timeout_s=120.0)
    torch.manual_seed(0)
    config = PPOConfig(batch_size=BATCH, mini_batch_size=4, ppo_epochs=2, learning_rate=1e-3)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
    parallel = DataParallel.current(device)
    trainer = PPOTrainer(config, model, parallel=parallel, dtype=torch.bfloat16)
    batch = fixed_batch()
    before = preference(trainer, batch)
    stats = [trainer.step(**batch) for _ in range(STEPS)]
    after = preference(trainer, batch)
    check_finite_weights(trainer.model, "after training")
    state = trainer.optimizer.state
    results = {
        "preference": (before, after),
        "kl": [s["objective/kl"] for s in stats],
        "param_dtypes": {p.to_local().dtype for p in trainer.model.parameters()},
        "optimizer_dtypes": {
            v.to_local().dtype for s in state.values() for k, v in s.items() if k != "step"
        },
        "reference_dtypes": {p.to_local().dtype for p in trainer.ref_model.parameters()},
        "full_dtypes": {tensor.dtype for _, tensor in full_state(trainer.model)},
    }
    with torch.no_grad():
        if rank == world_size - 1:
            trainer.model.pretrained_model.transformer.h[0].mlp.c_fc.bias.to_local().fill_(math.nan)
    try:
        check_finite_weights(trainer.model, "poisoned")
        results["poison_found"] = False
    except NonFiniteError as error:
        results["poison_found"] = "h.0.mlp.c_fc.bias" in str(error)
    if rank == 0:
        torch.save(results, out)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_bf16_keeps_float32_masters_and_learns(tiny_model_dir: Path, tmp_path: Path) -> None:
    results = spawn_ranks(2, tiny_model_dir, tmp_path / "bf16.pt", worker=run_bf16_rank)
    assert results["param_dtypes"] == {torch.float32}
    assert results["optimizer_dtypes"] == {torch.float32}
    assert results["reference_dtypes"] == {torch.bfloat16}
    assert results["full_dtypes"] == {torch.float32}
    before, after = results["preference"]
    assert after > before + 0.5, results["preference"]
    assert results["kl"][0] == 0.0  # policy and reference: the same bf16 weights at first
    assert all(math.isfinite(kl) for kl in results["kl"])
    assert results["poison_found"]  # a NaN in another rank's shard is found on rank 0

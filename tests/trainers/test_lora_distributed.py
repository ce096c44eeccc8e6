"""LoRA on a sharded learner (FSDP2 over 2 gloo ranks): the same adapter updates and stats as one
plain rank, merged weights equal to peft's merge of the gathered model, a checkpoint resumed on
one plain rank, and bfloat16 LoRA that learns. One spawn runs every scenario; tolerances are
test_distributed.py's (its docstring says how they were measured)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from test_distributed import (
    BATCH,
    TIMEOUT_S,
    UPDATE_ERROR,
    assert_same_stats,
    is_ppo,
    make_batch,
    spawn_ranks,
    train,
)
from test_distributed import CASES as DISTRIBUTED_CASES
from test_distributed import update_error as weights_update_error
from test_distributed_bf16 import fixed_batch, preference
from transformers import AutoModelForCausalLM

from rlfleet.checkpoint.load import load_checkpoint
from rlfleet.checkpoint.saver import save_checkpoint
from rlfleet.common.config import CriticFreeConfig, JobConfig, LearnerConfig, LoraConfig, PPOConfig
from rlfleet.learner.actor import load_trainer
from rlfleet.learner.registry import TRAINERS
from rlfleet.trainers.distributed import DataParallel, full_state, init_process_group
from rlfleet.trainers.lora import ADAPTER_DIR, BaseModelForward, check_lora_job, merged_state

LORA = LoraConfig(r=4, alpha=8.0)
CASES = ["ppo", "grpo", "grpo_micro", "dapo_checkpointed"]
"""test_distributed.py's cases of PPO (value head beside the adapters, reference in the rollout
forward), GRPO with a KL (reference logprobs from the adapters-disabled forward alone), with a
micro-batch token budget (dummy micro-batches), and with gradient checkpointing."""
JOB_STATE = {"dataset": {"epoch": 0, "position": 8}}
BF16_STEPS = 4


def lora_trainer(
    case: str,
    model_dir: str,
    parallel: DataParallel | None = None,
    dtype: str = "float32",
    lora: LoraConfig | None = LORA,
) -> Any:
    """The case's trainer as a LoRA job's learner loads it (``load_trainer``)."""
    torch.manual_seed(0)  # the value head's and the adapters' initial weights
    spec = DISTRIBUTED_CASES[case]["config"]
    if is_ppo(case):
        config: Any = PPOConfig(learning_rate=1e-3, seed=3, **spec)
    else:
        config = CriticFreeConfig(
            batch_size=BATCH, learning_rate=1e-3, max_completion_length=8, seed=3, **spec
        )
    layout = {key: value for key, value in DISTRIBUTED_CASES[case].items() if key != "config"}
    ranks = parallel.world_size if parallel else 1
    learner = LearnerConfig(num_ranks=ranks, dtype=dtype, **layout)
    algorithm = "ppo" if is_ppo(case) else config.algorithm
    return load_trainer(model_dir, TRAINERS[algorithm], config, False, learner, parallel, lora)


def trained(result: dict[str, Any]) -> dict[str, Any]:
    """Only the trained tensors (adapters, value head) of a ``train`` result."""
    keep = {name for name in result["weights"] if "lora_" in name or name.startswith("v_head.")}
    return {
        **result,
        "initial": {name: result["initial"][name] for name in keep},
        "weights": {name: result["weights"][name] for name in keep},
    }


def run_lora_rank(
    rank: int, world_size: int, port: int, model_dir: str, out: str, checkpoint_dir: str
) -> None:
    """One rank (spawned): each case trained for two steps, then for PPO the merged state, the
    gathered model, a checkpoint and a third step; then bfloat16 LoRA PPO on a fixed batch."""
    torch.set_num_threads(1)
    device = torch.device("cpu")
    init_process_group(rank, world_size, "127.0.0.1", port, device, timeout_s=TIMEOUT_S)
    parallel = DataParallel.current(device)
    results: dict[str, Any] = {}
    for case in reversed(CASES):
        trainer = lora_trainer(case, model_dir, parallel)
        results[case] = train(trainer, case)
    results["merged"] = {name: tensor.clone() for name, tensor in merged_state(trainer.policy)}
    results["step_dir"] = save_checkpoint(checkpoint_dir, 2, trainer, JOB_STATE, keep_last=1)
    results["third_step"] = trainer.step(**make_batch(2))
    results["after_third"] = {name: tensor.clone() for name, tensor in full_state(trainer.model)}
    results["bf16"] = bf16_preferences(model_dir, parallel)
    try:
        BaseModelForward(trainer.model)
        results["bare_model_refused"] = ""
    except ValueError as error:
        results["bare_model_refused"] = str(error)
    if rank == 0:
        torch.save(results, out)
    torch.distributed.destroy_process_group()


def bf16_preferences(model_dir: str, parallel: DataParallel) -> dict[str, Any]:
    """bfloat16 LoRA PPO on one fixed batch (a LoRA learning rate, ten times the full
    fine-tune's): the rewarded-minus-punished logprob gap before and after, the KLs."""
    trainer = lora_trainer("ppo", model_dir, parallel, dtype="bfloat16")
    for group in trainer.optimizer.param_groups:
        group["lr"] = 1e-2
    batch = fixed_batch()
    before = preference(trainer, batch)
    stats = [trainer.step(**batch) for _ in range(BF16_STEPS)]
    return {
        "preference": (before, preference(trainer, batch)),
        "kl": [s["objective/kl"] for s in stats],
        "trained_dtypes": {
            p.to_local().dtype for group in trainer.optimizer.param_groups for p in group["params"]
        },
    }


@pytest.fixture(scope="module")
def ranked(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("lora-ranks")
    return spawn_ranks(
        2, tiny_model_dir, out / "2.pt", str(out / "checkpoints"), worker=run_lora_rank
    )


def assert_same_adapter_training(actual: dict[str, Any], expected: dict[str, Any]) -> None:
    """The same adapter (and value head) updates and stats; the base weights untouched."""
    frozen = set(actual["initial"]) - set(trained(actual)["initial"])
    assert frozen and all(
        torch.equal(actual["weights"][name], actual["initial"][name]) for name in frozen
    )
    actual, expected = trained(actual), trained(expected)
    assert expected["weights"] and actual["weights"].keys() == expected["weights"].keys()
    torch.testing.assert_close(actual["initial"], expected["initial"], rtol=0, atol=0)
    assert weights_update_error(actual, expected) < UPDATE_ERROR
    for got, want in zip(actual["stats"], expected["stats"], strict=True):
        assert_same_stats(got, want)


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_two_ranks_train_the_adapters_as_one_plain_rank(
    case: str, ranked: dict[str, Any], tiny_model_dir: Path
) -> None:
    plain = train(lora_trainer(case, str(tiny_model_dir)), case)
    moved = max((plain["weights"][n] - plain["initial"][n]).abs().max() for n in plain["weights"])
    assert moved > 1e-4
    assert_same_adapter_training(ranked[case], plain)


@pytest.mark.slow
def test_the_merged_sharded_state_is_peft_merge_and_unload(
    ranked: dict[str, Any], tiny_model_dir: Path
) -> None:
    """The merged state gathered from 2 ranks equals peft's ``merge_and_unload`` of a model
    holding the gathered weights, and of the checkpoint's exported ``adapter/``."""
    gathered = ranked["ppo"]["weights"]
    peft_model = lora_trainer("ppo", str(tiny_model_dir)).model
    peft_model.load_state_dict(gathered)
    expected = dict(merged_state(peft_model))
    merged = {name.removeprefix("model."): t for name, t in ranked["merged"].items()}
    assert merged.keys() == expected.keys()
    torch.testing.assert_close(merged, expected, rtol=1e-6, atol=1e-7)

    step_dir = Path(ranked["step_dir"])
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    unloaded = PeftModel.from_pretrained(base, step_dir / ADAPTER_DIR).merge_and_unload()
    exported = AutoModelForCausalLM.from_pretrained(step_dir / "policy").state_dict()
    for name, tensor in unloaded.state_dict().items():
        torch.testing.assert_close(exported[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert max((merged[name] - base[name]).abs().max() for name in base) > 1e-4


@pytest.mark.slow
def test_a_sharded_lora_checkpoint_resumes_on_one_plain_rank(
    ranked: dict[str, Any], tiny_model_dir: Path
) -> None:
    """Adapters, value head and optimizer state saved by 2 ranks, loaded into a plain trainer:
    its next step is the 2 ranks' next step."""
    trainer = lora_trainer("ppo", str(tiny_model_dir))
    assert load_checkpoint(ranked["step_dir"], trainer) == JOB_STATE
    resumed = {name: tensor.clone() for name, tensor in full_state(trainer.model)}
    stats = trainer.step(**make_batch(2))
    after = dict(full_state(trainer.model))
    result = {"initial": resumed, "weights": after, "stats": [stats]}
    expected = {
        "initial": ranked["ppo"]["weights"],
        "weights": ranked["after_third"],
        "stats": [ranked["third_step"]],
    }
    assert_same_adapter_training(result, expected)


def test_a_ppo_policy_is_published_merged_under_the_plain_policy_names(
    tiny_model_dir: Path,
) -> None:
    """What a PPO learner publishes (``merged_state`` of its policy forward, whose state names
    differ from its modules' names): the plain policy forward's names, no adapter tensors, the
    adapted weights merged."""
    trainer = lora_trainer("ppo", str(tiny_model_dir))
    with torch.no_grad():
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.1)
    published = dict(merged_state(trainer.policy))
    plain = lora_trainer("ppo", str(tiny_model_dir), lora=None)
    assert list(published) == [name for name, _ in full_state(plain.policy)]
    merged = dict(merged_state(trainer.model.pretrained_model))
    assert all(torch.equal(published[f"model.{name}"], merged[name]) for name in merged)
    weight = "model.transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(published[weight], dict(full_state(plain.policy))[weight])


def test_a_sharded_bfloat16_lora_job_is_accepted(tiny_model_dir: Path) -> None:
    job = {
        "model": str(tiny_model_dir),
        "dataset": {"path": "unused.jsonl"},
        "reward": {"function": "rlfleet.reward.functions:sentiment"},
        "lora": {"r": 4},
        "learner": {"num_ranks": 2, "dtype": "bfloat16"},
    }
    check_lora_job(JobConfig.model_validate(job))


@pytest.mark.slow
def test_the_reference_of_a_sharded_model_needs_its_root(ranked: dict[str, Any]) -> None:
    """Given a sharded model instead of its policy's forward, the adapters-disabled reference is
    refused at once (its forward would miss the root's gathered embeddings)."""
    assert "pass the policy's ResponseForward" in ranked["bare_model_refused"]


@pytest.mark.slow
def test_bfloat16_lora_learns_with_float32_adapters(ranked: dict[str, Any]) -> None:
    results = ranked["bf16"]
    assert results["trained_dtypes"] == {torch.float32}
    before, after = results["preference"]
    assert after > before + 0.5, results["preference"]
    assert results["kl"][0] == 0.0  # adapters start as a no-op: the policy is its reference

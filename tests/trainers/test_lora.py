"""LoRA training (trainers/lora.py) with the real trainers, peft and checkpoints, in process."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from rlfleet.checkpoint.commit import MANIFEST, CheckpointError
from rlfleet.checkpoint.load import load_checkpoint
from rlfleet.checkpoint.saver import save_checkpoint
from rlfleet.common.config import CriticFreeConfig, JobConfig, LearnerConfig, LoraConfig, PPOConfig
from rlfleet.learner.actor import load_trainer
from rlfleet.learner.registry import TRAINERS
from rlfleet.trainers.forward import ResponseBatch, batch_logprobs
from rlfleet.trainers.lora import ADAPTER_DIR, check_lora_job, has_adapters, merged_state

BATCH = 4
GROUP_IDS = [0, 0, 1, 1]
LORA = LoraConfig(r=4, alpha=8.0)
JOB_STATE = {"dataset": {"epoch": 0, "position": 4}}


def rollouts(seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    queries = [torch.randint(1, 600, (5,), generator=generator) for _ in range(BATCH)]
    responses = [torch.randint(1, 600, (3 + i,), generator=generator) for i in range(BATCH)]
    scores = [torch.randn((), generator=generator) for _ in range(BATCH)]
    return queries, responses, scores


def ppo_trainer(model_dir: Path, lora: LoraConfig | None = LORA):
    torch.manual_seed(0)
    config = PPOConfig(batch_size=BATCH, mini_batch_size=2, ppo_epochs=2, seed=0)
    return load_trainer(str(model_dir), TRAINERS["ppo"], config, False, LearnerConfig(), None, lora)


def grpo_trainer(model_dir: Path, lora: LoraConfig | None = LORA):
    torch.manual_seed(0)
    config = CriticFreeConfig(batch_size=BATCH, mini_batch_size=2, num_iterations=2, beta=0.04)
    return load_trainer(
        str(model_dir), TRAINERS["grpo"], config, False, LearnerConfig(), None, lora
    )


def moved_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    """Random non-zero adapters, so that the adapted model differs from its base."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in model.state_dict().items()}


def base_model(model_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(model_dir).eval()


def test_the_reference_is_the_base_model_with_adapters_disabled_not_a_copy(
    tiny_model_dir: Path,
) -> None:
    trainer = grpo_trainer(tiny_model_dir)
    moved_adapters(trainer.model)
    queries, responses, _ = rollouts(0)
    batch = ResponseBatch.build(queries, responses, None)

    reference = batch_logprobs(trainer.reference, batch, BATCH)
    assert trainer.ref_model is None
    assert torch.equal(reference, batch_logprobs(base_model(tiny_model_dir), batch, BATCH))
    adapted = batch_logprobs(trainer.policy, batch, BATCH)
    assert not torch.allclose(adapted, reference)
    assert all(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_a_step_trains_only_the_adapters_and_the_value_head(
    tiny_model_dir: Path, algorithm: str
) -> None:
    trainer = ppo_trainer(tiny_model_dir) if algorithm == "ppo" else grpo_trainer(tiny_model_dir)
    before = snapshot(trainer.model)
    if algorithm == "ppo":
        trainer.step(*rollouts(0))
    else:
        trainer.step(*rollouts(0), GROUP_IDS)
    after = trainer.model.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}

    assert changed and all("lora_" in name or name.startswith("v_head.") for name in changed)
    assert any("lora_B" in name for name in changed)
    trained = [p for group in trainer.optimizer.param_groups for p in group["params"]]
    expected = [p for n, p in trainer.model.named_parameters() if "lora_" in n or "v_head" in n]
    assert {id(p) for p in trained} == {id(p) for p in expected}


def test_merged_weights_equal_peft_merge_and_unload(tiny_model_dir: Path, tmp_path: Path) -> None:
    trainer = ppo_trainer(tiny_model_dir)
    moved_adapters(trainer.model.pretrained_model)
    policy = trainer.model.pretrained_model
    before = snapshot(policy)
    merged = dict(merged_state(policy))
    save_checkpoint(str(tmp_path), 1, trainer, JOB_STATE, keep_last=1)

    peft_model = PeftModel.from_pretrained(
        base_model(tiny_model_dir), tmp_path / "step-00000001" / ADAPTER_DIR
    )
    expected = peft_model.merge_and_unload().state_dict()
    assert merged.keys() == expected.keys() == base_model(tiny_model_dir).state_dict().keys()
    assert [name for name in merged if not torch.equal(merged[name], expected[name])] == []
    assert all(torch.equal(before[name], policy.state_dict()[name]) for name in before)


def test_the_exported_policy_is_the_merged_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    trainer = grpo_trainer(tiny_model_dir)
    moved_adapters(trainer.model)
    step_dir = Path(save_checkpoint(str(tmp_path), 1, trainer, JOB_STATE, keep_last=1))

    exported = AutoModelForCausalLM.from_pretrained(step_dir / "policy").eval()
    learner_merged = base_model(tiny_model_dir)
    learner_merged.load_state_dict(dict(merged_state(trainer.model)))
    ids = torch.randint(1, 600, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = exported(ids).logits
        assert torch.equal(logits, learner_merged(ids).logits)
        assert torch.allclose(logits, trainer.model.eval()(ids).logits, atol=1e-5)
    assert not has_adapters(exported)


def test_a_lora_checkpoint_holds_the_adapters_and_resumes_exactly(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    trained = ppo_trainer(tiny_model_dir)
    trained.step(*rollouts(1))
    step_dir = Path(save_checkpoint(str(tmp_path), 1, trained, JOB_STATE, keep_last=1))
    manifest = json.loads((step_dir / MANIFEST).read_text())
    assert manifest["lora"] is True
    saved_model = json.loads((step_dir / "model.rank-00000-of-00001.json").read_text())
    assert all("lora_" in n or n.startswith("v_head.") for n in saved_model["tensors"])

    torch.manual_seed(7)  # other adapter and value-head initial weights: the load must set them
    fresh = ppo_trainer(tiny_model_dir)
    assert load_checkpoint(str(tmp_path), fresh) == JOB_STATE
    stats_a, stats_b = trained.step(*rollouts(2)), fresh.step(*rollouts(2))
    a, b = trained.model.state_dict(), fresh.model.state_dict()
    assert [name for name in a if not torch.equal(a[name], b[name])] == []
    assert stats_a["objective/kl"] == stats_b["objective/kl"]


def test_a_full_fine_tune_and_a_lora_job_refuse_each_others_checkpoints(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    save_checkpoint(str(tmp_path / "lora"), 1, grpo_trainer(tiny_model_dir), {}, keep_last=1)
    save_checkpoint(str(tmp_path / "full"), 1, grpo_trainer(tiny_model_dir, None), {}, keep_last=1)
    with pytest.raises(CheckpointError, match="holds LoRA adapters but this job trains the whole"):
        load_checkpoint(str(tmp_path / "lora"), grpo_trainer(tiny_model_dir, None))
    with pytest.raises(CheckpointError, match="holds the whole model but this job trains LoRA"):
        load_checkpoint(str(tmp_path / "full"), grpo_trainer(tiny_model_dir))


def lora_job(tiny_model_dir: Path, **learner: object) -> JobConfig:
    return JobConfig.model_validate(
        {
            "model": str(tiny_model_dir),
            "dataset": {"path": "unused.jsonl"},
            "reward": {"function": "rlfleet.reward.functions:sentiment"},
            "lora": {"r": 4},
            "learner": learner,
        }
    )


def test_a_lora_job_that_cannot_run_is_refused_in_one_line(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    check_lora_job(lora_job(tiny_model_dir))
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "peft" else find_spec(name)
    )
    with pytest.raises(ValueError, match=r"^lora: .*pip install rlfleet\[lora\]$") as refused:
        check_lora_job(lora_job(tiny_model_dir))
    assert "\n" not in str(refused.value)


def test_lora_needs_a_module_to_adapt() -> None:
    with pytest.raises(ValueError, match="target_modules: name at least one module"):
        LoraConfig(target_modules=[])

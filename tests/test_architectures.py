"""Every architecture of ``common.tiny_model.ARCHITECTURES`` end to end: vLLM (CPU build) serves
it and follows an in-place weight load exactly, a PPO and a GRPO step train it, and the
checkpoint's policy loads with ``AutoModelForCausalLM`` and gives the trained model's logits; a
head size vLLM's CPU build cannot serve is refused when the job starts.

One tiny model per architecture (hidden 64, 2 layers, 2 heads of 32, one key/value head where
the architecture groups them), shared by the tests of that architecture.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest
import torch
from actors.generator_reference import (
    PROMPTS,
    assert_same_completions,
    load_model,
    reference_greedy,
)
from support.batches import ppo_step_batch
from support.job_configs import small_job
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlfleet.actors.engine import SamplingSpec
from rlfleet.checkpoint.commit import step_dir_name
from rlfleet.checkpoint.export import POLICY_DIR, policy_of
from rlfleet.checkpoint.saver import save_checkpoint
from rlfleet.common.config import CriticFreeConfig, GeneratorConfig, PPOConfig
from rlfleet.job.checks import ConfigError
from rlfleet.job.data import checked_rows
from rlfleet.tasks.tiny_model import ARCHITECTURES, build_tiny_model
from rlfleet.trainers.critic_free import CriticFreeTrainer
from rlfleet.trainers.ppo import PPOTrainer
from rlfleet.trainers.value_head import AutoModelForCausalLMWithValueHead

BATCH = 4
MAX_NEW_TOKENS = 6


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """The tiny model of an architecture, built on first use and shared by the module."""

    @cache
    def build(architecture: str) -> Path:
        out_dir = tmp_path_factory.mktemp(architecture)
        return build_tiny_model(out_dir, architecture=architecture)

    return build


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_head_size_vllm_on_cpu_cannot_serve_is_refused_at_job_start(
    architecture: str, tmp_path: Path
) -> None:
    """vLLM's CPU build stops such a model at its first generation ("Unsupported CPU attention
    configuration"); the job refuses it before any actor starts and names the fallback."""
    model_dir = build_tiny_model(tmp_path / "m", architecture=architecture, n_head=4)
    with pytest.raises(
        ConfigError,
        match=r"^generators\.engine: .*: attention head size 16 is not served by vLLM on CPU "
        r"\(it serves 32, 64, .*\); use generators\.engine: hf$",
    ):
        checked_rows(small_job(model_dir, tmp_path / "run"))
    assert checked_rows(small_job(model_dir, tmp_path / "run", generators={"engine": "hf"}))


def perturbed(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """``model`` with seeded noise added to every parameter in place (tied ones once)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))
    return model


def random_batch(vocab_size: int, seed: int = 0):
    return ppo_step_batch(
        seed,
        BATCH,
        vocab=vocab_size,
        query_lengths=lambda i: 3 + i,
        response_lengths=lambda i: 2 + i,
        scores=[i % 2 for i in range(BATCH)],
    )


def ppo_trainer(model_dir: Path, tokenizer) -> PPOTrainer:
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
    config = PPOConfig(batch_size=BATCH, mini_batch_size=2, learning_rate=1e-3)
    return PPOTrainer(config, model, tokenizer=tokenizer)


def grpo_trainer(model_dir: Path, tokenizer) -> CriticFreeTrainer:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = CriticFreeConfig(algorithm="grpo", batch_size=BATCH, learning_rate=1e-3)
    return CriticFreeTrainer(config, model, tokenizer)


def step(trainer, queries, responses, scores) -> dict:
    if isinstance(trainer, PPOTrainer):
        return trainer.step(queries, responses, scores)
    return trainer.step(queries, responses, scores, group_ids=[0, 0, 1, 1])


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("make_trainer", [ppo_trainer, grpo_trainer], ids=["ppo", "grpo"])
def test_a_step_trains_and_the_checkpoint_loads_with_auto_model(
    model_dirs, architecture: str, tmp_path: Path, make_trainer
) -> None:
    model_dir = model_dirs(architecture)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    trainer = make_trainer(model_dir, tokenizer)
    policy = policy_of(trainer)
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    stats = step(trainer, *random_batch(policy.config.vocab_size))

    assert all(torch.isfinite(torch.as_tensor(value)).all() for value in stats.values())
    changed = [name for name, p in policy.named_parameters() if not torch.equal(p, before[name])]
    assert len(changed) == len(before)

    save_checkpoint(str(tmp_path / "ckpt"), 1, trainer, {}, keep_last=1)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt" / step_dir_name(1) / POLICY_DIR)
    ids = torch.tensor([PROMPTS[1]])
    with torch.no_grad():
        torch.testing.assert_close(
            loaded.eval()(ids).logits, policy.eval()(ids).logits, rtol=0, atol=0
        )


@pytest.mark.slow
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_vllm_follows_an_in_place_weight_load(
    model_dirs, architecture: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After loading perturbed weights, vLLM's greedy tokens and logprobs are transformers'
    on the same weights (and differ from the unperturbed model's, so the load took effect).

    The transformers models are built before vLLM starts, and these tests run after the
    training ones: vLLM 0.32 serves GPT-NeoX through its Transformers backend, which decorates
    the transformers model class in place, and that class then cannot be built outside vLLM
    in this process."""
    from rlfleet.actors.vllm_engine import VLLMEngine

    model_dir = model_dirs(architecture)
    original = reference_greedy(load_model(model_dir), PROMPTS, MAX_NEW_TOKENS)
    model = perturbed(load_model(model_dir))
    expected = reference_greedy(model, PROMPTS, MAX_NEW_TOKENS)
    assert [c.token_ids for c in expected] != [c.token_ids for c in original]

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    engine = VLLMEngine(model_dir, GeneratorConfig(kv_cache_gib=0.05), seed=0)

    engine.load_weights(model.state_dict().items())
    assert_same_completions(engine.generate(PROMPTS, SamplingSpec.greedy(MAX_NEW_TOKENS)), expected)

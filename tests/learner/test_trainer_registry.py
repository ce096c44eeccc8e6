"""learner/registry.py: every algorithm a job can name resolves, once, to the spec of its trainer;
the learner's settings carry that spec from the job config to the ranks."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import get_args

import pytest
from support.job_configs import small_job

from rlfleet import AutoModelForCausalLMWithValueHead, CriticFreeTrainer, PPOTrainer
from rlfleet.common.config import (
    TRAINER_SECTIONS,
    Algorithm,
    CriticFreeConfig,
    JobConfig,
    PPOConfig,
    WeightSyncConfig,
)
from rlfleet.learner.actor import LearnerSettings
from rlfleet.learner.registry import TRAINERS


def test_every_algorithm_a_job_can_name_has_a_trainer_in_its_section() -> None:
    assert set(TRAINERS) == set(get_args(Algorithm)) == set(TRAINER_SECTIONS)
    for name, spec in TRAINERS.items():
        assert spec.name == name
        assert JobConfig.model_fields[spec.section].annotation in (
            spec.config_type,
            spec.config_type | None,
        )
    ppo = TRAINERS["ppo"]
    assert (ppo.trainer, ppo.model_class, ppo.section) == (
        PPOTrainer,
        AutoModelForCausalLMWithValueHead,
        "ppo",
    )
    for name in ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"):
        assert (TRAINERS[name].trainer, TRAINERS[name].section) == (
            CriticFreeTrainer,
            "critic_free",
        )
    with pytest.raises(KeyError, match="unknown algorithm 'dpo'; known: grpo, ppo, "):
        TRAINERS["dpo"]


def test_the_settings_refuse_a_config_of_another_trainer_or_algorithm() -> None:
    with pytest.raises(ValueError, match="algorithm ppo trains with a PPOConfig .* CriticFreeCo"):
        LearnerSettings("model", "ppo", CriticFreeConfig())
    with pytest.raises(ValueError, match="algorithm rloo: its critic_free config names grpo"):
        LearnerSettings("model", "rloo", CriticFreeConfig(algorithm="grpo"))
    assert LearnerSettings("model", "rloo", CriticFreeConfig(algorithm="rloo")).trainer.name == (
        "rloo"
    )


def test_a_job_config_resolves_to_settings_whose_spec_travels_by_reference(
    tmp_path: Path,
) -> None:
    config = small_job(
        tmp_path,
        tmp_path / "run",
        algorithm="reinforce_pp",
        critic_free={"batch_size": 8},
        learner={"num_ranks": 2},
        placement="disaggregated",
    )
    sync = WeightSyncConfig()
    settings = LearnerSettings.from_job(config, sync)
    assert settings.trainer is TRAINERS["reinforce_pp"]
    assert settings.trainer_config is config.critic_free
    assert (settings.model_dir, settings.seed, settings.job_name) == (
        config.model,
        config.seed,
        config.name,
    )
    assert (settings.learner, settings.colocated, settings.weight_transport) == (
        config.learner,
        False,
        sync,
    )
    seeded = config.critic_free.model_copy(update={"seed": 7})
    assert LearnerSettings.from_job(config, sync, seeded).trainer_config.seed == 7
    copied = pickle.loads(pickle.dumps(settings))
    assert copied.trainer == settings.trainer and copied.trainer.trainer is CriticFreeTrainer
    ppo = LearnerSettings.from_job(small_job(tmp_path, tmp_path / "run"), sync)
    assert ppo.trainer is TRAINERS["ppo"] and isinstance(ppo.trainer_config, PPOConfig)

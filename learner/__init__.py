"""The learner: value-head model, PPO math and the TRL-style in-process API."""

from common.config import PPOConfig
from learner.trainer import PPOTrainer
from learner.value_head import AutoModelForCausalLMWithValueHead

__all__ = ["AutoModelForCausalLMWithValueHead", "PPOConfig", "PPOTrainer"]

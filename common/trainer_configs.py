"""The trainers' own configs, usable without a job: ``PPOConfig`` (every field and default of
TRL v0.11.4's) and ``CriticFreeConfig`` (TRL 1.16 ``GRPOConfig``'s names). A job config
(common/config.py) holds one of them as its ``ppo`` or ``critic_free`` section.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator


def _default_exp_name() -> str:
    """TRL's default: the script's file name minus its last three characters (``.py``)."""
    return os.path.basename(sys.argv[0] if sys.argv else "")[: -len(".py")]


STRICT_MODEL_CONFIG = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)
"""Every config model's settings, in one place: unknown keys are refused, assignments are
validated, and every float field refuses ``inf`` and ``nan`` (YAML's ``.inf`` and ``.nan``, in
the file or a ``--set``), whatever its bounds: ``gt=0`` refuses ``nan`` but not ``inf``."""

CorrectionMode = Literal["none", "token_tis", "seq_tis", "icepop", "seq_mis"]
CORRECTION_PARAMS: dict[str, tuple[str, ...]] = {
    "none": (),
    "token_tis": ("cap",),
    "seq_tis": ("cap",),
    "icepop": ("low", "high"),
    "seq_mis": ("low", "high", "aggregate", "cap"),
}
"""The parameters each mode reads (algorithms/corrections.py); any other one set is refused."""


class RolloutCorrectionConfig(BaseModel):
    """Off-policy correction between the generator's logprobs and the learner's old ones
    (algorithms/corrections.py, veRL 0.9.1's modes). A parameter left unset takes the mode's
    default: ``cap`` 2.0 (``seq_mis``: no IS weights), ``low``/``high`` 0.5/5.0 for ``icepop``
    and 0.5/2.0 for ``seq_mis``, ``aggregate`` ``product``."""

    model_config = STRICT_MODEL_CONFIG

    mode: CorrectionMode = "none"
    """``none``: the trainer's ``tis_cap`` decides (token TIS when set); ``token_tis``: weights
    ``min(rho_t, cap)``; ``seq_tis``: each row weighted by ``min(prod rho_t, cap)``; ``icepop``:
    tokens with ``rho_t`` outside ``[low, high]`` weighted 0; ``seq_mis``: rows whose sequence
    ratio is outside ``[low, high]`` leave the loss."""
    cap: PositiveFloat | None = None
    low: PositiveFloat | None = None
    """Lower bound of the ratio ``pi_old / pi_generator`` (``icepop``, ``seq_mis``)."""
    high: PositiveFloat | None = None
    aggregate: Literal["product", "geometric"] | None = None
    """``seq_mis``: the sequence ratio as the product of the token ratios or their geometric
    mean (length-normalised)."""

    @property
    def params(self) -> dict[str, Any]:
        """The parameters set, by name (what the correction function is called with)."""
        return {
            name: getattr(self, name)
            for name in CORRECTION_PARAMS[self.mode]
            if getattr(self, name) is not None
        }

    @model_validator(mode="after")
    def _check(self) -> RolloutCorrectionConfig:
        read = CORRECTION_PARAMS[self.mode]
        unread = [
            name
            for name in ("cap", "low", "high", "aggregate")
            if getattr(self, name) is not None and name not in read
        ]
        if unread:
            raise ValueError(f"rollout_correction mode {self.mode} does not read {unread}")
        if self.low is not None and self.high is not None and self.low > self.high:
            raise ValueError(f"rollout_correction: low ({self.low}) > high ({self.high})")
        return self


def resolved_correction(
    section: RolloutCorrectionConfig, tis_cap: float | None, tis_cap_set: bool
) -> tuple[str, dict[str, Any]]:
    """The one correction a trainer applies, ``(mode, params)``: the ``rollout_correction``
    section's, or, with its mode ``none``, token TIS at ``tis_cap`` (the key as it always worked)
    or nothing. ``tis_cap`` set explicitly beside another mode is refused (two corrections)."""
    if section.mode != "none":
        if tis_cap_set and tis_cap is not None:
            raise ValueError(
                f"tis_cap and rollout_correction (mode {section.mode}) both set: use one "
                "(tis_cap X is rollout_correction {mode: token_tis, cap: X})"
            )
        return section.mode, section.params
    if tis_cap is not None:
        return "token_tis", {"cap": tis_cap}
    return "none", {}


class PPOConfig(BaseModel):
    """Every field and default of TRL v0.11.4's ``PPOConfig``, validated.

    ``log_with``, ``tracker_kwargs``, ``tracker_project_name``, ``project_kwargs`` and ``exp_name``
    steer ``PPOTrainer.log_stats`` (trainers/trl_compat.py). Fields that only steered TRL's hub
    uploads or accelerate are kept so that existing scripts run unchanged; they have no effect.
    """

    model_config = STRICT_MODEL_CONFIG

    exp_name: str = Field(default_factory=_default_exp_name)
    seed: int = 0
    log_with: Literal["wandb", "tensorboard"] | None = None
    task_name: str | None = None
    model_name: str = "gpt2"
    query_dataset: str = "stanfordnlp/imdb"
    reward_model: str = "sentiment-analysis:lvwerra/distilbert-imdb"
    remove_unused_columns: bool = True
    tracker_kwargs: dict[str, Any] = Field(default_factory=dict)
    accelerator_kwargs: dict[str, Any] = Field(default_factory=dict)
    project_kwargs: dict[str, Any] = Field(default_factory=dict)
    tracker_project_name: str = "trl"
    push_to_hub_if_best_kwargs: dict[str, Any] = Field(default_factory=dict)
    steps: PositiveInt = 20000
    learning_rate: PositiveFloat = 1.41e-5
    adap_kl_ctrl: bool = True
    init_kl_coef: float = Field(default=0.2, ge=0)
    kl_penalty: Literal["kl", "abs", "mse", "full"] = "kl"
    target: PositiveFloat = 6.0
    horizon: PositiveFloat = 10000.0
    gamma: float = Field(default=1.0, ge=0, le=1)
    lam: float = Field(default=0.95, ge=0, le=1)
    cliprange: PositiveFloat = 0.2
    cliprange_value: PositiveFloat = 0.2
    vf_coef: float = Field(default=0.1, ge=0)
    batch_size: PositiveInt = 128
    forward_batch_size: PositiveInt | None = None
    mini_batch_size: PositiveInt = 128
    gradient_accumulation_steps: PositiveInt = 1
    world_size: PositiveInt | None = None
    ppo_epochs: PositiveInt = 4
    max_grad_norm: PositiveFloat | None = None
    optimize_cuda_cache: bool | None = None
    optimize_device_cache: bool = False
    early_stopping: bool = False
    target_kl: PositiveFloat = 1.0
    compare_steps: PositiveInt = 1
    ratio_threshold: PositiveFloat = 10.0
    use_score_scaling: bool = False
    use_score_norm: bool = False
    score_clip: PositiveFloat | None = None
    whiten_rewards: bool = False
    gradient_checkpointing: bool = False
    is_encoder_decoder: bool | None = None
    is_peft_model: bool | None = None
    dataset_num_proc: PositiveInt | None = None
    nonfinite: Literal["error", "skip"] = "error"
    """rlfleet's own: a non-finite loss or gradient fails the step naming it (``error``), or
    its optimizer step is skipped and counted (``skip``); see trainers/guards.py."""
    tis_cap: PositiveFloat | None = None
    """rlfleet's own, not a TRL field: truncated importance sampling between the learner's
    old-policy logprobs and the generator's (``step``'s ``behaviour_logprobs``): each token's
    policy loss is weighted by ``min(pi_old / pi_behaviour, tis_cap)``, e.g. 2.0, which corrects a
    stale generator (``one_step_off``) or its numerics. None: off, TRL v0.11.4's loss."""
    rollout_correction: RolloutCorrectionConfig = Field(default_factory=RolloutCorrectionConfig)
    """rlfleet's own: another off-policy correction than ``tis_cap``'s (sequence-level TIS,
    IcePop, sequence masking); mode ``none`` leaves ``tis_cap`` in charge."""

    @property
    def correction(self) -> tuple[str, dict[str, Any]]:
        """The correction the trainer applies, ``(mode, params)`` (``resolved_correction``)."""
        return resolved_correction(
            self.rollout_correction, self.tis_cap, "tis_cap" in self.model_fields_set
        )

    @property
    def backward_batch_size(self) -> int:
        """Samples per optimizer step: ``mini_batch_size * gradient_accumulation_steps``."""
        return self.mini_batch_size * self.gradient_accumulation_steps

    @property
    def global_backward_batch_size(self) -> int:
        return self.backward_batch_size * (self.world_size or 1)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * (self.world_size or 1)

    @property
    def total_ppo_epochs(self) -> int:
        return -(-self.steps // self.batch_size)

    def to_dict(self) -> dict[str, Any]:
        """The fields plus the derived batch sizes, nested dicts flattened with ``/`` as in TRL."""
        derived = ("backward_batch_size", "global_backward_batch_size", "global_batch_size")
        values = {**self.model_dump(), **{name: getattr(self, name) for name in derived}}
        values["total_ppo_epochs"] = self.total_ppo_epochs
        flat: dict[str, Any] = {}
        while values:
            key, value = values.popitem()
            if isinstance(value, dict):
                values.update({f"{key}/{inner}": item for inner, item in value.items()})
            else:
                flat[key] = value
        return dict(sorted(flat.items()))

    @model_validator(mode="before")
    @classmethod
    def _forward_batch_size_sets_mini_batch_size(cls, data: Any) -> Any:
        """TRL's deprecated ``forward_batch_size`` overrides ``mini_batch_size`` when given."""
        if isinstance(data, dict) and data.get("forward_batch_size") is not None:
            data = {**data, "mini_batch_size": data["forward_batch_size"]}
        return data

    @model_validator(mode="after")
    def _check_batch_sizes(self) -> PPOConfig:
        if self.batch_size % self.backward_batch_size:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size "
                f"({self.mini_batch_size}) * gradient_accumulation_steps "
                f"({self.gradient_accumulation_steps})"
            )
        _ = self.correction  # refuses tis_cap beside another correction now, not in the learner
        return self


CriticFreeAlgorithm = Literal["grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]
REWARD_KL_COEF_DEFAULTS = {"reinforce_pp": 0.01}
"""``kl_coef`` when not given: REINFORCE++ puts its KL in the reward (OpenRLHF's
``init_kl_coef``); the other algorithms default to none there."""


class CriticFreeConfig(BaseModel):
    """The critic-free trainer (trainers/critic_free.py): GRPO, RLOO, REINFORCE++ and
    REINFORCE++-baseline, with TRL 1.16 ``GRPOConfig``'s names and defaults where it has them.

    Batch sizes count samples (completions), not prompts: a step takes ``batch_size`` samples,
    the samples of one prompt sharing a group id. The KL to the reference enters the loss with
    ``beta`` (GRPO's k3 term) and the reward with ``kl_coef`` (REINFORCE++'s per-token penalty);
    with both 0 no reference model exists.
    """

    model_config = STRICT_MODEL_CONFIG

    algorithm: CriticFreeAlgorithm = "grpo"
    """The advantage estimator (algorithms/advantages.py)."""
    learning_rate: PositiveFloat = 1e-6
    batch_size: PositiveInt = 64
    """Samples per ``step``."""
    mini_batch_size: PositiveInt | None = None
    """Samples per optimizer step; None: the whole batch (one optimizer step per iteration)."""
    num_iterations: PositiveInt = 1
    """Passes over each batch (GRPO's mu)."""
    beta: float = Field(default=0.0, ge=0)
    """Weight of the k3 KL to the reference in the loss."""
    use_bias_correction_kl: bool = True
    """Multiply the loss's KL term by the importance ratio (TRL 1.16's default)."""
    kl_coef: float = Field(default=0.0, ge=0)
    """Weight of the per-token KL penalty in the reward, ``r_t = -kl_coef * KL_t`` (REINFORCE++);
    when not given, ``REWARD_KL_COEF_DEFAULTS`` by algorithm, else 0."""
    kl_penalty: Literal["kl", "abs", "mse", "k3"] = "kl"
    """The estimator of the reward's KL penalty (algorithms/kl.py)."""
    gamma: float = Field(default=1.0, ge=0, le=1)
    """REINFORCE++'s discount of the per-token rewards."""
    epsilon: PositiveFloat = 0.2
    epsilon_high: PositiveFloat | None = None
    """The upper clip of the ratio, ``1 + epsilon_high`` (DAPO's clip-higher); None: epsilon."""
    loss_type: Literal["grpo", "bnpo", "dr_grpo", "dapo"] = "dapo"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    normalize_advantages: bool = False
    """RLOO: normalise the advantages over the batch (TRL 1.16 ``RLOOConfig``'s name)."""
    importance_sampling_level: Literal["token", "sequence"] = "token"
    mask_truncated_completions: bool = False
    """Truncated samples (no EOS) count in their group's statistics but not in the loss."""
    max_completion_length: PositiveInt | None = 512
    """The longest response a step accepts; ``dr_grpo``'s loss divides by it."""
    max_grad_norm: PositiveFloat | None = 1.0
    tis_cap: PositiveFloat | None = 2.0
    """Truncated importance sampling between the learner's old-policy logprobs and the
    generator's: each token's loss is weighted by ``min(pi_old / pi_behaviour, tis_cap)`` when
    ``step`` gets behaviour logprobs; None: off."""
    rollout_correction: RolloutCorrectionConfig = Field(default_factory=RolloutCorrectionConfig)
    """Another off-policy correction than ``tis_cap``'s (sequence-level TIS, IcePop, sequence
    masking); mode ``none`` leaves ``tis_cap`` in charge, another mode replaces it."""
    seed: int = 42
    """Seeds the order of the minibatches."""

    @property
    def uses_reference(self) -> bool:
        """Whether the loss or the reward measures a KL to a reference model."""
        return self.beta > 0 or self.kl_coef > 0

    @property
    def optimizer_batch_size(self) -> int:
        return self.mini_batch_size or self.batch_size

    @property
    def correction(self) -> tuple[str, dict[str, Any]]:
        """The correction the trainer applies, ``(mode, params)`` (``resolved_correction``)."""
        return resolved_correction(
            self.rollout_correction, self.tis_cap, "tis_cap" in self.model_fields_set
        )

    @model_validator(mode="before")
    @classmethod
    def _kl_coef_defaults_by_algorithm(cls, data: Any) -> Any:
        if isinstance(data, dict) and "kl_coef" not in data:
            default = REWARD_KL_COEF_DEFAULTS.get(data.get("algorithm", "grpo"), 0.0)
            data = {**data, "kl_coef": default}
        return data

    @model_validator(mode="after")
    def _check(self) -> CriticFreeConfig:
        if self.batch_size % self.optimizer_batch_size:
            raise ValueError(
                f"mini_batch_size ({self.mini_batch_size}) must divide batch_size "
                f"({self.batch_size})"
            )
        if self.loss_type == "dr_grpo" and self.max_completion_length is None:
            raise ValueError("loss_type dr_grpo divides by max_completion_length: set it")
        _ = self.correction  # refuses tis_cap beside another correction now, not in the learner
        return self

"""Every configuration a job reads, as pydantic models: the job config and its sections (the
trainers' own configs are in common/trainer_configs.py; the YAML file and ``--set`` overrides are
read by common/config_file.py).

A bad value raises ``pydantic.ValidationError`` (a ``ValueError``) whose message names the field
and, for choices, the allowed values. Job configs reject unknown keys so a typo fails before any
actor starts.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, Field, PositiveFloat, PositiveInt, model_validator

from rlfleet.common.env_config import EnvConfig
from rlfleet.common.sampling_config import DynamicSamplingConfig, OverlongPenaltyConfig
from rlfleet.common.trainer_configs import (
    REWARD_KL_COEF_DEFAULTS,
    STRICT_MODEL_CONFIG,
    CriticFreeAlgorithm,
    CriticFreeConfig,
    PPOConfig,
)

__all__ = [
    "CriticFreeAlgorithm",
    "CriticFreeConfig",
    "EnvConfig",
    "PPOConfig",
    "REWARD_KL_COEF_DEFAULTS",
]
"""Re-exported: a job's ``ppo`` and ``critic_free`` sections."""


class StrictModel(BaseModel):
    model_config = STRICT_MODEL_CONFIG


class DatasetConfig(StrictModel):
    path: str
    """A JSONL or Parquet file of prompts."""
    prompt_field: str = "prompt"
    """The field of each row holding the prompt as text (unused with ``messages_field``)."""
    messages_field: str | None = None
    """A field of OpenAI-style message lists (``[{"role": "user", "content": "..."}]``) to
    render with the tokenizer's chat template, the assistant's turn opened, as each prompt;
    None: the prompts are the text of ``prompt_field``. Reward functions get each sample's
    conversation (system prompt included) as the keyword argument ``messages``."""
    system_prompt: str | None = None
    """With ``messages_field``: a system message put first in each conversation that does not
    open with its own."""
    shuffle: bool = True

    @model_validator(mode="after")
    def _system_prompt_needs_messages(self) -> DatasetConfig:
        if self.system_prompt is not None and self.messages_field is None:
            raise ValueError(
                "dataset.system_prompt needs dataset.messages_field (a field of chat messages); "
                "with text prompts, write the system prompt into the prompts"
            )
        return self


class GeneratorConfig(StrictModel):
    num_actors: PositiveInt = 1
    engine: Literal["vllm", "hf"] = "vllm"
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    max_new_tokens: PositiveInt = 16
    temperature: float = Field(default=1.0, ge=0)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    """0 disables top-k sampling."""
    kv_cache_gib: PositiveFloat = 0.25
    """vLLM CPU KV-cache size (VLLM_CPU_KVCACHE_SPACE); ignored on GPUs and by the hf engine."""
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    """Fraction of a GPU's memory vLLM may take; lower it when generators share a GPU."""
    n_samples_per_prompt: PositiveInt = 1
    """Samples per prompt (the group size): each gets its own rollout id and seed, and all of
    them share the prompt's group id."""
    dtype: Dtype | None = None
    """The engine's dtype; None: the learner's (``learner.dtype``)."""
    cache_dir: str | None = "~/.cache/rlfleet"
    """Where the vLLM engine keeps the kernels torch inductor compiles for its sampler (in
    ``torchinductor/``; on GPUs, on CPU it compiles none), so that later jobs on the machine
    load them instead of compiling again; None: torch's default, in the temp dir. An inductor
    cache named by ``TORCHINDUCTOR_CACHE_DIR`` wins."""
    tensor_parallel_size: PositiveInt = 1
    """The vLLM engine's tensor-parallel size: each generator's engine runs this many workers
    (one GPU each on GPUs: ``num_gpus`` is then this size), and every one of them receives the
    new weights."""
    timeout_s: PositiveFloat = 120.0
    """A generator's deadline for one shard to sample: ``timeout_s`` plus 0.01 s for each token it
    may sample (its rows x ``max_new_tokens``), counted from when the shard is sent (after any
    call queued before it). A generator past it is taken for dead (stalled, e.g. stopped): it is
    killed, restarted, and its shard is sent again. ``sleep`` and ``wake_up`` have ``timeout_s``;
    a weight load has ``weight_sync.timeout_s``."""

    @model_validator(mode="after")
    def _tensor_parallel_engine(self) -> GeneratorConfig:
        size = self.tensor_parallel_size
        if size > 1 and self.engine != "vllm":
            raise ValueError(
                f"generators.tensor_parallel_size {size} needs generators.engine: vllm "
                f"(the {self.engine} engine runs one worker)"
            )
        if size > 1 and self.num_gpus > 0 and self.num_gpus != size:
            raise ValueError(
                f"generators.num_gpus is {self.num_gpus:g} but tensor_parallel_size is {size}: "
                "each tensor-parallel worker takes one GPU, so set num_gpus to the same number"
            )
        return self


REWARD_SOURCES = ("function", "model", "url")


def _check_one_source(where: str, config: BaseModel, choices: tuple[str, ...]) -> None:
    given = [name for name in choices if getattr(config, name)]
    if len(given) != 1:
        named = f"{', '.join(choices[:-1])} or {choices[-1]}"
        raise ValueError(f"{where} needs exactly one of {named}; got {given or 'none'}")


class RewardComponent(StrictModel):
    """One named term of a reward of several: its own source and kwargs, and its weight."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Names the component's stats key (``reward/<name>_mean``) and its metrics label."""
    weight: float = Field(default=1.0, allow_inf_nan=False)
    function: str | None = None
    model: str | None = None
    url: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _exactly_one_source(self) -> RewardComponent:
        _check_one_source(f"reward component {self.name!r}", self, REWARD_SOURCES)
        return self


class RewardConfig(StrictModel):
    """The reward: one source (``function``, ``model`` or ``url``), or ``components``, whose
    weighted sum is the score and whose raw scores are kept in the ``score_components`` column."""

    function: str | None = None
    """A reward function as ``"module:function"``, e.g. ``"rlfleet.reward.functions:sentiment"``."""
    model: str | None = None
    """A sequence-classification model directory."""
    url: str | None = None
    """A remote HTTP scorer."""
    components: list[RewardComponent] | None = Field(default=None, min_length=1)
    """Named, weighted reward sources, e.g. correctness and format."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    num_actors: PositiveInt = 1
    num_cpus: float = Field(default=1.0, ge=0)
    num_gpus: float = Field(default=0.0, ge=0)
    timeout_s: PositiveFloat = 30.0
    """Bounds each call of a reward source. A reward actor that has not scored its shard within
    ``timeout_s`` (once per component) plus 30 s is taken for dead (stalled, e.g. stopped): it is
    killed, restarted, and its shard is sent again."""

    @model_validator(mode="after")
    def _exactly_one_source(self) -> RewardConfig:
        _check_one_source("reward", self, (*REWARD_SOURCES, "components"))
        if self.components:
            names = [component.name for component in self.components]
            repeated = sorted({name for name in names if names.count(name) > 1})
            if repeated:
                raise ValueError(f"reward.components: names {repeated} are used more than once")
            if self.kwargs:
                raise ValueError(
                    "reward.kwargs is not used with reward.components; give each component "
                    "its own kwargs"
                )
        return self


Dtype = Literal["float32", "bfloat16"]


class LearnerConfig(StrictModel):
    """The learner: ``num_ranks`` rank actors in one placement group and one
    ``torch.distributed`` group (nccl on GPUs, gloo on CPU), the models sharded across them
    with FSDP2; ``num_cpus`` and ``num_gpus`` are per rank."""

    num_ranks: PositiveInt = 1
    num_cpus: float | None = Field(default=None, ge=0)
    """CPUs per rank that Ray reserves; torch uses as many threads (at least one). None: Ray
    reserves one per rank, and torch uses the node's cores shared among the ranks on it when
    ``placement`` is colocated (the generators are idle while the learner trains), one thread
    when disaggregated."""
    num_gpus: float = Field(default=0.0, ge=0, le=1)
    """GPUs per rank (at most 1: a rank trains on one device; more GPUs, more ranks)."""
    dtype: Dtype = "float32"
    """Parameters and activations; bfloat16 keeps float32 master weights, optimizer state,
    gradient reductions, logits and log-softmax."""
    gradient_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward pass (less memory)."""
    max_tokens_per_microbatch: PositiveInt | None = None
    """Split each rank's share of a minibatch into micro-batches of at most this many (padded)
    tokens; None: one micro-batch per minibatch share."""
    timeout_s: PositiveFloat = 600.0
    """Deadline of the learner ranks' collectives, and (plus a minute) of the driver's wait for
    each call to the ranks: start-up, a step, a weight publication, a checkpoint. A dead or
    stalled rank fails the call naming it; raise it for steps that take longer."""
    liveness_timeout_s: PositiveFloat = 60.0
    """While a call to the ranks is outstanding (a step may rightly take ``timeout_s``), each
    rank is asked every few seconds whether it is alive, on a thread of its own; a rank that
    does not answer within ``liveness_timeout_s`` (stopped, or its process frozen) fails the
    call at once, and the learner is restarted as for a dead rank."""
    max_restarts: int = Field(default=3, ge=0)
    """Times the job restarts the learner after a rank died or stalled: the new ranks restore
    the latest checkpoint this run saved or resumed from (the model directory when there is
    none), and the iterations after it are sampled and trained again. One failure more ends the
    job."""

    @property
    def cpus_per_rank(self) -> float:
        """The CPUs Ray reserves for each rank: ``num_cpus``, else one."""
        return 1.0 if self.num_cpus is None else self.num_cpus

    @model_validator(mode="after")
    def _check_rank_resources(self) -> LearnerConfig:
        if self.num_cpus == 0 and self.num_gpus == 0:
            raise ValueError(
                "learner: a rank with num_cpus 0 and num_gpus 0 has nothing to run on; give it "
                "CPUs (or leave num_cpus unset) or a GPU"
            )
        return self


class WeightSyncConfig(StrictModel):
    """How new weights reach the generators: through Ray's object store, or a collective
    group (nccl on GPUs, gloo on CPU) of the learner's rank 0 and every generator."""

    transport: Literal["object_store", "collective", "auto"] = "auto"
    """auto: collective when the learner and the generators are on GPUs, else object_store."""
    bucket_mb: PositiveFloat = 256.0
    """Tensors travel packed in buckets of at most this size."""
    timeout_s: PositiveFloat = 120.0
    """A sync not finished by then fails, naming the generator that did not answer. Through the
    object store, a generator that has not loaded the weights by then (counted from when any
    call queued before the load is due) is killed and restarted, and loads them anew."""


class CheckpointConfig(StrictModel):
    uri: str | None = None
    """A local path, ``file://...`` or ``s3://bucket/prefix``; None disables checkpoints."""
    every: int = Field(default=0, ge=0)
    """Save every N iterations (0: only at the end)."""
    keep_last: PositiveInt = 3
    resume: Literal["auto", "never"] = "auto"
    """auto: ``rlfleet train`` continues from the latest committed checkpoint under ``uri``
    when there is one (it must be this job's: same name, algorithm and model); never: start
    from the model directory whatever ``uri`` holds. ``--resume-from`` names one explicitly."""
    s3_endpoint_override: str | None = None
    """For S3-compatible stores, e.g. ``http://127.0.0.1:8333``; else AWS_ENDPOINT_URL or AWS."""
    local_copy_dir: str | None = "~/.cache/rlfleet/checkpoints"
    """With a remote ``uri``: where each learner node keeps a copy of the newest checkpoint it
    saved (one directory per ``uri``); a restarted learner reads the files of that copy that
    match the manifest and downloads only the others. None: no local copy."""


class MetricsConfig(StrictModel):
    enabled: bool = True
    host: str = "127.0.0.1"
    """Address the actors' metrics endpoints bind to (0.0.0.0 on multi-node clusters)."""
    file_sd_dir: str = "/tmp/rlfleet/prometheus"
    """Where the job writes its Prometheus file_sd targets (read by deploy/prometheus/*.yml)."""


class EvalConfig(StrictModel):
    """Held-out evaluation: before the first iteration and every ``every`` iterations the
    generators answer the eval prompts with the current policy, the answers are scored, and
    ``eval/*`` goes into stats.jsonl, the trackers and Prometheus. Its sampling seeds are its
    own, so training's random streams (and exact resume) are untouched."""

    dataset: DatasetConfig
    """The held-out prompts (same fields as the training dataset; ``shuffle`` is ignored: the
    first ``max_samples`` rows are used, in file order)."""
    every: PositiveInt = 10
    """Evaluate after every ``every``-th iteration (and after the last one)."""
    at_start: bool = True
    """Also evaluate the initial policy, before the first iteration (recorded as iteration 0)."""
    max_samples: PositiveInt | None = 64
    """Prompts evaluated each time (the first ones of the file); None: all of them."""
    temperature: float = Field(default=0.0, ge=0)
    """0 is greedy decoding."""
    n: PositiveInt = 1
    """Samples per eval prompt (with temperature > 0: mean and pass@n style stats)."""
    max_new_tokens: PositiveInt | None = None
    """None: ``generators.max_new_tokens``."""
    reward: RewardConfig | None = None
    """A separate eval reward (its own reward actors); None: the job's reward."""

    @model_validator(mode="after")
    def _check_samples_differ(self) -> EvalConfig:
        if self.n > 1 and self.temperature == 0:
            raise ValueError(
                f"eval.n is {self.n} but eval.temperature is 0: greedy decoding answers a "
                "prompt the same way every time; set eval.temperature > 0 or eval.n to 1"
            )
        return self


class LoraConfig(StrictModel):
    """Train LoRA adapters (peft) instead of the whole policy: the reference is the base model
    with the adapters disabled (no second copy), the generators receive merged weights, and
    checkpoints hold the adapters and export merged weights."""

    r: PositiveInt = 8
    alpha: PositiveFloat = 16.0
    dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names (or suffixes) to adapt, as peft's ``target_modules``; all-linear: every
    linear layer but the LM head."""

    @model_validator(mode="after")
    def _check_target_modules(self) -> LoraConfig:
        if not self.target_modules:
            raise ValueError("target_modules: name at least one module, or all-linear")
        return self


class WandbConfig(StrictModel):
    """A W&B run per driver (a resumed job starts a new one), named after the job, with the job's
    config."""

    project: str = Field(min_length=1)
    mode: Literal["online", "offline", "disabled"] = "offline"
    """offline writes the run under ``dir`` for a later ``wandb sync``."""
    entity: str | None = None
    dir: str | None = None
    """Where wandb writes its files; None: ``output_dir``."""


class LoggingConfig(StrictModel):
    """What the job records besides stats.jsonl and Prometheus (the live view)."""

    samples_per_iteration: int = Field(default=4, ge=0)
    """Prompts, responses and rewards of this many rollouts of each iteration go into
    ``output_dir/samples.jsonl`` (0: none): those with the lowest rollout ids."""
    tensorboard: str | None = Field(default=None, min_length=1)
    """A directory for TensorBoard event files with the stats.jsonl scalars (step: the
    iteration)."""
    wandb: WandbConfig | None = None
    """A Weights & Biases run with the stats.jsonl scalars (``pip install rlfleet[trackers]``)."""


Placement = Literal["colocated", "disaggregated"]

Algorithm = Literal["ppo", "grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline"]
TRAINER_SECTIONS: dict[str, str] = {
    "ppo": "ppo",
    **dict.fromkeys(get_args(CriticFreeAlgorithm), "critic_free"),
}
"""Each algorithm's trainer section of a job config (its trainer's config). The learner resolves
the algorithm to its trainer once, from the job config (learner/registry.py)."""
GROUPED_ALGORITHMS = ("grpo", "rloo", "reinforce_pp_baseline")
"""The algorithms whose baseline is the other samples of a prompt: groups of two or more."""


class JobConfig(StrictModel):
    """A distributed job. ``algorithm`` picks the learner's trainer: ``ppo`` (the ``ppo``
    section, trainers/ppo.py) or a critic-free one (the ``critic_free`` section,
    trainers/critic_free.py).

    Batch sizes count samples (rollouts), never prompts: an iteration trains on
    ``ppo.batch_size`` (or ``critic_free.batch_size``) samples, which are
    ``batch_size / generators.n_samples_per_prompt`` prompts (``prompts_per_iteration``).
    """

    name: str = "rlfleet"
    algorithm: Algorithm = "ppo"
    """ppo, or a critic-free algorithm (GRPO, RLOO, REINFORCE++, REINFORCE++-baseline)."""
    model: str
    """A Hugging Face model directory (causal LM + tokenizer)."""
    dataset: DatasetConfig
    generators: GeneratorConfig = Field(default_factory=GeneratorConfig)
    reward: RewardConfig
    env: EnvConfig | None = None
    """Multi-turn trajectories against an environment or tools (None: one completion per
    prompt)."""
    learner: LearnerConfig = Field(default_factory=LearnerConfig)
    placement: Placement = "colocated"
    """Where generators run relative to the learner. colocated: they share its cores or GPUs
    and take turns (the loop is synchronous): on CPUs the learner's torch threads use the
    node's cores (``learner.num_cpus`` unset); on GPUs generator i shares learner rank
    ``i % num_ranks``'s GPU and its vLLM engine sleeps (frees its memory) while the learner
    trains. disaggregated: every actor keeps the resources it asks for (clusters, and
    ``one_step_off`` on GPUs)."""
    weight_sync: WeightSyncConfig = Field(default_factory=WeightSyncConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    critic_free: CriticFreeConfig | None = None
    """The critic-free trainer's settings (only when ``algorithm`` is not ppo; its
    ``algorithm`` is the job's)."""
    iterations: PositiveInt = 10
    seed: int = Field(default=0, ge=0)
    output_dir: str = "runs/rlfleet"
    max_policy_lag: int = Field(default=0, ge=0)
    """Policy versions a generator may lag behind the learner (0: strictly on-policy)."""
    one_step_off: bool = False
    """Generate batch k+1 while training on batch k (needs max_policy_lag >= 1)."""
    dynamic_sampling: DynamicSamplingConfig | None = None
    """DAPO's dynamic sampling (None: off): groups that all scored alike are dropped and more
    prompts sampled to fill the batch."""
    overlong_penalty: OverlongPenaltyConfig | None = None
    """DAPO's soft overlong punishment added to the scores (None: off)."""
    mode: Literal["sync", "async"] = "sync"
    """``sync``: each batch is sampled, scored and trained on in turn (exact; the default).
    ``async``: the generators sample ``max_policy_lag`` batches ahead of the learner and load
    each new policy as soon as it is published, between two engine steps: a request in flight
    goes on under the new weights from its prefix, each token recording the version that
    sampled it (``token_versions``), so no sample is more than ``max_policy_lag`` versions
    behind the learner that trains on it and none is thrown away."""
    ray_address: str | None = None
    """None: join the cluster of a submitted job, else start a local Ray instance."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    eval: EvalConfig | None = None
    """Held-out evaluation (None: none)."""
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    lora: LoraConfig | None = None
    """Train LoRA adapters instead of the full policy (None: full fine-tuning)."""
    trust_remote_code: bool = False
    """Let the model directories' own Python code run when they load (off unless set)."""

    @property
    def trainer_config(self) -> PPOConfig | CriticFreeConfig:
        """The learner trainer's config: ``ppo`` or ``critic_free``, as ``algorithm`` says."""
        return getattr(self, self.trainer_section)

    @property
    def trainer_section(self) -> str:
        """The section of ``trainer_config``: ``TRAINER_SECTIONS[algorithm]``."""
        return TRAINER_SECTIONS[self.algorithm]

    @property
    def generator_dtype(self) -> str:
        """The generators' engine dtype: ``generators.dtype``, else ``learner.dtype``."""
        return self.generators.dtype or self.learner.dtype

    @property
    def colocated_on_gpus(self) -> bool:
        """Whether generators share the learner's GPUs and sleep while it trains."""
        on_gpus = self.learner.num_gpus > 0 and self.generators.num_gpus > 0
        return self.placement == "colocated" and on_gpus

    @property
    def generators_per_learner_gpu(self) -> int:
        """Generators that share one learner rank's GPU when colocated on GPUs."""
        return -(-self.generators.num_actors // self.learner.num_ranks)

    @property
    def batch_key(self) -> str:
        """The key of the batch size, for messages: ``ppo.batch_size`` or
        ``critic_free.batch_size``."""
        return f"{self.trainer_section}.batch_size"

    @property
    def samples_per_iteration(self) -> int:
        return self.trainer_config.batch_size

    @property
    def prompts_per_iteration(self) -> int:
        return self.samples_per_iteration // self.generators.n_samples_per_prompt

    @model_validator(mode="before")
    @classmethod
    def _critic_free_algorithm_is_the_jobs(cls, data: Any) -> Any:
        """A critic-free job's ``critic_free`` section takes the job's ``algorithm`` (before it
        validates: its ``kl_coef`` default depends on it); a different one is refused."""
        if not isinstance(data, dict) or data.get("algorithm", "ppo") == "ppo":
            return data
        algorithm = data["algorithm"]
        section = data.get("critic_free")
        if isinstance(section, CriticFreeConfig):
            section = section.model_dump(exclude_unset=True)
        section = dict(section or {})
        if section.setdefault("algorithm", algorithm) != algorithm:
            raise ValueError(
                f"critic_free.algorithm: {section['algorithm']!r} differs from algorithm "
                f"{algorithm!r}; set the algorithm once, at the top level"
            )
        return {**data, "critic_free": section}

    @model_validator(mode="after")
    def _check(self) -> JobConfig:
        if self.one_step_off and self.max_policy_lag < 1:
            raise ValueError("one_step_off needs max_policy_lag >= 1")
        self._check_sampling_control()
        if self.mode == "async" and (self.max_policy_lag < 1 or self.one_step_off):
            raise ValueError(
                "mode: async samples max_policy_lag batches ahead of the learner: set "
                "max_policy_lag >= 1 (and drop one_step_off, which async mode replaces)"
            )
        if self.algorithm == "ppo" and self.critic_free is not None:
            raise ValueError(
                "critic_free: a section for critic-free algorithms, but algorithm is ppo; "
                "set algorithm (grpo, rloo, reinforce_pp, reinforce_pp_baseline) or drop it"
            )
        if self.algorithm != "ppo" and self.ppo.model_fields_set:
            raise ValueError(
                f"ppo: algorithm {self.algorithm} trains with the critic_free section; move "
                f"{sorted(self.ppo.model_fields_set)} there (TRL's GRPOConfig names) or drop them"
            )
        if self.critic_free is not None:
            self._check_completion_length(self.critic_free)
        if self.colocated_on_gpus:
            self._check_gpu_colocation()
        samples = self.generators.n_samples_per_prompt
        if self.samples_per_iteration % samples:
            raise ValueError(
                f"{self.batch_key} ({self.samples_per_iteration}) must be a multiple of "
                f"generators.n_samples_per_prompt ({samples}): batch sizes count samples, and "
                "each prompt gives n_samples_per_prompt of them"
            )
        if self.algorithm in GROUPED_ALGORITHMS and samples < 2:
            raise ValueError(
                f"generators.n_samples_per_prompt: {self.algorithm} compares each sample with "
                f"the others of its prompt; it needs at least 2, got {samples}"
            )
        return self

    @model_validator(mode="after")
    def _check_group_samples_differ(self) -> JobConfig:
        """A grouped algorithm's advantage is each sample's score against the others of its
        prompt: greedy samples are all alike, so every advantage is 0 and nothing trains."""
        samples, greedy = self.generators.n_samples_per_prompt, self.generators.temperature == 0
        if self.algorithm in GROUPED_ALGORITHMS and samples > 1 and greedy:
            raise ValueError(
                f"generators.n_samples_per_prompt is {samples} but generators.temperature is 0: "
                "greedy decoding answers a prompt the same way every time, so every "
                f"{self.algorithm} advantage (a sample against the others of its prompt) is 0 "
                "and nothing trains; set generators.temperature > 0"
            )
        return self

    def _check_sampling_control(self) -> None:
        if self.dynamic_sampling is not None:
            if self.algorithm not in GROUPED_ALGORITHMS:
                raise ValueError(
                    f"dynamic_sampling drops groups whose samples scored alike; algorithm "
                    f"{self.algorithm} does not compare a prompt's samples: use one of "
                    f"{sorted(GROUPED_ALGORITHMS)} or drop dynamic_sampling"
                )
            if self.mode != "sync" or self.one_step_off:
                raise ValueError(
                    "dynamic_sampling refills a batch with prompts sampled after it, which the "
                    "batches sampled ahead (mode: async, one_step_off) would also take; use "
                    "mode: sync with it"
                )
        key, budget = self.response_budget
        if self.overlong_penalty is not None and self.overlong_penalty.buffer_len > budget:
            raise ValueError(
                f"overlong_penalty.buffer_len ({self.overlong_penalty.buffer_len}) exceeds {key} "
                f"({budget}); the buffer is the last part of that budget"
            )

    def _check_gpu_colocation(self) -> None:
        """Colocated on GPUs, a learner rank and its generators fit one GPU, and generation
        cannot overlap training (the engines sleep while the learner trains)."""
        if self.mode == "async":
            raise ValueError(
                "mode: async: with placement colocated on GPUs the generators sleep while the "
                "learner trains, so nothing overlaps; set placement: disaggregated or mode: sync"
            )
        if self.one_step_off:
            raise ValueError(
                "one_step_off: with placement colocated on GPUs the generators sleep while the "
                "learner trains, so nothing overlaps; set placement: disaggregated or drop "
                "one_step_off"
            )
        shared = self.generators_per_learner_gpu
        total = self.learner.num_gpus + shared * self.generators.num_gpus
        if total > 1:
            raise ValueError(
                f"placement: colocated puts {shared} generator(s) on each learner rank's GPU, but "
                f"learner.num_gpus ({self.learner.num_gpus}) + {shared} x generators.num_gpus "
                f"({self.generators.num_gpus}) = {total:g} > 1; lower them (e.g. 0.5 each) or "
                "set placement: disaggregated"
            )

    @property
    def response_budget(self) -> tuple[str, int]:
        """The most tokens after a prompt, and the key that sets it: ``env.max_total_tokens``
        for a multi-turn job (sampled and observation tokens), else
        ``generators.max_new_tokens``."""
        if self.env is not None:
            return "env.max_total_tokens", self.env.max_total_tokens
        return "generators.max_new_tokens", self.generators.max_new_tokens

    def _check_completion_length(self, critic_free: CriticFreeConfig) -> None:
        """``critic_free.max_completion_length`` is the generation limit, as in TRL's GRPO:
        the response budget (``response_budget``) unless given, and never below it (the
        trainer refuses a longer response)."""
        key, budget = self.response_budget
        if "max_completion_length" not in critic_free.model_fields_set:
            critic_free.max_completion_length = budget
        elif (critic_free.max_completion_length or budget) < budget:
            raise ValueError(
                f"critic_free.max_completion_length ({critic_free.max_completion_length}) is below "
                f"{key} ({budget}): the learner would refuse the longer responses; raise it or "
                "leave it unset (it defaults to that budget)"
            )

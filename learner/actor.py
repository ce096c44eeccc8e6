"""The learner's rank actor: one rank of the learner, a trainer (PPO's or a critic-free one) behind
Ray.

The job runs the learner as ``learner.num_ranks`` of these in one placement group and one
``torch.distributed`` group (learner/rank_group.py starts them; nccl on GPUs, gloo on CPU), the
models sharded across the ranks with FSDP2 by the trainer; one rank is the same path with a group of
one. Every rank gets every call with the same arguments (the trainer takes each rank's share of a
batch, and all ranks take part in its collectives); rank 0 answers for the group, serves the
learner's metrics and hands the gathered weights to the transport.

A rank is made from ``LearnerSettings`` (the job config's parts a learner needs, with the job's
algorithm resolved to its ``TrainerSpec``, learner/registry.py) and its place in the group. The
spec loads the trainer (PPO: policy with value head and a frozen reference, trainers/ppo.py;
critic-free: plain causal LM, a reference only when a KL needs one, trainers/critic_free.py) and
turns each scored rollout batch (``common.schema.ROLLOUT_SCHEMA``) into one step of it. The
actor runs one step per batch and publishes each new policy version through a weight transport
(``common/transport/``) for every generator to load. Every rollout id is consumed at most once: a
repeated id is refused before any update. The model sits on the device Ray assigned the actor
(``learner_device``).

Off-policy rollouts: either trainer gets the generator's logprobs (the behaviour policy) and
weights each token by truncated importance sampling when its ``tis_cap`` is set
(``critic_free.tis_cap``, ``ppo.tis_cap``); ``rollout/logprob_diff_mean`` measures the mismatch
between the learner's old policy and the generator's every step.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray
import torch
from pydantic import BaseModel

from rlfleet.checkpoint.export import policy_of
from rlfleet.checkpoint.identity import CheckpointIdentity, model_fingerprint
from rlfleet.common import startup_trace
from rlfleet.common.config import (
    CheckpointConfig,
    JobConfig,
    LearnerConfig,
    LoraConfig,
    MetricsConfig,
    WeightSyncConfig,
)
from rlfleet.common.metrics import MetricsTarget
from rlfleet.common.transport import DEFAULT_TRANSPORT, GroupSpec, WeightsHandle, make_publisher
from rlfleet.learner.batches import staleness_stats
from rlfleet.learner.metrics import LearnerMetrics
from rlfleet.learner.rank_group import RankSpec
from rlfleet.learner.registry import TRAINERS, Trainer, TrainerSpec
from rlfleet.trainers.distributed import DataParallel, full_state, init_process_group
from rlfleet.trainers.guards import check_finite_weights
from rlfleet.trainers.lora import add_adapters, merged_state


def learner_device() -> torch.device:
    """The GPU Ray assigned this actor, else the CPU. Ray sets ``CUDA_VISIBLE_DEVICES`` to the
    assigned GPUs, so the first of them is ``cuda:0`` in this process."""
    if ray.is_initialized() and ray.get_gpu_ids():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def node_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0))


def torch_threads(num_cpus: float | None, colocated: bool, ranks_on_node: int = 1) -> int:
    """Torch's threads in one rank: ``learner.num_cpus`` when given; else, colocated, the node's
    cores shared among its ranks (generators sleep while the learner trains), else one."""
    if num_cpus is not None:
        return max(1, int(num_cpus))
    if not colocated:
        return 1
    return max(1, node_cores() // max(1, ranks_on_node))


TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class LearnerSettings:
    """What a learner rank is made with, but its place in the group: the job config's parts it
    needs, its algorithm resolved to the trainer's ``TrainerSpec`` (``trainer``) when the
    settings are made. ``from_job`` makes them from a job config."""

    model_dir: str
    algorithm: str
    """A name of learner/registry.py's ``TRAINERS``: ``ppo``, ``grpo``, ..."""
    trainer_config: BaseModel
    """The trainer's config (``PPOConfig``, ``CriticFreeConfig``), as the spec's
    ``config_type`` says."""
    _: dataclasses.KW_ONLY
    seed: int = 0
    """Seeds torch before the model loads (PPO's value head)."""
    max_policy_lag: int = 0
    job_name: str = "rlfleet"
    metrics: MetricsConfig | None = None
    """Served by rank 0 (None: the defaults)."""
    weight_transport: WeightSyncConfig | str = DEFAULT_TRANSPORT
    """The job's resolved ``weight_sync`` (or a transport name)."""
    trust_remote_code: bool = False
    learner: LearnerConfig = dataclasses.field(default_factory=LearnerConfig)
    """Ranks, dtype, micro-batches, collective deadline."""
    colocated: bool = True
    """The job's placement, for torch's thread count."""
    weights_dtype: str | None = None
    """The generators' engine dtype, which published weights are cast to (None: as trained)."""
    lora: LoraConfig | None = None
    """The job's ``lora`` section: train adapters, publish merged weights."""
    trainer: TrainerSpec = dataclasses.field(init=False, repr=False, compare=False)
    """``TRAINERS[algorithm]``, resolved once, here."""

    def __post_init__(self) -> None:
        spec = TRAINERS[self.algorithm]
        spec.check_config(self.trainer_config)
        object.__setattr__(self, "trainer", spec)

    @classmethod
    def from_job(
        cls,
        config: JobConfig,
        weight_transport: WeightSyncConfig | str,
        trainer_config: BaseModel | None = None,
    ) -> LearnerSettings:
        """The learner's settings of the job ``config``: ``weight_transport`` is its resolved
        ``weight_sync``; ``trainer_config`` replaces ``config.trainer_config`` (the job's seed
        put in, say)."""
        return cls(
            config.model,
            config.algorithm,
            config.trainer_config if trainer_config is None else trainer_config,
            seed=config.seed,
            max_policy_lag=config.max_policy_lag,
            job_name=config.name,
            metrics=config.metrics,
            weight_transport=weight_transport,
            trust_remote_code=config.trust_remote_code,
            learner=config.learner,
            colocated=config.placement == "colocated",
            weights_dtype=config.generator_dtype,
            lora=config.lora,
        )


def load_trainer(
    model_dir: str,
    spec: TrainerSpec,
    config: BaseModel,
    trust_remote_code: bool,
    learner: LearnerConfig,
    parallel: DataParallel | None,
    lora: LoraConfig | None = None,
) -> Trainer:
    """``spec``'s trainer with ``config``, its model loaded from ``model_dir`` onto the learner's
    device and sharded across ``parallel``'s ranks (None: a plain trainer, no process group),
    with ``learner``'s dtype, gradient checkpointing and micro-batch budget; with ``lora``, the
    causal LM gets LoRA adapters and only they (and PPO's value head) are trained."""
    from transformers import AutoTokenizer

    device = parallel.device if parallel else learner_device()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = spec.model_class.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    model = model.to(device)
    if lora is not None:
        add_adapters(spec.causal_lm(model), lora)
    return spec.trainer(
        config=config,
        model=model,
        tokenizer=tokenizer,
        parallel=parallel,
        dtype=TORCH_DTYPES[learner.dtype],
        gradient_checkpointing=learner.gradient_checkpointing,
        max_tokens_per_microbatch=learner.max_tokens_per_microbatch,
    )


def join_process_group(rank: RankSpec | None, learner: LearnerConfig) -> DataParallel | None:
    """Joins the learner's process group as ``rank`` (nccl on a GPU, gloo on the CPU) on the
    device Ray assigned. None (a plain trainer, no group) without a rank (in-process use) and
    for a lone float32 rank: FSDP2 over one rank shards nothing and made the demo's step about
    1.9x slower (the bench workload's 14%); bfloat16 needs its mixed-precision policy."""
    if rank is None or (rank.world_size == 1 and learner.dtype == "float32"):
        return None
    device = learner_device()
    init_process_group(
        rank.rank, rank.world_size, rank.master_addr, rank.master_port, device, learner.timeout_s
    )
    return DataParallel.current(device)


class LearnerActor:
    """One learner rank; use as ``ray.remote(LearnerActor).options(...).remote(...)``, N of them
    through ``learner.rank_group.start_learner_group``. Without ``rank`` it is a learner of one
    rank and no process group (in-process use, tests)."""

    def __init__(self, settings: LearnerSettings, rank: RankSpec | None = None) -> None:
        """``settings``: what the job asks of the learner (``LearnerSettings.from_job``);
        ``rank``: this rank's place in the group (None: no process group, one rank)."""
        startup_trace.mark("learner: start")
        learner = settings.learner
        if rank is not None:
            threads = torch_threads(learner.num_cpus, settings.colocated, rank.ranks_on_node)
            torch.set_num_threads(threads)
        torch.manual_seed(settings.seed)
        self.parallel = join_process_group(rank, learner)
        self.rank = self.parallel.rank if self.parallel else 0
        self.world_size = self.parallel.world_size if self.parallel else 1
        self.spec = settings.trainer
        self.trainer = load_trainer(
            settings.model_dir,
            self.spec,
            settings.trainer_config,
            settings.trust_remote_code,
            learner,
            self.parallel,
            settings.lora,
        )
        startup_trace.mark("learner: trainer loaded")
        self.lora = settings.lora
        self._publisher = make_publisher(
            settings.weight_transport, settings.weights_dtype, sender=self.rank == 0
        )
        self.max_policy_lag = settings.max_policy_lag
        self.version = 0
        self.consumed: list[int] = []
        self._consumed_set: set[int] = set()
        self._saver: Any = None
        self.identity = CheckpointIdentity(
            settings.job_name,
            self.spec.name,
            settings.model_dir,
            model_fingerprint(settings.model_dir),
            settings.lora is not None,
        )
        served = settings.metrics if self.rank == 0 else MetricsConfig(enabled=False)
        self.metrics = LearnerMetrics.from_config(settings.job_name, 0, served or MetricsConfig())
        startup_trace.mark("learner: ready")

    def ready(self) -> int:
        return self.version

    @property
    def policy(self) -> torch.nn.Module:
        """The causal LM being trained (without PPO's value head): what generators load."""
        return policy_of(self.trainer)

    def step(self, batch: pa.RecordBatch) -> dict[str, float]:
        """One training step on a scored batch; the policy version goes from V to V+1.

        Weights that came out of the step with a NaN or an infinity fail it
        (``trainers/guards.py``): they are never published or checkpointed."""
        ids = batch.column("rollout_id").to_pylist()
        self._check_unconsumed(ids)
        self._check_policy_lag(batch)
        started = time.perf_counter()
        stats = self.spec.step(self.trainer, batch)
        stats.update(staleness_stats(batch, self.version))
        check_finite_weights(
            self.trainer.model,
            f"step {self.version + 1} (rollouts {min(ids)}..{max(ids)})",
            self.spec.advice,
        )
        self.consumed.extend(ids)
        self._consumed_set.update(ids)
        self.version += 1
        gauges = self.spec.stat_gauges(self.trainer.config, stats)
        self.metrics.record_step(stats, time.perf_counter() - started, self.version, gauges)
        return stats

    def join_weight_group(self, spec: GroupSpec) -> None:
        """Joins the collective weight group ``spec`` names as its sender (rank 0 only; the
        other ranks send nothing)."""
        self._publisher.join(spec)

    def publish_weights(self) -> WeightsHandle | None:
        """Publishes the current policy: every rank gathers its full tensors one at a time (a
        collective), rank 0 hands them to the transport and returns the handle that every
        generator loads (``GeneratorActor.load_weights``); the other ranks return None. A LoRA
        policy is published merged, under the base model's names (trainers/lora.py)."""
        started = time.perf_counter()
        handle = self._publisher.publish(self.published_state(), self.version)
        if handle is not None:
            self.metrics.record_weight_broadcast(
                time.perf_counter() - started, handle.nbytes, self.version
            )
        return handle

    def published_state(self) -> Iterator[tuple[str, torch.Tensor]]:
        """The policy's full tensors as the generators get them, one at a time (a collective
        over the ranks): merged under the base model's names for a LoRA policy."""
        return merged_state(self.policy) if self.lora else full_state(self.policy)

    def metrics_target(self) -> MetricsTarget | None:
        """Where this actor serves its Prometheus metrics (None when metrics are disabled)."""
        return self.metrics.served_target

    def consumed_rollout_ids(self) -> list[int]:
        """Rollout ids in the order they were trained on."""
        return list(self.consumed)

    def save_checkpoint(self, config: CheckpointConfig, job_state: dict[str, Any]) -> str:
        """Saves checkpoint ``step-<version>`` (trainer + ``job_state`` + this actor's ledger),
        every rank its own shards. One rank: for object stores the upload goes on in the
        background (see ``wait_for_checkpoint``); several: committed by rank 0 before it
        returns (the commit is a collective of the ranks)."""
        from rlfleet.checkpoint.saver import CheckpointSaver, save_checkpoint

        state = {**job_state, "learner": {"version": self.version, "consumed": self.consumed}}
        if self.world_size > 1:
            return save_checkpoint(
                config.uri,
                self.version,
                self.trainer,
                state,
                keep_last=config.keep_last,
                config=config,
                identity=self.identity,
            )
        if self._saver is None:
            self._saver = CheckpointSaver(
                config.uri, keep_last=config.keep_last, config=config, identity=self.identity
            )
        return self._saver.save(self.version, self.trainer, state)

    def wait_for_checkpoint(self) -> str | None:
        """Blocks until the last checkpoint is committed; its URI (None if none was saved)."""
        return self._saver.wait() if self._saver else None

    def resolve_checkpoint(self, uri: str, config: CheckpointConfig) -> str:
        """The committed checkpoint ``uri`` names (the latest under a root), refused when it
        belongs to another job, algorithm or model: what every rank then loads."""
        from rlfleet.checkpoint.load import resolve_resume

        return resolve_resume(uri, expect=self.identity, config=config)

    def newest_committed(self, uris: list[str], config: CheckpointConfig) -> str | None:
        """The newest of the checkpoints ``uris`` (oldest first) with a manifest, None if none
        has one: where a restarted learner resumes (the newest may be a save that its ranks died
        committing)."""
        from rlfleet.checkpoint.load import CheckpointError, resolve_checkpoint

        for uri in reversed(uris):
            try:
                return resolve_checkpoint(uri, config=config).uri
            except CheckpointError:
                continue
        return None

    def load_checkpoint(self, uri: str, config: CheckpointConfig) -> dict[str, Any]:
        """Restores the trainer (this rank's shards) and ledger from the checkpoint ``uri``
        (as ``resolve_checkpoint`` answered); returns the saved job state."""
        from rlfleet.checkpoint.load import load_checkpoint

        state = load_checkpoint(uri, self.trainer, config=config, expect=self.identity)
        self.version = state["learner"]["version"]
        self.consumed = list(state["learner"]["consumed"])
        self._consumed_set = set(self.consumed)
        return state

    def _check_unconsumed(self, ids: list[int]) -> None:
        seen: set[int] = set()
        for rollout_id in ids:
            if rollout_id in self._consumed_set or rollout_id in seen:
                raise ValueError(f"rollout {rollout_id} was already consumed")
            seen.add(rollout_id)

    def _check_policy_lag(self, batch: pa.RecordBatch) -> None:
        for rollout_id, version in zip(
            batch.column("rollout_id").to_pylist(),
            batch.column("policy_version").to_pylist(),
            strict=True,
        ):
            if version is None or self.version - version > self.max_policy_lag:
                raise ValueError(
                    f"rollout {rollout_id}: sampled with policy version {version}, learner is at "
                    f"{self.version} (max_policy_lag {self.max_policy_lag})"
                )

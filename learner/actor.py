"""The learner's rank actor: one rank of the learner, a trainer (PPO's or a critic-free one) behind
Ray.

The job runs the learner as ``learner.num_ranks`` of these in one placement group and one
``torch.distributed`` group (learner/rank_group.py starts them; nccl on GPUs, gloo on CPU), the
models sharded across the ranks with FSDP2 by the trainer; one rank is the same path with a group of
one. Every rank gets every call with the same arguments (the trainer takes each rank's share of a
batch, and all ranks take part in its collectives); rank 0 answers for the group, serves the
learner's metrics and hands the gathered weights to the transport.

The trainer's config picks it: a ``PPOConfig`` gives a PPOTrainer (policy with value head and a
frozen reference, trainers/ppo.py), a ``CriticFreeConfig`` a CriticFreeTrainer (plain causal
LM, a reference only when a KL needs one, trainers/critic_free.py). The actor consumes scored
rollout batches (``common.schema.ROLLOUT_SCHEMA``), runs one step per batch and publishes each
new policy version through a weight transport (``common/transport/``) for every generator to
load. Every rollout id is consumed at most once: a repeated id is refused before any update. The
model sits on the device Ray assigned the actor (``learner_device``).

Off-policy rollouts: either trainer gets the generator's logprobs (the behaviour policy) and
weights each token by truncated importance sampling when its ``tis_cap`` is set
(``critic_free.tis_cap``, ``ppo.tis_cap``); ``rollout/logprob_diff_mean`` measures the mismatch
between the learner's old policy and the generator's every step.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from numbers import Number
from typing import Any

import numpy as np
import pyarrow as pa
import ray
import torch

from rlfleet.checkpoint.commit import CheckpointIdentity, model_fingerprint, policy_of
from rlfleet.common.config import (
    CheckpointConfig,
    CriticFreeConfig,
    LearnerConfig,
    LoraConfig,
    MetricsConfig,
    PPOConfig,
    WeightSyncConfig,
)
from rlfleet.common.metrics import MetricsTarget
from rlfleet.common.transport import DEFAULT_TRANSPORT, GroupSpec, WeightsHandle, make_publisher
from rlfleet.learner.metrics import (
    PPO_STAT_GAUGES,
    LearnerMetrics,
    StatGauges,
    critic_free_stat_gauges,
)
from rlfleet.learner.rank_group import RankSpec
from rlfleet.trainers.distributed import DataParallel, full_state, init_process_group
from rlfleet.trainers.guards import CRITIC_FREE_ADVICE, PPO_ADVICE, check_finite_weights
from rlfleet.trainers.lora import add_adapters, merged_state

CRITIC_FREE_STAT_PREFIX = "critic_free/"
"""The critic-free trainer's stats go out under this prefix, but for ``rollout/`` (shared with
PPO) and ``time/`` (timings, as PPO's ``time/ppo/``)."""


def learner_device() -> torch.device:
    """The GPU Ray assigned this actor, else the CPU. Ray sets ``CUDA_VISIBLE_DEVICES`` to the
    assigned GPUs, so the first of them is ``cuda:0`` in this process."""
    if ray.is_initialized() and ray.get_gpu_ids():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def scalar_stats(stats: dict[str, Any]) -> dict[str, float]:
    """The single-number entries of a TRL stats dict, as floats (histograms are dropped)."""
    scalars = {}
    for name, value in stats.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        if isinstance(value, np.ndarray) and value.size == 1:
            value = value.item()
        if isinstance(value, Number) and not isinstance(value, bool):
            scalars[name] = float(value)
    return scalars


def rollout_tensors(
    batch: pa.RecordBatch,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """``(queries, responses, scores)`` as PPOTrainer.step takes them; names a bad rollout."""
    columns = batch.to_pydict()
    queries, responses, scores = [], [], []
    for rollout_id, prompt_ids, response_ids, logprobs, score in zip(
        columns["rollout_id"],
        columns["prompt_ids"],
        columns["response_ids"],
        columns["response_logprobs"],
        columns["score"],
        strict=True,
    ):
        if not prompt_ids or not response_ids:
            raise ValueError(f"rollout {rollout_id}: empty prompt_ids or response_ids")
        if logprobs is None or len(logprobs) != len(response_ids):
            count = "no" if logprobs is None else len(logprobs)
            raise ValueError(
                f"rollout {rollout_id}: {count} response_logprobs for {len(response_ids)} tokens"
            )
        if score is None or not math.isfinite(score):
            raise ValueError(f"rollout {rollout_id}: score is {score!r}, not a finite number")
        queries.append(torch.tensor(prompt_ids, dtype=torch.long))
        responses.append(torch.tensor(response_ids, dtype=torch.long))
        scores.append(torch.tensor(score, dtype=torch.float32))
    return queries, responses, scores


def rollout_stats(batch: pa.RecordBatch, old_logprobs: np.ndarray) -> dict[str, float]:
    """How the generators' rollouts compare with the learner.

    ``rollout/logprob_diff_mean``: the mean over response tokens of |learner's old-policy logprob
    - generator's logprob| (``old_logprobs``: ``[batch, max response length]`` in batch order,
    the trainer's ``objective/logprobs``); near zero when both hold the same weights, it grows
    with policy lag and with any mismatch between the engine and the learner.
    ``rollout/truncated_fraction``: the fraction of rollouts that ``max_new_tokens`` cut off.
    """
    generator_logprobs = batch.column("response_logprobs").to_pylist()
    old = np.asarray(old_logprobs, dtype=np.float64).reshape(len(generator_logprobs), -1)
    differences = np.concatenate(
        [np.abs(old[row, : len(lps)] - lps) for row, lps in enumerate(generator_logprobs)]
    )
    return {
        "rollout/logprob_diff_mean": float(differences.mean()),
        "rollout/truncated_fraction": truncated_fraction(batch),
    }


def truncated_flags(batch: pa.RecordBatch) -> list[bool]:
    """Which rollouts ``max_new_tokens`` cut off (finish reason ``length``)."""
    return [reason == "length" for reason in batch.column("finish_reason").to_pylist()]


def truncated_fraction(batch: pa.RecordBatch) -> float:
    truncated = truncated_flags(batch)
    return sum(truncated) / len(truncated)


def grouped(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The batch with the samples of each group next to each other (shards may split a group),
    in the order the groups and their samples came in otherwise."""
    order = np.argsort(batch.column("group_id").to_numpy(), kind="stable")
    return batch.take(pa.array(order))


def generator_logprobs(batch: pa.RecordBatch) -> list[torch.Tensor]:
    """Each rollout's per-token logprobs from the generator that sampled it (the behaviour
    policy), as float32 tensors."""
    return [
        torch.tensor(logprobs, dtype=torch.float32)
        for logprobs in batch.column("response_logprobs").to_pylist()
    ]


def critic_free_inputs(batch: pa.RecordBatch) -> dict[str, Any]:
    """``CriticFreeTrainer.step``'s keyword arguments from a scored batch: the rollouts, their
    group ids, the generator's logprobs (the behaviour policy) and truncation flags."""
    queries, responses, scores = rollout_tensors(batch)
    return {
        "queries": queries,
        "responses": responses,
        "scores": scores,
        "group_ids": batch.column("group_id").to_pylist(),
        "behaviour_logprobs": generator_logprobs(batch),
        "truncated": truncated_flags(batch),
    }


def critic_free_stats(step_stats: dict[str, float], batch: pa.RecordBatch) -> dict[str, float]:
    """A critic-free step's stats named as ``CRITIC_FREE_STAT_PREFIX`` says, plus the batch's
    ``rollout/truncated_fraction`` (as PPO's)."""
    stats = {
        key if key.startswith(("rollout/", "time/")) else CRITIC_FREE_STAT_PREFIX + key: value
        for key, value in step_stats.items()
    }
    return {**stats, "rollout/truncated_fraction": truncated_fraction(batch)}


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


def load_trainer(
    model_dir: str,
    config: PPOConfig | CriticFreeConfig,
    trust_remote_code: bool,
    learner: LearnerConfig,
    parallel: DataParallel | None,
    lora: LoraConfig | None = None,
) -> Any:
    """The trainer ``config`` names, its model loaded from ``model_dir`` onto the learner's
    device and sharded across ``parallel``'s ranks (None: a plain trainer, no process group),
    with ``learner``'s dtype, gradient checkpointing and micro-batch budget; with ``lora``, the
    causal LM gets LoRA adapters and only they (and PPO's value head) are trained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlfleet import AutoModelForCausalLMWithValueHead, CriticFreeTrainer, PPOTrainer

    device = parallel.device if parallel else learner_device()
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    options = {
        "parallel": parallel,
        "dtype": TORCH_DTYPES[learner.dtype],
        "gradient_checkpointing": learner.gradient_checkpointing,
        "max_tokens_per_microbatch": learner.max_tokens_per_microbatch,
    }
    if isinstance(config, CriticFreeConfig):
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, trust_remote_code=trust_remote_code
        ).to(device)
        if lora is not None:
            add_adapters(model, lora)
        return CriticFreeTrainer(config=config, model=model, tokenizer=tokenizer, **options)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        model_dir, trust_remote_code=trust_remote_code
    ).to(device)
    if lora is not None:
        add_adapters(model.pretrained_model, lora)
    return PPOTrainer(config=config, model=model, tokenizer=tokenizer, **options)


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
    through ``learner.group.start_learner_group``. Without ``rank`` it is a learner of one rank
    and no process group (in-process use, tests)."""

    def __init__(
        self,
        model_dir: str,
        trainer_config: PPOConfig | CriticFreeConfig,
        seed: int,
        max_policy_lag: int = 0,
        job_name: str = "rlfleet",
        metrics: MetricsConfig | None = None,
        weight_transport: WeightSyncConfig | str = DEFAULT_TRANSPORT,
        trust_remote_code: bool = False,
        *,
        learner: LearnerConfig | None = None,
        rank: RankSpec | None = None,
        colocated: bool = True,
        weights_dtype: str | None = None,
        lora: LoraConfig | None = None,
    ) -> None:
        """``weight_transport``: the job's resolved ``weight_sync`` (or a transport name);
        ``weights_dtype``: the generators' engine dtype, which published weights are cast to
        (None: as trained). ``learner``: ranks, dtype, micro-batches, collective deadline;
        ``rank``: this rank's place in the group (None: no process group, one rank);
        ``colocated``: the job's placement, for torch's thread count; ``lora``: the job's
        ``lora`` section (train adapters, publish merged weights)."""
        learner = learner or LearnerConfig()
        if rank is not None:
            torch.set_num_threads(torch_threads(learner.num_cpus, colocated, rank.ranks_on_node))
        torch.manual_seed(seed)
        self.parallel = join_process_group(rank, learner)
        self.rank = self.parallel.rank if self.parallel else 0
        self.world_size = self.parallel.world_size if self.parallel else 1
        self.trainer = load_trainer(
            model_dir, trainer_config, trust_remote_code, learner, self.parallel, lora
        )
        self.lora = lora
        self.critic_free = isinstance(trainer_config, CriticFreeConfig)
        self._publisher = make_publisher(weight_transport, weights_dtype, sender=self.rank == 0)
        self.max_policy_lag = max_policy_lag
        self.version = 0
        self.consumed: list[int] = []
        self._consumed_set: set[int] = set()
        self._saver: Any = None
        algorithm = trainer_config.algorithm if self.critic_free else "ppo"
        self.identity = CheckpointIdentity(
            job_name, algorithm, model_dir, model_fingerprint(model_dir), lora is not None
        )
        served = metrics if self.rank == 0 else MetricsConfig(enabled=False)
        self.metrics = LearnerMetrics.from_config(job_name, 0, served or MetricsConfig())

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
        stats = self._critic_free_step(batch) if self.critic_free else self._ppo_step(batch)
        check_finite_weights(
            self.trainer.model,
            f"step {self.version + 1} (rollouts {min(ids)}..{max(ids)})",
            CRITIC_FREE_ADVICE if self.critic_free else PPO_ADVICE,
        )
        self.consumed.extend(ids)
        self._consumed_set.update(ids)
        self.version += 1
        self.metrics.record_step(
            stats, time.perf_counter() - started, self.version, self._stat_gauges(stats)
        )
        return stats

    def _stat_gauges(self, stats: dict[str, float]) -> StatGauges:
        """Which of this step's stats set which learner gauge (``learner/metrics.py``)."""
        if not self.critic_free:
            return PPO_STAT_GAUGES
        config = self.trainer.config
        trained = "critic_free/loss" in stats  # no loss: every sample was masked out
        return critic_free_stat_gauges(config.beta, config.kl_coef, trained)

    def _ppo_step(self, batch: pa.RecordBatch) -> dict[str, float]:
        step_stats = self.trainer.step(
            *rollout_tensors(batch), behaviour_logprobs=generator_logprobs(batch)
        )
        return {
            **scalar_stats(step_stats),
            **rollout_stats(batch, step_stats["objective/logprobs"]),
            "ppo/nonfinite_skipped_steps": float(self.trainer.nonfinite_skipped_steps),
        }

    def _critic_free_step(self, batch: pa.RecordBatch) -> dict[str, float]:
        batch = grouped(batch)
        return critic_free_stats(self.trainer.step(**critic_free_inputs(batch)), batch)

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
        from rlfleet.checkpoint.commit import CheckpointSaver, save_checkpoint

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
        from rlfleet.checkpoint.commit import resolve_resume

        return resolve_resume(uri, expect=self.identity, config=config)

    def newest_committed(self, uris: list[str], config: CheckpointConfig) -> str | None:
        """The newest of the checkpoints ``uris`` (oldest first) with a manifest, None if none
        has one: where a restarted learner resumes (the newest may be a save that its ranks died
        committing)."""
        from rlfleet.checkpoint.commit import CheckpointError, resolve_checkpoint

        for uri in reversed(uris):
            try:
                return resolve_checkpoint(uri, config=config).uri
            except CheckpointError:
                continue
        return None

    def load_checkpoint(self, uri: str, config: CheckpointConfig) -> dict[str, Any]:
        """Restores the trainer (this rank's shards) and ledger from the checkpoint ``uri``
        (as ``resolve_checkpoint`` answered); returns the saved job state."""
        from rlfleet.checkpoint.commit import load_checkpoint

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

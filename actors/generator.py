"""The generator actor: samples rollouts for prompt batches with one engine and one policy version.

``GeneratorActor`` is a plain class; ``RemoteGenerator`` is its Ray actor class, so a job sets
resources from the config: ``RemoteGenerator.options(**generator_options(config)).remote(...)``
(``start_generators`` does exactly that for ``config.num_actors`` actors).
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pyarrow as pa
import ray

from rlfleet.actors.engine import Engine, SamplingSpec
from rlfleet.actors.metrics import GeneratorMetrics
from rlfleet.common.config import GeneratorConfig, MetricsConfig
from rlfleet.common.metrics import MetricsTarget
from rlfleet.common.schema import with_columns
from rlfleet.common.transport import DEFAULT_TRANSPORT, WeightsHandle, make_receiver


def make_engine(
    model_dir: str | Path, config: GeneratorConfig, seed: int, trust_remote_code: bool = False
) -> Engine:
    """The engine ``config.engine`` names, loaded from ``model_dir`` and seeded with ``seed``."""
    if config.engine == "vllm":
        from rlfleet.actors.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, config, seed, trust_remote_code=trust_remote_code)
    from rlfleet.actors.hf_engine import HFEngine

    return HFEngine(model_dir, seed, trust_remote_code=trust_remote_code)


def rollout_seed(job_seed: int, rollout_id: int) -> int:
    """The sampling seed of one rollout: a 32-bit hash of ``(job_seed, rollout_id)``.

    32 bits because vLLM's CPU build keeps only the low 32 bits of a request's seed: a seed of
    ``(job_seed << 32) + rollout_id`` lost the job seed there, so every job seed sampled alike.
    """
    key = f"{job_seed}:{rollout_id}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little")


class GeneratorActor:
    def __init__(
        self,
        index: int,
        model_dir: str,
        config: GeneratorConfig,
        seed: int,
        job_name: str = "rlfleet",
        metrics: MetricsConfig | None = None,
        weight_transport: str = DEFAULT_TRANSPORT,
        trust_remote_code: bool = False,
    ) -> None:
        """Load ``model_dir`` (policy version 0) into the engine ``config.engine`` names; serve
        this generator's Prometheus metrics as ``job_name`` unless ``metrics.enabled`` is off;
        receive new weights through ``weight_transport`` (``common/transport/``). The model
        directory's own code runs only with ``trust_remote_code``.

        Each rollout is sampled with its own seed derived from ``seed`` and its rollout id, so
        a rollout's sample is the same whichever generator draws it and in whatever batch: a
        re-dispatched shard or a resumed job reproduces the samples of an uninterrupted run.
        """
        from transformers import AutoTokenizer

        self._config = config
        self._seed = seed
        self._engine = make_engine(model_dir, config, seed + index, trust_remote_code)
        self._tokenizer = AutoTokenizer.from_pretrained(
            str(model_dir), trust_remote_code=trust_remote_code
        )
        self._receiver = make_receiver(weight_transport)
        self._version = 0
        self._metrics = GeneratorMetrics.from_config(job_name, index, metrics or MetricsConfig())

    def ready(self) -> bool:
        return True

    def metrics_target(self) -> MetricsTarget | None:
        """Where this actor serves its Prometheus metrics (None when metrics are disabled)."""
        return self._metrics.served_target

    def load_weights(self, handle: WeightsHandle) -> int:
        """Load the published weights ``handle`` names in place, bucket by bucket; returns the
        policy version now held."""
        started = time.perf_counter()
        for bucket in self._receiver.receive(handle):
            self._engine.load_weights(bucket)
        self._version = handle.version
        self._metrics.record_weight_load(time.perf_counter() - started, handle.version)
        return self._version

    def generate(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """Fill the rollout columns of a ``common.schema.prompt_batch`` with sampled responses."""
        prompt_ids = batch.column("prompt_ids").to_pylist()
        seeds = [rollout_seed(self._seed, rid) for rid in batch.column("rollout_id").to_pylist()]
        started = time.perf_counter()
        with self._metrics.busy():
            completions = self._engine.generate(
                prompt_ids, SamplingSpec.from_config(self._config, seeds)
            )
        responses = [c.token_ids for c in completions]
        self._metrics.record_generation(
            len(responses), sum(map(len, responses)), time.perf_counter() - started
        )
        return with_columns(
            batch,
            response=self._tokenizer.batch_decode(responses, skip_special_tokens=True),
            response_ids=responses,
            response_logprobs=[c.logprobs for c in completions],
            finish_reason=[c.finish_reason for c in completions],
            policy_version=[self._version] * len(completions),
        )


RemoteGenerator = ray.remote(GeneratorActor)


def generator_options(config: GeneratorConfig) -> dict[str, float]:
    """Ray actor options for one generator of ``config``."""
    return {"num_cpus": config.num_cpus, "num_gpus": config.num_gpus}


def start_generators(
    model_dir: str, config: GeneratorConfig, seed: int
) -> list[ray.actor.ActorHandle]:
    """Start ``config.num_actors`` generator actors and wait until every engine is loaded."""
    actors = [
        RemoteGenerator.options(**generator_options(config)).remote(i, model_dir, config, seed)
        for i in range(config.num_actors)
    ]
    ray.get([actor.ready.remote() for actor in actors])
    return actors

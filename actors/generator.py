"""The generator actor: samples rollouts for prompt batches with one engine and one policy version.

``GeneratorActor`` is a plain class; ``RemoteGenerator`` is its Ray actor class, so a job sets
resources from the config: ``RemoteGenerator.options(**generator_options(config)).remote(...)``
(``start_generators`` does exactly that for ``config.num_actors`` actors).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from contextlib import closing, nullcontext
from itertools import chain
from pathlib import Path

import pyarrow as pa
import ray

from rlfleet.actors.agent_rollout import AgentRollout
from rlfleet.actors.endpoint import Endpoint
from rlfleet.actors.engine import Engine, QueuedRequests, SamplingOverride, SamplingSpec
from rlfleet.actors.metrics import GeneratorMetrics
from rlfleet.actors.rollout import MultiTurnRollout, Trajectory
from rlfleet.actors.trajectories import EnvSetup, trajectory_batch
from rlfleet.actors.turns import TurnTokens
from rlfleet.actors.weight_handoff import WeightHandoff
from rlfleet.common.chat import stop_token_ids
from rlfleet.common.config import GeneratorConfig, MetricsConfig, WeightSyncConfig
from rlfleet.common.metrics import MetricsTarget
from rlfleet.common.schema import with_columns
from rlfleet.common.transport import (
    DEFAULT_TRANSPORT,
    CollectiveError,
    CollectiveReceiver,
    GroupSpec,
    WeightLoadError,
    WeightsHandle,
    make_receiver,
)


def make_engine(
    model_dir: str | Path, config: GeneratorConfig, seed: int, trust_remote_code: bool = False
) -> Engine:
    """The engine ``config.engine`` names, loaded from ``model_dir`` and seeded with ``seed``."""
    if config.engine == "vllm":
        from rlfleet.actors.vllm_engine import VLLMEngine

        return VLLMEngine(model_dir, config, seed, trust_remote_code=trust_remote_code)
    from rlfleet.actors.hf_engine import HFEngine

    return HFEngine(model_dir, seed, trust_remote_code=trust_remote_code, dtype=config.dtype)


def rollout_seed(job_seed: int, rollout_id: int) -> int:
    """The sampling seed of one rollout: a 32-bit hash of ``(job_seed, rollout_id)``.

    32 bits because vLLM's CPU build keeps only the low 32 bits of a request's seed: a seed of
    ``(job_seed << 32) + rollout_id`` lost the job seed there, so every job seed sampled alike.
    """
    key = f"{job_seed}:{rollout_id}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=4).digest(), "little")


WEIGHTS_GROUP = "weights"
"""The Ray concurrency group of a generator's weight calls (``load_weights``,
``join_weight_group``)."""


class GeneratorActor:
    def __init__(
        self,
        index: int,
        model_dir: str,
        config: GeneratorConfig,
        seed: int,
        job_name: str = "rlfleet",
        metrics: MetricsConfig | None = None,
        weight_transport: WeightSyncConfig | str = DEFAULT_TRANSPORT,
        trust_remote_code: bool = False,
        env: EnvSetup | None = None,
        asynchronous: bool = False,
    ) -> None:
        """Load ``model_dir`` (policy version 0) into the engine ``config.engine`` names; serve
        this generator's Prometheus metrics as ``job_name`` unless ``metrics.enabled`` is off;
        receive new weights through ``weight_transport`` (the job's resolved ``weight_sync``,
        or a transport name; ``common/transport/``). The model directory's own code runs only
        with ``trust_remote_code``. With ``env`` (a multi-turn job) each rollout is a
        trajectory against the environment actors (actors/rollout.py). ``asynchronous`` (the
        job's ``mode: async``): weights that arrive while it samples load between two engine
        steps, and the requests in flight go on under them
        from their prefixes, each token recording the version that sampled it
        (actors/weight_handoff.py).

        Each rollout is sampled with its own seed derived from ``seed`` and its rollout id, so
        a rollout's sample is the same whichever generator draws it and in whatever batch: a
        re-dispatched shard or a resumed job reproduces the samples of an uninterrupted run.
        """
        from transformers import AutoTokenizer

        self._config = config
        self._index = index
        self._seed = seed
        self._engine = make_engine(model_dir, config, seed + index, trust_remote_code)
        self._tokenizer = AutoTokenizer.from_pretrained(
            str(model_dir), trust_remote_code=trust_remote_code
        )
        self._stop_token_ids = stop_token_ids(model_dir, self._tokenizer)
        self._receiver = make_receiver(weight_transport)
        self._engine_receives = isinstance(self._receiver, CollectiveReceiver) and getattr(
            self._engine, "receives_in_workers", False
        )
        """A tensor-parallel vLLM engine's workers receive a collective sync themselves."""
        self._version = 0
        self._env = env
        self._turns = TurnTokens(self._tokenizer, env.tools if env else None)
        self._handoff = WeightHandoff() if asynchronous else None
        self._metrics = GeneratorMetrics.from_config(job_name, index, metrics or MetricsConfig())
        self._endpoint = self._serve_endpoint(env) if env and env.config.agent else None

    def _serve_endpoint(self, env: EnvSetup) -> Endpoint:
        """An agent job's OpenAI-compatible endpoint (actors/endpoint.py), on this node's
        cluster-internal address: 127.0.0.1 in a local job."""
        host = ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"
        spec = SamplingSpec.from_config(self._config, None, self._stop_token_ids)
        token = env.endpoint_token or secrets.token_hex(32)
        return Endpoint(self._tokenizer, token, host, spec, env.config.tool_parser)

    def endpoint_url(self) -> str | None:
        """Where this generator's agent endpoint listens (None: not an agent job)."""
        return self._endpoint.url if self._endpoint else None

    def ready(self) -> bool:
        return True

    def metrics_target(self) -> MetricsTarget | None:
        """Where this actor serves its Prometheus metrics (None when metrics are disabled)."""
        return self._metrics.served_target

    def sleep(self) -> None:
        """The engine frees its accelerator memory (while a colocated learner trains)."""
        self._engine.sleep()

    def wake_up(self) -> None:
        self._engine.wake_up()

    @ray.method(concurrency_group=WEIGHTS_GROUP)
    def join_weight_group(self, spec: GroupSpec, rank: int) -> None:
        """Leave the weight group this generator is in (if any) and join ``spec``'s as
        ``rank`` (collective transport; the job driver forms a new group at the start and after
        a generator restarts or a sync fails). A tensor-parallel engine's workers join as
        ``rank`` and the ranks after it, one each."""
        if self._engine_receives:
            self._engine.join_weight_group(spec, rank)
        else:
            self._receiver.join(spec, rank)

    @ray.method(concurrency_group=WEIGHTS_GROUP)
    def load_weights(self, handle: WeightsHandle) -> int:
        """Load the weights ``handle`` names in place as they arrive, bucket by bucket, in one
        engine reload (a layer's tensors may span two buckets); returns the policy version now
        held.

        A transport failure raises ``CollectiveError`` (the driver re-forms the group and
        syncs again); an engine that cannot load the weights raises a ``WeightLoadError``
        naming this generator (the job stops: retrying would not help). Engine workers that
        died or did not answer raise what vLLM raised (the driver restarts this generator).
        In asynchronous mode, weights that arrive while this generator samples load at its next
        step boundary."""
        if self._handoff is not None:
            return self._handoff.load(handle, self._load_now)
        return self._load_now(handle)

    def _load_now(self, handle: WeightsHandle) -> int:
        started = time.perf_counter()
        try:
            version = self._load_received(handle)
        except WeightLoadError as exc:
            raise WeightLoadError(
                f"generator {self._index}: its {self._config.engine} engine could not load "
                f"the published weights: {exc}"
            ) from exc
        self._version = version
        self._metrics.record_weight_load(time.perf_counter() - started, self._version)
        return self._version

    def _load_received(self, handle: WeightsHandle) -> int:
        if self._engine_receives:
            return self._engine.receive_weights(handle)
        with closing(self._receiver.receive(handle)) as buckets:
            try:
                self._engine.load_weights(chain.from_iterable(buckets))
            except CollectiveError:
                raise
            except Exception as exc:
                raise WeightLoadError(f"{type(exc).__name__}: {exc}") from exc
        if self._receiver.version is None:
            raise WeightLoadError("it stopped before taking every published weight")
        return self._receiver.version

    def generate(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """Fill the rollout columns of a ``common.schema.prompt_batch`` with sampled responses,
        sampled with this generator's settings or those the batch carries
        (``engine.SamplingOverride``: held-out evaluation's temperature and budget): multi-turn
        trajectories with ``env``, plain rollouts request by request in asynchronous mode (new
        weights may reach them mid-request), else one batched ``generate``."""
        override = SamplingOverride.of(batch)
        sampling = self._handoff.generating(self._load_now) if self._handoff else nullcontext()
        with sampling:
            if self._env is not None or (self._handoff is not None and override is None):
                return self._generate_trajectories(batch)
            return self._generate_batched(batch)

    def _generate_batched(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        prompt_ids = batch.column("prompt_ids").to_pylist()
        seeds = [rollout_seed(self._seed, rid) for rid in batch.column("rollout_id").to_pylist()]
        spec = SamplingSpec.from_config(self._config, seeds, self._stop_token_ids)
        started = time.perf_counter()
        with self._metrics.busy():
            completions = self._engine.generate(prompt_ids, spec.overridden_by(batch))
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

    def _generate_trajectories(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """Request by request (actors/rollout.py): multi-turn trajectories for the batch's
        prompts (``env``), or, in asynchronous mode, plain rollouts that new weights may reach
        mid-request."""
        env = self._env
        engine = self._engine if hasattr(self._engine, "submit") else QueuedRequests(self._engine)
        spec = SamplingSpec.from_config(self._config, None, self._stop_token_ids)
        spec = spec.overridden_by(batch)
        between_steps = self._load_arrived_weights if self._handoff else None
        if self._endpoint is not None:
            loop = AgentRollout(
                engine,
                self._endpoint,
                env.actors,
                env.config,
                env.config.max_tokens_per_turn or spec.max_new_tokens,
                self._engine.context,
                between_steps=between_steps,
                version=lambda: self._version,
            )
        else:
            loop = MultiTurnRollout(
                engine,
                self._turns,
                env.actors if env else None,
                env.config if env else None,
                spec,
                self._engine.context,
                between_steps=between_steps,
                version=lambda: self._version,
            )
        columns = batch.select(["rollout_id", "prompt", "metadata", "prompt_ids"]).to_pydict()
        trajectories = [
            Trajectory(
                rid,
                rollout_seed(self._seed, rid),
                {"prompt": text, **json.loads(meta or "{}")},
                ids,
            )
            for rid, text, meta, ids in zip(*columns.values(), strict=True)
        ]
        started = time.perf_counter()
        with self._metrics.busy():
            loop.run(trajectories)
        sampled = sum(sum(t.loss_mask) for t in trajectories)
        self._metrics.record_generation(len(trajectories), sampled, time.perf_counter() - started)
        return trajectory_batch(batch, trajectories, self._turns, multi_turn=env is not None)

    def _load_arrived_weights(self, loop: MultiTurnRollout | AgentRollout) -> None:
        """Between two engine steps: weights that arrived stop the requests where they are,
        load, and the requests go on from their prefixes under them."""
        pending = self._handoff.take()
        if pending is None:
            return
        stopped = loop.interrupt()
        pending.run(self._load_now)
        loop.resume(stopped)


RemoteGenerator = ray.remote(concurrency_groups={WEIGHTS_GROUP: 1})(GeneratorActor)
"""Weight loads run in a thread of their own (``WEIGHTS_GROUP``), beside the sampling calls,
which run one at a time: in asynchronous mode a load reaches a generator while it samples."""


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

"""rlfleet's vLLM worker extension without vLLM: stand-in workers (a rank, ``reload_weights``)
with ``WeightReceiverExtension`` mixed in as vLLM mixes it, driven by ``VLLMEngine``'s
``join_weight_group`` / ``receive_weights`` through a stand-in ``collective_rpc`` that runs every
worker in a thread of its own (as vLLM's multiprocess executor runs them in processes). The
learner's end is the real collective publisher, the group real gloo. Every worker receives every
bucket itself; a worker that cannot load what it received is a ``WeightLoadError`` even though it
made its peers' broadcasts fail. And the real engine survives a reload cut off mid-stream."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
import torch
from generator_reference import PROMPTS, assert_same_completions, load_model, reference_greedy
from torch.distributed import TCPStore

from rlfleet.actors.engine import SamplingSpec
from rlfleet.actors.vllm_engine import VLLMEngine
from rlfleet.actors.vllm_worker import WeightReceiverExtension
from rlfleet.common.config import GeneratorConfig
from rlfleet.common.transport import CollectiveHandle, GroupSpec, WeightLoadError
from rlfleet.common.transport.collective import CollectivePublisher

WEIGHTS = {
    "embed.weight": torch.arange(64 * 32, dtype=torch.float32).reshape(64, 32),
    "layer.weight": torch.ones(300, 300),  # larger than a bucket
    "layer.bias": torch.full((7,), 0.5),
}


class StandInWorker(WeightReceiverExtension):
    """What the extension uses of a vLLM worker: its rank and ``reload_weights``; records what
    it loaded, or fails like a model that has no parameter of that name."""

    def __init__(self, rank: int, known: set[str]) -> None:
        self.rank = rank
        self.known = known
        self.loaded: dict[str, torch.Tensor] = {}
        self.model_runner = self

    def get_model(self) -> torch.nn.Module:
        return torch.nn.Module()

    def reload_weights(self, weights_iterator) -> None:
        for name, tensor in weights_iterator:
            if name not in self.known:
                raise KeyError(name)
            self.loaded[name] = tensor.clone()


class StandInLLM:
    """``collective_rpc`` over the stand-in workers, each in its own thread."""

    def __init__(self, workers: list[StandInWorker]) -> None:
        self.workers = workers

    def collective_rpc(self, method: str, timeout: float, args: tuple) -> list[object]:
        answers: list[object] = [None] * len(self.workers)

        def call(index: int) -> None:
            answers[index] = getattr(self.workers[index], method)(*args)

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(self.workers))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout)
        return answers

    def reset_prefix_cache(self) -> bool:
        return True


def engine_of(workers: list[StandInWorker]) -> VLLMEngine:
    engine = VLLMEngine.__new__(VLLMEngine)
    engine._llm = StandInLLM(workers)
    engine._workers = len(workers)
    engine._asleep = False
    engine._group_timeout_s = None
    return engine


def sync_into(engine: VLLMEngine, workers: int, version: int, timeout_s: float = 5.0):
    """Forms a group of a publisher (rank 0) and the engine's workers (ranks 1..), then
    publishes ``WEIGHTS`` while the engine receives; the engine's answer (version or error)."""
    store = TCPStore(
        "127.0.0.1", 0, 1 + workers, True, timeout=timedelta(seconds=5), wait_for_workers=False
    )
    spec = GroupSpec("127.0.0.1", store.port, 1 + workers, 3, "gloo", timeout_s)
    publisher = CollectivePublisher(bucket_mb=0.1)
    outcome: dict[str, object] = {}

    def learner() -> None:
        publisher.join(spec)
        try:
            publisher.publish(iter(WEIGHTS.items()), version)
        except Exception as exc:  # noqa: BLE001 - the engine's side is what the tests judge
            outcome["learner"] = exc

    thread = threading.Thread(target=learner)
    thread.start()
    engine.join_weight_group(spec, 1)
    try:
        outcome["engine"] = engine.receive_weights(CollectiveHandle(spec.group_id))
    except Exception as exc:  # noqa: BLE001 - returned for the test to judge
        outcome["engine"] = exc
    thread.join(30)
    assert not thread.is_alive(), "the learner hung"
    return outcome


def test_every_worker_receives_every_tensor_as_its_own_rank_and_answers_the_version():
    workers = [StandInWorker(rank, set(WEIGHTS)) for rank in range(2)]
    outcome = sync_into(engine_of(workers), 2, version=4)
    assert outcome == {"engine": 4}
    for worker in workers:
        assert worker.rlfleet_receiver._group.rank == 1 + worker.rank
        assert list(worker.loaded) == list(WEIGHTS)
        for name, tensor in WEIGHTS.items():
            assert torch.equal(worker.loaded[name], tensor), name


def test_a_worker_that_cannot_load_is_a_weight_load_error_not_a_group_failure():
    workers = [StandInWorker(0, set(WEIGHTS)), StandInWorker(1, {"embed.weight"})]
    outcome = sync_into(engine_of(workers), 2, version=1)
    with pytest.raises(WeightLoadError, match=r"^worker 1: KeyError: 'layer.weight'$"):
        raise outcome["engine"]


@pytest.mark.slow
def test_a_reload_cut_off_mid_stream_is_repaired_by_the_next_whole_one(
    tiny_model_dir, other_model_dir, tmp_path, monkeypatch
):
    """Weights stream into vLLM's in-place reload as they arrive: a peer failing in the middle
    of a sync leaves some layers unloaded, and the sync tried again must make the engine whole
    (the real engine, one worker in this process)."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    engine = VLLMEngine(tiny_model_dir, GeneratorConfig(kv_cache_gib=0.125), seed=0)
    other = load_model(other_model_dir)
    weights = list(other.state_dict().items())

    def cut_off():
        yield from weights[: len(weights) // 2]
        raise ConnectionResetError("a peer left the weight group")

    with pytest.raises(ConnectionResetError):
        engine.load_weights(cut_off())
    engine.load_weights(iter(weights))
    completions = engine.generate(PROMPTS, SamplingSpec.greedy(6))
    assert_same_completions(completions, reference_greedy(other, PROMPTS, 6))


def test_receiving_before_joining_a_group_is_refused():
    with pytest.raises(RuntimeError, match="in no weight group: join one first"):
        engine_of([StandInWorker(0, set())]).receive_weights(CollectiveHandle(1))


def test_tensor_parallel_generators_need_the_vllm_engine_and_one_gpu_per_worker():
    assert GeneratorConfig(tensor_parallel_size=2, num_gpus=2).tensor_parallel_size == 2
    assert GeneratorConfig(tensor_parallel_size=2).num_gpus == 0  # CPU: workers are processes
    with pytest.raises(ValueError, match="tensor_parallel_size 2 needs generators.engine: vllm"):
        GeneratorConfig(engine="hf", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="num_gpus is 1 but tensor_parallel_size is 2"):
        GeneratorConfig(tensor_parallel_size=2, num_gpus=1)

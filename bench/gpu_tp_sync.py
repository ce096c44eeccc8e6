"""The GPU suite's ``tp_sync`` stage (bench/gpu_suite.py): the collective transport into a
tensor-parallel vLLM engine, the learner's rank 0 in this process and the engine in another."""

from __future__ import annotations

import importlib.util
import os
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.multiprocessing as mp

TP_SYNC_RUNS = 3


def tp_sync(config: Any, build_model: Callable, smoke: bool, gpus: int) -> dict[str, Any]:
    """The collective transport into a vLLM engine as a generator runs it (actors/vllm_engine.py,
    actors/vllm_worker.py): this process, as the learner's rank 0 on GPU 0, broadcasts the bf16
    policy in buckets over nccl, and every tensor-parallel worker of an engine on the next GPUs
    (a process each) receives it as a rank of its own and loads its shard. Tensor parallel 2 with
    three GPUs or more, else 1. ``--smoke``: CPU, gloo, one worker, float32, a tiny model with the
    head size vLLM's CPU build serves. Median seconds from the publish until the engine holds the
    version, and GB/s of the bytes each worker received. ``config``: the suite's model config,
    ``build_model(config, device)`` its model."""
    if importlib.util.find_spec("vllm") is None:
        return {"skipped": "vLLM is not installed here"}
    if not smoke and gpus < 2:
        return {"skipped": "needs two GPUs: nccl refuses two ranks (learner, engine) on one GPU"}
    from rlfleet.common.transport import GroupSpec, make_publisher
    from rlfleet.common.transport.rendezvous import listening_store

    workers = 1 if smoke else min(2, gpus - 1)
    if smoke:
        config.hidden_size, config.intermediate_size = 128, 256  # head size 32
    dtype = torch.float32 if smoke else torch.bfloat16
    device = torch.device("cpu") if smoke else torch.device("cuda", 0)
    store = listening_store(
        "127.0.0.1", 0, 1 + workers, timedelta(seconds=600), wait_for_workers=False
    )
    spec = GroupSpec("127.0.0.1", store.port, 1 + workers, 1, "gloo" if smoke else "nccl", 600)
    with tempfile.TemporaryDirectory() as directory:
        model = build_model(config, device).to(dtype)
        model.save_pretrained(directory)
        answers, engine = start_tp_engine(directory, spec, workers, smoke)
        try:
            publisher = make_publisher("collective", dtype=dtype)
            publisher.join(spec)
            seconds = []
            for version in range(1, TP_SYNC_RUNS + 1):
                started = time.perf_counter()
                handle = publisher.publish(iter(model.state_dict().items()), version)
                held = answers.get(timeout=600)
                seconds.append(time.perf_counter() - started)
                if held != version:
                    raise RuntimeError(f"the engine holds version {held}, {version} was sent")
        finally:
            engine.join(timeout=60)
            if engine.is_alive():
                engine.kill()
    median = sorted(seconds)[len(seconds) // 2]
    return {
        "tensor_parallel_size": workers,
        "backend": spec.backend,
        "gb": handle.nbytes / 1e9,
        "seconds": median,
        "gb_per_s": handle.nbytes / median / 1e9,
    }


def start_tp_engine(model_dir: str, spec, workers: int, smoke: bool):
    """A process running ``tp_engine``, its workers on GPUs 1..``workers``; the queue it answers
    each version it holds on."""
    context = mp.get_context("spawn")
    answers = context.Queue()
    engine = context.Process(target=tp_engine, args=(model_dir, spec, workers, smoke, answers))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if not smoke:  # the child inherits it: its workers take cuda:0.. of these
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(str(1 + i) for i in range(workers))
    try:
        engine.start()
    finally:
        if visible is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible
    return answers, engine


def tp_engine(model_dir: str, spec, workers: int, smoke: bool, answers) -> None:
    """The generator's engine: joins the weight group from rank 1 and answers each version its
    workers received and loaded."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from rlfleet.actors.vllm_engine import VLLMEngine
    from rlfleet.common.config import GeneratorConfig
    from rlfleet.common.transport import CollectiveHandle

    config = GeneratorConfig(
        dtype="float32" if smoke else "bfloat16",
        tensor_parallel_size=workers,
        gpu_memory_utilization=0.5,
        kv_cache_gib=0.125,
    )
    engine = VLLMEngine(model_dir, config, seed=0)
    engine.join_weight_group(spec, 1)
    for _ in range(TP_SYNC_RUNS):
        answers.put(engine.receive_weights(CollectiveHandle(spec.group_id)))

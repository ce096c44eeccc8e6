"""The GPU suite: rlfleet's learner, generation and weight sync on the GPUs of one machine.

Builds a ~0.5B-parameter model from a config (Qwen2-0.5B's shape, random weights: nothing is
downloaded) and prints, within a few minutes:

- the learner's PPO step in bf16 on 1 rank and on N ranks (every GPU; FSDP2 over nccl): tokens per
  second and model FLOPs utilisation (MFU) against the bf16 matrix rate measured on this GPU first
  (and the datasheet's, for comparison), with peak memory per rank;
- generation tokens per second with vLLM when it is installed, else with Hugging Face's
  ``generate`` (said so in the output: a stand-in, not vLLM's figure);
- weight sync: gathering the sharded policy a tensor at a time (``full_state``) and loading it into
  a generator's copy of the model, through host memory (what the object-store transport does) and
  device to device; with two GPUs or more, the collective transport's broadcast over nccl when
  ``common/transport`` has it. Seconds and GB/s.

``bash bench/gpu_suite.sh`` runs it on a GPU machine; ``--smoke`` runs the same code on the CPU
with a tiny model and two gloo ranks (tests/bench/test_gpu_suite.py keeps it working).
Figures go to stdout as a table and, with ``--json PATH``, as JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import socket
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from gpu_tp_sync import tp_sync

DATASHEET_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0}
"""Dense bf16 peak by the vendors' datasheets, for comparison with the measured rate."""


@dataclass(frozen=True)
class Workload:
    """One PPO step's shape: ``batch`` rows of ``query_len`` prompt and ``response_len``
    response tokens, minibatches of ``mini_batch``."""

    batch: int
    query_len: int
    response_len: int
    mini_batch: int
    ppo_epochs: int
    steps: int
    generate_prompts: int
    generate_tokens: int
    max_tokens_per_microbatch: int | None = None
    gradient_checkpointing: bool = False


GPU_WORKLOAD = Workload(64, 128, 128, 16, 1, 3, 128, 128)
SMOKE_WORKLOAD = Workload(8, 6, 6, 4, 1, 2, 4, 4)


def model_config(smoke: bool):
    """Qwen2-0.5B's shape (494M parameters, tied embeddings), or a tiny one for ``--smoke``."""
    from transformers import Qwen2Config

    if smoke:
        return Qwen2Config(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=True,
        )
    return Qwen2Config(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )


def build_model(config, device: torch.device, seed: int = 0):
    """The causal LM with random weights, built on ``device``; the same on every rank."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def step_flops(config, workload: Workload, body_params: int) -> float:
    """Model FLOPs of one PPO step: the rollout forward of policy and reference, then
    ``ppo_epochs`` forward + backward passes (3x a forward). A forward costs ``2 * params`` per
    token in the transformer body, ``2 * vocab * hidden`` per response token in the LM head (only
    response positions reach it) and ``2 * layers * hidden * seq`` per token for causal attention
    (QK^T and AV, half the positions on average)."""
    seq = workload.query_len + workload.response_len
    tokens = workload.batch * seq
    response_tokens = workload.batch * workload.response_len
    forward = (
        2 * body_params * tokens
        + 2 * config.vocab_size * config.hidden_size * response_tokens
        + 2 * config.num_hidden_layers * config.hidden_size * seq * tokens
    )
    return forward * (2 + 3 * workload.ppo_epochs)


def body_parameter_count(model: torch.nn.Module) -> int:
    """Parameters outside the token embedding (and the tied LM head)."""
    embedding = model.get_input_embeddings().weight.numel()
    return parameter_count(model) - embedding


def measured_bf16_tflops(device: torch.device) -> float:
    """The bf16 rate of an 8192^3 matrix product on random data (median of 10 after 3)."""
    if device.type != "cuda":
        return float("nan")
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    times = []
    for i in range(13):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * 8192**3 / times[len(times) // 2] / 1e12


def random_batch(config, workload: Workload, seed: int) -> tuple[list, list, list]:
    generator = torch.Generator().manual_seed(seed)

    def ids(length: int) -> torch.Tensor:
        return torch.randint(0, config.vocab_size, (length,), generator=generator)

    queries = [ids(workload.query_len) for _ in range(workload.batch)]
    responses = [ids(workload.response_len) for _ in range(workload.batch)]
    scores = [torch.randn((), generator=generator) for _ in range(workload.batch)]
    return queries, responses, scores


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_device(rank: int, smoke: bool) -> torch.device:
    if smoke or not torch.cuda.is_available():
        return torch.device("cpu")
    torch.cuda.set_device(rank)
    return torch.device("cuda", rank)


def learner_rank(
    rank: int,
    world_size: int,
    port: int,
    smoke: bool,
    workload: Workload,
    with_checkpoint: bool,
    results: Any,
) -> None:
    """One learner rank: PPO steps in bf16 on the model, then gathering the policy a tensor at
    a time (``full_state``) and, if asked, a checkpoint round trip; rank 0 puts the figures in
    ``results``."""
    from rlfleet import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer
    from rlfleet.trainers.distributed import DataParallel, init_process_group

    device = rank_device(rank, smoke)
    init_process_group(rank, world_size, "127.0.0.1", port, device, timeout_s=600)
    config = model_config(smoke)
    model = build_model(config, device)
    body_params, params = body_parameter_count(model), parameter_count(model)
    trainer = PPOTrainer(
        PPOConfig(
            batch_size=workload.batch,
            mini_batch_size=workload.mini_batch,
            ppo_epochs=workload.ppo_epochs,
            learning_rate=1e-6,
            seed=0,
        ),
        AutoModelForCausalLMWithValueHead(model),
        parallel=DataParallel.current(device),
        dtype=torch.bfloat16,
        gradient_checkpointing=workload.gradient_checkpointing,
        max_tokens_per_microbatch=workload.max_tokens_per_microbatch,
    )
    batch = random_batch(config, workload, seed=1)
    trainer.step(*batch)  # warm-up: allocator, kernels' first launches
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(workload.steps):
        started = time.perf_counter()
        trainer.step(*batch)
        synchronize(device)
        times.append(time.perf_counter() - started)
    gather_s, gathered_bytes = time_full_state(trainer.model, device)
    checkpoint = {}
    if with_checkpoint:  # the fresh trainer starts from the same weights: the same reference
        checkpoint = checkpoint_round_trip(
            trainer,
            batch,
            port,
            lambda: PPOTrainer(
                trainer.config,
                AutoModelForCausalLMWithValueHead(build_model(config, device)),
                parallel=DataParallel.current(device),
                dtype=torch.bfloat16,
            ),
        )
    if rank == 0:
        step_s = sorted(times)[len(times) // 2]
        tokens = workload.batch * (workload.query_len + workload.response_len)
        results.put(
            {
                "ranks": world_size,
                "mini_batch": workload.mini_batch,
                "max_tokens_per_microbatch": workload.max_tokens_per_microbatch,
                "gradient_checkpointing": workload.gradient_checkpointing,
                "params": params,
                "step_s": step_s,
                "tokens_per_s": tokens / step_s,
                "model_tflops_per_s": step_flops(config, workload, body_params) / step_s / 1e12,
                "peak_memory_gib_rank0": (
                    torch.cuda.max_memory_allocated(device) / 2**30
                    if device.type == "cuda"
                    else float("nan")
                ),
                "full_state_s": gather_s,
                "full_state_gb": gathered_bytes / 1e9,
                **checkpoint,
            }
        )
    torch.distributed.destroy_process_group()


def checkpoint_round_trip(
    trainer: Any, batch: tuple[list, list, list], port: int, fresh_trainer: Any
) -> dict[str, float]:
    """Saves the trainer's sharded checkpoint, loads it into a trainer built from other random
    weights, steps both on ``batch`` and compares their weights (a collective: every rank).
    Exact resume means a difference of 0."""
    import tempfile

    from rlfleet.checkpoint.load import load_checkpoint
    from rlfleet.checkpoint.saver import save_checkpoint
    from rlfleet.trainers.distributed import full_state

    directory = Path(tempfile.gettempdir()) / f"rlfleet-suite-{port}"
    synchronize(trainer.current_device)
    started = time.perf_counter()
    uri = save_checkpoint(str(directory), 1, trainer, {}, keep_last=1)
    save_s = time.perf_counter() - started
    resumed = fresh_trainer()
    started = time.perf_counter()
    load_checkpoint(uri, resumed)
    load_s = time.perf_counter() - started
    trainer.step(*batch)
    resumed.step(*batch)
    difference = max(
        (a - b).abs().max().item()
        for (_, a), (_, b) in zip(full_state(trainer.model), full_state(resumed.model), strict=True)
    )
    return {"checkpoint_save_s": save_s, "checkpoint_load_s": load_s, "resume_max_diff": difference}


def time_full_state(model: torch.nn.Module, device: torch.device) -> tuple[float, int]:
    """Seconds to gather every full tensor of ``model`` once (collective), and their bytes."""
    from rlfleet.trainers.distributed import full_state

    synchronize(device)
    started = time.perf_counter()
    nbytes = 0
    for _, tensor in full_state(model):
        nbytes += tensor.numel() * tensor.element_size()
    synchronize(device)
    return time.perf_counter() - started, nbytes


def run_learner(
    world_size: int, smoke: bool, workload: Workload, with_checkpoint: bool
) -> dict[str, Any]:
    """``world_size`` learner ranks in their own processes; rank 0's figures."""
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    port = free_port()
    arguments = (world_size, port, smoke, workload, with_checkpoint, results)
    processes = [
        context.Process(target=learner_rank, args=(rank, *arguments)) for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    failed = [p.exitcode for p in processes if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"learner ranks exited with {failed}")
    return results.get()


def generation_tokens_per_s(smoke: bool, device: torch.device) -> dict[str, Any]:
    """Tokens per second of sampling ``generate_tokens`` new tokens for ``generate_prompts``
    prompts in bf16: vLLM when installed, else Hugging Face ``generate`` (a stand-in)."""
    workload = SMOKE_WORKLOAD if smoke else GPU_WORKLOAD
    config = model_config(smoke)
    prompts = torch.randint(0, config.vocab_size, (workload.generate_prompts, workload.query_len))
    if device.type == "cuda" and importlib.util.find_spec("vllm") is not None:
        return {"engine": "vllm", **vllm_tokens_per_s(config, prompts, workload)}
    reason = "vLLM is not installed here" if device.type == "cuda" else "CPU"
    engine = f"hf-generate ({reason})"
    model = build_model(config, device).to(torch.bfloat16).eval()
    with torch.no_grad():
        kwargs = {
            "max_new_tokens": workload.generate_tokens,
            "min_new_tokens": workload.generate_tokens,
            "do_sample": True,
            "pad_token_id": 0,
        }
        model.generate(
            prompts[:2].to(device), **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2}
        )
        synchronize(device)
        started = time.perf_counter()
        out = model.generate(prompts.to(device), **kwargs)
        synchronize(device)
    seconds = time.perf_counter() - started
    new_tokens = (out.shape[1] - prompts.shape[1]) * prompts.shape[0]
    return {"engine": engine, "seconds": seconds, "tokens_per_s": new_tokens / seconds}


def vllm_tokens_per_s(config, prompts: torch.Tensor, workload: Workload) -> dict[str, float]:
    """vLLM's engine as the generators run it (actors/vllm_engine.py) on a model directory
    written from the config."""
    import tempfile

    from rlfleet.actors.engine import SamplingSpec
    from rlfleet.actors.vllm_engine import VLLMEngine
    from rlfleet.common.config import GeneratorConfig

    with tempfile.TemporaryDirectory() as directory:
        build_model(config, torch.device("cpu")).to(torch.bfloat16).save_pretrained(directory)
        engine = VLLMEngine(
            directory,
            GeneratorConfig(dtype="bfloat16", gpu_memory_utilization=0.5),
            seed=0,
        )
        spec = SamplingSpec(
            max_new_tokens=workload.generate_tokens, temperature=1.0, top_p=1.0, top_k=0
        )
        engine.generate(prompts[:2].tolist(), spec)
        started = time.perf_counter()
        completions = engine.generate(prompts.tolist(), spec)
        seconds = time.perf_counter() - started
    tokens = sum(len(c.token_ids) for c in completions)
    return {"seconds": seconds, "tokens_per_s": tokens / seconds}


def weight_sync_local(smoke: bool, device: torch.device) -> dict[str, Any]:
    """Loading the policy's tensors into a generator's bf16 copy of the model on the same
    device: through pinned host memory (the object-store transport's copies) and device to
    device (the floor of any transport). Seconds and GB/s of the bf16 bytes."""
    config = model_config(smoke)
    source = build_model(config, device).to(torch.bfloat16)
    target = build_model(config, device, seed=1).to(torch.bfloat16)
    named = dict(source.state_dict())
    target_state = target.state_dict()
    nbytes = sum(t.numel() * t.element_size() for t in named.values())

    def copy(through_host: bool) -> float:
        synchronize(device)
        started = time.perf_counter()
        with torch.no_grad():
            for name, tensor in named.items():
                if through_host:
                    host = torch.empty(
                        tensor.shape, dtype=tensor.dtype, pin_memory=device.type == "cuda"
                    )
                    host.copy_(tensor)
                    tensor = host
                target_state[name].copy_(tensor, non_blocking=True)
        synchronize(device)
        return time.perf_counter() - started

    copy(True), copy(False)  # warm-up
    results = {}
    for label, through_host in (("through_host", True), ("device_to_device", False)):
        seconds = sorted(copy(through_host) for _ in range(3))[1]
        results[label] = {"seconds": seconds, "gb_per_s": nbytes / seconds / 1e9}
    results["gb"] = nbytes / 1e9
    return results


def collective_sync(world_size: int, smoke: bool) -> dict[str, Any]:
    """The collective transport's broadcast from a learner process to ``world_size - 1``
    receivers, one per GPU (needs common/transport's collective module and two devices)."""
    try:
        from rlfleet.common.transport import collective_benchmark
    except ImportError:
        return {"skipped": "common/transport has no collective_benchmark"}
    if world_size < 2:
        return {"skipped": "needs two GPUs (one learner, one generator)"}
    config = model_config(smoke)
    return collective_benchmark(config, world_size, smoke)


def table(results: dict[str, Any]) -> str:
    lines = [f"machine: {results['machine']}"]
    peak = results["bf16_tflops_measured"]
    lines.append(
        f"bf16 matmul: {peak:.0f} TFLOP/s measured, {results['bf16_tflops_datasheet']} datasheet"
    )
    for learner in results.get("learner", []):
        if "error" in learner:
            lines.append(f"FAILED learner run {learner['error']}")
            continue
        mfu = learner["model_tflops_per_s"] / peak if math.isfinite(peak) else float("nan")
        lines.append(
            f"learner {learner['ranks']} rank(s), minibatch {learner['mini_batch']}, "
            f"micro-batch tokens {learner['max_tokens_per_microbatch'] or 'all'}, "
            f"checkpointing {'on' if learner['gradient_checkpointing'] else 'off'}, "
            f"{learner['params'] / 1e6:.0f}M params, bf16: "
            f"{learner['step_s']:.3f} s/step, {learner['tokens_per_s']:.0f} tokens/s, "
            f"{learner['model_tflops_per_s']:.1f} TFLOP/s, MFU {mfu:.1%}, peak mem rank 0 "
            f"{learner['peak_memory_gib_rank0']:.1f} GiB; full_state gather "
            f"{learner['full_state_s']:.3f} s for {learner['full_state_gb']:.2f} GB"
        )
        if "checkpoint_save_s" in learner:
            lines.append(
                f"  checkpoint save {learner['checkpoint_save_s']:.1f} s, load "
                f"{learner['checkpoint_load_s']:.1f} s; resumed vs uninterrupted weights one "
                f"step later: max difference {learner['resume_max_diff']:.1e}"
            )
    if generation := results.get("generation"):
        engine, rate = generation["engine"], generation["tokens_per_s"]
        lines.append(f"generation [{engine}]: {rate:.0f} tokens/s")
    if sync := results.get("weight_sync_local"):
        for label in ("through_host", "device_to_device"):
            lines.append(
                f"weight load {label}: {sync[label]['seconds']:.3f} s for {sync['gb']:.2f} GB, "
                f"{sync[label]['gb_per_s']:.1f} GB/s"
            )
    if "collective_sync" in results:
        lines.append(f"collective sync: {json.dumps(results['collective_sync'])}")
    if "tp_sync" in results:
        lines.append(f"collective sync into a vLLM engine: {json.dumps(results['tp_sync'])}")
    for stage, error in results.get("errors", {}).items():
        lines.append(f"FAILED {stage}: {error}")
    return "\n".join(lines)


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
        return f"{torch.cuda.device_count()} x {'/'.join(names)}, torch {torch.__version__}"
    return f"CPU ({os.cpu_count()} cores), torch {torch.__version__}"


def datasheet_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(0)
    return next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)


def learner_runs(smoke: bool, n_ranks: int) -> list[dict[str, Any]]:
    """1 and ``n_ranks`` ranks on the workload (with a checkpoint round trip), and on a GPU
    also 1 rank with the whole batch as one minibatch (fewer, larger kernels), then the same
    with memory bounded: micro-batches of at most 8192 tokens and gradient checkpointing."""
    workload = SMOKE_WORKLOAD if smoke else GPU_WORKLOAD
    runs = [run_learner(n, smoke, workload, True) for n in sorted({1, n_ranks})]
    if not smoke:
        whole_batch = replace(workload, mini_batch=workload.batch)
        bounded = replace(whole_batch, max_tokens_per_microbatch=8192, gradient_checkpointing=True)
        for variant in (whole_batch, bounded):
            try:
                runs.append(run_learner(1, smoke, variant, False))
            except RuntimeError as error:  # keep the figures of the runs before
                runs.append({"error": f"{asdict(variant)}: {error}"})
    return runs


STAGES = ("learner", "generation", "weight_sync_local", "collective_sync", "tp_sync")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, 2 gloo ranks")
    parser.add_argument("--ranks", type=int, default=None, help="N for the N-rank run")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here")
    parser.add_argument(
        "--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}"
    )
    args = parser.parse_args(argv)
    device = torch.device("cuda", 0) if torch.cuda.is_available() and not args.smoke else None
    device = device or torch.device("cpu")
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    n_ranks = args.ranks or (2 if args.smoke else max(gpus, 1))
    results: dict[str, Any] = {
        "machine": machine_description(device),
        "workload": asdict(SMOKE_WORKLOAD if args.smoke else GPU_WORKLOAD),
        "bf16_tflops_measured": measured_bf16_tflops(device),
        "bf16_tflops_datasheet": datasheet_tflops(device),
    }
    stages = [
        ("learner", lambda: learner_runs(args.smoke, n_ranks)),
        ("generation", lambda: generation_tokens_per_s(args.smoke, device)),
        ("weight_sync_local", lambda: weight_sync_local(args.smoke, device)),
        ("collective_sync", lambda: collective_sync(n_ranks, args.smoke)),
        ("tp_sync", lambda: tp_sync(model_config(args.smoke), build_model, args.smoke, gpus)),
    ]
    for name, stage in stages:
        if name not in args.stages.split(","):
            continue
        started = time.perf_counter()
        try:
            results[name] = stage()
        except Exception as error:  # one failed stage must not cost the others' figures
            traceback.print_exc()
            results.setdefault("errors", {})[name] = f"{type(error).__name__}: {error}"
        print(f"[{name}: {time.perf_counter() - started:.1f} s]", file=sys.stderr, flush=True)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2))
    print(table(results))
    return 1 if "errors" in results else 0


if __name__ == "__main__":
    sys.exit(main())

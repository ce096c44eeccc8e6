"""What the vLLM engine asks of ``vllm.LLM`` (dtype, sleep mode) and where its compiled kernels
are kept, checked without starting vLLM; and a compile cache that a second process reuses."""

from __future__ import annotations

import gc
import getpass
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from support.fake_llm import RecordingLLM

from rlfleet.actors.vllm_engine import use_compile_cache
from rlfleet.common.config import GeneratorConfig


@pytest.fixture
def start_engine(tiny_model_dir, monkeypatch: pytest.MonkeyPatch):
    """Starts a VLLMEngine on ``RecordingLLM``, on a platform with or without sleep mode."""
    import vllm
    from vllm.platforms import current_platform
    from vllm.v1.sample import sampler

    from rlfleet.actors.vllm_engine import VLLMEngine

    monkeypatch.setattr(vllm, "LLM", RecordingLLM)
    monkeypatch.setattr(sampler, "batched_count_greater_than", sampler.batched_count_greater_than)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/unused")

    def start(config: GeneratorConfig, sleep_mode: bool) -> VLLMEngine:
        monkeypatch.setattr(
            type(current_platform), "is_sleep_mode_available", lambda self: sleep_mode
        )
        return VLLMEngine(tiny_model_dir, config, seed=0)

    return start


@pytest.mark.parametrize(
    ("dtype", "expected"), [(None, torch.float32), ("bfloat16", torch.bfloat16)]
)
def test_the_engine_runs_in_the_generators_dtype(start_engine, dtype, expected) -> None:
    engine = start_engine(GeneratorConfig(dtype=dtype), sleep_mode=False)
    assert engine._llm.kwargs["dtype"] is expected
    assert engine._llm.rpcs == ["rlfleet_rank_tokens_eagerly"]  # on CPU, in every worker


def test_with_sleep_mode_the_engine_sleeps_once_at_level_1_and_wakes_once(start_engine) -> None:
    engine = start_engine(GeneratorConfig(), sleep_mode=True)
    assert engine._llm.kwargs["enable_sleep_mode"] is True
    engine.sleep()
    engine.sleep()
    engine.wake_up()
    engine.wake_up()
    assert engine._llm.calls == ["sleep(1)", "wake_up"]


def test_the_engine_starts_with_the_loaded_modules_out_of_the_collectors_reach(
    start_engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM's start runs full collections: the objects that were there before it are frozen
    first, so that they do not walk the heap of torch, transformers and vLLM every time."""
    import vllm

    frozen_when_vllm_starts = []

    class FreezeRecordingLLM(RecordingLLM):
        def __init__(self, *args, **kwargs) -> None:
            frozen_when_vllm_starts.append(gc.get_freeze_count())
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(vllm, "LLM", FreezeRecordingLLM)
    gc.unfreeze()
    start_engine(GeneratorConfig(), sleep_mode=False)
    assert frozen_when_vllm_starts[0] > 100_000  # torch and vLLM are loaded in this process


def test_without_sleep_mode_sleep_and_wake_up_never_reach_vllm(start_engine) -> None:
    engine = start_engine(GeneratorConfig(), sleep_mode=False)
    assert engine._llm.kwargs["enable_sleep_mode"] is False
    engine.sleep()
    engine.wake_up()
    assert engine._llm.calls == []


def test_the_compile_cache_goes_under_cache_dir_unless_the_environment_names_another(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("HOME", "/home/someone")
    ours = "/home/someone/.cache/rlfleet/torchinductor"
    for torch_default in (None, str(tmp_path / f"torchinductor_{getpass.getuser()}")):
        if torch_default is None:
            monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        else:
            monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", torch_default)
        use_compile_cache("~/.cache/rlfleet")
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == ours
    use_compile_cache("/elsewhere")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == ours
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    use_compile_cache(None)
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def test_the_engine_start_points_the_compile_cache_at_cache_dir(
    start_engine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    start_engine(GeneratorConfig(cache_dir=str(tmp_path)), sleep_mode=False)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "torchinductor")


RANK_KERNEL = """
import json, sys
import torch
from torch._dynamo.utils import counters  # imports inductor, which fills in its default cache
from rlfleet.actors.vllm_engine import use_compile_cache

use_compile_cache(sys.argv[1])
from vllm.v1.sample.ops.logprobs import batched_count_greater_than

batched_count_greater_than(torch.randn(4, 10), torch.zeros(4, 1))
print(json.dumps(dict(counters["inductor"])))
"""


@pytest.mark.slow
def test_a_second_process_loads_the_kernel_the_first_compiled(tmp_path: Path) -> None:
    """The kernel vLLM compiles in an engine's first generation (the sampler's token ranks):
    the first process compiles it (an inductor graph-cache miss), the second only loads it."""
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    env["TMPDIR"] = str(tmp_path)

    def compile_counters() -> dict[str, int]:
        command = [sys.executable, "-c", RANK_KERNEL, str(tmp_path / "cache")]
        run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        return json.loads(run.stdout.strip().splitlines()[-1])

    assert compile_counters() == {"fxgraph_cache_miss": 1}
    assert (tmp_path / "cache" / "torchinductor" / "fxgraph").is_dir()
    assert compile_counters() == {"fxgraph_cache_hit": 1}


def test_on_cpu_the_sampler_ranks_tokens_eagerly(start_engine) -> None:
    from vllm.v1.sample import sampler

    from rlfleet.actors.vllm_worker import count_at_least

    start_engine(GeneratorConfig(), sleep_mode=False)
    assert sampler.batched_count_greater_than is count_at_least
    logprobs = torch.tensor([[-1.0, -2.0, -0.5, -2.0], [-3.0, -1.0, -1.0, -0.1]])
    sampled = torch.tensor([[-2.0], [-1.0]])
    assert count_at_least(logprobs, sampled).tolist() == [4, 3]

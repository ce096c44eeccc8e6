"""What a vLLM engine start checks and leaves behind: the CPU build's head sizes, no
``vllm_dist_*`` file in the temp dir, and job seeds that change its samples."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from generator_reference import PROMPTS
from support.fake_llm import RecordingLLM

from rlfleet.actors.engine import SamplingSpec
from rlfleet.actors.generator import rollout_seed
from rlfleet.actors.vllm_engine import CPU_HEAD_SIZES, cpu_serve_problem, head_dim
from rlfleet.common.config import GeneratorConfig


def model_dir(tmp_path: Path, **config) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize(
    ("config", "size"),
    [
        ({"n_embd": 64, "n_head": 2}, 32),
        ({"hidden_size": 64, "num_attention_heads": 4}, 16),
        ({"hidden_size": 64, "num_attention_heads": 4, "head_dim": 128}, 128),
    ],
)
def test_head_dim_comes_from_the_hf_config(tmp_path: Path, config: dict, size: int) -> None:
    assert head_dim(model_dir(tmp_path, **config)) == size


def test_a_head_size_the_cpu_build_cannot_serve_names_the_limit_and_the_fallback(
    tmp_path: Path,
) -> None:
    problem = cpu_serve_problem(model_dir(tmp_path, n_embd=64, n_head=4))
    assert problem.startswith("attention head size 16 is not served by vLLM on CPU")
    assert "32, 64, 80" in problem and "generators.engine: hf" in problem
    assert cpu_serve_problem(model_dir(tmp_path, n_embd=64, n_head=2)) is None


def test_cpu_head_sizes_are_the_ones_vllm_cpu_attention_serves() -> None:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    assert list(CPU_HEAD_SIZES) == CPUAttentionBackend.get_supported_head_sizes()


@pytest.fixture(scope="module")
def engine_and_tmp(tiny_model_dir, tmp_path_factory):
    from rlfleet.actors.vllm_engine import VLLMEngine

    tmp = tmp_path_factory.mktemp("vllm-tmp")
    previous, tempfile.tempdir = tempfile.tempdir, str(tmp)
    try:
        yield VLLMEngine(tiny_model_dir, GeneratorConfig(kv_cache_gib=0.05), seed=0), tmp
    finally:
        tempfile.tempdir = previous


@pytest.mark.slow
def test_an_engine_start_leaves_no_vllm_dist_file_in_the_temp_dir(engine_and_tmp) -> None:
    engine, tmp = engine_and_tmp
    assert [p.name for p in tmp.rglob("*") if "vllm" in p.name] == []
    assert len(engine.generate(PROMPTS, SamplingSpec.greedy(3))) == len(PROMPTS)


@pytest.mark.slow
def test_job_seeds_0_1_2_sample_differently_with_vllm(engine_and_tmp) -> None:
    engine, _ = engine_and_tmp

    def samples(job_seed: int) -> list[list[int]]:
        seeds = tuple(rollout_seed(job_seed, rid) for rid in range(len(PROMPTS)))
        spec = SamplingSpec(max_new_tokens=8, seeds=seeds)
        return [c.token_ids for c in engine.generate(PROMPTS, spec)]

    by_seed = [samples(job_seed) for job_seed in (0, 1, 2)]
    assert by_seed[0] != by_seed[1] != by_seed[2] != by_seed[0]
    assert samples(1) == by_seed[1]


class FakeLLM(RecordingLLM):
    """Records what ``vllm.LLM`` was given and drops a file where vLLM leaves its file store."""

    created: list[dict] = []

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        FakeLLM.created.append(kwargs)
        Path(tempfile.gettempdir(), "vllm_dist_fake").write_text("")


@pytest.mark.parametrize("trust", [False, True])
def test_remote_code_is_trusted_only_when_asked_and_the_start_leaves_no_file(
    tiny_model_dir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, trust: bool
) -> None:
    import vllm

    from rlfleet.actors.vllm_engine import VLLMEngine

    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    VLLMEngine(tiny_model_dir, GeneratorConfig(), seed=0, trust_remote_code=trust)
    assert FakeLLM.created[-1]["trust_remote_code"] is trust
    assert tempfile.gettempdir() == str(tmp_path)
    assert list(tmp_path.iterdir()) == []

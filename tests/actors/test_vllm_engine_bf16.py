"""A bfloat16 vLLM engine (the CPU build runs bfloat16 on AVX512-BF16 CPUs) decodes like
transformers in bfloat16, and its weights reload in place from the learner's float32 ones."""

from __future__ import annotations

import pytest
import torch
from generator_reference import PROMPTS, assert_same_completions, load_model

from rlfleet.actors.engine import SamplingSpec
from rlfleet.actors.hf_engine import HFEngine
from rlfleet.common.config import GeneratorConfig

pytestmark = pytest.mark.slow

LOGPROB_TOLERANCE = 0.02
"""Two bfloat16 decodings in transformers alone (KV cache and padding vs full forwards) differ
by up to 0.017 in a token's logprob; vLLM's bfloat16 vs transformers' bfloat16 engine by up to
0.008 (three tiny models, 12 greedy tokens, all tokens equal)."""


@pytest.fixture(scope="module")
def engine(tiny_model_dir, tmp_path_factory):
    from rlfleet.actors.vllm_engine import VLLMEngine

    with pytest.MonkeyPatch.context() as env:
        env.setenv("TMPDIR", str(tmp_path_factory.mktemp("vllm-tmp")))
        config = GeneratorConfig(kv_cache_gib=0.05, dtype="bfloat16")
        yield VLLMEngine(tiny_model_dir, config, seed=0)


def hf_bfloat16_greedy(model_dir, model: torch.nn.Module, max_new_tokens: int):
    hf = HFEngine(model_dir, seed=0, dtype="bfloat16")
    hf.load_weights(model.state_dict().items())
    return hf.generate(PROMPTS, SamplingSpec.greedy(max_new_tokens))


def test_float32_weights_reload_in_place_and_decode_like_transformers_bf16(
    engine, tiny_model_dir, other_model_dir
):
    """Two syncs in a row (to new weights and back), each from float32 tensors."""
    for model_dir in (other_model_dir, tiny_model_dir):
        model = load_model(model_dir)
        engine.load_weights(model.state_dict().items())
        assert_same_completions(
            engine.generate(PROMPTS, SamplingSpec.greedy(8)),
            hf_bfloat16_greedy(model_dir, model, 8),
            LOGPROB_TOLERANCE,
        )


def test_the_engine_computes_in_bfloat16(engine):
    """Every weight matrix is bfloat16. A bias may be float32: on CPUs with AMX, vLLM's
    sgl-kernel GEMM (``dispatch_cpu_unquantized_gemm``) keeps the biases of small linear layers
    in float32 and adds them to its float32 accumulator (seen on Intel Xeon; on AMD EPYC every
    parameter was bfloat16)."""

    def dtypes(worker) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {"matrices": set(), "biases": set(), "other": set()}
        for name, parameter in worker.model_runner.get_model().named_parameters():
            kind = "matrices" if parameter.dim() >= 2 else "other"
            kind = "biases" if name.endswith(".bias") else kind
            found[kind].add(str(parameter.dtype))
        return found

    [found] = engine._llm.collective_rpc(dtypes)
    assert found["matrices"] == {"torch.bfloat16"}
    assert found["biases"] <= {"torch.bfloat16", "torch.float32"}
    assert found["other"] <= {"torch.bfloat16"}

"""The tiny model's other architectures and its chat template: each built from its transformers
config with the family's traits, reproducible, and loadable with the Auto classes."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from rlfleet.tasks import tiny_model
from rlfleet.tasks.tiny_model import (
    ARCHITECTURES,
    CHAT_TEMPLATE,
    EOS_TOKEN,
    TURN_END_TOKEN,
    TURN_START_TOKEN,
    build_tiny_model,
)

MODEL_CLASSES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
    "gpt_neox": "GPTNeoXForCausalLM",
    "gemma": "GemmaForCausalLM",
}
TIED = {
    "gpt2": True,
    "llama": False,
    "qwen2": True,
    "mistral": False,
    "gpt_neox": False,
    "gemma": True,
}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_each_architecture_loads_with_its_family_traits(tmp_path: Path, architecture: str) -> None:
    model_dir = build_tiny_model(tmp_path, architecture=architecture)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = model.config
    assert type(model).__name__ == MODEL_CLASSES[architecture]
    assert config.model_type == architecture
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied is TIED[architecture]
    assert config.vocab_size == len(AutoTokenizer.from_pretrained(model_dir))
    if architecture in ("llama", "qwen2", "mistral", "gemma"):
        assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (
            2,
            1,
            32,
        )
    names = {name for name, _ in model.named_parameters()}
    has_qkv_bias = "model.layers.0.self_attn.q_proj.bias" in names
    assert has_qkv_bias is (architecture == "qwen2")
    logits = model(torch.tensor([[5, 6, 7]])).logits
    assert logits.shape == (1, 3, config.vocab_size) and torch.isfinite(logits).all()


def test_grouped_query_heads_follow_n_kv_head(tmp_path: Path) -> None:
    model_dir = build_tiny_model(tmp_path, architecture="llama", n_embd=128, n_head=4, n_kv_head=2)
    config = AutoConfig.from_pretrained(model_dir)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 32)


def _file_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def test_an_architecture_built_twice_is_the_same_bytes(tmp_path: Path) -> None:
    first = build_tiny_model(tmp_path / "a", architecture="qwen2", chat_template=True)
    second = build_tiny_model(tmp_path / "b", architecture="qwen2", chat_template=True)
    assert _file_bytes(first) == _file_bytes(second)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"architecture": "bloom"}, r"architecture 'bloom' is not one of gpt2, llama, .*gemma"),
        ({"architecture": "gpt2", "n_kv_head": 1}, "gpt2 has no grouped-query attention"),
        ({"architecture": "gpt_neox", "n_kv_head": 1}, "gpt_neox has no grouped-query"),
    ],
)
def test_unknown_architectures_and_impossible_heads_are_errors(
    tmp_path: Path, kwargs: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        build_tiny_model(tmp_path, **kwargs)


def test_the_chat_template_renders_chatml_and_its_turn_end_is_an_eos_id(tmp_path: Path) -> None:
    model_dir = build_tiny_model(tmp_path, chat_template=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "the movie was"},
    ]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert text == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nthe movie was<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in (EOS_TOKEN, TURN_START_TOKEN)}
    ids[TURN_END_TOKEN] = tokenizer.convert_tokens_to_ids(TURN_END_TOKEN)
    assert sorted(ids.values()) == [0, 1, 2]
    assert tokenizer.encode(text, add_special_tokens=False).count(ids[TURN_START_TOKEN]) == 3
    assert tokenizer.decode(
        tokenizer.encode("fine" + TURN_END_TOKEN), skip_special_tokens=True
    ) == ("fine")
    generation = GenerationConfig.from_pretrained(model_dir)
    assert generation.eos_token_id == [ids[TURN_END_TOKEN], ids[EOS_TOKEN]]
    assert tokenizer.eos_token == EOS_TOKEN


def test_without_a_chat_template_the_tokenizer_has_none(tiny_model_dir: Path) -> None:
    assert AutoTokenizer.from_pretrained(tiny_model_dir).chat_template is None


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rlfleet tiny-model")
    tiny_model.add_arguments(parser)
    return tiny_model.run(parser.parse_args(argv))


def test_the_cli_builds_and_pretrains_other_architectures_like_the_api(tmp_path: Path) -> None:
    assert _run_cli([str(tmp_path / "cli"), "--architecture", "llama", "--chat-template"]) == 0
    api = build_tiny_model(tmp_path / "api", architecture="llama", chat_template=True)
    assert _file_bytes(tmp_path / "cli") == _file_bytes(api)
    argv = [str(tmp_path / "pretrained"), "--pretrain", "--steps", "2", "--architecture", "gemma"]
    assert _run_cli(argv) == 0
    assert AutoConfig.from_pretrained(tmp_path / "pretrained").model_type == "gemma"


def test_the_arithmetic_task_keeps_its_gpt2(tmp_path: Path) -> None:
    argv = [str(tmp_path / "m"), "--task", "arithmetic", "--architecture", "llama"]
    with pytest.raises(
        SystemExit, match="--architecture and --chat-template are for --task reviews"
    ):
        _run_cli(argv)

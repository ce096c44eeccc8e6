"""Chat prompts: conversations checked, the system prompt placed, the template required, and the
ids that end a turn."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from rlfleet.common.chat import (
    ChatFormatError,
    check_chat_template,
    checked_messages,
    render_chat,
    stop_token_ids,
    with_system_prompt,
)
from rlfleet.tasks.tiny_model import build_tiny_model

USER = {"role": "user", "content": "the movie was"}


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("chat-model"), chat_template=True)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("hi", r"^row 3: expected a non-empty list of messages, got 'hi'$"),
        ([], r"^row 3: expected a non-empty list of messages, got \[\]$"),
        ([USER, {"role": "user"}], r"^row 3: message 1 must be an object with string 'role'"),
        ([{"role": "user", "content": [{"type": "text"}]}], r"^row 3: message 0 must be"),
        ([USER, "hi"], r"^row 3: message 1 must be an object"),
    ],
)
def test_a_conversation_that_is_not_role_content_messages_is_an_error(value, message) -> None:
    with pytest.raises(ChatFormatError, match=message):
        checked_messages(value, "row 3")


def test_a_conversation_of_messages_passes_with_extra_keys() -> None:
    messages = [USER, {"role": "assistant", "content": "great", "name": "bot"}]
    assert checked_messages(messages, "row 0") is messages


def test_the_system_prompt_goes_first_unless_the_conversation_has_its_own() -> None:
    assert with_system_prompt([USER], None) == [USER]
    assert with_system_prompt([USER], "be brief") == [
        {"role": "system", "content": "be brief"},
        USER,
    ]
    own = [{"role": "system", "content": "be kind"}, USER]
    assert with_system_prompt(own, "be brief") == own


def test_render_opens_the_assistant_turn(chat_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    assert render_chat(tokenizer, [USER]) == (
        "<|im_start|>user\nthe movie was<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_tokenizer_without_a_template_names_the_model_and_the_field(tiny_model_dir) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with pytest.raises(ChatFormatError) as error:
        check_chat_template(tokenizer, tiny_model_dir, "conversation")
    message = str(error.value)
    assert message.startswith(f"dataset.messages_field: the tokenizer of {tiny_model_dir} has no")
    assert "'conversation'" in message and "\n" not in message


def test_stop_ids_are_the_tokenizer_eos_and_every_generation_config_eos(chat_model_dir) -> None:
    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    turn_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert stop_token_ids(chat_model_dir, tokenizer) == (tokenizer.eos_token_id, turn_end)
    assert stop_token_ids(chat_model_dir) == (turn_end, tokenizer.eos_token_id)


def test_stop_ids_of_a_plain_model_are_its_eos(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert stop_token_ids(tiny_model_dir, tokenizer) == (tokenizer.eos_token_id,)


def test_without_a_generation_config_the_model_configs_eos_ids_count(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert stop_token_ids(tmp_path) == (7, 9)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 11}))
    assert stop_token_ids(tmp_path) == (11,)


@pytest.mark.slow
def test_both_engines_stop_at_the_end_of_turn_token(chat_model_dir, tmp_path, monkeypatch) -> None:
    """Weights that make the end-of-turn token (an EOS id of the generation config only, not
    the tokenizer's EOS) win every step: vLLM and the hf engine stop right after it."""
    from actors.generator_reference import PROMPTS, always_eos_state_dict, load_model

    from rlfleet.actors.engine import SamplingSpec
    from rlfleet.actors.hf_engine import HFEngine
    from rlfleet.actors.vllm_engine import VLLMEngine
    from rlfleet.common.config import GeneratorConfig

    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    turn_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert turn_end != tokenizer.eos_token_id
    model = load_model(chat_model_dir)
    model.config.eos_token_id = turn_end  # the token always_eos_state_dict makes win
    state = always_eos_state_dict(model)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    engines = [
        HFEngine(chat_model_dir, seed=0),
        VLLMEngine(chat_model_dir, GeneratorConfig(kv_cache_gib=0.05), seed=0),
    ]
    for engine in engines:
        engine.load_weights(state.items())
        completions = engine.generate(PROMPTS, SamplingSpec.greedy(6))
        assert [c.token_ids for c in completions] == [[turn_end]] * len(PROMPTS)
        assert [c.finish_reason for c in completions] == ["stop"] * len(PROMPTS)

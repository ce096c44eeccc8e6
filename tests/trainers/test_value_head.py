"""AutoModelForCausalLMWithValueHead: forward, initialisation, one-checkpoint save/load."""

from __future__ import annotations

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from rlfleet.trainers.value_head import AutoModelForCausalLMWithValueHead


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=96, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    return GPT2LMHeadModel(config).eval()


def test_forward_returns_float32_logits_no_loss_and_one_value_per_position():
    model = AutoModelForCausalLMWithValueHead(tiny_gpt2()).eval()
    input_ids = torch.randint(0, 96, (3, 7))
    logits, loss, values = model(input_ids=input_ids)
    assert logits.dtype == torch.float32 and logits.shape == (3, 7, 96)
    assert loss is None
    assert values.shape == (3, 7)
    hidden = model.pretrained_model(input_ids, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(values, model.v_head.summary(hidden).squeeze(-1))


def test_value_head_is_dropout_then_linear():
    default = AutoModelForCausalLMWithValueHead(tiny_gpt2())
    assert isinstance(default.v_head.dropout, nn.Dropout) and default.v_head.dropout.p == 0.1
    assert default.v_head.summary.in_features == 16
    assert default.v_head.summary.out_features == 1
    no_dropout = AutoModelForCausalLMWithValueHead(tiny_gpt2(), summary_dropout_prob=0.0)
    assert isinstance(no_dropout.v_head.dropout, nn.Identity)


def test_normal_init_strategy_draws_weights_and_zeroes_the_bias():
    model = AutoModelForCausalLMWithValueHead(
        tiny_gpt2(), v_head_init_strategy="normal", v_head_initializer_range=0.0
    )
    assert torch.equal(model.v_head.summary.weight, torch.zeros(1, 16))
    assert torch.equal(model.v_head.summary.bias, torch.zeros(1))
    torch.manual_seed(5)
    wide = AutoModelForCausalLMWithValueHead(tiny_gpt2(), v_head_init_strategy="normal")
    assert wide.v_head.summary.weight.abs().max() > 0.2  # N(0, 0.2): far above Linear's 1/4
    try:
        AutoModelForCausalLMWithValueHead(tiny_gpt2(), v_head_init_strategy="uniform")
    except ValueError as error:
        assert "v_head_init_strategy" in str(error)
    else:
        raise AssertionError("an unknown init strategy must be refused")


def test_save_pretrained_writes_one_checkpoint_both_loaders_read(tmp_path):
    model = AutoModelForCausalLMWithValueHead(tiny_gpt2(), v_head_init_strategy="normal")
    model.save_pretrained(tmp_path)
    assert not list(tmp_path.glob("*.bin"))
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as checkpoint:
        keys = set(checkpoint.keys())
    assert {"v_head.summary.weight", "v_head.summary.bias"} <= keys

    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    expected = model.pretrained_model.state_dict()
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, expected[name]), name

    restored = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path)
    assert torch.equal(restored.v_head.summary.weight, model.v_head.summary.weight)
    assert torch.equal(restored.v_head.summary.bias, model.v_head.summary.bias)
    for name, tensor in restored.pretrained_model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_from_pretrained_splits_value_head_and_transformers_kwargs(tmp_path):
    tiny_gpt2().save_pretrained(tmp_path)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        tmp_path, summary_dropout_prob=0.0, dtype=torch.float64, attn_implementation="eager"
    )
    assert isinstance(model.v_head.dropout, nn.Identity)
    assert model.pretrained_model.dtype == torch.float64
    assert model.pretrained_model.config._attn_implementation == "eager"


def test_from_pretrained_wraps_a_model_object():
    pretrained = tiny_gpt2()
    model = AutoModelForCausalLMWithValueHead.from_pretrained(pretrained)
    assert model.pretrained_model is pretrained


def test_state_dict_round_trip_keeps_hf_names_and_value_head():
    model = AutoModelForCausalLMWithValueHead(tiny_gpt2(seed=1))
    state = model.state_dict()
    assert "transformer.wte.weight" in state and "v_head.summary.bias" in state
    other = AutoModelForCausalLMWithValueHead(tiny_gpt2(seed=2))
    other.load_state_dict(state)
    for name, tensor in other.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_generate_delegates_to_the_wrapped_model():
    model = AutoModelForCausalLMWithValueHead(tiny_gpt2())
    input_ids = torch.tensor([[5, 6, 7]])
    kwargs = {"max_new_tokens": 4, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(
        model.generate(input_ids=input_ids, **kwargs),
        model.pretrained_model.generate(input_ids=input_ids, **kwargs),
    )


def test_push_to_hub_delegates_to_wrapped_model_with_mocked_hub(monkeypatch):
    model = AutoModelForCausalLMWithValueHead(tiny_gpt2())
    calls = []

    def fake_push(*args, **kwargs):
        calls.append((args, kwargs, model.pretrained_model.v_head))
        return "pushed"

    monkeypatch.setattr(model.pretrained_model, "push_to_hub", fake_push)
    assert model.push_to_hub("org/repo", private=True) == "pushed"
    assert calls == [(("org/repo",), {"private": True}, model.v_head)]

"""Config checks that run before any actor starts, without reading the dataset."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rlfleet.common.config import JobConfig
from rlfleet.job.checks import ConfigError, check_config, check_reward_arguments


def config(tmp_path: Path, model_config: dict | None = None, **fields) -> JobConfig:
    """A job on a model directory with ``model_config`` as its config.json and a tokenizer."""
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text(json.dumps(model_config or {}))
    (model / "tokenizer.json").write_text("{}")
    raw = {
        "model": str(model),
        "dataset": {"path": str(tmp_path / "not-read.jsonl")},
        "reward": {"function": "rlfleet.reward.functions:sentiment"},
        **fields,
    }
    return JobConfig.model_validate(raw)


def test_a_good_config_passes_without_its_dataset_being_read(tmp_path: Path) -> None:
    check_config(config(tmp_path))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"model": "/nonexistent/model"}, r"^model: /nonexistent/model is not a model directory"),
        (
            {"reward": {"function": "rlfleet.reward.functions:nope"}},
            r"^reward\.function: ",
        ),
        (
            {"reward": {"model": "/nonexistent/rm"}},
            r"^reward\.model: /nonexistent/rm is not a model directory",
        ),
    ],
)
def test_what_cannot_be_loaded_is_an_error_that_starts_with_the_key(
    tmp_path: Path, fields: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        check_config(config(tmp_path, **fields))


def test_a_model_directory_without_a_tokenizer_says_how_to_add_one(tmp_path: Path) -> None:
    job = config(tmp_path)
    (Path(job.model) / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=r"^model: .* has no tokenizer .*save_pretrained"):
        check_config(job)


def test_max_new_tokens_must_leave_room_for_a_prompt_in_the_context(tmp_path: Path) -> None:
    """Used to be found at the first batch: 'it must be 1..-72'."""
    with pytest.raises(
        ConfigError,
        match=r"^generators\.max_new_tokens: 200 leaves no room for a prompt in the model's "
        r"context of 128 tokens; set it to at most 127$",
    ):
        check_config(config(tmp_path, {"n_positions": 128}, generators={"max_new_tokens": 200}))
    check_config(config(tmp_path, {"n_positions": 128}, generators={"max_new_tokens": 127}))


def test_a_head_size_vllm_on_cpu_cannot_serve_is_refused_naming_the_fallback(
    tmp_path: Path,
) -> None:
    head_16 = {"hidden_size": 64, "num_attention_heads": 4}
    with pytest.raises(
        ConfigError, match=r"^generators\.engine: .*attention head size 16 .*generators\.engine: hf"
    ):
        check_config(config(tmp_path, head_16))
    check_config(config(tmp_path, head_16, generators={"engine": "hf"}))
    on_gpus = config(tmp_path, head_16, generators={"num_gpus": 1}, ray_address="ray://head:1")
    check_config(on_gpus)  # a cluster's GPUs: vLLM's GPU build serves any head size


def test_an_unwritable_checkpoint_location_fails_before_start(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ConfigError, match=r"^checkpoint\.uri: cannot write to .*a-file/ckpt \("):
        check_config(config(tmp_path, checkpoint={"uri": str(tmp_path / "a-file" / "ckpt")}))


def test_a_writable_checkpoint_location_keeps_no_probe_file(tmp_path: Path) -> None:
    check_config(config(tmp_path, checkpoint={"uri": str(tmp_path / "ckpt")}))
    assert list((tmp_path / "ckpt").iterdir()) == []


@pytest.mark.slow
def test_s3_checkpoint_locations_are_probed_too(tmp_path: Path, s3_env) -> None:
    check_config(config(tmp_path, checkpoint={"uri": f"s3://{s3_env.bucket}/probe-test"}))
    with pytest.raises(ConfigError, match=r"^checkpoint\.uri: cannot write to s3://no-such-bucket"):
        check_config(config(tmp_path, checkpoint={"uri": "s3://no-such-bucket/job"}))


@pytest.mark.parametrize(
    ("fields", "kwargs", "clashing"),
    [
        ({"prompt", "prompts"}, {}, "['prompts']"),
        ({"prompt", "responses", "label"}, {}, "['responses']"),
        ({"prompt", "label"}, {"label": "pos"}, "['label']"),
    ],
)
def test_dataset_fields_that_clash_with_reward_arguments_are_named(
    tmp_path: Path, fields: set, kwargs: dict, clashing: str
) -> None:
    reward = {"function": "rlfleet.reward.functions:sentiment", "kwargs": kwargs}
    job = config(tmp_path, reward=reward)
    with pytest.raises(
        ConfigError, match=rf"^dataset\.path: .* has fields {re.escape(clashing)} that clash"
    ):
        check_reward_arguments(job, fields)
    check_reward_arguments(job, {"prompt", "answer"})


def test_each_reward_component_is_checked_before_start(tmp_path) -> None:
    from rlfleet.common.config import JobConfig
    from rlfleet.job.checks import (
        ConfigError,
        check_reward_arguments,
        check_reward_source,
        reward_sources,
    )

    def job(components: list[dict]) -> JobConfig:
        return JobConfig.model_validate(
            {
                "model": str(tmp_path),
                "dataset": {"path": str(tmp_path / "d.jsonl")},
                "reward": {"components": components},
            }
        )

    good = {"name": "good", "function": "rlfleet.reward.functions:sentiment"}
    bad = {"name": "typo", "function": "rlfleet.reward.functions:nope"}
    sources = reward_sources(job([good, bad]))
    assert [key for key, _ in sources] == [
        "reward.components[0] (good)",
        "reward.components[1] (typo)",
    ]
    check_reward_source(*sources[0])
    with pytest.raises(ConfigError, match=r"reward.components\[1\] \(typo\).function: .*'nope'"):
        check_reward_source(*sources[1])
    clash = job([{**good, "kwargs": {"target": 1}}])
    with pytest.raises(ConfigError, match=r"clash .*reward.components\[0\] \(good\).kwargs"):
        check_reward_arguments(clash, ["prompt", "target"])


def test_gpus_asked_of_a_local_ray_instance_without_any_fail_before_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rlfleet.job.checks import check_local_gpus

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    job = config(tmp_path, learner={"num_gpus": 1})
    with pytest.raises(
        ConfigError,
        match=r"^learner\.num_gpus: this machine has no GPU .* set "
        r"learner\.num_gpus to 0, or join a cluster",
    ):
        check_local_gpus(job, gpus=0)
    check_local_gpus(job, gpus=1)
    check_local_gpus(job.model_copy(update={"ray_address": "ray://head:1"}), gpus=0)
    check_local_gpus(config(tmp_path), gpus=0)


def test_lora_target_modules_are_matched_as_peft_matches_them(tiny_model_dir: Path) -> None:
    """A name is a module's name or its last dotted parts; a near miss is suggested first."""
    from support.job_configs import small_job

    from rlfleet.job.checks import check_lora_target_modules

    def job(targets: list[str]) -> JobConfig:
        return small_job(tiny_model_dir, Path("/unused"), lora={"target_modules": targets})

    check_lora_target_modules(job(["c_attn", "attn.c_proj", "transformer.h.0.mlp.c_fc"]))
    check_lora_target_modules(job(["lm_head", "wte"]))
    with pytest.raises(
        ConfigError,
        match=r"^lora\.target_modules: 'lm_haed' names no module of .* that LoRA can adapt; its "
        r"modules are named lm_head, c_attn, c_fc, c_proj, wpe, wte \(or all-linear\)$",
    ):
        check_lora_target_modules(job(["c_proj", "lm_haed"]))
    with pytest.raises(ConfigError, match=r"'h\.9\.attn\.c_attn' names no module"):
        check_lora_target_modules(job(["h.9.attn.c_attn"]))  # the tiny model has 2 blocks


def test_a_tokenizer_larger_than_the_embedding_is_refused_naming_the_model(tmp_path: Path) -> None:
    from rlfleet.job.checks import check_tokenizer_fits_model

    job = config(tmp_path, model_config={"vocab_size": 300})
    check_tokenizer_fits_model("model", job.model, list(range(300)))
    with pytest.raises(
        ConfigError,
        match=rf"^model: the tokenizer in {re.escape(job.model)} has 301 tokens but the model's "
        r"embedding has 300 ",
    ):
        check_tokenizer_fits_model("model", job.model, list(range(301)))
    unknown = config(tmp_path, model_config={})
    check_tokenizer_fits_model("model", unknown.model, list(range(301)))  # no vocab_size: no check


MYSTERY = {
    "model_type": "mystery",
    "auto_map": {
        "AutoConfig": "configuration_mystery.MysteryConfig",
        "AutoModelForCausalLM": "modeling_mystery.MysteryForCausalLM",
    },
}
"""A config.json of a type transformers does not know, that names the directory's own code."""


def test_a_model_type_transformers_does_not_know_is_refused_naming_trust_remote_code(
    tmp_path: Path,
) -> None:
    job = config(tmp_path, model_config=MYSTERY)
    with pytest.raises(ConfigError) as error:
        check_config(job)
    assert re.fullmatch(
        rf"model: {re.escape(job.model)} has model_type 'mystery', which transformers [\d.]+ "
        r"does not know, and its config\.json names its own code \(auto_map\), which runs only "
        r"with trust_remote_code: true; set trust_remote_code: true if you trust that code, or "
        r"use a model transformers supports",
        str(error.value),
    )
    # with trust_remote_code its own code runs in the actors: not here
    check_config(job.model_copy(update={"trust_remote_code": True}))


def test_a_model_type_without_code_of_its_own_is_refused_with_transformers_reason(
    tmp_path: Path,
) -> None:
    job = config(tmp_path, model_config={"model_type": "mystery"}, trust_remote_code=True)
    with pytest.raises(
        ConfigError,
        match=rf"^model: transformers [\d.]+ cannot load the config of {re.escape(job.model)} "
        r"\(model_type 'mystery'\): The checkpoint you are trying to load has model type "
        r"`mystery` but Transformers does not recognize this architecture\.",
    ):
        check_config(job)


@pytest.mark.parametrize(
    ("env", "fields", "message"),
    [
        (
            {"environment": "rlf_no_such_module:Env"},
            {},
            r"^env\.environment: cannot import 'rlf_no_such_module:Env' \(ModuleNotFoundError",
        ),
        (
            {"environment": "rlfleet.envs.protocol:Step"},
            {},
            r"^env\.environment: rlfleet\.envs\.protocol:Step has no reset\(row, seed\) method",
        ),
        (
            {"environment": "support.envs:CountingEnv", "max_total_tokens": 600},
            {"dataset": {"path": "not-read.jsonl"}},
            r"^env\.max_total_tokens: 600 leaves no room for a prompt",
        ),
        (
            {"tools": "rlfleet.tasks.calculator:Calculator"},
            {},
            r"^env\.tools: tools reach the model through the chat template, but the dataset's "
            r"prompts are text; set dataset\.messages_field",
        ),
    ],
)
def test_an_environment_that_cannot_run_is_refused_before_ray_starts(
    tmp_path: Path, env: dict, fields: dict, message: str
) -> None:
    job = config(tmp_path, {"n_positions": 512}, env=env, **fields)
    with pytest.raises(ConfigError, match=message):
        check_config(job)

import json
import re
import time
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from rlfleet.common import config as config_module
from rlfleet.common import trainer_configs as trainer_configs_module
from rlfleet.common.config import JobConfig, PPOConfig, RewardConfig
from rlfleet.common.config_file import load_job_config
from rlfleet.common.errors import shown
from rlfleet.common.secrets import masked_argument, masked_config, masked_url, names_secret

MINIMAL_JOB = """
model: models/demo
dataset: {path: data/prompts.jsonl}
reward: {function: "rlfleet.reward.functions:sentiment"}
"""


def write_job(tmp_path: Path, text: str = MINIMAL_JOB) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_ppo_config_has_trl_defaults():
    config = PPOConfig()
    assert config.learning_rate == 1.41e-5
    assert (config.batch_size, config.mini_batch_size, config.ppo_epochs) == (128, 128, 4)
    assert (config.init_kl_coef, config.target, config.horizon) == (0.2, 6.0, 10000.0)
    assert (config.gamma, config.lam, config.cliprange, config.vf_coef) == (1.0, 0.95, 0.2, 0.1)
    assert config.backward_batch_size == 128


def test_bad_choice_names_field_and_allowed_values():
    with pytest.raises(ValueError) as error:
        PPOConfig(kl_penalty="kullback")
    message = str(error.value)
    assert "kl_penalty" in message
    for allowed in ("'kl'", "'abs'", "'mse'", "'full'"):
        assert allowed in message


def test_batch_size_must_divide_into_backward_batches():
    with pytest.raises(ValueError, match="batch_size"):
        PPOConfig(batch_size=10, mini_batch_size=4)


def test_job_config_loads_with_overrides(tmp_path):
    config = load_job_config(
        write_job(tmp_path),
        ["generators.num_actors=3", "ppo.batch_size=8", "ppo.mini_batch_size=4"],
    )
    assert config.generators.num_actors == 3
    assert config.ppo.batch_size == 8
    assert config.generators.engine == "vllm"


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ValidationError, match="generators.num_actor"):
        load_job_config(write_job(tmp_path), ["generators.num_actor=2"])


def test_bad_engine_names_allowed_values(tmp_path):
    with pytest.raises(ValidationError, match=r"generators.engine[\s\S]*'vllm' or 'hf'"):
        load_job_config(write_job(tmp_path), ["generators.engine=tgi"])


def test_reward_needs_exactly_one_source():
    with pytest.raises(ValidationError, match="exactly one of function, model, url or components"):
        RewardConfig(function="rlfleet.reward.functions:sentiment", url="http://127.0.0.1:1")
    with pytest.raises(ValidationError, match="exactly one of function, model, url or components"):
        RewardConfig()


def test_reward_components_have_unique_names_finite_weights_and_one_source_each():
    correct = {"name": "correct", "function": "rlfleet.reward.functions:arithmetic_correct"}
    short = {
        "name": "short",
        "function": "rlfleet.reward.functions:length_penalty",
        "weight": 0.1,
        "kwargs": {"target": 0, "coef": 0.01},
    }
    config = RewardConfig(components=[correct, short])
    assert [(c.name, c.weight, c.kwargs) for c in config.components] == [
        ("correct", 1.0, {}),
        ("short", 0.1, {"target": 0, "coef": 0.01}),
    ]
    with pytest.raises(ValidationError, match=r"names \['correct'\] are used more than once"):
        RewardConfig(components=[correct, {**short, "name": "correct"}])
    with pytest.raises(ValidationError, match="at least 1 item"):
        RewardConfig(components=[])
    with pytest.raises(ValidationError, match=r"got \['function', 'components'\]"):
        RewardConfig(function="f:g", components=[correct])
    with pytest.raises(ValidationError, match="reward.kwargs is not used with reward.components"):
        RewardConfig(components=[correct], kwargs={"target": 0})
    with pytest.raises(ValidationError, match="finite number"):
        RewardConfig(components=[{**short, "weight": float("nan")}])
    with pytest.raises(ValidationError, match="component 'short' needs exactly one of"):
        RewardConfig(components=[{**short, "url": "http://127.0.0.1:1"}])
    with pytest.raises(ValidationError, match="component 'short' needs exactly one of"):
        RewardConfig(components=[{"name": "short"}])
    with pytest.raises(ValidationError, match="should match pattern"):
        RewardConfig(components=[{**short, "name": "too short"}])


def test_reward_components_load_from_yaml(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(
        """
model: m
dataset: {path: p}
reward:
  components:
    - {name: correct, function: rlfleet.reward.functions:arithmetic_correct, weight: 1.0}
    - {name: short, function: rlfleet.reward.functions:length_penalty, weight: 0.1,
       kwargs: {target: 0, coef: 0.01}}
  num_actors: 1
  timeout_s: 30
"""
    )
    reward = load_job_config(path).reward
    assert [c.name for c in reward.components] == ["correct", "short"]
    assert reward.components[1].kwargs == {"target": 0, "coef": 0.01}


def test_one_step_off_needs_policy_lag():
    with pytest.raises(ValidationError, match="max_policy_lag"):
        JobConfig(
            model="m",
            dataset={"path": "p"},
            reward={"function": "f:g"},
            one_step_off=True,
        )


def test_malformed_override_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="section.field=value"):
        load_job_config(write_job(tmp_path), ["generators.num_actors"])


def test_forward_batch_size_overrides_mini_batch_size_as_in_trl():
    config = PPOConfig(batch_size=8, forward_batch_size=4)
    assert config.mini_batch_size == 4
    assert config.backward_batch_size == 4


def test_to_dict_flattens_nested_fields_and_adds_derived_sizes():
    config = PPOConfig(batch_size=8, mini_batch_size=2, gradient_accumulation_steps=2, steps=20)
    flat = PPOConfig(tracker_kwargs={"wandb": {"name": "run"}}).to_dict()
    assert flat["tracker_kwargs/wandb/name"] == "run"
    derived = config.to_dict()
    assert derived["backward_batch_size"] == 4
    assert derived["global_batch_size"] == 8
    assert derived["total_ppo_epochs"] == 3


def test_a_negative_job_seed_is_refused_naming_the_key(tmp_path):
    with pytest.raises(
        ValidationError, match=r"seed\n  Input should be greater than or equal to 0"
    ):
        load_job_config(write_job(tmp_path), ["seed=-1"])


def test_remote_code_is_not_trusted_unless_the_config_says_so(tmp_path):
    assert load_job_config(write_job(tmp_path)).trust_remote_code is False
    assert load_job_config(write_job(tmp_path), ["trust_remote_code=true"]).trust_remote_code


def test_nonfinite_training_is_an_error_unless_skip_is_chosen():
    assert PPOConfig().nonfinite == "error"
    assert PPOConfig(nonfinite="skip").nonfinite == "skip"
    with pytest.raises(ValidationError, match="nonfinite"):
        PPOConfig(nonfinite="ignore")


@pytest.mark.parametrize(
    ("text", "overrides", "message"),
    [
        ("model: [unclosed\n", [], r"job\.yaml is not valid YAML: while parsing .* line 2"),
        (MINIMAL_JOB, ["ppo.batch_size=[1"], r"^override 'ppo\.batch_size=\[1' is not valid YAML"),
        (MINIMAL_JOB, ["model.x=1"], r"^override 'model\.x=1': model is not a section"),
    ],
)
def test_yaml_and_override_errors_are_one_line_value_errors(tmp_path, text, overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        load_job_config(write_job(tmp_path, text), overrides)
    assert "\n" not in str(error.value)


def job(**fields) -> JobConfig:
    return JobConfig(model="m", dataset={"path": "p"}, reward={"function": "f:g"}, **fields)


def test_a_job_trains_with_ppo_unless_it_names_a_critic_free_algorithm():
    ppo = job()
    assert (ppo.algorithm, ppo.critic_free, ppo.trainer_config) == ("ppo", None, ppo.ppo)
    assert ppo.generators.n_samples_per_prompt == 1
    assert (ppo.samples_per_iteration, ppo.prompts_per_iteration) == (128, 128)

    grpo = job(
        algorithm="grpo",
        generators={"n_samples_per_prompt": 4},
        critic_free={"batch_size": 16, "beta": 0.04, "loss_type": "grpo"},
    )
    assert grpo.trainer_config is grpo.critic_free
    assert (grpo.critic_free.algorithm, grpo.critic_free.beta) == ("grpo", 0.04)
    assert (grpo.samples_per_iteration, grpo.prompts_per_iteration) == (16, 4)


def test_the_critic_free_section_takes_the_jobs_algorithm_and_its_defaults(tmp_path):
    config = load_job_config(
        write_job(tmp_path, MINIMAL_JOB + "algorithm: reinforce_pp\n"),
        ["critic_free.batch_size=8"],
    )
    assert config.critic_free.algorithm == "reinforce_pp"
    assert config.critic_free.kl_coef == 0.01  # REINFORCE++'s default, set by the algorithm
    assert (
        job(algorithm="rloo", generators={"n_samples_per_prompt": 2}).critic_free.batch_size == 64
    )
    with pytest.raises(
        ValidationError, match="critic_free.algorithm: 'rloo' differs from algorithm"
    ):
        job(
            algorithm="grpo",
            generators={"n_samples_per_prompt": 2},
            critic_free={"algorithm": "rloo"},
        )


def test_sections_of_the_other_trainer_are_refused_naming_the_key():
    with pytest.raises(ValidationError, match="critic_free: a section for critic-free algorithms"):
        job(critic_free={"batch_size": 8})
    with pytest.raises(ValidationError, match="ppo: algorithm grpo trains with the critic_free"):
        job(algorithm="grpo", generators={"n_samples_per_prompt": 2}, ppo={"learning_rate": 0.1})
    grpo = job(algorithm="grpo", generators={"n_samples_per_prompt": 2}, ppo={})
    assert grpo.trainer_config is grpo.critic_free


def test_batch_sizes_count_samples_and_must_hold_whole_groups():
    with pytest.raises(
        ValidationError,
        match=r"ppo.batch_size \(8\) must be a multiple of generators.n_samples_per_prompt \(3\)",
    ):
        job(generators={"n_samples_per_prompt": 3}, ppo={"batch_size": 8, "mini_batch_size": 8})
    with pytest.raises(ValidationError, match=r"critic_free.batch_size \(10\) must be a multiple"):
        job(
            algorithm="grpo", generators={"n_samples_per_prompt": 4}, critic_free={"batch_size": 10}
        )
    ppo_groups = job(
        generators={"n_samples_per_prompt": 4}, ppo={"batch_size": 8, "mini_batch_size": 8}
    )
    assert ppo_groups.prompts_per_iteration == 2


@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "reinforce_pp_baseline"])
def test_group_baselines_need_two_samples_per_prompt(algorithm):
    with pytest.raises(ValidationError, match=f"n_samples_per_prompt: {algorithm} compares"):
        job(algorithm=algorithm)
    assert job(algorithm="reinforce_pp").generators.n_samples_per_prompt == 1


def test_the_critic_free_completion_limit_is_the_generation_limit_unless_given_above_it():
    grpo = {"algorithm": "grpo", "generators": {"n_samples_per_prompt": 2, "max_new_tokens": 24}}
    assert job(**grpo).critic_free.max_completion_length == 24
    longer = job(**grpo, critic_free={"max_completion_length": 32, "loss_type": "dr_grpo"})
    assert longer.critic_free.max_completion_length == 32
    with pytest.raises(
        ValidationError,
        match=r"critic_free.max_completion_length \(16\) is below generators.max_new_tokens",
    ):
        job(**grpo, critic_free={"max_completion_length": 16})


# ----------------------------------------------------------------------------------------------
# The YAML a job config is read from: bounded, no key twice


def alias_bomb(levels: int = 9, width: int = 9, indent: str = "") -> str:
    """A "billion laughs": ``width ** levels`` strings from a few hundred bytes of aliases."""
    lines = [f"{indent}l0: &l0 [{', '.join(['lol'] * width)}]"]
    for level in range(1, levels):
        lines.append(f"{indent}l{level}: &l{level} [{', '.join([f'*l{level - 1}'] * width)}]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_at_load_naming_the_file_and_line(tmp_path):
    """Under an unknown key, whose error message used to write out the whole expansion."""
    text = MINIMAL_JOB + "unknown:\n" + alias_bomb(indent="  ")
    started = time.monotonic()
    with pytest.raises(ValueError) as error:
        load_job_config(write_job(tmp_path, text))
    assert time.monotonic() - started < 5
    assert str(error.value) == (
        f"{tmp_path / 'job.yaml'}, line 11: alias *l4 makes the document larger than 2,097,152 "
        "characters once its aliases are expanded (each counts as a copy of what it names); "
        "write out fewer repeated values"
    )


def job_yaml(reward: str) -> str:
    """MINIMAL_JOB with ``reward`` (a YAML block under ``reward:``) for its reward."""
    return MINIMAL_JOB.replace('reward: {function: "rlfleet.reward.functions:sentiment"}', reward)


def test_an_alias_bomb_in_reward_kwargs_is_refused_before_validation(tmp_path):
    text = job_yaml("reward:\n  function: f:g\n  kwargs:\n") + alias_bomb(indent="    ")
    with pytest.raises(ValueError, match=r"job\.yaml, line \d+: alias \*l\d makes the document"):
        load_job_config(write_job(tmp_path, text))


def test_aliases_that_stay_small_still_load(tmp_path):
    text = job_yaml("reward:\n  function: f:g\n  kwargs: {a: &words [x, y], b: *words}")
    config = load_job_config(write_job(tmp_path, text))
    assert config.reward.kwargs == {"a": ["x", "y"], "b": ["x", "y"]}


def test_a_recursive_alias_is_refused(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"^.*job\.yaml, line 5: alias \*self is inside the node it names; a job config "
        r"cannot be recursive$",
    ):
        load_job_config(write_job(tmp_path, MINIMAL_JOB + "x: &self [*self]\n"))


def test_a_config_file_over_one_mib_is_refused_unread(tmp_path):
    path = write_job(tmp_path, MINIMAL_JOB + "#" + "x" * (1 << 20) + "\n")
    with pytest.raises(
        ValueError,
        match=r"^.*job\.yaml is 1,048,6\d\d bytes or more; a job config may have at most "
        r"1,048,576 \(1 MiB\)$",
    ):
        load_job_config(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            MINIMAL_JOB + "iterations: 3\nseed: 1\niterations: 5\n",
            r"job\.yaml, line 7: duplicate key 'iterations' \(first at line 5\); give each key "
            r"once$",
        ),
        (
            MINIMAL_JOB.replace(
                "dataset: {path: data/prompts.jsonl}", "dataset: {path: a, path: b}"
            ),
            r"job\.yaml, line 3: duplicate key 'path' \(first at line 3\)",
        ),
        (
            MINIMAL_JOB + "generators:\n  num_actors: 2\n  temperature: 0.7\n  num_actors: 4\n",
            r"job\.yaml, line 8: duplicate key 'num_actors' \(first at line 6\)",
        ),
    ],
)
def test_a_key_given_twice_is_refused_naming_it_and_both_lines(tmp_path, text, message):
    with pytest.raises(ValueError, match=message) as error:
        load_job_config(write_job(tmp_path, text))
    assert "\n" not in str(error.value)


def test_a_merge_may_set_keys_the_mapping_sets_again(tmp_path):
    text = MINIMAL_JOB + "generators: &sampling {temperature: 0.7}\n"
    text += "eval: {dataset: {path: p}, <<: *sampling, temperature: 0.5, n: 3}\n"
    config = load_job_config(write_job(tmp_path, text))
    assert (config.generators.temperature, config.eval.temperature, config.eval.n) == (0.7, 0.5, 3)


def test_overrides_are_read_with_the_same_bounds(tmp_path):
    with pytest.raises(
        ValueError, match=r"^override 'reward\.kwargs=\{a: 1, a: 2\}', line 1: duplicate key 'a'"
    ):
        load_job_config(write_job(tmp_path), ["reward.kwargs={a: 1, a: 2}"])
    words = ", ".join(["y" * 1000] * 1000)
    bomb = f"reward.kwargs={{x: &a [{words}], z: [{', '.join(['*a'] * 10)}]}}"
    with pytest.raises(ValueError) as error:
        load_job_config(write_job(tmp_path), [bomb])
    message = str(error.value)
    assert re.fullmatch(
        r"override 'reward\.kwargs=\{x: &a \[y+\.\.\.[^']*', line 1: alias \*a .*", message
    )
    assert len(message) < 300  # the override is not written out whole


def test_a_value_in_a_message_is_cut_to_80_characters():
    assert shown("short") == "'short'"
    long = shown("x" * 10_000)
    assert len(long) <= 80 and long.startswith("'xxx") and "..." in long
    deep: list = ["lol"] * 9
    for _ in range(8):
        deep = [deep] * 9  # 9 ** 9 strings: a whole repr would take minutes
    started = time.monotonic()
    assert len(shown(deep)) <= 80
    assert time.monotonic() - started < 1


# ----------------------------------------------------------------------------------------------
# Finite floats, and samples that can differ


def config_models() -> list[type[BaseModel]]:
    return [
        value
        for module in (config_module, trainer_configs_module)
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, BaseModel)
        and value.__module__ == module.__name__
    ]


@pytest.mark.parametrize("model", config_models(), ids=lambda model: model.__name__)
def test_every_config_model_refuses_non_finite_floats(model):
    assert model.model_config.get("allow_inf_nan") is False
    assert model.model_config.get("extra") == "forbid"


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("ppo.learning_rate=.inf", "ppo.learning_rate"),
        ("generators.temperature=.inf", "generators.temperature"),
        ("generators.temperature=.nan", "generators.temperature"),
        ("generators.num_cpus=.inf", "generators.num_cpus"),
        ("reward.timeout_s=.inf", "reward.timeout_s"),
        ("learner.timeout_s=-.inf", "learner.timeout_s"),
        ("weight_sync.bucket_mb=.inf", "weight_sync.bucket_mb"),
        ("ppo.init_kl_coef=inf", "ppo.init_kl_coef"),  # a string: pydantic reads it as a float
    ],
)
def test_a_non_finite_float_is_refused_naming_the_key(tmp_path, override, key):
    with pytest.raises(ValidationError) as error:
        load_job_config(write_job(tmp_path), [override])
    [problem] = error.value.errors()
    assert ".".join(map(str, problem["loc"])) == key
    assert problem["msg"] == "Input should be a finite number"


def test_non_finite_floats_in_the_file_and_the_critic_free_section_are_refused(tmp_path):
    text = MINIMAL_JOB + "algorithm: grpo\ngenerators: {n_samples_per_prompt: 2}\n"
    text += "critic_free: {learning_rate: .inf, beta: .nan}\n"
    with pytest.raises(ValidationError) as error:
        load_job_config(write_job(tmp_path, text))
    assert {".".join(map(str, e["loc"])) for e in error.value.errors()} == {
        "critic_free.learning_rate",
        "critic_free.beta",
    }


@pytest.mark.parametrize("algorithm", ["grpo", "rloo", "reinforce_pp_baseline"])
def test_a_grouped_algorithm_refuses_greedy_samples(algorithm):
    with pytest.raises(ValidationError) as error:
        job(algorithm=algorithm, generators={"n_samples_per_prompt": 4, "temperature": 0})
    [problem] = error.value.errors()
    assert problem["msg"] == (
        "Value error, generators.n_samples_per_prompt is 4 but generators.temperature is 0: "
        "greedy decoding answers a prompt the same way every time, so every "
        f"{algorithm} advantage (a sample against the others of its prompt) is 0 and nothing "
        "trains; set generators.temperature > 0"
    )
    sampled = job(algorithm=algorithm, generators={"n_samples_per_prompt": 4, "temperature": 0.1})
    assert sampled.generators.temperature == 0.1


def test_greedy_samples_are_allowed_where_no_group_is_compared():
    assert job(generators={"temperature": 0}).generators.temperature == 0
    ppo_groups = job(
        generators={"n_samples_per_prompt": 2, "temperature": 0},
        ppo={"batch_size": 8, "mini_batch_size": 8},
    )
    assert ppo_groups.generators.n_samples_per_prompt == 2
    reinforce = job(
        algorithm="reinforce_pp", generators={"n_samples_per_prompt": 2, "temperature": 0}
    )
    assert reinforce.algorithm == "reinforce_pp"


# ----------------------------------------------------------------------------------------------
# Secrets of a config, masked wherever it is written


SECRET_URL = "https://alice:hunter2@scorer.example:8443/score?token=s3cr3t&v=2#frag"


def test_masked_url_keeps_the_host_and_path_and_drops_credentials():
    assert masked_url(SECRET_URL) == "https://***@scorer.example:8443/score?token=***&v=***#***"
    assert masked_url("http://[::1]:8000/x?k=v") == "http://[::1]:8000/x?k=***"
    for plain in ("https://scorer.example/score", "s3://bucket/prefix", "ray://10.0.0.1:10001"):
        assert masked_url(plain) == plain


@pytest.mark.parametrize(
    ("key", "secret"),
    [
        ("hf_token", True),
        ("api_key", True),
        ("X-API-Key", True),
        ("apiKey", True),
        ("Authorization", True),
        ("aws_secret_access_key", True),
        ("password", True),
        ("tracker_kwargs/wandb/api_key", True),
        ("max_new_tokens", False),
        ("max_tokens_per_microbatch", False),
        ("batch_key", False),
        ("url", False),
    ],
)
def test_names_secret(key, secret):
    assert names_secret(key) is secret


def test_masked_config_masks_every_secret_at_any_depth_and_copies():
    config = JobConfig(
        model="m",
        dataset={"path": "p"},
        reward={
            "components": [
                {"name": "remote", "url": SECRET_URL},
                {"name": "local", "function": "f:g", "kwargs": {"api_key": "sk-123", "n": 2}},
            ]
        },
        checkpoint={"s3_endpoint_override": "http://minio:pw@127.0.0.1:9000"},
    )
    settings = config.model_dump(mode="json")
    masked = masked_config(settings)
    remote, local = masked["reward"]["components"]
    assert remote["url"] == "https://***@scorer.example:8443/score?token=***&v=***#***"
    assert local["kwargs"] == {"api_key": "***", "n": 2}
    assert masked["checkpoint"]["s3_endpoint_override"] == "http://***@127.0.0.1:9000"
    assert masked["generators"] == settings["generators"]
    assert settings["reward"]["components"][0]["url"] == SECRET_URL  # a copy: the original stays
    text = json.dumps(masked)
    for secret in ("alice", "hunter2", "s3cr3t", "sk-123", "minio:pw"):
        assert secret not in text


def test_masked_argument_masks_overrides_of_secrets_and_urls():
    assert masked_argument(f"reward.url={SECRET_URL}").startswith("reward.url=https://***@")
    assert masked_argument("reward.kwargs.api_key=sk-123") == "reward.kwargs.api_key=***"
    assert masked_argument("generators.num_actors=2") == "generators.num_actors=2"

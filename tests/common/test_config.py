from pathlib import Path

import pytest
from pydantic import ValidationError

from rlfleet.common.config import JobConfig, PPOConfig, RewardConfig, load_job_config

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

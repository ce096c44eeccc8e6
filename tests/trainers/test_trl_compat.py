"""PPOTrainer's TRL v0.11 surface beyond generate/step: accelerator, log_stats, saving, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.wandb_files import finished_run_dir, isolate_wandb, wandb_history, wandb_table
from transformers import AutoTokenizer

from rlfleet import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer, create_reference_model
from rlfleet.core import LengthSampler, set_seed
from rlfleet.trainers.trl_compat import SingleProcessAccelerator, UnsupportedAPIError

QUERIES = [[5, 6, 7], [8, 9]]
RESPONSES = [[10, 11, 12, 13], [14, 15]]


def make_trainer(model_dir: Path, logging_dir: Path, **config) -> PPOTrainer:
    config = PPOConfig(
        batch_size=2,
        mini_batch_size=2,
        ppo_epochs=1,
        exp_name="compat",
        project_kwargs={"logging_dir": str(logging_dir)},
        **config,
    )
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.eos_token
    return PPOTrainer(config, model, tokenizer=tokenizer)


@pytest.fixture
def trainer(tiny_model_dir: Path, tmp_path: Path) -> PPOTrainer:
    return make_trainer(tiny_model_dir, tmp_path / "logs")


def step_and_log(trainer: PPOTrainer, **log_kwargs) -> tuple[dict, list[torch.Tensor]]:
    queries = [torch.tensor(q) for q in QUERIES]
    responses = [torch.tensor(r) for r in RESPONSES]
    rewards = [torch.tensor(1.0), torch.tensor(-0.5)]
    stats = trainer.step(queries, responses, rewards)
    batch = {"query": ["good film", "bad"], "response": [" yes", " no"], "extra": [1, 2]}
    trainer.log_stats(stats, batch, rewards, **log_kwargs)
    return stats, rewards


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_accelerator_behaves_as_accelerates_single_process(trainer: PPOTrainer):
    accelerator = trainer.accelerator
    assert isinstance(accelerator, SingleProcessAccelerator)
    assert trainer.accelerator is accelerator
    assert accelerator.device == trainer.current_device == torch.device("cpu")
    assert accelerator.is_main_process and accelerator.is_local_main_process
    assert (accelerator.num_processes, accelerator.process_index) == (1, 0)
    assert accelerator.state.deepspeed_plugin is None
    assert accelerator.state.distributed_type == "NO"
    assert accelerator.unwrap_model(trainer.model) is trainer.model
    rewards = torch.tensor([1.0, 2.0])
    assert accelerator.gather(rewards) is rewards
    assert accelerator.gather_for_metrics(rewards) is rewards
    assert accelerator.reduce(rewards) is rewards
    dataloader = torch.utils.data.DataLoader([1, 2, 3])
    assert accelerator.prepare(dataloader) is dataloader
    assert accelerator.prepare(trainer.model, dataloader) == (trainer.model, dataloader)
    with accelerator.main_process_first(), accelerator.local_main_process_first():
        accelerator.wait_for_everyone()


def test_accelerator_names_without_a_single_process_meaning_say_what_to_use(
    trainer: PPOTrainer,
):
    with pytest.raises(UnsupportedAPIError, match=r"Accelerator\.save_state .*rlfleet train"):
        trainer.accelerator.save_state("checkpoint")
    assert not hasattr(trainer.accelerator, "deepspeed_engine_wrapped")


@pytest.mark.parametrize(
    ("name", "advice"),
    [
        ("compute_rewards", r"rlfleet\.algorithms"),
        ("batched_forward_pass", r"rlfleet\.algorithms"),
        ("push_to_hub", r"save_pretrained"),
        ("_prepare_deepspeed", r"rlfleet train"),
    ],
)
def test_trl_trainer_names_rlfleet_does_not_provide_say_what_to_use(
    trainer: PPOTrainer, name: str, advice: str
):
    with pytest.raises(UnsupportedAPIError, match=rf"PPOTrainer\.{name} .*{advice}"):
        getattr(trainer, name)


def test_a_name_trl_never_had_is_a_plain_attribute_error(trainer: PPOTrainer):
    with pytest.raises(AttributeError) as error:
        trainer.no_such_attribute  # noqa: B018
    assert not isinstance(error.value, UnsupportedAPIError)


def test_trl_plain_attributes_have_their_single_process_values(trainer: PPOTrainer):
    assert not trainer.is_distributed
    assert not trainer.is_peft_model
    assert not trainer.is_encoder_decoder
    with trainer.optional_peft_ctx():
        pass
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert list(trainer.model_params) == trainable
    stats = {"objective/kl": 0.1}
    assert trainer.gather_stats(stats) is stats


def test_log_stats_appends_stats_rewards_and_the_game_log_to_jsonl(
    trainer: PPOTrainer, tmp_path: Path
):
    stats, _ = step_and_log(trainer)
    step_and_log(trainer, columns_to_log=["query", "response", "extra"])
    first, second = read_jsonl(tmp_path / "logs" / "compat" / "stats.jsonl")
    assert (first["step"], second["step"]) == (1, 2)
    assert first["objective/kl"] == pytest.approx(stats["objective/kl"])
    assert first["ppo/loss/total"] == pytest.approx(stats["ppo/loss/total"])
    assert first["env/reward_mean"] == pytest.approx(0.25)
    assert first["env/reward_std"] == pytest.approx(torch.tensor([1.0, -0.5]).std().item())
    assert "objective/logprobs" not in first  # distributions go to TensorBoard / W&B only
    assert first["game_log"] == {
        "columns": ["query", "response", "reward"],
        "rows": [["good film", " yes", 1.0], ["bad", " no", -0.5]],
    }
    assert second["game_log"]["columns"] == ["query", "response", "extra", "reward"]
    assert second["game_log"]["rows"][1] == ["bad", " no", 2, -0.5]


def test_log_stats_accepts_a_reward_tensor_and_tensor_cells(trainer: PPOTrainer):
    batch = {"query": ["a"], "response": ["b"], "score": [torch.tensor(0.5)]}
    trainer.log_stats({}, batch, torch.tensor([2.0]), columns_to_log=["query", "score"])
    [line] = read_jsonl(trainer.run_dir / "stats.jsonl")
    assert line["env/reward_mean"] == 2.0 and line["env/reward_std"] == 0.0
    assert line["game_log"]["rows"] == [["a", 0.5, 2.0]]


def test_log_stats_without_query_and_response_warns_as_trl_and_logs_the_rest(
    trainer: PPOTrainer,
):
    with pytest.warns(UserWarning, match="game logs will not be logged"):
        trainer.log_stats({"objective/kl": 0.5}, {}, [torch.tensor(1.0)])
    [line] = read_jsonl(trainer.run_dir / "stats.jsonl")
    assert line["objective/kl"] == 0.5 and "game_log" not in line


def test_log_stats_with_a_missing_column_warns_unless_logging_to_wandb(
    tiny_model_dir: Path, tmp_path: Path
):
    batch = {"query": ["a"], "response": ["b"]}
    plain = make_trainer(tiny_model_dir, tmp_path / "plain")
    with pytest.warns(UserWarning, match=r"\['ref_response'\] are not present"):
        plain.log_stats({}, batch, [1.0], columns_to_log=["query", "ref_response"])
    to_wandb = make_trainer(tiny_model_dir, tmp_path / "wandb", log_with="wandb")
    with pytest.raises(ValueError, match=r"\['ref_response'\] are not present"):
        to_wandb.log_stats({}, batch, [1.0], columns_to_log=["query", "ref_response"])


def test_log_stats_writes_tensorboard_events(tiny_model_dir: Path, tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = make_trainer(tiny_model_dir, tmp_path, log_with="tensorboard")
    stats, _ = step_and_log(trainer)
    events = EventAccumulator(str(trainer.run_dir), size_guidance={"tensors": 0})
    events.Reload()
    [reward_mean] = events.Scalars("env/reward_mean")
    assert (reward_mean.step, reward_mean.value) == (1, pytest.approx(0.25))
    [kl] = events.Scalars("objective/kl")
    assert kl.value == pytest.approx(stats["objective/kl"])
    assert "objective/logprobs" in events.Tags()["histograms"]
    [game_log] = events.Tensors("game_log/text_summary")
    assert "| good film |  yes | 1.0 |" in game_log.tensor_proto.string_val[0].decode()
    assert (trainer.run_dir / "stats.jsonl").exists()


def test_log_stats_writes_an_offline_wandb_run(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    isolate_wandb(monkeypatch, tmp_path / "wandb-home")
    trainer = make_trainer(
        tiny_model_dir,
        tmp_path,
        log_with="wandb",
        tracker_project_name="rlfleet-test",
        tracker_kwargs={"wandb": {"name": "compat-run"}},
    )
    step_and_log(trainer)
    run = trainer.accelerator.get_tracker("wandb", unwrap=True)
    assert (run.project, run.name) == ("rlfleet-test", "compat-run")
    trainer.accelerator.end_training()
    run_dir = finished_run_dir(trainer.run_dir)
    [history] = wandb_history(run_dir)
    assert history["_step"] == 1 and history["env/reward_mean"] == pytest.approx(0.25)
    assert history["env/reward_dist/_type"] == "histogram"
    table = wandb_table(run_dir, "game_log")
    assert table["columns"] == ["query", "response", "reward"]
    assert table["data"] == [["good film", " yes", 1.0], ["bad", " no", -0.5]]


def test_log_stats_default_directory_is_rlfleet_logs_under_the_working_directory(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tmp_path)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_model_dir)
    trainer = PPOTrainer(PPOConfig(batch_size=1, mini_batch_size=1, exp_name="run"), model)
    trainer.log_stats({"objective/kl": 0.5}, {"query": ["q"], "response": ["r"]}, [1.0])
    assert read_jsonl(tmp_path / "rlfleet_logs" / "run" / "stats.jsonl")[0]["objective/kl"] == 0.5


def test_save_pretrained_writes_model_value_head_and_tokenizer(trainer: PPOTrainer, tmp_path: Path):
    trainer.save_pretrained(tmp_path / "saved")
    reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(tmp_path / "saved")
    assert torch.equal(reloaded.v_head.summary.weight, trainer.model.v_head.summary.weight)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "saved")
    assert tokenizer.get_vocab() == trainer.tokenizer.get_vocab()
    with pytest.raises(UnsupportedAPIError, match="upload"):
        trainer.save_pretrained(tmp_path / "hub", push_to_hub=True)


def test_create_reference_model_is_a_frozen_copy(trainer: PPOTrainer):
    reference = create_reference_model(trainer.model)
    assert not reference.training
    assert not any(p.requires_grad for p in reference.parameters())
    for (name, copied), original in zip(
        reference.named_parameters(), trainer.model.parameters(), strict=True
    ):
        assert torch.equal(copied, original), name


def test_generate_a_list_with_length_sampler_batch_size_and_return_prompt(trainer: PPOTrainer):
    queries = [torch.tensor(q) for q in [[5, 6, 7], [8, 9], [10]]]
    drawn = []

    def length_sampler() -> int:
        drawn.append(LengthSampler(2, 5)())
        return drawn[-1]

    set_seed(0)
    responses = trainer.generate(
        queries, length_sampler=length_sampler, batch_size=2, return_prompt=False, do_sample=True
    )
    assert len(drawn) == 2  # one length per chunk of batch_size queries
    limits = [drawn[0], drawn[0], drawn[1]]
    assert all(1 <= len(r) <= n for r, n in zip(responses, limits, strict=True))
    set_seed(0)
    with_prompts = trainer.generate(
        queries, length_sampler=length_sampler, batch_size=2, do_sample=True
    )
    for query, response, full in zip(queries, responses, with_prompts, strict=True):
        assert torch.equal(full, torch.cat([query, response]))

"""Held-out evaluation (job/evaluation.py): the eval batch and its ids and seeds, the
stats, when it runs, its checks, the generators' eval sampling, its Prometheus gauges; with the
fake actors, a job with eval trains exactly as one without and resumes exactly; one real job
(vLLM, tiny model) gives the same training stats and weights with and without eval."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
import ray
from driver_fakes import FakeReward, fake_factories
from pydantic import ValidationError
from support.batches import scored_batch
from support.job_configs import PROMPTS, quiet_job, read_stats, small_job

from rlfleet.actors.engine import SamplingOverride, SamplingSpec
from rlfleet.actors.generator import rollout_seed
from rlfleet.common.config import EvalConfig, JobConfig
from rlfleet.common.schema import prompt_batch
from rlfleet.job.checks import ConfigError, check_config
from rlfleet.job.data import PromptBatches, read_prompt_rows
from rlfleet.job.evaluation import (
    eval_batch,
    eval_due,
    eval_postfix,
    eval_stats,
)
from rlfleet.job.loop import JobResult, TrainingJob
from rlfleet.job.metrics import JobMetrics
from rlfleet.job.roles import ActorFactories

ROWS = read_prompt_rows(PROMPTS, "prompt")


def eval_job(model_dir: Path, out: Path, eval_section: dict[str, Any] | None, **fields: Any):
    """``small_job`` with metrics off and the given ``eval`` section (the demo prompts)."""
    config = quiet_job(model_dir, out, **fields)
    if eval_section is None:
        return config
    section = EvalConfig.model_validate({"dataset": {"path": str(PROMPTS)}, **eval_section})
    return config.model_copy(update={"eval": section})


# -- when, which prompts, which ids and seeds ----------------------------------------------------


@pytest.mark.parametrize(
    ("every", "at_start", "due"),
    [
        (2, True, [0, 2, 4, 5]),
        (2, False, [2, 4, 5]),
        (10, True, [0, 5]),
        (1, False, [1, 2, 3, 4, 5]),
    ],
)
def test_eval_runs_at_start_every_n_iterations_and_after_the_last(
    every: int, at_start: bool, due: list[int]
) -> None:
    config = EvalConfig(dataset={"path": "x.jsonl"}, every=every, at_start=at_start)
    assert [i for i in range(6) if eval_due(config, i, iterations=5)] == due


def test_the_eval_batch_has_ids_and_seeds_training_never_uses_and_eval_sampling(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = eval_job(
        tiny_model_dir,
        tmp_path,
        {"max_samples": 3, "n": 2, "temperature": 0.7, "max_new_tokens": 5},
    )
    batch = eval_batch(config)

    assert batch.column("rollout_id").to_pylist() == [-1, -2, -3, -4, -5, -6]
    assert batch.column("group_id").to_pylist() == [-1, -1, -3, -3, -5, -5]
    assert batch.column("prompt").to_pylist() == [r["prompt"] for r in ROWS[:3] for _ in "ab"]
    assert SamplingOverride.of(batch) == SamplingOverride(temperature=0.7, max_new_tokens=5)
    assert SamplingOverride.of(batch.slice(2, 2)) == SamplingOverride.of(batch)  # any shard
    # Rendered and tokenized as training's prompts are; training's own batches carry no override.
    training = PromptBatches.from_config(config, ROWS)
    expected = [training.renderer.encode(row["prompt"]) for row in ROWS[:3]]
    assert batch.column("prompt_ids").to_pylist()[::2] == expected
    assert SamplingOverride.of(training.next_batch(3)) is None
    training_seeds = {rollout_seed(config.seed, i) for i in range(10_000)}
    eval_seeds = {rollout_seed(config.seed, i) for i in batch.column("rollout_id").to_pylist()}
    assert len(eval_seeds) == 6 and not eval_seeds & training_seeds


def test_all_eval_rows_when_max_samples_is_none(tiny_model_dir: Path, tmp_path: Path) -> None:
    batch = eval_batch(eval_job(tiny_model_dir, tmp_path, {"max_samples": None}))
    assert batch.num_rows == len(ROWS)
    assert SamplingOverride.of(batch) == SamplingOverride(temperature=0.0, max_new_tokens=8)


def no_actor(*args: Any) -> None:
    raise AssertionError("an actor was started")


def test_a_too_long_eval_prompt_is_refused_naming_the_key_file_and_row(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "eval.jsonl"
    rows = [{"prompt": "fine"}, {"prompt": "word " * 200}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = eval_job(tiny_model_dir, tmp_path, {"dataset": {"path": str(path)}})
    with pytest.raises(ConfigError, match=rf"^eval\.dataset\.path: row 1 of {path}: the prompt"):
        eval_batch(config)
    with pytest.raises(ConfigError, match=r"^eval\.dataset\.path: row 1 of "):
        TrainingJob(config, ROWS, None, ActorFactories(no_actor, no_actor, no_actor))
    first_only = config.model_copy(
        update={"eval": config.eval.model_copy(update={"max_samples": 1})}
    )
    assert eval_batch(first_only).num_rows == 1  # rows never evaluated are not checked


def test_eval_budget_and_reward_are_checked_before_anything_starts(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = eval_job(tiny_model_dir, tmp_path, {"max_new_tokens": 128})
    with pytest.raises(ConfigError, match=r"^eval\.max_new_tokens: 128 leaves no room"):
        check_config(config)
    config = eval_job(
        tiny_model_dir, tmp_path, {"reward": {"function": "rlfleet.reward.functions:nope"}}
    )
    with pytest.raises(ConfigError, match=r"^eval\.reward\.function: "):
        check_config(config)
    with pytest.raises(ValidationError, match="eval.n is 4 but eval.temperature is 0"):
        EvalConfig(dataset={"path": "x.jsonl"}, n=4)


# -- stats and metrics ---------------------------------------------------------------------------


def scored(scores: list[float], groups: list[int], components=None) -> pa.RecordBatch:
    n = len(scores)
    return scored_batch(
        [-1 - i for i in range(n)],
        scores,
        policy_version=3,
        group_ids=groups,
        prompt_ids=[[1]] * n,
        response_ids=[[1] * (i + 1) for i in range(n)],
        score_components=components or [None] * n,
    )


def test_eval_stats_are_means_over_samples_and_best_of_n_over_prompts() -> None:
    batch = scored(
        [1.0, 3.0, 0.0, 2.0],
        [-1, -1, -3, -3],
        [{"a": 1.0}, {"a": 3.0}, {"a": 0.0}, {"a": 2.0}],
    )
    assert eval_stats(batch) == {
        "eval/reward_mean": 1.5,
        "eval/reward_std": pytest.approx(1.118033988749895),
        "eval/reward/a_mean": 1.5,
        "eval/response_length_mean": 2.5,
        "eval/samples": 4,
        "eval/policy_version": 3,
        "eval/reward_max_mean": 2.5,  # best of prompt -1: 3, of prompt -3: 2
    }
    one_each = eval_stats(scored([1.0, 0.0], [-1, -2]))
    assert "eval/reward_max_mean" not in one_each and "eval/reward/a_mean" not in one_each


def test_prometheus_has_a_gauge_per_eval_stat_with_its_iteration() -> None:
    metrics = JobMetrics("demo")

    def gauge(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, {**metrics.labels, **labels})

    assert gauge("rlfleet_job_eval_reward_mean") != gauge("rlfleet_job_eval_reward_mean")  # NaN
    metrics.record_eval(4, {**eval_stats(scored([1.0, 3.0], [-1, -1], [{"a": 1.0}] * 2))})
    assert gauge("rlfleet_job_eval_iteration") == 4
    assert gauge("rlfleet_job_eval_reward_mean") == 2.0
    assert gauge("rlfleet_job_eval_reward_std") == 1.0
    assert gauge("rlfleet_job_eval_reward_max_mean") == 3.0
    assert gauge("rlfleet_job_eval_response_length_mean") == 1.5
    assert gauge("rlfleet_job_eval_samples") == 2
    assert gauge("rlfleet_job_eval_policy_version") == 3
    assert gauge("rlfleet_job_eval_reward_component_mean", component="a") == 1.0


def test_the_progress_bar_shows_the_latest_eval_reward() -> None:
    assert eval_postfix([{"iteration": 1, "reward_mean": 0.5}]) == {}
    lines = [{"iteration": 0, "eval/reward_mean": 0.25}, {"iteration": 1}]
    assert eval_postfix(lines) == {"eval": "0.250"}


# -- the generators' eval sampling ---------------------------------------------------------------


def test_a_generator_samples_an_eval_batch_greedily_with_evals_budget(
    tiny_model_dir: Path,
) -> None:
    from rlfleet.actors.generator import GeneratorActor
    from rlfleet.common.config import GeneratorConfig, MetricsConfig

    config = GeneratorConfig(engine="hf", max_new_tokens=8, temperature=1.0)
    generator = GeneratorActor(
        0, str(tiny_model_dir), config, 0, metrics=MetricsConfig(enabled=False)
    )
    prompt_ids = [[5, 6, 7], [8, 9]]
    batch = prompt_batch([-1, -2], ["a", "b"], prompt_ids)

    sampled = generator.generate(batch)
    evaluated = generator.generate(SamplingOverride(0.0, 3).attach(batch))

    greedy = generator._engine.generate(prompt_ids, SamplingSpec.greedy(3))
    assert evaluated.column("response_ids").to_pylist() == [c.token_ids for c in greedy]
    assert all(len(ids) == 8 for ids in sampled.column("response_ids").to_pylist())


# -- jobs with the fake actors -------------------------------------------------------------------


def run(config: JobConfig, factories=None, resume_from: str | None = None):
    """Trains with the fakes; the result, the job and the eval reward actors' score calls."""
    job = TrainingJob(config, ROWS, None, factories or fake_factories(config))
    try:
        if resume_from:
            job.resume(resume_from)
        result = job.train()
        calls = [
            actor_calls(actor) for actor in (job.eval_rewards.actors if job.eval_rewards else [])
        ]
        return result, job, calls
    finally:
        job.shutdown()


def actor_calls(actor: Any) -> int:
    def calls(fake: Any) -> int:
        return fake.calls

    return ray.get(actor.__ray_call__.remote(calls))


def training_part(line: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in line.items() if not k.startswith(("eval/", "time/"))}


@pytest.mark.parametrize("one_step_off", [False, True], ids=["on-policy", "one-step-off"])
def test_a_job_with_eval_trains_exactly_as_without_and_records_eval_lines(
    ray_local, tiny_model_dir: Path, tmp_path: Path, one_step_off: bool
) -> None:
    fields = {"iterations": 3, "one_step_off": one_step_off, "max_policy_lag": int(one_step_off)}
    plain, _, _ = run(eval_job(tiny_model_dir, tmp_path / "plain", None, **fields))
    config = eval_job(tiny_model_dir, tmp_path / "eval", {"every": 2, "max_samples": 5}, **fields)
    result, job, _ = run(config)

    stats = read_stats(tmp_path / "eval")
    assert stats == result.stats
    assert [line["iteration"] for line in stats] == [0, 1, 2, 3]
    assert set(stats[0]) == {"iteration", "policy_version", *eval_keys(stats[1:])}
    assert [training_part(line) for line in stats[1:]] == [
        training_part(line) for line in plain.stats
    ]
    assert result.consumed_rollout_ids == plain.consumed_rollout_ids == list(range(24))
    evaluated = {line["iteration"]: line for line in stats if "eval/reward_mean" in line}
    assert sorted(evaluated) == [0, 2, 3]
    # Rollout -1-i scores (-1-i) % 3 with the fakes: ids -1..-5 give 2, 1, 0, 2, 1.
    assert {line["eval/reward_mean"] for line in evaluated.values()} == {1.2}
    assert {line["eval/samples"] for line in evaluated.values()} == {5}
    versions = [evaluated[i]["eval/policy_version"] for i in (0, 2, 3)]
    assert versions == [0, 2, 3]  # the version synced after the iteration, in either mode
    assert (
        job.metrics.registry.get_sample_value("rlfleet_job_eval_iteration", job.metrics.labels) == 3
    )


def eval_keys(lines: list[dict[str, Any]]) -> set[str]:
    return {key for line in lines for key in line if key.startswith("eval/")}


def test_an_eval_reward_of_its_own_scores_the_eval_and_a_resume_is_exact(
    ray_local, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Eval's own reward actors score every eval (at start, 2, 3) and nothing else; a job
    resumed from checkpoint 2 drops line 3, keeps line 0 and evaluates again after 3 and 4."""
    uri = tmp_path / "checkpoints"
    config = eval_job(
        tiny_model_dir,
        tmp_path / "run",
        {
            "every": 2,
            "max_samples": 4,
            "reward": {"function": "rlfleet.reward.functions:sentiment", "num_actors": 2},
        },
        iterations=3,
        checkpoint={"uri": str(uri), "every": 2},
    )

    def factories(config: JobConfig):
        return dataclasses.replace(
            fake_factories(config),
            eval_reward=lambda i: FakeReward.remote(config.name, 10 + i, False),
        )

    first, job, calls = run(config, factories(config))
    assert calls == [3, 3]  # 2 eval reward actors, each a shard of 3 evals
    assert job.eval_rewards is not None and job.eval_rewards.kind == "eval reward"

    longer = config.model_copy(update={"iterations": 4})
    resumed, _, _ = run(longer, factories(longer), resume_from=str(uri / "step-00000002.json"))
    stats = read_stats(tmp_path / "run")
    assert [line["iteration"] for line in stats] == [0, 1, 2, 3, 4]
    assert stats[:3] == first.stats[:3]
    assert stats[3:] == resumed.stats
    assert [line["rollout_ids"] for line in stats[1:]] == [[0, 7], [8, 15], [16, 23], [24, 31]]
    assert [("eval/reward_mean" in line) for line in stats] == [True, False, True, False, True]
    assert resumed.consumed_rollout_ids == list(range(32))


# -- a real job ----------------------------------------------------------------------------------


def learner_weights_digest(job: TrainingJob) -> str:
    def digest(actor: Any) -> str:
        import hashlib

        hashed = hashlib.sha256()
        for name, tensor in sorted(actor.policy.state_dict().items()):
            hashed.update(name.encode())
            hashed.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        return hashed.hexdigest()

    return ray.get(job.learner.ranks[0].__ray_call__.remote(digest))


@pytest.mark.slow
def test_a_real_job_with_eval_has_the_same_training_stats_and_weights_as_without(
    ray_local, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Tiny GPT-2 on vLLM, 2 iterations: greedy eval of 4 prompts with a 4-token budget at
    start and after each iteration, then the same job without eval."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # vLLM leaves sockets there
    results: dict[str, tuple[JobResult, str]] = {}
    for name, section in [
        ("eval", {"every": 1, "max_samples": 4, "max_new_tokens": 4}),
        ("plain", None),
    ]:
        config = small_job(tiny_model_dir, tmp_path / name, metrics={"enabled": False})
        if section is not None:
            config = config.model_copy(
                update={
                    "eval": EvalConfig.model_validate(
                        {"dataset": {"path": str(PROMPTS)}, **section}
                    )
                }
            )
        job = TrainingJob(config)
        try:
            results[name] = (job.train(), learner_weights_digest(job))
        finally:
            job.shutdown()

    (evaluated, evaluated_weights), (plain, plain_weights) = results["eval"], results["plain"]
    stats = read_stats(tmp_path / "eval")
    assert stats == evaluated.stats
    assert [line["iteration"] for line in stats] == [0, 1, 2]
    for line in stats:
        assert line["eval/samples"] == 4
        assert line["eval/response_length_mean"] <= 4
        assert -1 <= line["eval/reward_mean"] <= 1
    assert [line["eval/policy_version"] for line in stats] == [0, 1, 2]
    assert [training_part(line) for line in stats[1:]] == [
        training_part(line) for line in plain.stats
    ]
    assert evaluated_weights == plain_weights

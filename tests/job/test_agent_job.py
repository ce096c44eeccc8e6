"""An agent job end to end on real local Ray: agents written with the ``openai`` package run in
environment actors and call the generators' endpoint (real vLLM); what the learner trains on is
exactly the engine's ids of every call; faulty agents are dropped, counted and named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.job_configs import read_stats, small_job, train_recording

KINDS = ["ok", "ok", "raise", "ok", "hang", "silent", "unscored", "long"]


@pytest.fixture(autouse=True)
def vllm_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rlfleet.tasks.tiny_model import build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("chat-model"), chat_template=True, n_positions=256
    )


def write_prompts(tmp_path: Path, kinds: list[str]) -> Path:
    """A dataset of one prompt per agent ``kind`` (tests/support/endpoint_agents.py)."""
    prompts = tmp_path / "prompts.jsonl"
    rows = ({"prompt": f"tell me about movie {i}", "kind": kind} for i, kind in enumerate(kinds))
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return prompts


def agent_job(model_dir: Path, out: Path, prompts: Path, env: dict | None = None, **fields):
    return small_job(
        model_dir,
        out,
        dataset={"path": str(prompts)},
        env={
            "agent": "support.endpoint_agents:run",
            "num_actors": 1,
            "num_cpus": 0.25,
            "max_total_tokens": 120,
            "max_tokens_per_turn": 6,
            "trajectory_timeout_s": 8,
            **(env or {}),
        },
        generators={"max_new_tokens": 6},
        **fields,
    )


@pytest.mark.slow
def test_an_agent_job_trains_on_the_engine_s_ids_and_drops_faulty_agents(
    ray_local, chat_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from rlfleet.job.loop import TrainingJob

    prompts = write_prompts(tmp_path, KINDS)
    config = agent_job(chat_model_dir, tmp_path / "run", prompts, iterations=2)
    job = TrainingJob(config)
    trained = []
    score = job.score
    job.score = lambda rollouts: trained.append(score(rollouts)) or trained[-1]
    try:
        job.train()
        import ray

        url = ray.get(job.generators.actors[0].endpoint_url.remote())
    finally:
        job.shutdown()
    assert url.startswith("http://127.0.0.1:")  # a local job's endpoint is on loopback only
    rows = [row for batch in trained for row in batch.to_pylist()]
    assert len(rows) == 16 and len({row["rollout_id"] for row in rows}) == 16
    by_kind: dict[str, list[dict]] = {}
    for row in rows:
        by_kind.setdefault(json.loads(row["metadata"])["kind"], []).append(row)
    calls_made = sum(json.loads(row["env_info"]).get("agent_calls", 0) for row in rows)
    assert sum(line["env/agent_calls"] for line in read_stats(tmp_path / "run")) == calls_made
    for row in by_kind["ok"]:
        info = json.loads(row["env_info"])
        calls = info["calls"]
        assert len(calls) == 3 and info["agent_calls"] == 3 and info["split_calls"] == 0
        assert row["prompt_ids"] == calls[0]["prompt"]
        full = row["prompt_ids"] + row["response_ids"]
        for call in calls:  # every call's prompt and sampled ids, in place, token for token
            start = len(call["prompt"])
            assert full[:start] == call["prompt"]
            assert full[start : start + len(call["sampled"])] == call["sampled"]
            assert all(
                row["loss_mask"][start - len(row["prompt_ids"]) + i] == 1
                for i in range(len(call["sampled"]))
            )
        sampled = [i for i, m in zip(row["response_ids"], row["loss_mask"], strict=True) if m]
        assert sampled == [i for call in calls for i in call["sampled"]]
        assert row["num_turns"] == 3 and row["finish_reason"] in ("stop", "length")
        assert sum(row["turn_rewards"]) == info["reward"] if "reward" in info else True
    for kind, reason in (
        ("raise", "agent_error"),
        ("hang", "agent_timeout"),
        ("silent", "agent_no_calls"),
    ):
        for row in by_kind[kind]:
            assert row["finish_reason"] == reason
            assert not any(row["loss_mask"]), "a dropped trajectory is not trained"
    assert "the agent's own bug" in json.loads(by_kind["raise"][0]["env_info"])["error"]
    for row in by_kind["long"]:  # refused at its budget: trained to there, as a native one
        info = json.loads(row["env_info"])
        assert row["finish_reason"] == "length" and info["agent_calls"] >= 4
        assert "max_total_tokens 120" in info["error"] and sum(row["loss_mask"]) > 0
        assert len(row["response_ids"]) <= 120 and sum(row["turn_rewards"]) == 0
    for row in by_kind["unscored"]:
        assert json.loads(row["env_info"])["scored"] is False and sum(row["turn_rewards"]) == 0
    stats = read_stats(tmp_path / "run")
    assert len(stats) == 2
    for line in stats:
        assert line["env/finished_agent_error"] == line["env/finished_agent_timeout"] == 1
        assert line["env/finished_agent_no_calls"] == 1
        assert line["env/split_calls"] == 0
        dropped = [r["rollout_id"] for r in rows if r["finish_reason"].startswith("agent_")]
        assert set(line["env/dropped_rollout_ids"]) <= set(dropped)
        assert len(line["env/dropped_rollout_ids"]) == 3
    assert "3 agent trajectories dropped (not trained): rollout" in caplog.text
    assert (
        "agent_error: env support.endpoint_agents:run (env actor 0): the agent raised"
        in caplog.text
    )


@pytest.mark.slow
def test_an_agent_job_loses_no_trajectory_when_a_generator_or_env_actor_dies_mid_call(
    ray_local, chat_model_dir: Path, tmp_path: Path
) -> None:
    """A generator SIGKILLed while its agents are between calls: their sessions go with it, the
    shard is sampled again on its replacement (new sessions, the same seeds); an environment
    actor SIGKILLed: Ray restarts it and its agents start again. Every id is trained once."""
    import threading

    from support.chaos import sigkill

    from rlfleet.job.loop import TrainingJob

    prompts = write_prompts(tmp_path, ["ok"] * 8)
    config = agent_job(
        chat_model_dir,
        tmp_path / "run",
        prompts,
        iterations=3,
        env={"kwargs": {"sleep_s": 0.4}},
    )
    killed = []

    def kill_mid_call(kind: str, iteration: int, actors: list) -> None:
        victim = (
            {1: actors[0], 2: job.envs.actors[0]}.get(iteration) if kind == "generator" else None
        )
        if victim is not None:
            timer = threading.Timer(0.8, lambda: killed.append(sigkill(victim)))
            timer.start()

    job = TrainingJob(config, on_dispatch=kill_mid_call)
    trained = train_recording(job)
    assert killed == [True, True]
    ids = [rid for batch in trained for rid in batch.column("rollout_id").to_pylist()]
    assert sorted(ids) == list(range(3 * 8))  # each trajectory once, none lost
    for batch in trained:
        for row in batch.to_pylist():
            info = json.loads(row["env_info"])
            assert row["finish_reason"] in ("stop", "length"), info
            assert info["agent_calls"] == 3 and len(info["calls"]) == 3
    stats = read_stats(tmp_path / "run")
    assert sum(line["env/restarts"] for line in stats) > 0  # the env actor's agents began again


@pytest.mark.slow
def test_an_async_agent_job_samples_under_new_weights_mid_call_and_trains_every_id_once(
    ray_local, chat_model_dir: Path, tmp_path: Path
) -> None:
    """``mode: async``: new weights load between two engine steps while agents are mid-way; a
    call in flight goes on under them, each token recording its version; the records stay
    exact."""
    from rlfleet.job.loop import TrainingJob

    prompts = write_prompts(tmp_path, ["ok"] * 8)
    config = agent_job(
        chat_model_dir,
        tmp_path / "run",
        prompts,
        env={"kwargs": {"sleep_s": 0.5}},
        algorithm="grpo",
        mode="async",
        max_policy_lag=1,
        iterations=3,
    )
    trained = train_recording(TrainingJob(config))
    ids = [rid for batch in trained for rid in batch.column("rollout_id").to_pylist()]
    assert sorted(ids) == list(range(3 * 8))
    newer = 0
    for iteration, batch in enumerate(trained):
        for row in batch.to_pylist():
            info, versions = json.loads(row["env_info"]), row["token_versions"]
            assert len(versions) == len(row["response_ids"]) and versions == sorted(versions)
            assert iteration - 1 <= row["policy_version"] == versions[0] <= iteration
            newer += versions[-1] > versions[0]
            full = row["prompt_ids"] + row["response_ids"]
            for call in info["calls"]:
                start = len(call["prompt"])
                assert full[start : start + len(call["sampled"])] == call["sampled"]
    assert newer > 0  # some trajectories went on under weights that arrived mid-way

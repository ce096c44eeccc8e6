"""An agent job end to end on real local Ray: agents written with the ``openai`` package run in
environment actors and call the generators' endpoint (real vLLM); what the learner trains on is
exactly the engine's ids of every call; faulty agents are dropped, counted and named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.job_configs import read_stats, small_job

KINDS = ["ok", "ok", "raise", "ok", "hang", "silent", "unscored", "ok"]


@pytest.fixture(autouse=True)
def vllm_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rlfleet.tasks.tiny_model import build_tiny_model

    return build_tiny_model(
        tmp_path_factory.mktemp("chat-model"), chat_template=True, n_positions=256
    )


def agent_job(model_dir: Path, out: Path, prompts: Path, **fields):
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
        },
        generators={"max_new_tokens": 6},
        **fields,
    )


@pytest.mark.slow
def test_an_agent_job_trains_on_the_engine_s_ids_and_drops_faulty_agents(
    ray_local, chat_model_dir: Path, tmp_path: Path
) -> None:
    from rlfleet.job.loop import TrainingJob

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"prompt": f"tell me about movie {i}", "kind": k}) + "\n"
            for i, k in enumerate(KINDS)
        )
    )
    config = agent_job(chat_model_dir, tmp_path / "run", prompts, iterations=2)
    job = TrainingJob(config)
    trained = []
    score = job.score
    job.score = lambda rollouts: trained.append(score(rollouts)) or trained[-1]
    try:
        job.train()
    finally:
        job.shutdown()
    rows = [row for batch in trained for row in batch.to_pylist()]
    assert len(rows) == 16 and len({row["rollout_id"] for row in rows}) == 16
    by_kind: dict[str, list[dict]] = {}
    for row in rows:
        by_kind.setdefault(json.loads(row["metadata"])["kind"], []).append(row)
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
    for row in by_kind["unscored"]:
        assert json.loads(row["env_info"])["scored"] is False and sum(row["turn_rewards"]) == 0
    stats = read_stats(tmp_path / "run")
    assert len(stats) == 2
    for line in stats:
        assert line["env/finished_agent_error"] == line["env/finished_agent_timeout"] == 1
        assert line["env/finished_agent_no_calls"] == 1
        assert line["env/agent_calls"] == 5 * 3  # the ok and unscored agents, 3 calls each
        assert line["env/split_calls"] == 0

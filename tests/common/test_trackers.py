"""Experiment trackers: each writes what it was given where it says, read back from the files."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from support.wandb_files import finished_run_dir, isolate_wandb, wandb_history, wandb_table

from rlfleet.common.trackers import (
    JsonlTracker,
    Table,
    TensorBoardTracker,
    WandbTracker,
    open_trackers,
    split_values,
)

TABLE = Table(columns=["query", "response", "reward"], rows=[["good", " film | yes", 0.5]])
VALUES = {
    "objective/kl": 0.25,
    "ppo/loss/total": np.float32(1.5),
    "tokens/responses_dist": np.array([3.0, 4.0, 5.0]),
    "env/reward_mean": torch.tensor(0.5),
    "note": "first",
    "game_log": TABLE,
}


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    isolate_wandb(monkeypatch, tmp_path / "wandb-home")


def test_split_values_sorts_scalars_histograms_texts_and_tables():
    split = split_values({**VALUES, "bf16": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)})
    assert split.scalars == {"objective/kl": 0.25, "ppo/loss/total": 1.5, "env/reward_mean": 0.5}
    assert set(split.histograms) == {"tokens/responses_dist", "bf16"}
    np.testing.assert_array_equal(split.histograms["bf16"], [1.0, 2.0])
    assert split.texts == {"note": "first"}
    assert split.tables == {"game_log": TABLE}


def test_split_values_names_a_value_it_cannot_log():
    with pytest.raises(TypeError, match="'model'"):
        split_values({"model": object()})


def test_table_markdown_escapes_pipes_and_newlines():
    markdown = Table(["a", "b"], [["x|y", "line\nbreak"]]).to_markdown()
    assert markdown.splitlines() == ["| a | b |", "|---|---|", "| x\\|y | line break |"]


def test_jsonl_tracker_appends_scalars_texts_and_tables(tmp_path: Path):
    tracker = JsonlTracker(tmp_path / "run" / "stats.jsonl")
    tracker.log(VALUES, step=1)
    tracker.log({"objective/kl": 0.5}, step=2)
    first, second = (json.loads(line) for line in tracker.path.read_text().splitlines())
    assert first["step"] == 1 and second["step"] == 2
    assert first["objective/kl"] == 0.25 and first["env/reward_mean"] == 0.5
    assert first["note"] == "first"
    assert first["game_log"] == {"columns": TABLE.columns, "rows": TABLE.rows}
    assert "tokens/responses_dist" not in first


def test_tensorboard_tracker_writes_scalars_histograms_and_the_table(tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = TensorBoardTracker(tmp_path, config={"batch_size": 4})
    tracker.log(VALUES, step=3)
    tracker.close()
    events = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    events.Reload()
    [kl] = events.Scalars("objective/kl")
    assert (kl.step, kl.value) == (3, 0.25)
    [histogram] = events.Histograms("tokens/responses_dist")
    assert histogram.histogram_value.num == 3
    texts = {tag: events.Tensors(tag) for tag in events.Tags()["tensors"]}
    [game_log] = texts["game_log/text_summary"]
    assert game_log.step == 3
    markdown = game_log.tensor_proto.string_val[0].decode()
    assert "| query | response | reward |" in markdown and " film \\| yes" in markdown
    assert "batch_size" in texts["config/text_summary"][0].tensor_proto.string_val[0].decode()


def test_wandb_tracker_writes_an_offline_run(tmp_path: Path, wandb_offline: None):
    tracker = WandbTracker(project="rlfleet-test", directory=tmp_path, config={"batch_size": 4})
    tracker.log(VALUES, step=1)
    tracker.log({"objective/kl": 0.5}, step=2)
    tracker.close()
    run_dir = finished_run_dir(tmp_path)
    history = wandb_history(run_dir)
    assert [row["_step"] for row in history] == [1, 2]
    assert history[0]["objective/kl"] == 0.25 and history[1]["objective/kl"] == 0.5
    assert history[0]["tokens/responses_dist/_type"] == "histogram"
    table = wandb_table(run_dir, "game_log")
    assert table["columns"] == TABLE.columns and table["data"] == TABLE.rows


def test_open_trackers_always_keeps_the_jsonl(tmp_path: Path):
    trackers = open_trackers(tmp_path)
    assert [tracker.name for tracker in trackers.trackers] == ["jsonl"]
    trackers.log({"x": 1.0}, step=0)
    trackers.close()
    assert json.loads((tmp_path / "stats.jsonl").read_text())["x"] == 1.0


def test_open_trackers_opens_the_named_ones(tmp_path: Path, wandb_offline: None):
    trackers = open_trackers(
        tmp_path,
        log_with=["tensorboard", "wandb"],
        project="rlfleet-test",
        init_kwargs={"wandb": {"name": "my-run"}},
    )
    assert [tracker.name for tracker in trackers.trackers] == ["jsonl", "tensorboard", "wandb"]
    assert trackers.get("wandb").run.name == "my-run"
    trackers.close()
    assert list(tmp_path.glob("events.out.tfevents.*"))
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))


def test_open_trackers_refuses_an_unknown_tracker(tmp_path: Path):
    with pytest.raises(ValueError, match="mlflow"):
        open_trackers(tmp_path, log_with="mlflow")


def test_a_rewound_jsonl_tracker_drops_the_lines_from_that_step(tmp_path: Path):
    tracker = JsonlTracker(tmp_path / "stats.jsonl")
    for step in (1, 2, 3):
        tracker.log({"x": float(step)}, step=step)
    tracker.rewind(2)
    tracker.log({"x": 20.0}, step=2)
    lines = [json.loads(line) for line in tracker.path.read_text().splitlines()]
    assert [(line["step"], line["x"]) for line in lines] == [(1, 1.0), (2, 20.0)]


def test_tensorboard_shows_the_steps_logged_again_after_a_rewind(tmp_path: Path):
    """One writer (a learner restarted in the same job) and a new one (a resumed job)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tracker = TensorBoardTracker(tmp_path, config={"batch_size": 4})
    for step in (1, 2, 3):
        tracker.log({"x": step}, step=step)
    tracker.rewind(2)
    tracker.log({"x": 20}, step=2)
    tracker.close()
    resumed = TensorBoardTracker(tmp_path)
    resumed.rewind(3)
    resumed.log({"x": 30}, step=3)
    resumed.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert [(event.step, event.value) for event in events.Scalars("x")] == [
        (1, 1.0),
        (2, 20.0),
        (3, 30.0),
    ]
    assert "config/text_summary" in events.Tags()["tensors"]


SECRETS = ("alice", "hunter2", "s3cr3tTok", "sk-APIKEY", "argvpass", "argvtok")
SECRET_CONFIG = {
    "reward": {
        "url": "http://alice:hunter2@scorer.local:8000/score?token=s3cr3tTok",
        "kwargs": {"api_key": "sk-APIKEY", "n": 2},
    },
    "batch_size": 4,
}


def assert_no_secret_in(directory: Path) -> None:
    """No byte of any file under ``directory`` spells a secret of ``SECRET_CONFIG`` or the
    command line."""
    files = [path for path in directory.rglob("*") if path.is_file()]
    assert files
    for path in files:
        data = path.read_bytes()
        assert not [secret for secret in SECRETS if secret.encode() in data], path


def test_tensorboard_writes_the_config_masked(tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    TensorBoardTracker(tmp_path, config=SECRET_CONFIG).close()
    events = EventAccumulator(str(tmp_path), size_guidance={"tensors": 0})
    events.Reload()
    [config] = events.Tensors("config/text_summary")
    markdown = config.tensor_proto.string_val[0].decode()
    assert "http://***@scorer.local:8000/score?token=***" in markdown
    assert "'api_key': '***'" in markdown and "| batch_size | 4 |" in markdown
    assert_no_secret_in(tmp_path)


def test_wandb_writes_the_config_and_the_command_line_masked(
    tmp_path: Path, wandb_offline: None, monkeypatch: pytest.MonkeyPatch
):
    argv = ["rlfleet", "train", "job.yaml", "--set", "reward.url=http://u:argvpass@h/?t=argvtok"]
    monkeypatch.setattr("sys.argv", argv)
    tracker = WandbTracker(project="rlfleet-test", directory=tmp_path, config=SECRET_CONFIG)
    assert tracker.run.config["reward"]["url"] == "http://***@scorer.local:8000/score?token=***"
    assert tracker.run.config["reward"]["kwargs"] == {"api_key": "***", "n": 2}
    tracker.log({"x": 1.0}, step=1)
    tracker.close()
    assert sys.argv == argv  # masked only while W&B read it
    finished_run_dir(tmp_path)
    assert list((tmp_path / "wandb").rglob("debug*.log"))  # the debug logs are checked too
    assert_no_secret_in(tmp_path)

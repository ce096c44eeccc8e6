"""Config checks that run before any actor starts, without reading the dataset."""

from __future__ import annotations

from pathlib import Path

import pytest

from rlfleet.common.config import JobConfig
from rlfleet.learner.driver.checks import ConfigError, check_config


def config(tmp_path: Path, **fields) -> JobConfig:
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text("{}")
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

"""Where the job's actors go: the learner's bundles, generators sharing its GPUs when colocated,
the generators' dtype, and the placement settings that contradict each other."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from support.job_configs import small_job

from rlfleet.job.roles import generator_config, learner_bundles


def test_each_rank_gets_a_bundle_of_its_cpus_and_gpu_share(tmp_path: Path) -> None:
    config = small_job(tmp_path, tmp_path / "run", learner={"num_ranks": 3, "num_cpus": 2})
    assert config.placement == "colocated" and not config.colocated_on_gpus
    assert learner_bundles(config) == [{"CPU": 2.0, "GPU": 0.0}] * 3


def test_unset_learner_cpus_reserve_one_per_rank(tmp_path: Path) -> None:
    config = small_job(tmp_path, tmp_path / "run", learner={"num_ranks": 2, "num_cpus": None})
    assert config.learner.cpus_per_rank == 1.0
    assert learner_bundles(config) == [{"CPU": 1.0, "GPU": 0.0}] * 2


def test_colocated_on_gpus_generator_i_joins_the_bundle_of_rank_i_mod_ranks(tmp_path) -> None:
    config = small_job(
        tmp_path,
        tmp_path / "run",
        learner={"num_ranks": 2, "num_cpus": 1, "num_gpus": 0.5},
        generators={"num_actors": 3, "num_cpus": 0.5, "num_gpus": 0.25},
    )
    assert config.colocated_on_gpus
    assert learner_bundles(config) == [{"CPU": 2.0, "GPU": 1.0}, {"CPU": 1.5, "GPU": 0.75}]
    disaggregated = config.model_copy(update={"placement": "disaggregated"})
    assert not disaggregated.colocated_on_gpus
    assert learner_bundles(disaggregated) == [{"CPU": 1.0, "GPU": 0.5}] * 2


def test_generators_run_in_the_learners_dtype_unless_given_their_own(tmp_path: Path) -> None:
    config = small_job(tmp_path, tmp_path / "run", learner={"dtype": "bfloat16"})
    assert generator_config(config).dtype == "bfloat16"
    own = small_job(
        tmp_path, tmp_path / "run", learner={"dtype": "bfloat16"}, generators={"dtype": "float32"}
    )
    assert generator_config(own).dtype == "float32"
    assert generator_config(small_job(tmp_path, tmp_path / "run")).dtype == "float32"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"one_step_off": True, "max_policy_lag": 1},
            r"one_step_off: with placement colocated on GPUs the generators sleep while the "
            r"learner trains, so nothing overlaps; set placement: disaggregated",
        ),
        (
            {"generators": {"num_actors": 2, "num_gpus": 0.5}},
            r"placement: colocated puts 2 generator\(s\) on each learner rank's GPU, but "
            r"learner.num_gpus \(0.5\) \+ 2 x generators.num_gpus \(0.5\) = 1.5 > 1",
        ),
    ],
)
def test_contradictory_gpu_colocation_is_one_line_naming_the_fields(
    tmp_path: Path, fields: dict, message: str
) -> None:
    gpus = {"learner": {"num_gpus": 0.5}, "generators": {"num_gpus": 0.5}}
    merged = {**gpus, **fields}
    with pytest.raises(ValidationError, match=message):
        small_job(tmp_path, tmp_path / "run", **merged)
    small_job(tmp_path, tmp_path / "run", **merged, placement="disaggregated")


def test_an_unknown_placement_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(
        ValidationError, match=r"placement\n  Input should be 'colocated' or 'disaggregated'"
    ):
        small_job(tmp_path, tmp_path / "run", placement="spread")


def test_a_rank_with_neither_cpus_nor_gpus_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="learner: a rank with num_cpus 0 and num_gpus 0"):
        small_job(tmp_path, tmp_path / "run", learner={"num_cpus": 0})
    gpu_only = small_job(tmp_path, tmp_path / "run", learner={"num_cpus": 0, "num_gpus": 1})
    assert learner_bundles(gpu_only) == [{"CPU": 0.0, "GPU": 1.0}]

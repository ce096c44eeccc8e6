"""``rlfleet train`` and ``run_job``: config errors before anything starts, resume resolution,
and jobs end to end on real local Ray with real vLLM generators, reward and learner actors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import deque
from pathlib import Path

import pytest
from support.job_configs import DEMO_CONFIG, read_stats, small_job, write_config

from rlfleet.common.config_file import load_job_config
from rlfleet.job import train
from rlfleet.job.checks import ConfigError
from rlfleet.job.loop import JobResult
from rlfleet.job.train import resolve_resume


@pytest.fixture(scope="module")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's starting policy: the tiny GPT-2 pretrained on the built-in corpus (seed 0)."""
    from rlfleet.tasks.tiny_model import pretrain_demo_model

    return pretrain_demo_model(tmp_path_factory.mktemp("demo-model"))


@pytest.fixture(autouse=True)
def vllm_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM leaves sockets in TMPDIR: keep them in the test's directory."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))


@pytest.mark.parametrize("command", [[], ["train"], ["submit"]])
def test_the_help_names_every_algorithm(capsys: pytest.CaptureFixture, command: list) -> None:
    from typing import get_args

    from rlfleet.cli import main
    from rlfleet.common.config import Algorithm

    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "PPO job" not in text
    for algorithm in get_args(Algorithm):
        assert re.search(rf"\b{algorithm}\b", text), (algorithm, text)


# ----------------------------------------------------------------------------------------------
# Config errors


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("generators.num_actor=2", "generators.num_actor"),
        ("generators.engine=tpu", "generators.engine"),
        ("ppo.learning_rate=-1", "ppo.learning_rate"),
        ("dataset.prompt_field=text", "dataset.prompt_field"),
        ("model=/nonexistent/model", "model"),
        ("reward.function=rlfleet.reward.functions:nope", "reward.function"),
    ],
)
def test_config_errors_fail_before_any_actor_starts_and_name_the_key(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, override: str, key: str
) -> None:
    """The job makes output_dir before it starts any actor: no output_dir, no actor."""
    from rlfleet.cli import main

    out = tmp_path / "run"
    config = write_config(tmp_path / "job.yaml", small_job(tiny_model_dir, out))

    assert main(["train", "--config", str(config), "--set", override]) == 2
    stderr = capsys.readouterr().err
    assert "invalid job config" in stderr
    assert key in stderr
    assert not out.exists()


def test_cli_exits_2_on_a_bad_config_without_starting_ray(tiny_model_dir: Path, tmp_path: Path):
    out = tmp_path / "run"
    config = write_config(tmp_path / "job.yaml", small_job(tiny_model_dir, out))
    proc = subprocess.run(
        ["rlfleet", "train", "--config", str(config), "--set", "generators.num_actors=0"],
        capture_output=True,
        text=True,
        env={
            **os.environ,
            "RAY_ADDRESS": "",
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        },
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "generators.num_actors" in proc.stderr
    assert "Started a local Ray instance" not in proc.stdout + proc.stderr
    assert not out.exists()


def test_the_startup_trace_marks_each_milestone_in_order(tiny_model_dir: Path, tmp_path: Path):
    """``RLFLEET_STARTUP_TRACE`` (bench/startup.py): the driver's milestones, each actor's
    constructor and the first dispatch, in order; a bad config stops after the imports."""
    from rlfleet.common import startup_trace

    trace = tmp_path / "trace"
    ray_tmp = tempfile.mkdtemp(prefix="rlf-ray-", dir="/tmp")  # short: Ray's socket paths
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
        "TMPDIR": ray_tmp,
        startup_trace.TRACE_VARIABLE: str(trace),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    config = write_config(tmp_path / "job.yaml", small_job(tiny_model_dir, tmp_path / "run"))
    command = ["rlfleet", "train", "--config", str(config), "--set", "iterations=1"]
    try:
        bad = subprocess.run(
            [*command, "--set", "generators.num_actors=0"], env=env, capture_output=True
        )
        assert bad.returncode == 2
        assert [m for _, _, _, m in startup_trace.read(trace)] == [
            "python started",
            "imports done",
        ]
        trace.unlink()
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    milestones = [m for _, _, _, m in startup_trace.read(trace)]
    driver = [m for m in milestones if not re.search(r"__init__|learner: |vllm engine: ", m)]
    assert driver == [
        "python started",
        "imports done",
        "checks done",
        "ray.init done",
        "first dispatch (generator)",
    ]
    # the actors' own marks (Ray's task events, the __init__ milestones, come in the background
    # and were missing from a run inside the test session: they are not asserted)
    for mark in ("vllm engine: start", "vllm engine: LLM made", "learner: ready"):
        assert milestones.index("ray.init done") < milestones.index(mark)
        assert milestones.index(mark) < milestones.index("first dispatch (generator)")
    learner = [m for m in milestones if m.startswith("learner: ")]
    assert learner == ["learner: start", "learner: trainer loaded", "learner: ready"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--set", "ppo"], r"override 'ppo' must look like section\.field=value"),
        (["--set", "ppo=3"], r"ppo: Input should be a valid dictionary .*\(got 3\)"),
        (["--set", "ppo.batch_size=[1"], r"override 'ppo\.batch_size=\[1' is not valid YAML"),
        (["--set", "generators.num_actor=2"], r"generators\.num_actor: Extra inputs are not perm"),
        (["--set", "seed=-1"], r"seed: Input should be greater than or equal to 0 \(got -1\)"),
        (["--set", "generators.max_new_tokens=200"], r"generators\.max_new_tokens: 200 leaves"),
    ],
)
def test_cli_misuse_exits_2_with_one_line_naming_the_problem(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, args: list, message: str
) -> None:
    from rlfleet.cli import main

    config = write_config(tmp_path / "job.yaml", small_job(tiny_model_dir, tmp_path / "run"))
    assert main(["train", "--config", str(config), *args]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert re.search(rf"^rlfleet train: invalid job config .*job\.yaml: {message}", lines[0])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: [unclosed\n", r"job\.yaml is not valid YAML: while parsing"),
        ("- a list\n", r"a job config is a mapping of sections, got list"),
    ],
)
def test_a_bad_yaml_file_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, text: str, message: str
) -> None:
    from rlfleet.cli import main

    (tmp_path / "job.yaml").write_text(text)
    assert main(["train", "--config", str(tmp_path / "job.yaml")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and re.search(message, lines[0]), lines


def test_a_missing_config_file_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from rlfleet.cli import main

    assert main(["train", "--config", str(tmp_path / "nope.yaml")]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        f"rlfleet train: invalid job config {tmp_path}/nope.yaml: no such file: "
        f"{tmp_path}/nope.yaml"
    ]


def test_a_too_long_prompt_anywhere_in_the_dataset_fails_before_start(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from rlfleet.cli import main

    rows = [{"prompt": "a fine review"}] * 16 + [{"prompt": "word " * 200}]
    dataset = tmp_path / "prompts.jsonl"
    dataset.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "run"
    job = small_job(tiny_model_dir, out, dataset={"path": str(dataset)})
    config = write_config(tmp_path / "job.yaml", job)
    assert main(["train", "--config", str(config)]) == 2
    assert "dataset.path: row 16 of" in capsys.readouterr().err
    assert not out.exists()


@pytest.fixture
def no_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train, "init_ray", lambda config: None)


def failing_learner_step() -> Exception:
    """What ray.get raises when the learner's step raised: a RayTaskError around the cause."""
    from ray.exceptions import RayTaskError

    from rlfleet.trainers.guards import NonFiniteError

    cause = NonFiniteError("PPO step 2, epoch 0, minibatch 1: the loss is nan; lower ...")
    error = RayTaskError(
        "LearnerActor.step",
        "Traceback (most recent call last):\n  ...\nNonFiniteError: PPO step 2 ...",
        cause,
        proctitle="ray::LearnerActor.step",
    )
    return error.as_instanceof_cause()


@pytest.mark.parametrize("verbose", [False, True])
def test_a_failing_actor_is_one_line_naming_it_and_what_to_do_and_exit_1(
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    no_cluster: None,
    verbose: bool,
) -> None:
    from rlfleet.cli import main

    def run_job(*args, **kwargs):
        raise failing_learner_step()

    monkeypatch.setattr(train, "run_job", run_job)
    out = tmp_path / "run"
    job = small_job(tiny_model_dir, out, checkpoint={"uri": str(tmp_path / "ckpt")})
    config = write_config(tmp_path / "job.yaml", job)
    assert main(["train", "--config", str(config), *(["--verbose"] if verbose else [])]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == (
        "rlfleet train: LearnerActor.step: NonFiniteError: PPO step 2, epoch 0, minibatch 1: the "
        f"loss is nan; lower ...; traceback in {out}/error.log (or rerun with --verbose); fix "
        "the cause, then run the same command (it resumes from the latest checkpoint)"
    )
    assert (len(lines) > 1) == verbose
    assert "Traceback" in (out / "error.log").read_text()


def job_result(iterations: list[int]) -> JobResult:
    stats = [{"iteration": i, "samples": 8, "reward_mean": 0.1 * i} for i in iterations]
    return JobResult(stats, list(range(8 * max(iterations, default=0))), 0, 0)


def test_the_summary_after_a_resume_counts_this_runs_iterations_and_rollouts(
    tmp_path: Path,
) -> None:
    """A job resumed at iteration 4 of 6 trained 2 iterations of 8 rollouts (not 48 ever)."""
    job = small_job(tmp_path, tmp_path / "run", iterations=6)
    line = train.summary(job, job_result([5, 6]))
    assert line.startswith("done: 2 iterations (5..6), 16 rollouts, reward 0.500 -> 0.600, stats")
    restarted = job_result([5, 6])
    restarted.learner_restarts = 2
    assert ", reward 0.500 -> 0.600, 2 learner restarts, stats in " in train.summary(job, restarted)


def test_demo_config_is_valid_and_uses_vllm_and_the_sentiment_reward() -> None:
    config = load_job_config(DEMO_CONFIG)
    assert config.generators.engine == "vllm"
    assert config.reward.function == "rlfleet.reward.functions:sentiment"
    assert config.ray_address is None


def test_a_check_across_sections_is_its_own_one_line_message(tiny_model_dir: Path, tmp_path):
    config = write_config(tmp_path / "job.yaml", small_job(tiny_model_dir, tmp_path / "run"))
    with pytest.raises(ValueError) as error:
        load_job_config(config, ["generators.n_samples_per_prompt=3"])
    assert train.config_error_line(error.value) == (
        "ppo.batch_size (8) must be a multiple of generators.n_samples_per_prompt (3): batch "
        "sizes count samples, and each prompt gives n_samples_per_prompt of them"
    )


def test_resume_from_latest_means_the_checkpoint_uri_and_needs_one(tmp_path: Path) -> None:
    config = small_job(tmp_path, tmp_path / "run", checkpoint={"uri": "s3://bucket/job"})
    assert resolve_resume(config, "latest") == "s3://bucket/job"
    assert resolve_resume(config, "/ckpt/step-00000002") == "/ckpt/step-00000002"
    assert resolve_resume(config, None) is None
    no_uri = small_job(tmp_path, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"^checkpoint\.uri: --resume-from latest needs"):
        resolve_resume(no_uri, "latest")


# ----------------------------------------------------------------------------------------------
# Jobs on a real local Ray cluster


@pytest.mark.slow
@pytest.mark.parametrize(("generators", "rewards"), [(1, 1), (2, 2)])
def test_job_writes_stats_and_consumes_every_rollout_id_once(
    ray_local, tiny_model_dir: Path, tmp_path: Path, generators: int, rewards: int
) -> None:
    from rlfleet.common.metrics import file_sd_path
    from rlfleet.job.train import run_job

    config = small_job(
        tiny_model_dir,
        tmp_path / "run",
        name=f"test-job-{generators}-{rewards}-{os.getpid()}",
        generators={"num_actors": generators},
        reward={"num_actors": rewards},
        iterations=3,
        metrics={"file_sd_dir": str(tmp_path / "sd")},
    )
    sd_file = file_sd_path(config.name, config.metrics.file_sd_dir)
    groups = []

    def read_discovery_file(kind: str, iteration: int, actors: list) -> None:
        """The job's Prometheus discovery file, read while the job runs."""
        if not groups:
            groups.extend(json.loads(sd_file.read_text()))

    result = run_job(config, on_dispatch=read_discovery_file)

    roles = sorted((g["labels"]["role"], g["labels"]["index"]) for g in groups)
    assert roles == sorted(
        [("job", "0"), ("learner", "0")]
        + [("generator", str(i)) for i in range(generators)]
        + [("reward", str(i)) for i in range(rewards)]
    )
    assert not sd_file.exists()

    stats = read_stats(tmp_path / "run")
    assert stats == result.stats
    assert [line["iteration"] for line in stats] == [1, 2, 3]
    assert [line["policy_version"] for line in stats] == [1, 2, 3]
    assert [line["samples"] for line in stats] == [8, 8, 8]
    assert [line["rollout_ids"] for line in stats] == [[0, 7], [8, 15], [16, 23]]
    assert [line["sampled_with_versions"] for line in stats] == [[0], [1], [2]]
    assert result.consumed_rollout_ids == list(range(24))
    for line in stats:
        for key in ("objective/kl", "objective/kl_coef", "ppo/loss/policy", "ppo/loss/value"):
            assert isinstance(line[key], float), key
        for key in ("time/generate_s", "time/score_s", "time/train_s", "time/sync_s"):
            assert line[key] >= 0, key
        assert -1 <= line["reward_mean"] <= 1
        assert line["generator_restarts"] == line["reward_restarts"] == 0


@pytest.mark.slow
def test_killed_actors_mid_batch_have_their_shards_redispatched_and_nothing_counted_twice(
    ray_local, tiny_model_dir: Path, tmp_path: Path
) -> None:
    import ray

    from rlfleet.job.train import run_job

    killed = []

    def kill_once(kind: str, iteration: int, actors: list) -> None:
        """Kills generator 0 while it samples batch 2 and reward actor 1 while it scores batch 1."""
        if (kind, iteration) in {("generator", 1), ("reward", 0)}:
            victim = actors[0] if kind == "generator" else actors[1]
            ray.kill(victim, no_restart=True)
            killed.append((kind, iteration))

    config = small_job(
        tiny_model_dir,
        tmp_path / "run",
        generators={"num_actors": 2},
        reward={"num_actors": 2},
        iterations=3,
    )
    result = run_job(config, on_dispatch=kill_once)

    assert killed == [("reward", 0), ("generator", 1)]
    assert result.generator_restarts == 1
    assert result.reward_restarts == 1
    stats = read_stats(tmp_path / "run")
    assert [line["samples"] for line in stats] == [8, 8, 8]
    assert [line["reward_restarts"] for line in stats] == [1, 1, 1]
    assert [line["generator_restarts"] for line in stats] == [0, 1, 1]
    assert [line["sampled_with_versions"] for line in stats] == [[0], [1], [2]]
    assert result.consumed_rollout_ids == list(range(24))


@pytest.mark.slow
def test_after_every_sync_the_generators_greedy_tokens_and_logprobs_match_the_learner(
    ray_local, demo_model_dir: Path, tmp_path: Path
) -> None:
    from support.probes import generator_greedy, generator_version, job_learner_greedy

    from rlfleet.job.loop import TrainingJob

    config = small_job(
        demo_model_dir,
        tmp_path / "run",
        generators={"num_actors": 2},
        ppo={"learning_rate": 5e-3, "ppo_epochs": 2},
        iterations=3,
    )
    job = TrainingJob(config)
    probe = job.prompts.next_batch(4).column("prompt_ids").to_pylist()
    try:
        before = job_learner_greedy(job, probe, 8)
        queue = deque([job.dispatch_next_batch()])
        for _ in range(config.iterations):
            job.train_iteration(queue)
            learner = job_learner_greedy(job, probe, 8)
            for generator in job.generators.actors:
                assert generator_version(generator) == job.iteration
                completions = generator_greedy(generator, probe, 8)
                for mine, theirs in zip(learner, completions, strict=True):
                    assert theirs.token_ids == mine["token_ids"]
                    assert theirs.logprobs == pytest.approx(mine["logprobs"], abs=1e-4)
    finally:
        job.shutdown()
    changed = [a["logprobs"] != b["logprobs"] for a, b in zip(before, learner, strict=True)]
    assert all(changed), "training did not move the policy: the sync check would prove nothing"


@pytest.mark.slow
def test_one_step_off_overlaps_generation_and_trains_with_lag_one(
    ray_local, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from rlfleet.job.train import run_job

    config = small_job(
        tiny_model_dir, tmp_path / "run", iterations=4, one_step_off=True, max_policy_lag=1
    )
    result = run_job(config)

    stats = read_stats(tmp_path / "run")
    # Batch k+1 is sampled (with version k) while the learner trains on batch k.
    assert [line["sampled_with_versions"] for line in stats] == [[0], [0], [1], [2]]
    assert result.consumed_rollout_ids == list(range(32))


@pytest.mark.slow
def test_demo_job_raises_the_mean_reward_with_bounded_kl(
    ray_local, demo_model_dir: Path, tmp_path: Path
) -> None:
    """The embedded demo (examples/demo.yaml, seed 0) on the demo model, with CPUs scaled to
    the 4-CPU test cluster."""
    from rlfleet.job.train import run_job

    config = load_job_config(
        DEMO_CONFIG,
        [
            f"model={demo_model_dir}",
            f"output_dir={tmp_path / 'run'}",
            "generators.num_cpus=1",
            "reward.num_cpus=1",
        ],
    )
    result = run_job(config)

    rewards = [line["reward_mean"] for line in result.stats]
    kls = [line["objective/kl"] for line in result.stats]
    assert len(rewards) == config.iterations
    assert sum(rewards[-3:]) / 3 > rewards[0] + 0.15, rewards
    assert max(abs(kl) for kl in kls) < 10.0, kls


@pytest.mark.slow
def test_a_resumed_job_continues_from_the_latest_checkpoint_without_reusing_rollout_ids(
    ray_local, tiny_model_dir: Path, tmp_path: Path
) -> None:
    from rlfleet.job.train import run_job

    checkpoint = {"uri": str(tmp_path / "checkpoints"), "every": 1}
    first = small_job(tiny_model_dir, tmp_path / "run", iterations=2, checkpoint=checkpoint)
    run_job(first)
    resumed = run_job(first.model_copy(update={"iterations": 3}), resume_from="latest")

    stats = read_stats(tmp_path / "run")
    assert [line["iteration"] for line in stats] == [1, 2, 3]
    assert [line["rollout_ids"] for line in stats] == [[0, 7], [8, 15], [16, 23]]
    assert [line["sampled_with_versions"] for line in stats] == [[0], [1], [2]]
    assert resumed.consumed_rollout_ids == list(range(24))
    from rlfleet.checkpoint.load import list_checkpoints

    assert [info.step for info in list_checkpoints(checkpoint["uri"])] == [1, 2, 3]


def test_a_dead_actor_is_named_from_rays_error() -> None:
    from ray.exceptions import ActorDiedError

    error = ActorDiedError()
    error.error_msg = f"{ActorDiedError.BASE_ERROR_MSG}\n\tclass_name: LearnerActor\n\tpid: 7"
    assert train.job_error_line(error) == (
        "LearnerActor died: The actor died unexpectedly before finishing this task."
    )


@pytest.mark.slow
def test_a_diverging_job_stops_with_one_line_and_exit_1_before_publishing_nan(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """ppo.learning_rate=1000 used to train on NaN to the end and exit 0."""
    out = tmp_path / "run"
    job = small_job(tiny_model_dir, out, iterations=4, checkpoint={"uri": str(tmp_path / "ck")})
    config = write_config(tmp_path / "job.yaml", job)
    ray_tmp = Path(tempfile.mkdtemp(prefix="rlf-ray-", dir="/tmp"))  # short: Ray's socket paths
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(TMPDIR=str(ray_tmp), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    try:
        proc = subprocess.run(
            ["rlfleet", "train", "--config", str(config), "--set", "ppo.learning_rate=1000"],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 1, proc.stderr[-3000:]
    ours = re.findall(r"rlfleet train: .*", proc.stderr)  # after the progress bar's last update
    assert len(ours) == 1, proc.stderr[-3000:]
    assert re.match(r"rlfleet train: LearnerActor\.step: NonFiniteError: PPO step \d+, ", ours[0])
    assert "Traceback" not in proc.stderr
    assert "Traceback" in (out / "error.log").read_text()
    assert len(read_stats(out)) < 4

"""A reward function runs in a warm worker process of its scorer: a call stuck in C code that
holds the GIL is cut at ``reward.timeout_s`` by killing the worker, and the next call gets a
fresh one; bad return values and exceptions that are not ``Exception`` are one-line errors."""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlfleet.common.config import RewardConfig
from rlfleet.reward import scorers
from rlfleet.reward.scorers import (
    MAX_ABS_SCORE,
    FunctionScorer,
    RewardError,
    RewardTimeoutError,
    make_scorer,
)

CATASTROPHIC = "a" * 40 + "b"


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie nobody reaps counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, IndexError):
        return True


def wait_until_gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while not gone(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_a_regex_stuck_in_c_is_cut_at_the_timeout_and_the_next_call_works(user_rewards):
    spec = f"{user_rewards}:catastrophic_regex"
    scorer = make_scorer(RewardConfig(function=spec, timeout_s=2))
    stuck_worker = scorer.worker.pid
    started = time.monotonic()
    with pytest.raises(RewardTimeoutError) as raised:
        scorer.score(["p", "q"], ["aaa", CATASTROPHIC], [{}, {}])
    elapsed = time.monotonic() - started
    assert 2 <= elapsed < 2 + 2
    message = str(raised.value)
    assert message == (
        f"reward function '{spec}' did not return within reward.timeout_s=2 s; "
        "its worker process was killed and a new one started"
    )
    assert "\n" not in message
    assert raised.value.indices == ()  # the whole batch
    assert gone(stuck_worker)
    assert scorer.worker.pid != stuck_worker
    assert scorer.score(["p", "q"], ["aaa", "ab"], [{}, {}]) == [1.0, 0.0]


def test_a_built_in_function_runs_in_the_worker_too(user_rewards):
    """``exact_match`` with a user's ``extract`` regex that backtracks forever."""
    scorer = make_scorer(
        RewardConfig(
            function="rlfleet.reward.functions:exact_match",
            kwargs={"extract": "(a+)+$"},
            timeout_s=1,
        )
    )
    started = time.monotonic()
    with pytest.raises(RewardTimeoutError, match=r"exact_match' did not return within .*=1 s"):
        scorer.score([""], [CATASTROPHIC], [{"answer": "x"}])
    assert time.monotonic() - started < 1 + 2
    assert scorer.score([""], ["aaaa"], [{"answer": "aaaa"}]) == [1.0]


def test_the_worker_is_started_once_and_stays_warm(user_rewards):
    scorer = FunctionScorer(f"{user_rewards}:worker_pid")
    pid = scorer.worker.pid
    assert pid != os.getpid()
    for _ in range(5):
        scores = scorer.score(["p"] * 3, ["r"] * 3, [{}] * 3)
        assert [round(score * 1e4) for score in scores] == [pid] * 3
    assert scorer.worker.pid == pid


def test_a_call_on_a_warm_worker_costs_well_under_a_process_start():
    """64 short responses: about 0.1 ms over a direct call on an idle machine (a process start
    is about 50 ms); the bound leaves room for a loaded one."""
    scorer = FunctionScorer("rlfleet.reward.functions:arithmetic_correct")
    prompts = [f"{i}+{i}=" for i in range(64)]
    responses = [f"it is {2 * i}" if i % 2 else "no idea" for i in range(64)]
    metadata = [{"answer": 2 * i} for i in range(64)]
    assert scorer.score(prompts, responses, metadata) == [float(i % 2) for i in range(64)]
    durations = []
    for _ in range(30):
        started = time.perf_counter()
        scorer.score(prompts, responses, metadata)
        durations.append(time.perf_counter() - started)
    assert statistics.median(durations) < 0.01


def test_a_large_batch_is_sent_and_scored(user_rewards):
    """A request bigger than the socket's buffer (written by a helper thread)."""
    scorer = FunctionScorer(f"{user_rewards}:numpy_lengths", timeout_s=10)
    responses = ["x" * (1000 + i) for i in range(1000)]  # ~1.5 MB
    assert scorer.score([""] * 1000, responses, [{}] * 1000) == [1000.0 + i for i in range(1000)]


def test_a_worker_that_cannot_read_a_large_request_is_cut_at_the_timeout(user_rewards):
    """The write of a request bigger than the socket's buffer is bounded by the timeout too."""
    scorer = FunctionScorer(f"{user_rewards}:hog_the_gil_in_background", timeout_s=1)
    assert scorer.score(["p"], ["r"], [{}]) == [0.0]
    time.sleep(0.6)  # the worker's background thread now holds the GIL
    started = time.monotonic()
    with pytest.raises(RewardTimeoutError, match="did not return within reward.timeout_s=1 s"):
        scorer.score([""] * 1000, [f"{i:04}" + "x" * 1000 for i in range(1000)], [{}] * 1000)
    assert time.monotonic() - started < 1 + 2
    assert scorer.score(["p"], ["r"], [{}]) == [0.0]


def test_keyboard_interrupt_in_the_function_is_a_one_line_error_naming_it(user_rewards):
    spec = f"{user_rewards}:raises_keyboard_interrupt"
    scorer = FunctionScorer(spec)
    worker = scorer.worker.pid
    with pytest.raises(RewardError) as raised:
        scorer.score(["p", "q"], ["a", "b"], [{}, {}])
    assert str(raised.value) == f"reward function '{spec}' raised KeyboardInterrupt"
    assert raised.value.indices == (0,)
    assert scorer.worker.pid == worker  # the worker survives it


def test_an_int_too_big_for_a_float_is_not_a_finite_float_not_an_overflow_error(user_rewards):
    spec = f"{user_rewards}:huge_int_at_1"
    with pytest.raises(RewardError) as raised:
        FunctionScorer(spec).score(["p"] * 3, ["r"] * 3, [{}] * 3)
    assert str(raised.value) == (
        f"reward function '{spec}' returned {'1' + '0' * 39}... (int) for sample 1, "
        "a value that is not a finite float"
    )
    assert raised.value.indices == (1,)
    assert "OverflowError" not in str(raised.value)


def test_a_score_beyond_the_bound_is_refused_naming_value_and_bound(user_rewards):
    spec = f"{user_rewards}:score_1e30_at_1"
    with pytest.raises(RewardError) as raised:
        FunctionScorer(spec).score(["p"] * 3, ["r"] * 3, [{}] * 3)
    assert str(raised.value) == (
        f"reward function '{spec}' returned 1e+30 for sample 1, beyond the bound "
        "|score| <= 1e+06 (rlfleet.reward.scorers.MAX_ABS_SCORE); scale the reward down"
    )
    assert raised.value.indices == (1,)


def test_the_bound_is_inclusive_and_applies_to_both_signs(user_rewards):
    scorer = FunctionScorer(f"{user_rewards}:scores")
    assert MAX_ABS_SCORE == 1e6
    bounds = [{"score": MAX_ABS_SCORE}, {"score": -MAX_ABS_SCORE}]
    assert scorer.score(["p", "q"], ["a", "b"], bounds) == [1e6, -1e6]
    with pytest.raises(RewardError, match=r"returned -1000000\.5 for sample 1, beyond the bound"):
        scorer.score(["p", "q"], ["a", "b"], [{"score": 0}, {"score": -1e6 - 0.5}])


def test_the_bound_is_a_module_constant_read_at_each_check(user_rewards, monkeypatch):
    monkeypatch.setattr(scorers, "MAX_ABS_SCORE", 1e31)
    scorer = FunctionScorer(f"{user_rewards}:score_1e30_at_1")
    assert scorer.score(["p"] * 3, ["r"] * 3, [{}] * 3) == [0.0, 1e30, 0.0]
    assert scorers.check_scores([0.0, 1e30], 2, "x") == [0.0, 1e30]


def test_a_worker_that_crashes_is_named_and_replaced(user_rewards):
    spec = f"{user_rewards}:crash_on_crash"
    scorer = FunctionScorer(spec)
    crashed = scorer.worker.pid
    with pytest.raises(RewardError) as raised:
        scorer.score(["p", "q"], ["fine", "crash"], [{}, {}])
    assert str(raised.value) == (
        f"reward function '{spec}' did not return: its worker process was killed by SIGSEGV; "
        "a new one was started"
    )
    assert not isinstance(raised.value, RewardTimeoutError)
    assert scorer.worker.pid != crashed
    assert scorer.score(["p"], ["fine"], [{}]) == [1.0]


def test_a_worker_that_died_between_calls_is_replaced_silently(user_rewards):
    scorer = FunctionScorer(f"{user_rewards}:worker_pid")
    killed = scorer.worker.pid
    os.kill(killed, signal.SIGKILL)
    assert wait_until_gone(killed, 5)
    [score] = scorer.score(["p"], ["r"], [{}])
    assert round(score * 1e4) == scorer.worker.pid != killed


def test_the_timeout_kills_the_processes_the_function_started(user_rewards, tmp_path):
    pid_file = tmp_path / "sleep.pid"
    scorer = FunctionScorer(f"{user_rewards}:spawn_and_hang", {"pid_file": str(pid_file)}, 1)
    with pytest.raises(RewardTimeoutError):
        scorer.score(["p"], ["r"], [{}])
    assert wait_until_gone(int(pid_file.read_text()), 5)


def test_close_and_garbage_collection_stop_the_worker(user_rewards):
    scorer = FunctionScorer(f"{user_rewards}:worker_pid")
    pid = scorer.worker.pid
    scorer.close()
    assert gone(pid)
    scorer = FunctionScorer(f"{user_rewards}:worker_pid")
    pid = scorer.worker.pid
    del scorer
    assert wait_until_gone(pid, 5)


def test_components_close_their_workers(user_rewards):
    config = RewardConfig(
        components=[
            {"name": "a", "function": f"{user_rewards}:worker_pid"},
            {"name": "b", "function": "rlfleet.reward.functions:sentiment"},
        ]
    )
    scorer = make_scorer(config)
    pids = [component.worker.pid for _, _, component in scorer.components]
    assert len(set(pids)) == 2
    scorer.close()
    assert all(gone(pid) for pid in pids)


def test_a_module_that_fails_to_import_is_a_value_error_naming_the_spec(user_rewards, tmp_path):
    (tmp_path / "rlfleet_broken_rewards.py").write_text("raise RuntimeError('no GPU here')\n")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(
            ValueError,
            match=r"^reward function 'rlfleet_broken_rewards:f': importing it raised "
            r"RuntimeError: no GPU here$",
        ):
            FunctionScorer("rlfleet_broken_rewards:f")
    finally:
        sys.path.remove(str(tmp_path))


CHILD = """
import sys
from rlfleet.reward.scorers import FunctionScorer

scorer = FunctionScorer(sys.argv[1], timeout_s=600)
print(scorer.worker.pid, flush=True)
scorer.score(["p"], ["a" * 40 + "b"], [{}])
"""


def test_the_worker_dies_with_its_parent_even_while_stuck(user_rewards):
    """The actor killed (SIGKILL) while its worker is stuck in the regex: no worker lingers."""
    module_dir = next(path for path in sys.path if Path(path, f"{user_rewards}.py").exists())
    parent = subprocess.Popen(
        [sys.executable, "-c", CHILD, f"{user_rewards}:catastrophic_regex"],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": module_dir},
        text=True,
    )
    try:
        worker = int(parent.stdout.readline())
        time.sleep(0.5)  # the call is under way
        assert not gone(worker)
    finally:
        parent.kill()
        parent.wait()
    assert wait_until_gone(worker, 5)

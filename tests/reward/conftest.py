"""A real HTTP reward server on 127.0.0.1 and a user reward module, shared by the reward tests."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

SLOW_ENDPOINT_SECONDS = 1.0
BASIC_AUTH = "Basic " + base64.b64encode(b"scorer:s3cret pass").decode()
_FLAKY_SEEN: set[str] = set()


def served_scores(request: dict) -> list[float]:
    """What ``/score`` answers: 100 * len(prompt) + len(response) + the sample's ``bonus``."""
    return [
        100.0 * len(prompt) + len(response) + meta.get("bonus", 0)
        for prompt, response, meta in zip(
            request["prompts"], request["responses"], request["metadata"], strict=True
        )
    ]


class RewardHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/score":
            self._answer(200, json.dumps({"scores": served_scores(request)}))
        elif self.path == "/slow":
            time.sleep(SLOW_ENDPOINT_SECONDS)
            self._answer(200, json.dumps({"scores": served_scores(request)}))
        elif self.path == "/bad-json":
            self._answer(200, "scores: [1, 2")
        elif self.path == "/no-scores":
            self._answer(200, json.dumps({"rewards": served_scores(request)}))
        elif self.path == "/short":
            self._answer(200, json.dumps({"scores": served_scores(request)[:-1]}))
        elif self.path.startswith("/flaky/"):
            # 503 on the first request for each key, then the scores.
            key = self.path.removeprefix("/flaky/")
            if key in _FLAKY_SEEN:
                self._answer(200, json.dumps({"scores": served_scores(request)}))
            else:
                _FLAKY_SEEN.add(key)
                self._answer(503, "warming up")
        elif self.path == "/always-503":
            self._answer(503, "overloaded")
        elif self.path.startswith("/auth"):
            if self.headers.get("Authorization") == BASIC_AUTH:
                self._answer(200, json.dumps({"scores": served_scores(request)}))
            else:
                self._answer(401, "who are you")
        elif self.path == "/nan":
            nans = [float("nan")] * (len(request["responses"]) - 1)
            self._answer(200, json.dumps({"scores": [0.0, *nans]}))
        else:
            self._answer(500, "internal failure")

    def _answer(self, status: int, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            self.wfile.write(data)
        except BrokenPipeError:
            pass  # the client timed out and left

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="session")
def reward_server() -> Iterator[str]:
    """The base URL of a real threaded HTTP reward server on 127.0.0.1."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), RewardHandler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


USER_REWARDS = """
import math

import numpy as np

def bonus_plus_weight(prompts, responses, *, bonus, weight, **_):
    return [bonus + (w or 0.0) for w in weight]

def numpy_lengths(prompts, responses, **_):
    return np.array([len(r) for r in responses], dtype=np.float32)

def wrong_length(prompts, responses, **_):
    return [0.0] * (len(responses) + 1)

def nan_at_1(prompts, responses, **_):
    return [0.0, math.nan, 0.0][: len(responses)]

def text_at_2(prompts, responses, **_):
    return [0.0, 1.0, "high"][: len(responses)]

def not_a_list(prompts, responses, **_):
    return 1.0

def a_dict(prompts, responses, **_):
    return {"scores": [0.0] * len(responses)}

def fail_on_bad(prompts, responses, **_):
    for response in responses:
        if "bad" in response:
            raise KeyError("cannot score " + response)
    return [1.0] * len(responses)

def weighted_fail_on_bad(prompts, responses, *, weight, **_):
    return fail_on_bad(prompts, responses)

def fail_on_batches(prompts, responses, **_):
    if len(responses) > 1:
        raise RuntimeError("batches not supported")
    return [1.0]

def hangs(prompts, responses, **_):
    import threading

    threading.Event().wait()

def catastrophic_regex(prompts, responses, **_):
    import re

    # exponential backtracking in C, holding the GIL, on "a" * 40 + "b"
    return [1.0 if re.match(r"(a+)+$", response) else 0.0 for response in responses]

def raises_keyboard_interrupt(prompts, responses, **_):
    raise KeyboardInterrupt

def huge_int_at_1(prompts, responses, **_):
    return [0.0, 10**400, 0.0][: len(responses)]

def score_1e30_at_1(prompts, responses, **_):
    return [0.0, 1e30, 0.0][: len(responses)]

def scores(prompts, responses, *, score, **_):
    return [float(s) for s in score]

def worker_pid(prompts, responses, **_):
    import os

    print("scoring in", os.getpid())  # the worker's stdout is not its channel to the scorer
    return [os.getpid() / 1e4] * len(responses)

def crash_on_crash(prompts, responses, **_):
    import os
    import signal

    if "crash" in responses:
        os.kill(os.getpid(), signal.SIGSEGV)
    return [1.0] * len(responses)

def hog_the_gil_in_background(prompts, responses, **_):
    import re
    import threading

    # the worker answers, then cannot read its next request: this thread holds the GIL
    hog = threading.Timer(0.3, re.match, args=(r"(a+)+$", "a" * 40 + "b"))
    hog.daemon = True
    hog.start()
    return [0.0] * len(responses)

def spawn_and_hang(prompts, responses, *, pid_file, **_):
    import pathlib
    import subprocess
    import threading

    child = subprocess.Popen(["sleep", "600"])
    pathlib.Path(pid_file).write_text(str(child.pid))
    threading.Event().wait()

threshold = 0.5
"""


@pytest.fixture(scope="session")
def user_rewards(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The name of an importable module of user reward functions, written for the session."""
    directory = tmp_path_factory.mktemp("user-rewards")
    (directory / "rlfleet_user_rewards.py").write_text(USER_REWARDS)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(directory))
        yield "rlfleet_user_rewards"

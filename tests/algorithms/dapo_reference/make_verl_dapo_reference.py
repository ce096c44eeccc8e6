"""Builds veRL 0.9.1 reference data for DAPO's sampling control (``rlfleet.algorithms.sampling``).

Run with the veRL virtualenv (``bash bench/setup_verl_venv.sh`` creates it)::

    .venv-verl/bin/python tests/algorithms/dapo_reference/make_verl_dapo_reference.py

It writes ``cases/overlong.json``, ``cases/filter_groups.json`` and ``cases/sample_loop.json``
(inputs and veRL's outputs) and ``versions_verl.json``. Every number comes from veRL's own code:

- Soft overlong punishment: ``verl.workers.reward_manager.dapo.DAPORewardManager`` (imports as
  is) called on a ``DataProto`` of right-padded responses, with a tokenizer that only joins ids
  and a ``compute_score`` that returns each sample's stored score (its ``ground_truth``), so the
  reward it writes on the last valid token is ``score + overlong_reward``; its
  ``reward_extra_info["overlong_reward"]`` is recorded too.
- Dynamic sampling: veRL 0.9.1 has it in ``verl/trainer/ppo/v1/replay_buffer.py`` (``ReplayBuffer``;
  the older trainer loop moved out to the DAPO recipe). That module imports ``transfer_queue``
  (not installable here) and its package ``verl.trainer.ppo.v1`` imports hydra through the agent
  loop, so the script loads the module's file directly under another name with a stand-in
  ``transfer_queue``: an in-memory key-value store with ``kv_list``, ``kv_batch_get``,
  ``kv_clear`` and ``KVBatchMeta``, nothing else. ``filter_groups.json`` is what the real
  ``ReplayBuffer._dapo_filtered_keys`` drops for each group, for the metric ``"reward"`` (each
  trajectory's ``rm_scores`` summed: float32 values) and ``"acc"`` (a ``reward_extra_info``
  field: Python floats). ``sample_loop.json`` runs the real sync ``ReplayBuffer.sample`` on a
  script of groups, with a ``refill_fn`` that turns the next prompts of the script into finished
  groups at once (generation is instantaneous, so nothing is ever in flight when it polls) and
  records every refill, the eviction metrics, and the uids selected (veRL picks among one
  step's prompts in set order, which string hashing randomises: the script re-runs itself with
  ``PYTHONHASHSEED=0`` so its output is reproducible).

veRL 0.9.1 behaviour worth knowing:

- ``DAPORewardManager``: ``exceed_len = valid_response_length - (max_resp_len - buffer_len)``,
  ``overlong_reward = min(-exceed_len / buffer_len * penalty_factor, 0)`` with
  ``valid_response_length`` the response's attention-mask sum (a 0-d int64 tensor, so the
  penalty is float32); nothing caps it at ``-penalty_factor`` (a response is never longer than
  ``max_resp_len``); it asserts ``buffer_len > 0`` and ``max_resp_len >= buffer_len``.
- ``_dapo_filtered_keys`` drops a finished group iff ``len(values) > 1 and
  float(np.std(values)) == 0.0``: a group of one is kept; np.std's float64 rounding keeps three
  samples of 0.1 (std 1.4e-17) under ``"acc"``, while ``"reward"``'s float32 0.1 gives std 0.
- sync ``sample``: each poll's dropped groups add ``2 * k`` to a refill credit, dispatched up to
  ``max_inflight_gen_batches * train_batch_size`` prompts in flight; once ``batch_size`` groups
  are sampleable it stops dispatching, drains, selects ``batch_size`` (oldest ``global_steps``
  first, ties in set order) and discards the rest as ``discarded_surplus_samples``.
  ``filter_groups.max_num_gen_batches`` is ignored (``v1/trainer_base.py`` warns).
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
CASES_DIR = HERE / "cases"
PROMPT_WIDTH = 3

OVERLONG_CASES = [
    {"name": "max16_buffer4_factor1", "max_resp_len": 16, "buffer_len": 4, "penalty_factor": 1.0},
    {"name": "max12_buffer5_factor1.7", "max_resp_len": 12, "buffer_len": 5, "penalty_factor": 1.7},
    {"name": "buffer_equals_max", "max_resp_len": 10, "buffer_len": 10, "penalty_factor": 0.5},
    {"name": "buffer1", "max_resp_len": 9, "buffer_len": 1, "penalty_factor": 2.0},
    {
        "name": "max4096_buffer512",
        "max_resp_len": 4096,
        "buffer_len": 512,
        "penalty_factor": 1.0,
        "lengths": [1, 3583, 3584, 3585, 3600, 3839, 3840, 4000, 4095, 4096],
    },
]

FILTER_GROUPS: dict[str, list[float]] = {
    "g00": [1.0, 1.0, 1.0, 1.0],
    "g01": [0.0, 0.0, 0.0, 0.0],
    "g02": [0.0, 0.0, 0.0, 1.0],
    "g03": [1.0],
    "g04": [0.0],
    "g05": [0.1, 0.1, 0.1],
    "g06": [0.1, 0.1, 0.1, 0.1],
    "g07": [0.7, 0.7, 0.7],
    "g08": [0.7, 0.7],
    "g09": [-0.5, -0.5, -0.5],
    "g10": [0.3, -1.2, 2.5, 0.7],
    "g11": [1.0, 1.0000001],
    "g12": [0.75, 0.75, 0.75, 0.75],
    "g13": [1.0, 0.75, 1.0, 1.0],
    "g14": [0.2, 0.2, 0.2],
    "g15": [1e-8, 0.0, 0.0],
}

SAMPLE_LOOPS = [
    {
        "name": "batch4_inflight1",
        "train_batch_size": 4,
        "max_inflight_gen_batches": 1,
        "script": [
            [1, 1],
            [0, 1],
            [0, 0],
            [1, 1],
            [1, 0],
            [1, 1],
            [0, 0],
            [0, 1],
            [1, 0],
            [0, 0],
            [1, 1],
            [0, 1],
            [0, 0],
            [1, 0],
            [1, 1],
            [0, 1],
        ],
    },
    {
        "name": "batch4_inflight2",
        "train_batch_size": 4,
        "max_inflight_gen_batches": 2,
        "script": [
            [1, 1],
            [0, 0],
            [0, 0],
            [0, 1],
            [1, 1],
            [1, 1],
            [0, 1],
            [0, 0],
            [1, 0],
            [1, 1],
            [0, 0],
            [0, 1],
            [1, 0],
            [0, 1],
            [1, 1],
            [0, 0],
            [1, 0],
            [0, 1],
        ],
    },
    {
        "name": "batch3_all_kept",
        "train_batch_size": 3,
        "max_inflight_gen_batches": 1,
        "script": [[0, 1], [1, 0], [0.5, 1], [1, 1]],
    },
    {
        "name": "batch5_hard_data",
        "train_batch_size": 5,
        "max_inflight_gen_batches": 1,
        "script": [[0, 0, 0]] * 4
        + [[0, 0, 1]]
        + [[0, 0, 0]] * 9
        + [[1, 0, 0]] * 2
        + [[0, 0, 0]] * 5
        + [[0, 1, 1]] * 6
        + [[1, 1, 1]] * 3,
    },
]


# --- soft overlong punishment ------------------------------------------------------------------


class JoiningTokenizer:
    """What ``DAPORewardManager`` asks of a tokenizer: ``decode`` and ``eos_token``."""

    eos_token = "<eos>"

    def decode(self, ids: torch.Tensor, skip_special_tokens: bool = True) -> str:
        return " ".join(str(i) for i in ids.tolist())


def stored_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: Any) -> float:
    return float(ground_truth)


def run_overlong(case: dict[str, Any]) -> dict[str, Any]:
    from verl import DataProto
    from verl.workers.reward_manager.dapo import DAPORewardManager

    max_len = case["max_resp_len"]
    lengths = case.get("lengths", list(range(max_len + 1)))
    rng = np.random.default_rng(21)
    scores = [float(np.float32(s)) for s in rng.choice([0.0, 1.0, -1.0, 0.5], size=len(lengths))]
    batch = len(lengths)
    responses = torch.randint(5, 50, (batch, max_len))
    attention = torch.zeros(batch, PROMPT_WIDTH + max_len, dtype=torch.int64)
    attention[:, :PROMPT_WIDTH] = 1
    for row, length in enumerate(lengths):
        attention[row, PROMPT_WIDTH : PROMPT_WIDTH + length] = 1
    data = DataProto.from_dict(
        tensors={
            "prompts": torch.randint(5, 50, (batch, PROMPT_WIDTH)),
            "responses": responses,
            "attention_mask": attention,
        },
        non_tensors={
            "reward_model": np.array([{"ground_truth": s} for s in scores], dtype=object),
            "data_source": np.array(["stored"] * batch, dtype=object),
        },
    )
    config = SimpleNamespace(
        enable=True, len=case["buffer_len"], penalty_factor=case["penalty_factor"], log=True
    )
    manager = DAPORewardManager(
        JoiningTokenizer(), 0, stored_score, max_resp_len=max_len, overlong_buffer_cfg=config
    )
    out = manager(data, return_dict=True)
    reward_tensor = out["reward_tensor"]
    rewards = [float(reward_tensor[row, length - 1]) for row, length in enumerate(lengths)]
    penalties = [float(v) for v in out["reward_extra_info"]["overlong_reward"]]
    return {
        **{k: v for k, v in case.items() if k != "lengths"},
        "response_lengths": lengths,
        "scores": scores,
        "overlong_reward": penalties,
        "reward_on_last_token": rewards,
        "reward_dtype": str(reward_tensor.dtype),
        "overlong": [bool(v) for v in out["reward_extra_info"]["overlong"]],
    }


# --- dynamic sampling: the real ReplayBuffer on an in-memory transfer_queue -------------------


class MemoryQueue(types.ModuleType):
    """The few ``transfer_queue`` calls ``ReplayBuffer`` makes, on dicts."""

    def __init__(self) -> None:
        super().__init__("transfer_queue")
        self.tags: dict[str, dict[str, dict]] = {}
        self.values: dict[str, dict[str, dict]] = {}

        class KVBatchMeta:
            def __init__(self, partition_id: str, keys: list[str], tags: list[dict]) -> None:
                self.partition_id, self.keys, self.tags = partition_id, keys, tags

        self.KVBatchMeta = KVBatchMeta

    def put(self, partition: str, key: str, tag: dict, value: dict | None = None) -> None:
        self.tags.setdefault(partition, {})[key] = tag
        if value is not None:
            self.values.setdefault(partition, {})[key] = value

    def kv_list(self) -> dict[str, dict[str, dict]]:
        return {p: {k: dict(t) for k, t in tags.items()} for p, tags in self.tags.items()}

    def kv_batch_get(self, keys: list[str], partition_id: str, select_fields: list[str]) -> dict:
        stored = self.values[partition_id]
        return {field: [stored[key][field] for key in keys] for field in select_fields}

    def kv_clear(self, partition_id: str, keys: list[str]) -> None:
        for key in keys:
            self.tags.get(partition_id, {}).pop(key, None)
            self.values.get(partition_id, {}).pop(key, None)


def load_replay_buffer(queue: MemoryQueue) -> types.ModuleType:
    """``verl/trainer/ppo/v1/replay_buffer.py`` itself, with ``queue`` as its transfer_queue."""
    import verl

    sys.modules["transfer_queue"] = queue
    path = Path(verl.__file__).parent / "trainer" / "ppo" / "v1" / "replay_buffer.py"
    spec = importlib.util.spec_from_file_location("verl_v1_replay_buffer", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def add_finished_group(queue: MemoryQueue, uid: str, values: list[float], step: int) -> None:
    """A prompt whose sessions all finished: its tag, and per trajectory the metric both ways."""
    queue.put("train", uid, {"is_prompt": True, "status": "finished", "global_steps": step})
    for session, value in enumerate(values):
        rm_scores = torch.zeros(4, dtype=torch.float32)
        rm_scores[2] = value  # a score sits on the last valid token
        extra = {"reward_extra_info": {"acc": value}}
        key = f"{uid}_{session}_0"
        queue.put(
            "train", key, {"status": "finished"}, {"rm_scores": rm_scores, "extra_fields": extra}
        )


def make_buffer(module: types.ModuleType, metric: str, refill, batch: int, inflight: int):
    return module.ReplayBuffer(
        trainer_mode="sync",
        trainer_config={},
        max_off_policy_threshold=None,
        max_off_policy_strategy="drop",
        sampler_kwargs={},
        poll_interval=0.0,
        refill_fn=refill,
        filter_groups_metric=metric,
        train_batch_size=batch,
        gen_batch_size=1,
        max_inflight_gen_batches=inflight,
    )


def run_filter_groups() -> dict[str, Any]:
    queue = MemoryQueue()
    module = load_replay_buffer(queue)
    for uid, values in FILTER_GROUPS.items():
        add_finished_group(queue, uid, values, step=1)
    dropped = {}
    for metric in ("reward", "acc"):
        buffer = make_buffer(module, metric, lambda n: None, len(FILTER_GROUPS), 1)
        buffer._sync_metadata_from_transfer_queue()
        uids, counts = buffer._dapo_filtered_keys("train")
        dropped[metric] = sorted(uids)
    return {"groups": FILTER_GROUPS, "dropped": dropped}


def run_sample_loop(case: dict[str, Any]) -> dict[str, Any]:
    queue = MemoryQueue()
    module = load_replay_buffer(queue)
    script = list(case["script"])
    uids = [f"p{i:03d}" for i in range(len(script))]
    next_prompt = 0
    refills: list[int] = []

    def generate(count: int) -> None:
        nonlocal next_prompt
        if next_prompt + count > len(script):
            raise RuntimeError(f"script of {len(script)} groups exhausted")
        for index in range(next_prompt, next_prompt + count):
            add_finished_group(queue, uids[index], script[index], step=1)
        next_prompt += count

    def refill(count: int) -> None:
        refills.append(count)
        generate(count)

    batch = case["train_batch_size"]
    buffer = make_buffer(module, "acc", refill, batch, case["max_inflight_gen_batches"])
    buffer._wait_for_next_poll = lambda *_: (_ for _ in ()).throw(RuntimeError("stuck"))
    generate(batch)  # the trainer's first dispatch
    meta, metrics = buffer.sample(global_steps=1, partition_id="train", batch_size=batch)
    selected = sorted({key.split("_")[0] for key in meta.keys})
    return {
        **case,
        "uids": uids,
        "refills": refills,
        "generated": next_prompt,
        "selected": selected,
        "evicted": metrics.get("training/filter_groups/evicted_samples", 0),
        "discarded_surplus": metrics.get("training/filter_groups/discarded_surplus_samples", 0),
    }


def write_versions() -> None:
    import verl

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "verl": verl.__version__,
        "numpy": np.__version__,
        "machine": platform.machine(),
    }
    (HERE / "versions_verl.json").write_text(json.dumps(versions, indent=1) + "\n")


def write(name: str, document: Any) -> None:
    (CASES_DIR / f"{name}.json").write_text(json.dumps(document, indent=1) + "\n")


def main() -> int:
    if os.environ.get("PYTHONHASHSEED") != "0":  # set order picks veRL's batch among ties
        os.execve(sys.executable, [sys.executable, __file__], {**os.environ, "PYTHONHASHSEED": "0"})
    torch.set_num_threads(1)
    CASES_DIR.mkdir(exist_ok=True)
    write("overlong", [run_overlong(case) for case in OVERLONG_CASES])
    write("filter_groups", run_filter_groups())
    write("sample_loop", [run_sample_loop(case) for case in SAMPLE_LOOPS])
    write_versions()
    print(f"wrote {sorted(p.name for p in CASES_DIR.iterdir())}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Builds veRL 0.9.1 reference data for the off-policy corrections (algorithms/corrections.py).

Run with the veRL virtualenv (``bash bench/setup_verl_venv.sh`` creates it)::

    .venv-verl/bin/python tests/algorithms/corrections_reference/make_verl_reference.py

One seeded batch of 8 responses (width 10, right-padded, one row with holes as a multi-turn
mask has them): the learner's old logprobs and the generator's, apart by a per-row drift plus
per-token noise, so that some tokens and some rows fall outside every mode's bounds and some
inside; on the padding, values no function may read (a log ratio of -10 there). Each case calls
veRL's own ``verl.trainer.ppo.rollout_corr_helper.compute_rollout_correction_and_rejection_mask``
(it imports in the veRL venv) and stores, in ``cases/NAME.json``, its inputs, the IS weights (or
null), the modified response mask and every metric it returned (``rollout_corr/...``, the
off-policy metrics included), with the variation between 1 and 2 torch threads.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
CASES_DIR = HERE / "cases"
MASK_ROWS = [
    "1111111111",
    "1111111000",
    "1111000000",
    "1110011100",
    "1111111110",
    "1100000000",
    "1111111111",
    "1111110000",
]
ROW_DRIFT = [0.0, 0.02, -0.3, 0.1, 0.25, -0.05, -0.12, 0.6]
"""Each row's mean log ratio: some rows' sequence ratios inside the bounds, some outside."""

FUNCTION = "compute_rollout_correction_and_rejection_mask"


def verl_k1_bounds(low: float, high: float) -> str:
    """veRL's k1 threshold for ``[low, high]`` on ``pi_old / pi_rollout``: its k1 bounds
    ``pi_rollout / pi_old``."""
    return f"{1 / high!r}_{1 / low!r}"


CASES: dict[str, dict[str, Any]] = {
    # rlfleet mode -> the veRL arguments that are the same correction
    "token_tis_cap2": {
        "mode": "token_tis",
        "params": {"cap": 2.0},
        "verl": {"rollout_is": "token", "rollout_is_threshold": 2.0},
    },
    "token_tis_cap1.2": {
        "mode": "token_tis",
        "params": {"cap": 1.2},
        "verl": {"rollout_is": "token", "rollout_is_threshold": 1.2},
    },
    "seq_tis_cap2": {
        "mode": "seq_tis",
        "params": {"cap": 2.0},
        "verl": {"rollout_is": "sequence", "rollout_is_threshold": 2.0},
    },
    "icepop_0.8_1.25": {
        "mode": "icepop",
        "params": {"low": 0.8, "high": 1.25},
        "verl": {"rollout_is": "token", "rollout_is_threshold": "0.8_1.25"},
    },
    "icepop_0.5_5": {
        "mode": "icepop",
        "params": {"low": 0.5, "high": 5.0},
        "verl": {"rollout_is": "token", "rollout_is_threshold": "0.5_5.0"},
    },
    "seq_mis_product_0.5_4": {
        "mode": "seq_mis",
        "params": {"low": 0.5, "high": 4.0, "aggregate": "product"},
        "verl": {
            "rollout_is": None,
            "rollout_rs": "seq_sum_k1",
            "rollout_rs_threshold": verl_k1_bounds(0.5, 4.0),
        },
    },
    "seq_mis_product_0.5_2_cap2": {
        "mode": "seq_mis",
        "params": {"low": 0.5, "high": 2.0, "aggregate": "product", "cap": 2.0},
        "verl": {
            "rollout_is": "sequence",
            "rollout_is_threshold": 2.0,
            "rollout_rs": "seq_sum_k1",
            "rollout_rs_threshold": verl_k1_bounds(0.5, 2.0),
        },
    },
    "seq_mis_geometric_0.95_1.05": {
        "mode": "seq_mis",
        "params": {"low": 0.95, "high": 1.05, "aggregate": "geometric"},
        "verl": {
            "rollout_is": None,
            "rollout_rs": "seq_mean_k1",
            "rollout_rs_threshold": verl_k1_bounds(0.95, 1.05),
        },
    },
    "seq_mis_geometric_0.98_1.1_cap1.5": {
        "mode": "seq_mis",
        "params": {"low": 0.98, "high": 1.1, "aggregate": "geometric", "cap": 1.5},
        "verl": {
            "rollout_is": "sequence",
            "rollout_is_threshold": 1.5,
            "rollout_rs": "seq_mean_k1",
            "rollout_rs_threshold": verl_k1_bounds(0.98, 1.1),
        },
    },
}


def make_batch() -> dict[str, torch.Tensor]:
    """The masks, the old logprobs and the generator's (garbage on padding, not on holes)."""
    rng = np.random.default_rng(2031)
    mask = torch.tensor([[float(c) for c in row] for row in MASK_ROWS])
    shape = mask.shape
    old = torch.tensor(rng.normal(-1.5, 0.7, size=shape), dtype=torch.float32)
    noise = torch.tensor(rng.normal(0.0, 0.15, size=shape), dtype=torch.float32)
    rollout = old - torch.tensor(ROW_DRIFT).unsqueeze(1) / 4 - noise
    lengths = torch.tensor([row.rstrip("0").__len__() for row in MASK_ROWS])
    padding = torch.arange(shape[1]).unsqueeze(0) >= lengths.unsqueeze(1)
    old = old.masked_fill(padding, -7.0)
    rollout = rollout.masked_fill(padding, 3.0)
    return {"response_mask": mask, "old_log_prob": old, "rollout_log_prob": rollout}


def run_case(name: str) -> dict[str, Any]:
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_rejection_mask

    batch = make_batch()
    weights, modified, metrics = compute_rollout_correction_and_rejection_mask(
        batch["old_log_prob"],
        batch["rollout_log_prob"],
        batch["response_mask"],
        **CASES[name]["verl"],
    )
    return {
        "weights": None if weights is None else weights.batch["rollout_is_weights"].tolist(),
        "modified_response_mask": modified.tolist(),
        "metrics": {key: float(value) for key, value in metrics.items()},
    }


def run_all(out: Path, threads: int) -> None:
    torch.set_num_threads(threads)
    out.write_text(json.dumps({name: run_case(name) for name in CASES}))


def largest_difference(a: Any, b: Any) -> float:
    if isinstance(a, dict):
        return max((largest_difference(a[k], b[k]) for k in a), default=0.0)
    if a is None:
        return 0.0
    return float(
        np.nanmax(np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float)), initial=0.0)
    )


def write_cases(one: dict[str, Any], two: dict[str, Any]) -> None:
    CASES_DIR.mkdir(parents=True, exist_ok=True)
    batch = make_batch()
    inputs = {key: value.tolist() for key, value in batch.items()}
    for name, case in CASES.items():
        document = {
            "name": name,
            "function": f"verl.trainer.ppo.rollout_corr_helper.{FUNCTION}",
            "case": case,
            "inputs": inputs,
            "expected": one[name],
            "thread_variation": largest_difference(one[name], two[name]),
        }
        (CASES_DIR / f"{name}.json").write_text(json.dumps(document, indent=1) + "\n")


def write_versions() -> None:
    import verl

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "verl": verl.__version__,
        "numpy": np.__version__,
        "machine": platform.machine(),
        "torch_threads": "1 (stored data); 2 (thread_variation)",
    }
    (HERE / "versions_verl.json").write_text(json.dumps(versions, indent=1) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="run every case on this many threads")
    parser.add_argument("--out", type=Path, help="with --threads: the raw outputs' JSON file")
    args = parser.parse_args()
    if args.threads:
        run_all(args.out, args.threads)
        return 0
    write_versions()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {n: Path(tmp) / f"threads{n}.json" for n in (1, 2)}
        for threads, out in runs.items():
            command = [sys.executable, __file__, "--threads", str(threads), "--out", str(out)]
            subprocess.run(command, check=True)
        one, two = (json.loads(runs[n].read_text()) for n in (1, 2))
        write_cases(one, two)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Measures how far TRL v0.11.4 and rlfleet move against themselves, the numbers behind the
tolerances of tests/trainers/test_trl_parity.py.

Every parity case runs with TRL (``.venv-trl``, through ``make_reference.py --case``) and with
rlfleet (this interpreter, through the test module's ``run_rlfleet``) under each variant of
:data:`VARIANTS`: torch thread counts 1 and 2, and two stand-ins for another CPU on this one,
the scalar ATen kernels (``ATEN_CPU_CAPABILITY=default`` instead of AVX2/AVX-512: other vector
widths, other ``exp``/``tanh``/``log`` rounding, other reduction order) and MKL's conditional
numerical reproducibility mode (``MKL_CBWR=COMPATIBLE``: the matmul kernels any x86 CPU runs).
The stored reference (made on another machine, see ``versions.json``) is one more CPU::

    .venv/bin/python tests/trainers/trl_reference/measure_variation.py [--out DIR]

It prints, per case, the differences of the updated weights in units of the learning rate
(attention key bias left out, as the test does: largest, third largest, count over the test's
``atol``) and of the stats, as the relative difference left over after the test's absolute
tolerance (the ``rtol`` the comparison needs), for the first ``step`` and for later ones.
``--out`` keeps the runs (a later call with the same ``--out`` reuses them) and a JSON of the
table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(HERE.parent))
import test_trl_parity as parity  # noqa: E402

TRL_PYTHON = ROOT / ".venv-trl" / "bin" / "python"
VARIANTS: dict[str, tuple[int, dict[str, str]]] = {
    "threads_1": (1, {}),
    "threads_2": (2, {}),
    "scalar_kernels": (2, {"ATEN_CPU_CAPABILITY": "default"}),
    "mkl_compatible": (2, {"MKL_CBWR": "COMPATIBLE"}),
}
"""Variant name -> (torch threads, environment)."""


def run_all(out: Path) -> None:
    """Every case under every variant with both implementations, one process per run."""
    for (variant, (threads, env)), name in itertools.product(VARIANTS.items(), parity.CASE_NAMES):
        environment = {**os.environ, **env}
        trl = [str(TRL_PYTHON), str(HERE / "make_reference.py"), "--case", name]
        ours = [sys.executable, __file__, "--rlfleet-case", name]
        for impl, command in (("trl", trl), ("rlfleet", ours)):
            target = out / impl / variant
            if not (target / f"{name}.safetensors").exists():
                print(f"{impl} {variant} {name}", flush=True)
                options = ["--threads", str(threads), "--out", str(target)]
                subprocess.run(command + options, env=environment, check=True)


def run_rlfleet_case(name: str, out: Path) -> None:
    """One case through rlfleet; writes its stats (JSON) and updated weights next to TRL's."""
    case = parity.load_case(name)
    tokenizer = parity.AutoTokenizer.from_pretrained(parity.REFERENCE / "tokenizer")
    with tempfile.TemporaryDirectory() as directory:

        def checkpoint(case: dict[str, Any], weights: str) -> Path:
            target = Path(directory) / f"{case['model_variant']}-{weights}"
            if not target.exists():
                parity.write_checkpoint(target, case["model_config"], weights)
            return target

        all_stats, model = parity.run_rlfleet(case, tokenizer, checkpoint)
    state = model.state_dict()
    expected = load_file(parity.REFERENCE / "cases" / f"{name}.safetensors")
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: state[k].detach().contiguous() for k in expected}, out / f"{name}.safetensors")
    records = [{"stats": {k: jsonable(v) for k, v in s.items()}} for s in all_stats]
    (out / f"{name}.json").write_text(json.dumps({"records": records}) + "\n")


def jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.double().tolist()
    if isinstance(value, np.ndarray):
        return value.astype(np.float64).tolist()
    return float(value) if isinstance(value, (np.floating, np.integer)) else value


def weight_differences_in_lr(a: Path, b: Path, learning_rate: float) -> dict[str, float]:
    """Two updated policies elementwise, key bias left out, in lr: the largest difference, the
    third largest (what is left past the rare Adam-amplified elements) and how many elements
    differ by more than the test's ``WEIGHT_ATOL_IN_LR``."""
    first, second = load_file(a), load_file(b)
    differences = (
        torch.cat(
            [
                (parity.without_key_bias(k, first[k]) - parity.without_key_bias(k, second[k]))
                .abs()
                .flatten()
                for k in second
            ]
        )
        / learning_rate
    )
    top = torch.topk(differences, 3).values.tolist()
    return {
        "weights_lr": top[0],
        "weights_lr_third": top[2],
        "weights_over_atol": int((differences > parity.WEIGHT_ATOL_IN_LR).sum()),
    }


def meaningful_stats(run: dict[str, Any], impl: str, case: dict[str, Any]) -> list[dict]:
    """Per step, each compared stat reduced to its meaningful values (the test's reduction)."""
    batch = case["ppo"]["batch_size"]
    steps = []
    for record, stats in zip(case["records"], (r["stats"] for r in run["records"]), strict=True):
        reduced = {}
        for key, value in stats.items():
            if key.startswith("time/") or (batch == 1 and key in parity.NAN_IN_TRL_AT_BATCH_1):
                continue
            if impl == "trl":
                reduced[key] = parity.trl_meaningful(key, value, record)
            else:
                reduced[key] = parity.rlfleet_meaningful(key, value, record)
        steps.append(reduced)
    return steps


def needed_rtol(got: list[dict], want: list[dict]) -> tuple[float, float]:
    """Per group (first step, later steps): the smallest ``rtol`` with which every stat passes
    ``np.allclose(got, want, rtol, atol)`` at the test's ``atol`` for that stat."""
    needs = [0.0, 0.0]
    for index, (mine, theirs) in enumerate(zip(got, want, strict=True)):
        for key, expected in theirs.items():
            atol = parity.stat_tolerance(key, index)["atol"]
            excess = np.abs(mine[key] - expected) - atol
            scale = np.maximum(np.abs(expected), np.finfo(np.float32).tiny)
            needs[min(index, 1)] = max(needs[min(index, 1)], float(np.max(excess / scale)))
    return needs[0], needs[1]


def compare(out: Path, name: str, a: tuple[str, str], b: tuple[str, str]) -> dict[str, float]:
    """Weights (in lr) and stats (needed rtol) of run ``a`` against run ``b``; a run is
    ``(impl, variant)``, ``("trl", "stored")`` being the reference data."""
    case = parity.load_case(name)

    def files(run: tuple[str, str]) -> tuple[Path, dict[str, Any]]:
        impl, variant = run
        folder = parity.REFERENCE / "cases" if variant == "stored" else out / impl / variant
        data = json.loads((folder / f"{name}.json").read_text())
        return folder / f"{name}.safetensors", meaningful_stats(data, impl, case)

    (weights_a, stats_a), (weights_b, stats_b) = files(a), files(b)
    first, later = needed_rtol(stats_a, stats_b)
    weights = weight_differences_in_lr(weights_a, weights_b, case["ppo"]["learning_rate"])
    return {**weights, "stats_rtol_first": first, "stats_rtol_later": later}


def worst(results: list[dict[str, float]]) -> dict[str, float]:
    return {key: max(r[key] for r in results) for key in results[0]}


def comparisons(out: Path, name: str) -> dict[str, dict[str, float]]:
    """The table's columns for one case."""
    pairs = list(itertools.combinations(VARIANTS, 2))
    stored = ("trl", "stored")
    return {
        "trl 1v2 threads": compare(out, name, ("trl", "threads_1"), ("trl", "threads_2")),
        "trl any 2 variants": worst([compare(out, name, ("trl", x), ("trl", y)) for x, y in pairs]),
        "trl here vs stored": worst([compare(out, name, ("trl", v), stored) for v in VARIANTS]),
        "rlfleet 1v2 threads": compare(
            out, name, ("rlfleet", "threads_1"), ("rlfleet", "threads_2")
        ),
        "rlfleet any 2 variants": worst(
            [compare(out, name, ("rlfleet", x), ("rlfleet", y)) for x, y in pairs]
        ),
        "rlfleet vs trl, same variant": worst(
            [compare(out, name, ("rlfleet", v), ("trl", v)) for v in VARIANTS]
        ),
        "rlfleet 1 thread vs stored": compare(out, name, ("rlfleet", "threads_1"), stored),
        "rlfleet 2 threads vs stored": compare(out, name, ("rlfleet", "threads_2"), stored),
        "rlfleet any variant vs stored": worst(
            [compare(out, name, ("rlfleet", v), stored) for v in VARIANTS]
        ),
    }


def print_table(table: dict[str, dict[str, dict[str, float]]]) -> None:
    for metric in next(iter(next(iter(table.values())).values())):
        columns = list(next(iter(table.values())))
        print(f"\n{metric}\n| case | " + " | ".join(columns) + " |")
        print("|---" * (len(columns) + 1) + "|")
        for name, row in table.items():
            print(f"| {name} | " + " | ".join(f"{row[c][metric]:.2g}" for c in columns) + " |")
        overall = [max(row[c][metric] for row in table.values()) for c in columns]
        print("| **max** | " + " | ".join(f"{value:.2g}" for value in overall) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="keep the runs here (default: a temporary dir)")
    parser.add_argument("--rlfleet-case", choices=parity.CASE_NAMES, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rlfleet_case:
        torch.set_num_threads(args.threads)
        run_rlfleet_case(args.rlfleet_case, args.out)
        return 0
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        run_all(out)
        table = {name: comparisons(out, name) for name in parity.CASE_NAMES}
        print_table(table)
        if args.out:
            (out / "variation.json").write_text(json.dumps(table, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

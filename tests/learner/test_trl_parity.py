"""rlfleet's ``PPOTrainer.step`` against TRL v0.11.4's, to float32 rounding.

The reference numbers are test data made by TRL itself (``trl_reference/make_reference.py``, run
with ``.venv-trl``; its docstring lists the TRL quirks met). For each case the same initial
policy, reference model, PPOConfig and inputs go through rlfleet; every stat TRL returned and the
updated weights (value head included) must agree.

How stats are compared:

- first ``step`` of a trainer: ``rtol=1e-5, atol=1e-6``. TRL itself moves by up to ~6e-6
  relative under a mathematically neutral change (another padding width, or one thread instead
  of two), and rlfleet pads differently (per minibatch, response positions only), which changes
  float32 summation order, not the math. ``objective/kl`` and ``objective/kl_dist`` get
  ``atol=1e-5``: each is a per-sample sum of up to a dozen differences of logprobs near -4.9,
  each rounded to ~3e-7, that cancel to values near 0;
- later steps: ``rtol=1e-3, atol=1e-5``. They start from weights that already differ by
  Adam-amplified rounding (see :func:`weight_mismatches`); TRL against itself with another
  padding width differs there by up to 1.3e-4 relative (``objective/kl`` at batch size 1);
- array stats whose layout is TRL's padding (``objective/logprobs``, ``objective/ref_logprobs``:
  ``[batch, padded_len - 1]``; ``ppo/policy/advantages``, ``ppo/policy/ratio``: every
  minibatch's ``[mini_batch, padded_len - 1]`` grid flattened) are compared on the response
  tokens, the only positions that carry meaning; TRL's other positions hold query and padding
  values. rlfleet returns ``[batch, max_response_len]`` and packed response tokens, in the same
  minibatch order;
- ``time/ppo/*``: only present and non-negative;
- the three std stats TRL reports as NaN at batch size 1 (``torch.std`` of one value) must be 0;
- updated weights: ``atol=0.02 * learning_rate``, attention key bias left out (see
  :func:`weight_mismatches` and :func:`without_key_bias`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, GPT2Config

from rlfleet import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

REFERENCE = Path(__file__).parent / "trl_reference"
CASE_NAMES = sorted(path.stem for path in (REFERENCE / "cases").glob("*.json"))
FIRST_STEP_TOLERANCE = {"rtol": 1e-5, "atol": 1e-6}
KL_SUM_STATS = ("objective/kl", "objective/kl_dist")
KL_SUM_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
LATER_STEP_TOLERANCE = {"rtol": 1e-3, "atol": 1e-5}
WEIGHT_RTOL, WEIGHT_ATOL_IN_LR = 1e-5, 2e-2
RESPONSE_GRID_STATS = ("objective/logprobs", "objective/ref_logprobs")
MINIBATCH_GRID_STATS = ("ppo/policy/advantages", "ppo/policy/ratio")
NAN_IN_TRL_AT_BATCH_1 = ("ppo/std_scores", "tokens/queries_len_std", "tokens/responses_len_std")


def load_case(name: str) -> dict[str, Any]:
    return json.loads((REFERENCE / "cases" / f"{name}.json").read_text())


def write_checkpoint(directory: Path, model_config: dict[str, Any], weights: str) -> Path:
    """A Hugging Face checkpoint (config + safetensors with ``v_head.*``) of the shared weights."""
    directory.mkdir(parents=True, exist_ok=True)
    GPT2Config(**model_config).save_pretrained(directory)
    state = load_file(REFERENCE / f"{weights}.safetensors")
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def load_model(directory: Path, value_head: dict[str, Any]) -> AutoModelForCausalLMWithValueHead:
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        directory, attn_implementation="eager", **value_head
    )
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return model


def response_rows(record: dict[str, Any]) -> list[range]:
    """Per sample, its response positions in TRL's shifted ``[batch, padded_len - 1]`` layout."""
    inputs = record["inputs"]
    return [
        range(len(q) - 1, len(q) - 1 + len(r))
        for q, r in zip(inputs["queries"], inputs["responses"], strict=True)
    ]


def trl_meaningful(key: str, value: Any, record: dict[str, Any], mini: int) -> np.ndarray:
    """TRL's stat with the padding-layout arrays reduced to their response tokens, in order."""
    array = np.asarray(value, dtype=np.float64)
    positions = response_rows(record)
    if key in RESPONSE_GRID_STATS:
        return np.concatenate([array[row, cols] for row, cols in enumerate(positions)])
    if key in MINIBATCH_GRID_STATS:
        order = [row for permutation in record["permutations"] for row in permutation]
        grid = array.reshape(len(order), -1)
        return np.concatenate([grid[k, positions[row]] for k, row in enumerate(order)])
    return array


def rlfleet_meaningful(key: str, value: Any, record: dict[str, Any]) -> np.ndarray:
    """rlfleet's stat with ``[batch, max_response_len]`` arrays reduced to response tokens."""
    array = np.asarray(value, dtype=np.float64)
    if key in RESPONSE_GRID_STATS:
        lengths = [len(r) for r in record["inputs"]["responses"]]
        assert array.shape == (len(lengths), max(lengths)), (key, array.shape)
        return np.concatenate([array[row, :n] for row, n in enumerate(lengths)])
    return array


def stat_tolerance(key: str, step_index: int) -> dict[str, float]:
    if step_index > 0:
        return LATER_STEP_TOLERANCE
    return KL_SUM_TOLERANCE if key in KL_SUM_STATS else FIRST_STEP_TOLERANCE


def stat_mismatches(
    stats: dict[str, Any], record: dict[str, Any], mini: int, batch_size: int, step_index: int
) -> list[str]:
    """Every stat that differs from TRL's beyond float32 rounding, described."""
    problems = []
    for key, expected in record["stats"].items():
        actual = stats[key]
        if key.startswith("time/"):
            if not (isinstance(actual, float) and actual >= 0):
                problems.append(f"{key}: {actual!r} is not a non-negative float")
            continue
        if batch_size == 1 and key in NAN_IN_TRL_AT_BATCH_1:
            assert math.isnan(expected), (key, expected)
            if actual != 0.0:
                problems.append(f"{key}: {actual!r} (TRL: NaN; rlfleet must give 0.0)")
            continue
        if isinstance(expected, float) and not isinstance(actual, float):
            problems.append(f"{key}: {type(actual).__name__}, TRL returns a Python float")
        want = trl_meaningful(key, expected, record, mini)
        got = rlfleet_meaningful(key, actual, record)
        if want.shape != got.shape:
            problems.append(f"{key}: shape {got.shape}, TRL {want.shape}")
        elif not np.allclose(got, want, **stat_tolerance(key, step_index)):
            diff = np.abs(got - want)
            worst = int(np.argmax(diff))
            problems.append(
                f"{key}: max |diff| {diff.max():.3g} at {worst}: rlfleet {got.flat[worst]!r}, "
                f"TRL {want.flat[worst]!r}"
            )
    return problems


def without_key_bias(key: str, tensor: torch.Tensor) -> torch.Tensor:
    """Drops the attention key bias (the middle third of GPT-2's ``c_attn.bias``): softmax is
    invariant to it, so its exact gradient is 0 and Adam turns the rounding noise left in its
    place into arbitrary updates of up to ``lr`` in TRL and rlfleet alike."""
    if not key.endswith("attn.c_attn.bias"):
        return tensor
    third = tensor.shape[0] // 3
    return torch.cat([tensor[:third], tensor[2 * third :]])


def weight_mismatches(
    model: AutoModelForCausalLMWithValueHead, name: str, learning_rate: float
) -> list[str]:
    """Updated weights against TRL's. Adam's update ``lr * m / (sqrt(v) + eps)`` is about ``lr``
    whatever the gradient's scale, so where a gradient element is near ``eps`` or cancels,
    float32 rounding moves the update by a fraction of ``lr``: TRL against itself with another
    padding width differs by up to 0.0066 lr. The tolerance is 0.02 lr, far below the ~2 lr
    that a wrong gradient sign makes."""
    expected = load_file(REFERENCE / "cases" / f"{name}.safetensors")
    initial = load_file(REFERENCE / "initial.safetensors")
    actual = model.state_dict()
    atol = WEIGHT_ATOL_IN_LR * learning_rate
    problems = []
    for key, want in expected.items():
        got = without_key_bias(key, actual[key].detach())
        want = without_key_bias(key, want)
        if not torch.allclose(got, want, rtol=WEIGHT_RTOL, atol=atol):
            diff = (got - want).abs().max().item()
            update = (want - without_key_bias(key, initial[key])).abs().max().item()
            problems.append(
                f"{key}: max |diff| {diff:.3g} = {diff / learning_rate:.3g} lr "
                f"(TRL's update: {update:.3g})"
            )
    return problems


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(REFERENCE / "tokenizer")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory):
    """``(model variant, weights) -> checkpoint dir``, written on first use."""
    root = tmp_path_factory.mktemp("trl-parity")
    made: dict[tuple[str, str], Path] = {}

    def get(case: dict[str, Any], weights: str) -> Path:
        key = (case["model_variant"], weights)
        if key not in made:
            made[key] = write_checkpoint(root / "-".join(key), case["model_config"], weights)
        return made[key]

    return get


def test_reference_data_is_small_and_versioned():
    versions = json.loads((REFERENCE / "versions.json").read_text())
    assert (versions["trl"], versions["transformers"]) == ("0.11.4", "4.45.2")
    total = sum(p.stat().st_size for p in REFERENCE.rglob("*") if p.is_file())
    assert total < 5 * 2**20
    assert len(CASE_NAMES) >= 16


def test_tokenizer_matches_reference(tokenizer):
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == 127
    assert tokenizer.padding_side == "right"


@pytest.mark.parametrize("name", CASE_NAMES)
def test_step_matches_trl(name: str, tokenizer, checkpoints):
    case = load_case(name)
    model = load_model(checkpoints(case, "initial"), case["value_head"])
    ref_model = load_model(checkpoints(case, case["reference"]), case["value_head"])
    config = PPOConfig(**case["ppo"])
    trainer = PPOTrainer(config, model, ref_model, tokenizer)
    problems = []
    for index, record in enumerate(case["records"]):
        inputs = record["inputs"]
        stats = trainer.step(
            [torch.tensor(q) for q in inputs["queries"]],
            [torch.tensor(r) for r in inputs["responses"]],
            [torch.tensor(s, dtype=torch.float32) for s in inputs["scores"]],
        )
        if set(stats) != set(record["stats"]):
            problems.append(
                f"step {index}: keys only in rlfleet {sorted(set(stats) - set(record['stats']))}"
                f", only in TRL {sorted(set(record['stats']) - set(stats))}"
            )
            continue
        problems += [
            f"step {index}: {p}"
            for p in stat_mismatches(
                stats, record, config.mini_batch_size, config.batch_size, index
            )
        ]
    problems += [f"weights: {p}" for p in weight_mismatches(model, name, config.learning_rate)]
    assert not problems, f"{name}:\n" + "\n".join(problems)

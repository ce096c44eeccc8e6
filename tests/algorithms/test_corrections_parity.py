"""The off-policy corrections (algorithms/corrections.py) against veRL 0.9.1's own numbers.

``tests/algorithms/corrections_reference/cases/`` holds what veRL's
``rollout_corr_helper.compute_rollout_correction_and_rejection_mask`` returned for each mode, its
arguments and the rlfleet mode that is the same correction (``make_verl_reference.py`` lists
them): the IS weights, the response mask after rejection, and its metrics, the off-policy ones
(``k3_kl`` ...) included. The inputs hold a log ratio of -10 on the padding, which neither side
may read.

Tolerance ``atol=1e-6, rtol=1e-5`` as the other parity tests (float32 rounding of one formula in
two implementations); veRL's results on 1 and 2 torch threads are identical
(``thread_variation`` 0 in every JSON).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlfleet.algorithms.corrections import ROLLOUT_CORRECTIONS, mismatch_metrics

CASES = Path(__file__).resolve().parent / "corrections_reference" / "cases"
TOLERANCE = {"atol": 1e-6, "rtol": 1e-5}
VERL_NAMES = {
    "is_weight_mean": "rollout_is_mean",
    "ratio_fraction_high": "rollout_is_ratio_fraction_high",
    "ratio_fraction_low": "rollout_is_ratio_fraction_low",
    "seq_masked_fraction": "rollout_rs_seq_masked_fraction",
}
"""Our metric -> veRL's (less ``rollout_corr/``); ``masked_fraction`` is veRL's
``rollout_is_oob_ratio`` for IcePop (zeroed weights), ``rollout_rs_masked_fraction`` for
rejection."""


def case_names() -> list[str]:
    return sorted(path.stem for path in CASES.glob("*.json"))


def load(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    document = json.loads((CASES / f"{name}.json").read_text())
    tensors = {key: torch.tensor(value) for key, value in document["inputs"].items()}
    return document, tensors


def corrected(document: dict, tensors: dict[str, torch.Tensor]):
    function = ROLLOUT_CORRECTIONS[document["case"]["mode"]]
    return function(
        tensors["old_log_prob"],
        tensors["rollout_log_prob"],
        tensors["response_mask"],
        **document["case"]["params"],
    )


def verl_name(name: str, mode: str) -> str:
    if name == "masked_fraction":
        return "rollout_is_oob_ratio" if mode == "icepop" else "rollout_rs_masked_fraction"
    return VERL_NAMES[name]


def test_every_mode_has_stored_cases() -> None:
    modes = {json.loads((CASES / f"{n}.json").read_text())["case"]["mode"] for n in case_names()}
    assert modes == set(ROLLOUT_CORRECTIONS) - {"none"}


@pytest.mark.parametrize("name", case_names())
def test_weights_equal_verls_on_the_sampled_tokens(name: str) -> None:
    document, tensors = load(name)
    mask = tensors["response_mask"]
    weights = corrected(document, tensors).weights
    expected = document["expected"]["weights"]
    if expected is None:
        assert weights is None
        return
    torch.testing.assert_close(weights * mask, torch.tensor(expected), **TOLERANCE)


@pytest.mark.parametrize("name", case_names())
def test_the_kept_tokens_equal_verls_response_mask_after_rejection(name: str) -> None:
    document, tensors = load(name)
    mask = tensors["response_mask"]
    keep = corrected(document, tensors).keep_mask
    kept = mask if keep is None else mask * keep
    assert torch.equal(kept, torch.tensor(document["expected"]["modified_response_mask"]))


@pytest.mark.parametrize("name", case_names())
def test_the_correction_metrics_equal_verls(name: str) -> None:
    document, tensors = load(name)
    mode = document["case"]["mode"]
    metrics = corrected(document, tensors).metrics
    expected = document["expected"]["metrics"]
    if mode in ("token_tis", "seq_tis"):
        assert metrics["masked_fraction"] == 0.0
        del metrics["masked_fraction"]
    assert metrics, "no metric compared"
    for name_, value in metrics.items():
        reference = expected[f"rollout_corr/{verl_name(name_, mode)}"]
        torch.testing.assert_close(value.double(), torch.tensor(reference).double(), **TOLERANCE)


@pytest.mark.parametrize("name", case_names())
def test_the_mismatch_metrics_equal_verls_offpolicy_metrics(name: str) -> None:
    """``k3_kl``, ``kl``, the perplexities and chi-squared divergences, all of veRL's."""
    document, tensors = load(name)
    metrics = mismatch_metrics(
        tensors["old_log_prob"], tensors["rollout_log_prob"], tensors["response_mask"]
    )
    expected = document["expected"]["metrics"]
    offpolicy = {
        key.removeprefix("rollout_corr/"): value
        for key, value in expected.items()
        if not key.startswith(("rollout_corr/rollout_is", "rollout_corr/rollout_rs"))
    }
    assert set(metrics) == set(offpolicy)
    for key, value in metrics.items():
        torch.testing.assert_close(
            value.double(), torch.tensor(offpolicy[key]).double(), **TOLERANCE
        )


def test_the_tolerance_tells_a_sequence_from_a_token_correction_apart() -> None:
    """Sequence-level TIS on the token-level case's inputs is far outside the tolerance."""
    document, tensors = load("token_tis_cap2")
    weights = ROLLOUT_CORRECTIONS["seq_tis"](
        tensors["old_log_prob"], tensors["rollout_log_prob"], tensors["response_mask"], cap=2.0
    ).weights
    expected = torch.tensor(document["expected"]["weights"])
    assert not torch.allclose(weights * tensors["response_mask"], expected, **TOLERANCE)

"""Builds the TRL v0.11.4 reference data for tests/trainers/test_trl_parity.py.

Run with the TRL virtualenv (``bash bench/setup_trl_venv.sh`` creates it)::

    .venv-trl/bin/python tests/trainers/trl_reference/make_reference.py

It builds a tiny GPT-2 (vocab 128, 2 layers, width 32, every dropout 0, eager attention) from a
fixed seed and a word-level tokenizer offline, then runs TRL's real ``PPOTrainer.step`` once per
case, each case in a fresh subprocess (accelerate keeps process-wide singletons, and a TRL user
runs one trainer per process). What it writes next to this file, all small:

- ``model_config.json``: the GPT-2 config kwargs; ``tokenizer/``: the tokenizer (save_pretrained);
- ``initial.safetensors`` / ``reference.safetensors``: the initial policy and the reference
  model (another seed), Hugging Face names plus ``v_head.summary.*`` (``lm_head.weight`` is tied
  to ``transformer.wte.weight`` and left out);
- ``cases/NAME.json``: the PPOConfig kwargs, the value-head kwargs, the model variant, and per
  ``step()`` call its inputs (query/response ids, scores) and every stat TRL returned;
- ``cases/NAME.safetensors``: the policy (with value head) after the case's last step;
- ``versions.json``: the exact versions and machine that produced the data.

The script is a plain TRL user: inputs come from private ``numpy.random.default_rng`` generators,
so between ``PPOTrainer(...)`` (which calls ``set_seed(config.seed)``) and ``step()`` nothing
touches numpy's global RNG, which TRL's minibatch shuffle (``np.random.permutation(bs)`` per
epoch) consumes. Hence ``np.random.RandomState(config.seed)`` replays TRL's permutations; the
script checks that.

TRL v0.11.4 quirks met here (what rlfleet must not copy, or where the data steers around them):

- ``max_grad_norm`` clips only the first optimizer step of a trainer's life:
  ``PPOTrainer.model_params`` is a one-shot ``filter`` object that the first ``clip_grad_norm_``
  call exhausts; later calls clip an empty parameter list. The case ``max_grad_norm_one_step``
  has a single optimizer step (untouched TRL); ``max_grad_norm`` replaces ``model_params`` by a
  list right after construction, so every step clips, as the option documents.
- Batch size 1: ``ppo/std_scores``, ``tokens/queries_len_std`` and ``tokens/responses_len_std``
  are NaN (``torch.std`` of one value), and length-1 array stats come back as floats
  (``convert_to_scalar``). A one-token response at mini-batch 1 makes ``masked_var``'s Bessel
  factor 1/0: NaN advantages, then NaN weights; the ``batch_size_1`` case uses responses of 2+
  tokens, so TRL stays finite apart from those three stats.
- ``whiten_rewards`` leaks padding into the advantages: ``masked_whiten(rewards, mask,
  shift_mean=False)`` leaves ``mean * (1 - 1/std)`` on every masked-out position, and GAE
  carries the trailing padding's share back onto each response's last token, so the result
  depends on the batch's padded width (TRL's own ``ppo/returns/mean`` moves from -0.043 to
  -0.130 on this case's batch with ``pad_to_multiple_of=32``). The case ``whiten_rewards``
  patches the whitened rewards to 0 outside the mask, which makes TRL padding-independent.
- ``use_score_scaling`` crashes (``RunningMoments.std`` is a float, TRL calls ``.to`` on it): no
  case covers score scaling or normalisation.
- A ``ratio_threshold`` skip multiplies the loss by 0 but still calls ``optimizer.step()``: Adam
  keeps moving the weights with its momentum (``ratio_threshold`` case).
- ``early_stopping`` zeroes the gradients only after the epoch's steps; it only stops the next
  epochs (``early_stopping`` case). The decision compares the epoch's last mini-batch
  ``policykl`` with ``1.5 * target_kl``.
- All padding is to the longest sequence of the whole batch (right side, pad id = EOS id), and
  array stats (``objective/logprobs``, ``ppo/policy/advantages``, ``ppo/policy/ratio``...) carry
  values at query and padding positions; only the response positions are meaningful.
- Forward passes run in eval mode (``batched_forward_pass`` calls ``model.eval()``), so dropout
  never acts during ``step``; the case ``default_dropouts`` (GPT-2's 0.1 dropouts and the value
  head's default 0.1) pins that.

Threshold decisions (early stopping, ratio threshold) are checked for a safe margin, so float32
rounding differences cannot flip them in the parity test.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
CASES_DIR = HERE / "cases"
VOCAB_SIZE = 128
EOS_TOKEN = "<|endoftext|>"
MODEL_SEED = 1234
MODEL_CONFIG = {
    "vocab_size": VOCAB_SIZE,
    "n_positions": 48,
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 2,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
    "summary_first_dropout": 0.0,
    "bos_token_id": VOCAB_SIZE - 1,
    "eos_token_id": VOCAB_SIZE - 1,
}
DEFAULT_DROPOUTS = {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}
DECISION_MARGIN = 1e-3
"""Smallest relative distance allowed between a threshold and the value it is compared with."""


@dataclass
class Case:
    """One reference run: a fresh TRL trainer, ``len(batches)`` calls of ``step``."""

    ppo: dict[str, Any]
    steps: int = 1
    query_lengths: tuple[int, int] = (2, 10)
    response_lengths: tuple[int, int] = (2, 12)
    score_scale: float = 2.0
    input_seed: int = 0
    value_head: dict[str, Any] = field(default_factory=lambda: {"summary_dropout_prob": 0.0})
    model_variant: str = "zero_dropouts"
    reference: str = "reference"
    """Weights of the frozen reference model: ``reference`` (another seed, so KL is non-zero from
    the first step) or ``initial`` (the policy's own start, as TRL's quickstart does)."""
    clip_every_step: bool = False
    zero_whitened_rewards_outside_mask: bool = False


BASE = {"batch_size": 8, "mini_batch_size": 2, "ppo_epochs": 2, "learning_rate": 3e-3}

CASES: dict[str, Case] = {
    "kl_penalty_kl": Case({**BASE}, input_seed=1),
    "kl_penalty_abs": Case({**BASE, "kl_penalty": "abs", "seed": 3}, input_seed=2),
    "kl_penalty_mse": Case({**BASE, "kl_penalty": "mse", "seed": 4}, input_seed=3),
    "kl_penalty_full": Case({**BASE, "kl_penalty": "full", "seed": 5}, input_seed=4),
    "whiten_rewards": Case(
        {**BASE, "whiten_rewards": True, "seed": 6},
        input_seed=5,
        zero_whitened_rewards_outside_mask=True,
    ),
    "score_clip": Case({**BASE, "score_clip": 0.5, "seed": 7}, input_seed=6, score_scale=3.0),
    "max_grad_norm_one_step": Case(
        {
            "batch_size": 4,
            "mini_batch_size": 4,
            "ppo_epochs": 1,
            "learning_rate": 3e-3,
            "max_grad_norm": 0.05,
            "seed": 8,
        },
        input_seed=7,
    ),
    "max_grad_norm": Case(
        {**BASE, "max_grad_norm": 0.05, "seed": 9}, input_seed=8, clip_every_step=True
    ),
    "gradient_accumulation": Case(
        {**BASE, "gradient_accumulation_steps": 2, "seed": 10}, input_seed=9
    ),
    "early_stopping": Case(
        {
            **BASE,
            "ppo_epochs": 3,
            "early_stopping": True,
            "target_kl": 1e-4,
            "learning_rate": 1e-2,
            "seed": 11,
        },
        input_seed=10,
    ),
    "ratio_threshold": Case(
        {**BASE, "ppo_epochs": 3, "ratio_threshold": 1.04, "learning_rate": 3e-2, "seed": 12},
        input_seed=11,
    ),
    "fixed_kl_two_steps": Case(
        {**BASE, "adap_kl_ctrl": False, "init_kl_coef": 0.3, "seed": 13},
        steps=2,
        input_seed=12,
        reference="initial",
    ),
    "adaptive_kl_two_steps": Case(
        {**BASE, "init_kl_coef": 0.3, "target": 0.05, "horizon": 100, "seed": 14},
        steps=2,
        input_seed=13,
    ),
    "batch_4_nondefault_gae": Case(
        {
            "batch_size": 4,
            "mini_batch_size": 2,
            "ppo_epochs": 2,
            "learning_rate": 1e-2,
            "gamma": 0.9,
            "lam": 0.8,
            "cliprange": 0.1,
            "cliprange_value": 0.05,
            "vf_coef": 0.5,
            "seed": 15,
        },
        input_seed=14,
    ),
    "batch_size_1": Case(
        {"batch_size": 1, "mini_batch_size": 1, "ppo_epochs": 2, "learning_rate": 3e-3, "seed": 16},
        steps=2,
        input_seed=15,
        response_lengths=(2, 12),
    ),
    "default_dropouts": Case(
        {**BASE, "seed": 17}, input_seed=16, value_head={}, model_variant="default_dropouts"
    ),
}


def model_config_kwargs(variant: str) -> dict[str, Any]:
    if variant == "zero_dropouts":
        return dict(MODEL_CONFIG)
    if variant == "default_dropouts":
        return {**MODEL_CONFIG, **DEFAULT_DROPOUTS}
    raise ValueError(f"unknown model variant {variant!r}")


def build_tokenizer():
    """A word-level tokenizer over ``t0 .. t126`` plus EOS (id 127), padding on the right."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB_SIZE - 1)} | {EOS_TOKEN: VOCAB_SIZE - 1}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOS_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        padding_side="right",
        model_max_length=MODEL_CONFIG["n_positions"],
    )
    return tokenizer


def build_model(weights: str, config_kwargs: dict[str, Any], value_head: dict[str, Any]):
    """A TRL value-head model from ``WEIGHTS.safetensors`` (``initial`` or ``reference``)."""
    from safetensors.torch import load_file
    from transformers import GPT2Config, GPT2LMHeadModel
    from trl import AutoModelForCausalLMWithValueHead

    config = GPT2Config(**config_kwargs)
    config._attn_implementation = "eager"
    pretrained = GPT2LMHeadModel(config)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(pretrained, **value_head)
    missing = load_policy_state(model, load_file(HERE / f"{weights}.safetensors"))
    assert missing == {"pretrained_model.lm_head.weight"}, missing
    assert model.pretrained_model.config._attn_implementation == "eager"
    return model


def load_policy_state(model, state: dict[str, torch.Tensor]) -> set[str]:
    """Loads HF-named weights into a TRL wrapper; returns the wrapper's keys left unloaded."""
    renamed = {
        (k if k.startswith("v_head.") else f"pretrained_model.{k}"): v for k, v in state.items()
    }
    result = model.load_state_dict(renamed, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    return set(result.missing_keys)


def policy_state(model) -> dict[str, torch.Tensor]:
    """The wrapper's weights with HF names, ``lm_head`` (tied) left out, contiguous copies."""
    state = {}
    for key, value in model.state_dict().items():
        name = key.removeprefix("pretrained_model.")
        if name == "lm_head.weight" or name.endswith(".attn.bias") or "masked_bias" in name:
            continue
        state[name] = value.detach().clone().contiguous()
    return state


def write_shared_files() -> None:
    """Initial policy and reference weights (seeded GPT-2s with TRL's default value-head init),
    the model config and the tokenizer."""
    from safetensors.torch import save_file
    from transformers import GPT2Config, GPT2LMHeadModel
    from trl import AutoModelForCausalLMWithValueHead

    for weights, seed in (("initial", MODEL_SEED), ("reference", MODEL_SEED + 1)):
        torch.manual_seed(seed)
        model = AutoModelForCausalLMWithValueHead.from_pretrained(
            GPT2LMHeadModel(GPT2Config(**MODEL_CONFIG)), summary_dropout_prob=0.0
        )
        save_file(policy_state(model), HERE / f"{weights}.safetensors", metadata={"format": "pt"})
    (HERE / "model_config.json").write_text(json.dumps(MODEL_CONFIG, indent=1) + "\n")
    build_tokenizer().save_pretrained(HERE / "tokenizer")


def make_inputs(case: Case, step_index: int, eos_id: int) -> dict[str, list]:
    """Ragged random queries/responses (about a third of responses end with EOS, as generate's
    do) and scores, from a private generator: numpy's global RNG stays TRL's alone."""
    rng = np.random.default_rng([case.input_seed, step_index])
    batch_size = case.ppo["batch_size"]
    queries, responses = [], []
    for _ in range(batch_size):
        query_len = int(rng.integers(case.query_lengths[0], case.query_lengths[1] + 1))
        response_len = int(rng.integers(case.response_lengths[0], case.response_lengths[1] + 1))
        queries.append(rng.integers(0, eos_id, size=query_len).tolist())
        response = rng.integers(0, eos_id, size=response_len).tolist()
        if rng.random() < 1 / 3:
            response[-1] = eos_id
        responses.append(response)
    scores = (rng.standard_normal(batch_size) * case.score_scale).astype(np.float32).tolist()
    return {"queries": queries, "responses": responses, "scores": scores}


def jsonable(value: Any) -> Any:
    """A stat as JSON: floats stay floats (NaN included), arrays become nested lists."""
    if isinstance(value, np.ndarray):
        return value.astype(np.float64).tolist()
    if isinstance(value, torch.Tensor):
        return value.double().tolist()
    if isinstance(value, (np.floating, np.integer)):
        return float(value)
    return value


def replayed_permutations(seed: int, batch_size: int, epochs: int) -> list[list[int]]:
    """The minibatch orders TRL drew: ``np.random.permutation`` after ``set_seed(seed)``."""
    rng = np.random.RandomState(seed)
    return [rng.permutation(batch_size).tolist() for _ in range(epochs)]


def response_positions(queries: list[list[int]], responses: list[list[int]]) -> list[range]:
    """Per sample, the positions of its response tokens in TRL's shifted ``[bs, L-1]`` layout."""
    return [range(len(q) - 1, len(q) - 1 + len(r)) for q, r in zip(queries, responses, strict=True)]


def padded_width(inputs: dict[str, list]) -> int:
    """Width of TRL's shifted arrays: the longest query + response of the batch, minus one."""
    pairs = zip(inputs["queries"], inputs["responses"], strict=True)
    return max(len(q) + len(r) for q, r in pairs) - 1


def minibatch_masked_means(
    flat: np.ndarray, inputs: dict[str, list], permutations: list[list[int]], mini_batch_size: int
) -> list[float]:
    """Masked mean over response tokens of each minibatch's slice of a flattened array stat."""
    positions = response_positions(inputs["queries"], inputs["responses"])
    width = padded_width(inputs)
    rows = [i for perm in permutations for i in perm]
    grid = np.asarray(flat).reshape(len(rows), width)
    means = []
    for start in range(0, len(rows), mini_batch_size):
        values = [
            grid[k, p] for k in range(start, start + mini_batch_size) for p in positions[rows[k]]
        ]
        means.append(float(np.mean(np.asarray(values, dtype=np.float64))))
    return means


def epochs_run(stats: dict[str, Any], inputs: dict[str, list], mini_batch_size: int) -> int:
    """How many PPO epochs TRL ran, from the size of its flattened per-minibatch ratio stat."""
    batch_size = len(inputs["queries"])
    width = padded_width(inputs)
    ratio = np.atleast_1d(np.asarray(stats["ppo/policy/ratio"]))
    minibatches, remainder = divmod(ratio.size, mini_batch_size * width)
    assert remainder == 0 and minibatches % (batch_size // mini_batch_size) == 0
    return minibatches // (batch_size // mini_batch_size)


def annotate_minibatches(case: Case, records: list[dict[str, Any]]) -> None:
    """Adds to each record TRL's minibatch orders and, per minibatch, the masked means of the
    ratio and of the policy KL (``mean(-log ratio)``) that its threshold decisions used."""
    ppo = case.ppo
    mini = ppo["mini_batch_size"]
    consumed = 0
    for record in records:
        inputs, stats = record["inputs"], record["stats"]
        epochs = epochs_run(stats, inputs, mini)
        perms = replayed_permutations(ppo.get("seed", 0), ppo["batch_size"], consumed + epochs)
        record["permutations"] = perms[consumed:]
        consumed += epochs
        ratio = np.atleast_1d(np.asarray(stats["ppo/policy/ratio"], dtype=np.float64))
        record["minibatch_mean_ratio"] = minibatch_masked_means(
            ratio, inputs, record["permutations"], mini
        )
        record["minibatch_policykl"] = minibatch_masked_means(
            -np.log(ratio), inputs, record["permutations"], mini
        )


def decision_is_safe(value: float, threshold: float) -> bool:
    """True when float32 rounding cannot move ``value`` across ``threshold``."""
    return abs(value - threshold) > max(DECISION_MARGIN * abs(threshold), 1e-5)


def check_decision_margins(case: Case, records: list[dict[str, Any]]) -> None:
    """Fails when a threshold decision is too close to flipping, or a decision case never
    exercises its decision."""
    ppo = case.ppo
    for record in records:
        if "ratio_threshold" in ppo:
            threshold, ratios = ppo["ratio_threshold"], record["minibatch_mean_ratio"]
            assert all(decision_is_safe(r, threshold) for r in ratios), ratios
            assert any(r > threshold for r in ratios) and any(r < threshold for r in ratios)
        if ppo.get("early_stopping"):
            per_epoch = ppo["batch_size"] // ppo["mini_batch_size"]
            epoch_end_kl = record["minibatch_policykl"][per_epoch - 1 :: per_epoch]
            threshold = 1.5 * ppo["target_kl"]
            assert all(decision_is_safe(kl, threshold) for kl in epoch_end_kl), epoch_end_kl
            assert all(kl <= threshold for kl in epoch_end_kl[:-1]), epoch_end_kl
            assert epoch_end_kl[-1] > threshold, "early stopping never triggered"
            assert len(epoch_end_kl) < ppo["ppo_epochs"]


def run_case(name: str, out_dir: Path = CASES_DIR) -> None:
    """Runs one case with TRL and writes its JSON and updated weights into ``out_dir``."""
    from safetensors.torch import save_file
    from trl import PPOConfig, PPOTrainer

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    case = CASES[name]
    config_kwargs = model_config_kwargs(case.model_variant)
    tokenizer = build_tokenizer()
    model = build_model("initial", config_kwargs, case.value_head)
    ref_model = build_model(case.reference, config_kwargs, case.value_head)
    all_inputs = [make_inputs(case, i, tokenizer.eos_token_id) for i in range(case.steps)]

    trainer = PPOTrainer(PPOConfig(**case.ppo), model, ref_model, tokenizer)
    assert_global_rng_is_seeded(case.ppo.get("seed", 0))
    if case.clip_every_step:
        trainer.model_params = [p for p in trainer.model.parameters() if p.requires_grad]
    if case.zero_whitened_rewards_outside_mask:
        zero_whitened_rewards_outside_mask()
    records = []
    for inputs in all_inputs:
        stats = trainer.step(
            [torch.tensor(q) for q in inputs["queries"]],
            [torch.tensor(r) for r in inputs["responses"]],
            [torch.tensor(s, dtype=torch.float32) for s in inputs["scores"]],
        )
        records.append({"inputs": inputs, "stats": {k: jsonable(v) for k, v in stats.items()}})
    annotate_minibatches(case, records)
    check_decision_margins(case, records)

    out_dir.mkdir(parents=True, exist_ok=True)
    document = {
        "name": name,
        **asdict(case),
        "model_config": config_kwargs,
        "records": records,
    }
    (out_dir / f"{name}.json").write_text(json.dumps(document) + "\n")
    save_file(policy_state(model), out_dir / f"{name}.safetensors", metadata={"format": "pt"})


def zero_whitened_rewards_outside_mask() -> None:
    """Patches TRL's reward whitening (its only ``masked_whiten(..., shift_mean=False)`` call)
    to leave 0 outside the response mask, as the rewards were before whitening."""
    import trl.trainer.ppo_trainer as ppo_trainer

    masked_whiten = ppo_trainer.masked_whiten

    def whiten_within_mask(values, mask, shift_mean=True):
        whitened = masked_whiten(values, mask, shift_mean=shift_mean)
        return whitened if shift_mean else whitened * mask

    ppo_trainer.masked_whiten = whiten_within_mask


def assert_global_rng_is_seeded(seed: int) -> None:
    """Nothing between ``set_seed`` in ``PPOTrainer.__init__`` and here drew from numpy."""
    fresh = np.random.RandomState(seed).get_state()
    now = np.random.get_state()
    assert now[2] == fresh[2] and np.array_equal(now[1], fresh[1]), "numpy RNG was consumed"


def write_versions() -> None:
    import accelerate
    import tokenizers
    import transformers
    import trl

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "accelerate": accelerate.__version__,
        "tokenizers": tokenizers.__version__,
        "numpy": np.__version__,
        "machine": platform.machine(),
        "torch_num_threads": torch.get_num_threads(),
    }
    (HERE / "versions.json").write_text(json.dumps(versions, indent=1) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=sorted(CASES), help="run one case in this process")
    parser.add_argument(
        "--out", type=Path, default=CASES_DIR, help="where --case writes (measure_variation.py)"
    )
    parser.add_argument("--threads", type=int, help="torch.set_num_threads for --case")
    args = parser.parse_args()
    if args.case:
        if args.threads:
            torch.set_num_threads(args.threads)
        run_case(args.case, args.out)
        return 0
    write_shared_files()
    write_versions()
    for name in CASES:
        print(f"case {name}", flush=True)
        subprocess.run([sys.executable, __file__, "--case", name], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

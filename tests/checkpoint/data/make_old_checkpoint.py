"""Writes ``old-main/``: checkpoints saved by the rlfleet of commit 3acc500 (the layout before
checkpoint/ and trainers/ existed), for tests/checkpoint/test_old_checkpoint.py to load with the
code of today. Nothing is downloaded: the tiny model is built offline and the hub is off.

It was run from the repository root, with the old tree as the package ``rlfleet`` and the
project's own virtual environment::

    rm -rf /tmp/old-rlfleet /tmp/old-rlfleet-path && mkdir -p /tmp/old-rlfleet /tmp/old-rlfleet-path
    git archive 3acc500 | tar -x -C /tmp/old-rlfleet
    ln -s /tmp/old-rlfleet /tmp/old-rlfleet-path/rlfleet
    HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONPATH=/tmp/old-rlfleet-path \\
        unshare -rn .venv/bin/python tests/checkpoint/data/make_old_checkpoint.py

(``unshare -rn``: no network at all.) It refuses to run unless ``rlfleet`` resolves to a tree
with ``learner/checkpoint.py``. In ``old-main/``:

- ``model/``: the config files of the tiny GPT-2 the jobs started from (n_embd 32, 2 layers, a
  257-token byte-level vocabulary), without its weights: a test makes fresh ones of that shape;
- ``ppo/``: a PPOTrainer (Adam and a StepLR schedule) after two steps, checkpoint step 2;
- ``grpo/``: a CriticFreeTrainer (GRPO, no value head) after one step, checkpoint step 1;
- ``ppo-lora/``: a PPOTrainer training LoRA adapters and its value head after one step, step 1;
- ``expected.json``: for each, the job state and identity it was saved with and
  :func:`trainer_digest` of the trainer right after the save.

Format 2 (``rlfleet-checkpoint/2``), one rank, each with a :class:`CheckpointIdentity`.
:func:`build_trainer`, :func:`rollouts` and :func:`trainer_digest` use only names that the old
and the new rlfleet both have, so the test builds its trainers and digests them with these.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "old-main"
MODEL_FILES = ("config.json", "generation_config.json")
BATCH = 4
GROUP_IDS = [0, 0, 1, 1]
KINDS = {"ppo": 2, "grpo": 1, "ppo-lora": 1}
"""Each checkpoint of ``old-main/`` and the steps its trainer took before the save."""


def build_trainer(
    kind: str, model_dir: Path, add_adapters: Callable[..., Any], tokenizer: Any = None
) -> Any:
    """The trainer of ``kind`` on the model in ``model_dir``, as the old job built it; the
    caller passes its rlfleet's ``add_adapters`` (learner/lora.py then, trainers/lora.py now)."""
    from transformers import AutoModelForCausalLM

    from rlfleet import AutoModelForCausalLMWithValueHead, CriticFreeTrainer, PPOTrainer
    from rlfleet.common.config import CriticFreeConfig, LoraConfig, PPOConfig

    torch.manual_seed(0)
    if kind == "grpo":
        config = CriticFreeConfig(batch_size=BATCH, mini_batch_size=2, num_iterations=1, beta=0.04)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        return CriticFreeTrainer(config=config, model=model, tokenizer=tokenizer)
    ppo = PPOConfig(batch_size=BATCH, mini_batch_size=2, ppo_epochs=1, learning_rate=1e-3, seed=0)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
    if kind == "ppo-lora":
        add_adapters(model.pretrained_model, LoraConfig(r=2, alpha=4.0, target_modules=["c_attn"]))
        return PPOTrainer(config=ppo, model=model, tokenizer=tokenizer)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    return PPOTrainer(
        config=ppo, model=model, tokenizer=tokenizer, optimizer=optimizer, lr_scheduler=scheduler
    )


def rollouts(seed: int, vocab_size: int) -> tuple[list[torch.Tensor], ...]:
    """A batch of queries, responses and scores (token ids below ``vocab_size``)."""
    generator = torch.Generator().manual_seed(seed)
    queries = [torch.randint(1, vocab_size, (5,), generator=generator) for _ in range(BATCH)]
    responses = [torch.randint(1, vocab_size, (2 + i,), generator=generator) for i in range(BATCH)]
    scores = [torch.randn((), generator=generator) for _ in range(BATCH)]
    return queries, responses, scores


def digest(value: Any) -> Any:
    """``value`` as JSON: tensors and arrays as their dtype, shape and the sha256 of their
    bytes, dicts (keys as strings), lists and tuples element by element, numbers as they are."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        raw = tensor.reshape(-1).view(torch.uint8).numpy().tobytes()
        return {
            "dtype": str(tensor.dtype),
            "shape": list(tensor.shape),
            "sha256": hashlib.sha256(raw).hexdigest(),
        }
    if isinstance(value, np.ndarray):
        raw = np.ascontiguousarray(value).tobytes()
        return {
            "dtype": str(value.dtype),
            "shape": list(value.shape),
            "sha256": hashlib.sha256(raw).hexdigest(),
        }
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(key): digest(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [digest(item) for item in value]
    return value


def trainer_digest(trainer: Any) -> dict[str, Any]:
    """What a resume must restore, as :func:`digest`: the model's trained tensors (with LoRA,
    only the trainable ones: the base weights are the model directory's), the optimizer's
    state and param groups keyed by parameter name, the scheduler's state and the trainer's
    ``training_state()``."""
    model = trainer.model
    lora = any("lora_" in name for name, _ in model.named_parameters())
    tensors = {
        name: tensor
        for name, tensor in model.state_dict(keep_vars=True).items()
        if not lora or tensor.requires_grad
    }
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    order = [names[id(p)] for group in trainer.optimizer.param_groups for p in group["params"]]
    saved = trainer.optimizer.state_dict()
    optimizer = {
        "state": {order[index]: slots for index, slots in saved["state"].items()},
        "param_groups": [
            {**group, "params": [order[index] for index in group["params"]]}
            for group in saved["param_groups"]
        ],
    }
    scheduler = trainer.lr_scheduler.state_dict() if trainer.lr_scheduler is not None else None
    return digest(
        {
            "model": tensors,
            "optimizer": optimizer,
            "lr_scheduler": scheduler,
            "training_state": trainer.training_state(),
        }
    )


def main() -> None:
    import rlfleet

    old_tree = Path(rlfleet.__file__).resolve().parent
    if not (old_tree / "learner" / "checkpoint.py").is_file():
        sys.exit(f"rlfleet resolves to {old_tree}, not the old tree: set PYTHONPATH (docstring)")
    from transformers import AutoTokenizer

    from rlfleet.common.tiny_model import build_tiny_model
    from rlfleet.learner.checkpoint import save_checkpoint
    from rlfleet.learner.checkpoint_identity import CheckpointIdentity, model_fingerprint
    from rlfleet.learner.lora import add_adapters

    torch.set_num_threads(1)
    shutil.rmtree(OUT, ignore_errors=True)
    (OUT / "model").mkdir(parents=True)
    model_dir = Path(tempfile.mkdtemp(prefix="old-tiny-model-"))
    build_tiny_model(
        model_dir, n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=257, seed=0
    )
    for name in MODEL_FILES:
        shutil.copyfile(model_dir / name, OUT / "model" / name)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    expected = {}
    for kind, steps in KINDS.items():
        trainer = build_trainer(kind, model_dir, add_adapters, tokenizer)
        for step in range(1, steps + 1):
            if kind == "grpo":
                trainer.step(*rollouts(step, vocab_size), GROUP_IDS)
            else:
                trainer.step(*rollouts(step, vocab_size))
        identity = CheckpointIdentity(
            job=f"old-main-{kind}",
            algorithm="grpo" if kind == "grpo" else "ppo",
            model="old-main/model",
            fingerprint=model_fingerprint(str(model_dir)),
            lora=kind == "ppo-lora",
        )
        job_state = {
            "dataset": {"epoch": 0, "position": BATCH * steps},
            "policy_version": steps,
            "learner": {"version": steps, "consumed": list(range(BATCH * steps))},
        }
        save_checkpoint(str(OUT / kind), steps, trainer, job_state, keep_last=1, identity=identity)
        expected[kind] = {
            "step": steps,
            "job_state": job_state,
            "identity": identity.to_json(),
            "trainer": trainer_digest(trainer),
        }
    (OUT / "expected.json").write_text(json.dumps(expected, sort_keys=True) + "\n")
    shutil.rmtree(model_dir)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    main()

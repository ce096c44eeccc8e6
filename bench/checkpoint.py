"""Checkpoint save and upload seconds versus model size, and whether the upload blocks training.

For GPT-2 models of several sizes (random weights, the tiny tokenizer; a real PPOTrainer after
one step, so the Adam state is full), each run measures:

- ``blocking``: ``save_checkpoint`` to a local directory and to a private SeaweedFS on loopback
  (write the files, sha256 them, fsync or upload, commit the manifest, all in the foreground);
- ``returns`` / ``commit``: ``CheckpointSaver.save`` (what training waits for: writing the
  files) and then ``wait`` (hashing, fsync or upload and the manifest, which training overlaps);
- training while an S3 upload runs: ``--train-steps`` PPO steps right after a background save,
  against the same steps with no upload in flight (on 2 cores the upload competes for CPU).

Runs alternate between the sides so load from other processes hits all alike; medians are
reported.

    .venv/bin/python bench/checkpoint.py [--sizes 2x128,6x384,12x768] [--runs 3] [--train-steps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel  # noqa: E402

from rlfleet.checkpoint.saver import CheckpointSaver, save_checkpoint  # noqa: E402
from rlfleet.common.config import PPOConfig  # noqa: E402
from rlfleet.tasks.tiny_model import build_tiny_model  # noqa: E402
from rlfleet.trainers.ppo import PPOTrainer  # noqa: E402
from rlfleet.trainers.value_head import AutoModelForCausalLMWithValueHead  # noqa: E402

BATCH = 4
JOB_STATE = {"dataset": {"epoch": 0, "position": 0}, "policy_version": 1}


def build_trainer(tokenizer_dir: Path, n_layer: int, n_embd: int) -> PPOTrainer:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=128,
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=max(1, n_embd // 64),
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    model = AutoModelForCausalLMWithValueHead(GPT2LMHeadModel(config))
    ppo = PPOConfig(batch_size=BATCH, mini_batch_size=BATCH, ppo_epochs=1, seed=0)
    return PPOTrainer(config=ppo, model=model, tokenizer=tokenizer)


def ppo_step(trainer: PPOTrainer, vocab_size: int) -> None:
    """One PPO step on random tokens (a timing load: its KL warnings are expected)."""
    generator = torch.Generator().manual_seed(trainer.current_step)
    queries = [torch.randint(1, vocab_size, (16,), generator=generator) for _ in range(BATCH)]
    responses = [torch.randint(1, vocab_size, (16,), generator=generator) for _ in range(BATCH)]
    trainer.step(queries, responses, [torch.tensor(1.0)] * BATCH)


def timed(action: Callable[..., object], *args: object, **kwargs: object) -> float:
    started = time.perf_counter()
    action(*args, **kwargs)
    return time.perf_counter() - started


def train(trainer: PPOTrainer, vocab_size: int, steps: int) -> None:
    for _ in range(steps):
        ppo_step(trainer, vocab_size)


def measure_size(
    trainer: PPOTrainer, vocab_size: int, work: Path, s3_root: str, runs: int, train_steps: int
) -> dict[str, float]:
    samples: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        samples.setdefault(name, []).append(seconds)

    roots = {"local": str(work / "local"), "s3": s3_root}
    for run in range(runs):
        for target, root in roots.items():
            record(
                f"{target}_blocking_s",
                timed(save_checkpoint, f"{root}/blocking", run, trainer, JOB_STATE, keep_last=1),
            )
            with CheckpointSaver(f"{root}/background", keep_last=1, staging_dir=work) as saver:
                record(f"{target}_save_returns_s", timed(saver.save, run, trainer, JOB_STATE))
                record(f"{target}_commit_wait_s", timed(saver.wait))
        with CheckpointSaver(f"{s3_root}/overlap", keep_last=1, staging_dir=work) as saver:
            saver.save(run, trainer, JOB_STATE)
            record("train_during_upload_s", timed(train, trainer, vocab_size, train_steps))
            record("upload_left_after_training_s", timed(saver.wait))
        record("train_alone_s", timed(train, trainer, vocab_size, train_steps))
    result = {name: statistics.median(values) for name, values in samples.items()}
    files = [p for p in (work / "local" / "blocking").rglob("*") if p.is_file()]
    result["checkpoint_mb"] = sum(p.stat().st_size for p in files) / 1e6
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="2x128,6x384,12x768", help="n_layer x n_embd, ...")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument("--out", help="also write the results as JSON here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="KL divergence is starting to become negative")

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from support.s3_server import running_s3_server

    with tempfile.TemporaryDirectory(prefix="bench-checkpoint-") as scratch:
        scratch_dir = Path(scratch)
        tokenizer_dir = build_tiny_model(scratch_dir / "tiny")
        vocab_size = len(AutoTokenizer.from_pretrained(tokenizer_dir))
        with running_s3_server(scratch_dir / "seaweedfs") as server:
            os.environ.update(server.env())
            results = []
            for size in args.sizes.split(","):
                n_layer, n_embd = (int(x) for x in size.split("x"))
                trainer = build_trainer(tokenizer_dir, n_layer, n_embd)
                ppo_step(trainer, vocab_size)
                params = sum(p.numel() for p in trainer.model.parameters())
                work = scratch_dir / f"work-{size}"
                work.mkdir()
                row = measure_size(
                    trainer,
                    vocab_size,
                    work,
                    f"s3://{server.bucket}/{size}",
                    args.runs,
                    args.train_steps,
                )
                row = {"model": f"gpt2 {size}", "params_m": params / 1e6, **row}
                results.append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(work)
    print_table(results, args.train_steps)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


def print_table(results: list[dict], train_steps: int) -> None:
    print(
        "\nSeconds, medians. blocking: save_checkpoint. returns: what training waits for with "
        "CheckpointSaver. commit: the rest, in the background (hash, fsync or upload, manifest)."
    )
    print(
        f"{'model':>12} {'params':>7} {'ckpt MB':>8} | {'local blocking':>14} {'returns':>7} "
        f"{'commit':>6} | {'S3 blocking':>11} {'returns':>7} {'commit':>6} | "
        f"{f'{train_steps} PPO steps':>11} {'during upload':>13} {'upload left':>11}"
    )
    for r in results:
        print(
            f"{r['model']:>12} {r['params_m']:>6.1f}M {r['checkpoint_mb']:>8.1f} | "
            f"{r['local_blocking_s']:>14.2f} {r['local_save_returns_s']:>7.2f} "
            f"{r['local_commit_wait_s']:>6.2f} | {r['s3_blocking_s']:>11.2f} "
            f"{r['s3_save_returns_s']:>7.2f} {r['s3_commit_wait_s']:>6.2f} | "
            f"{r['train_alone_s']:>11.2f} {r['train_during_upload_s']:>13.2f} "
            f"{r['upload_left_after_training_s']:>11.2f}"
        )


if __name__ == "__main__":
    main()

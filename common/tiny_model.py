"""A tiny GPT-2 and its byte-level BPE tokenizer, built offline and byte-for-byte reproducibly.

Nothing is downloaded: the tokenizer is trained on the built-in review corpus
(``rlfleet.common.corpus``) and the model starts from seeded random weights. ``pretrain_demo_model``
then trains it briefly on the same corpus so that it writes short review sentences, which is the
demo task's starting policy. ``pretrain_arithmetic_model`` builds the GRPO example's model the
same way from the arithmetic task's worked examples (``rlfleet.common.arithmetic``). The
directory loads with ``GPT2Tokenizer``, ``AutoTokenizer``, ``AutoModelForCausalLM`` and vLLM.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from rlfleet.common import arithmetic
from rlfleet.common.corpus import review_sentences

EOS_TOKEN = "<|endoftext|>"
DEFAULT_PRETRAIN_STEPS = 600
ARITHMETIC_PRETRAIN_STEPS = 2500
BYTE_VOCAB_SIZE = 257
"""The 256 byte-level symbols plus EOS: a tokenizer of that size learns no merges, one token
per character, so each digit of a sum is its own step (the arithmetic model's vocabulary)."""


def train_tokenizer(texts: list[str], vocab_size: int) -> Tokenizer:
    """A GPT-2-style byte-level BPE tokenizer (no prefix space, ``EOS_TOKEN`` as id 0).

    BPE training is deterministic: merges are picked by count, ties by the pair itself.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _save_tokenizer(tokenizer: Tokenizer, out_dir: Path, model_max_length: int) -> None:
    """vocab.json + merges.txt (slow-tokenizer files), tokenizer.json and the GPT-2 configs.

    As in GPT-2, bos, eos and unk are ``EOS_TOKEN``; the pad token is set to it as well, the
    way GPT-2 users set ``tokenizer.pad_token = tokenizer.eos_token`` before batching.
    """
    from transformers import GPT2Tokenizer

    tokenizer.model.save(str(out_dir))
    hf_tokenizer = GPT2Tokenizer(
        tokenizer_object=tokenizer,
        vocab_file=str(out_dir / "vocab.json"),
        merges_file=str(out_dir / "merges.txt"),
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        add_prefix_space=False,
        model_max_length=model_max_length,
    )
    hf_tokenizer.save_pretrained(str(out_dir))


def _save_random_gpt2(
    out_dir: Path,
    *,
    vocab_size: int,
    eos_token_id: int,
    n_layer: int,
    n_embd: int,
    n_head: int,
    n_positions: int,
    seed: int,
) -> None:
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.generation_config = GenerationConfig(
        bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id
    )
    model.save_pretrained(str(out_dir), safe_serialization=True)


def build_tiny_model(
    out_dir: str | Path,
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 2,
    n_positions: int = 128,
    vocab_size: int = 1024,
    seed: int = 0,
    texts: list[str] | None = None,
) -> Path:
    """Build the tokenizer and a random-weight GPT-2 in ``out_dir``; same bytes for same args.

    Returns ``out_dir`` as a ``Path``. The tokenizer is trained on ``texts`` (the review corpus
    by default); the model's vocabulary is its actual size (at most ``vocab_size``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(review_sentences() if texts is None else texts, vocab_size)
    _save_tokenizer(tokenizer, out_dir, model_max_length=n_positions)
    _save_random_gpt2(
        out_dir,
        vocab_size=tokenizer.get_vocab_size(),
        eos_token_id=tokenizer.token_to_id(EOS_TOKEN),
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_positions=n_positions,
        seed=seed,
    )
    return out_dir


def sentence_batch(
    token_ids: list[list[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask, labels)``; padding is masked out of the loss."""
    width = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    labels = torch.full((len(token_ids), width), -100, dtype=torch.long)
    mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(ids)
        mask[row, : len(ids)] = 1
    return input_ids, mask, labels


def corpus_token_ids(tokenizer, sentences: list[str]) -> list[list[int]]:
    """Each sentence's token ids followed by EOS, so the model learns where a review ends."""
    return [ids + [tokenizer.eos_token_id] for ids in tokenizer(sentences).input_ids]


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def pretrain_demo_model(
    out_dir: str | Path,
    *,
    steps: int = DEFAULT_PRETRAIN_STEPS,
    seed: int = 0,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
) -> Path:
    """Build the tiny model in ``out_dir`` and pretrain it on the corpus (CPU, seeded).

    Each step is one AdamW update on ``batch_size`` whole sentences (each starting at position
    0, as prompts do at generation time), with linear warm-up and decay of the learning rate.
    Training runs on one thread: the matrices are too small for more to help (on a busy 2-core
    machine two threads were 10x slower), and a fixed thread count keeps the bytes reproducible.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps ({steps}) and batch_size ({batch_size}) must be at least 1")
    out_dir = build_tiny_model(out_dir, seed=seed)
    with _torch_threads(1):
        _pretrain(
            out_dir,
            review_sentences(),
            steps=steps,
            seed=seed,
            batch_size=batch_size,
            lr=learning_rate,
        )
    return out_dir


def pretrain_arithmetic_model(
    out_dir: str | Path,
    *,
    steps: int = ARITHMETIC_PRETRAIN_STEPS,
    seed: int = 0,
    p_correct: float = 0.35,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
) -> Path:
    """The GRPO example's model: a one-token-per-character GPT-2 (2 x 64, head size 32, which
    vLLM's CPU build serves) pretrained on the arithmetic task's noisy worked examples, so that
    it answers ``"7+5="`` right about ``p_correct`` of the time (see
    ``rlfleet.common.arithmetic``). Seeded and single-threaded like ``pretrain_demo_model``."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps ({steps}) and batch_size ({batch_size}) must be at least 1")
    examples = arithmetic.worked_examples(20_000, p_correct=p_correct, seed=seed)
    out_dir = build_tiny_model(
        out_dir, n_positions=32, vocab_size=BYTE_VOCAB_SIZE, seed=seed, texts=examples
    )
    with _torch_threads(1):
        _pretrain(
            out_dir, examples, steps=steps, seed=seed, batch_size=batch_size, lr=learning_rate
        )
    return out_dir


def _pretrain(
    out_dir: Path, sentences: list[str], *, steps: int, seed: int, batch_size: int, lr: float
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, (steps - step) / (steps - warmup + 1))
    )
    token_ids = corpus_token_ids(tokenizer, sentences)
    model.train()
    rng = random.Random(seed)
    for _ in range(steps):
        input_ids, mask, labels = sentence_batch(
            rng.sample(token_ids, batch_size), tokenizer.pad_token_id
        )
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, help="output directory (created if missing)")
    parser.add_argument(
        "--pretrain", action="store_true", help="pretrain on the built-in corpus (the demo model)"
    )
    parser.add_argument(
        "--task",
        choices=("reviews", "arithmetic"),
        default="reviews",
        help="reviews: the PPO demo's model; arithmetic: the GRPO example's (always pretrained)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help=f"pretraining steps (default {DEFAULT_PRETRAIN_STEPS} for reviews, "
        f"{ARITHMETIC_PRETRAIN_STEPS} for arithmetic)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and pretraining")


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    if args.task == "arithmetic":
        steps = args.steps or ARITHMETIC_PRETRAIN_STEPS
        out_dir = pretrain_arithmetic_model(args.dir, steps=steps, seed=args.seed)
    elif args.pretrain:
        steps = args.steps or DEFAULT_PRETRAIN_STEPS
        out_dir = pretrain_demo_model(args.dir, steps=steps, seed=args.seed)
    else:
        out_dir = build_tiny_model(args.dir, seed=args.seed)
    print(f"tiny model written to {out_dir} in {time.perf_counter() - started:.1f} s")
    return 0

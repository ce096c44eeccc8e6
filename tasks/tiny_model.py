"""A tiny GPT-2 and its byte-level BPE tokenizer, built offline and byte-for-byte reproducibly.

Nothing is downloaded: the tokenizer is trained on the built-in review corpus
(``rlfleet.tasks.corpus``) and the model starts from seeded random weights. The same builder
makes tiny models of the other architectures rlfleet supports (``ARCHITECTURES``: Llama,
Qwen2, Mistral, GPT-NeoX, Gemma), each from its transformers config, and can give the
tokenizer a ChatML chat template with its end-of-turn token (``chat_template=True``).
``pretrain_demo_model`` then trains it briefly on the same corpus so that it writes short
review sentences, which is the demo task's starting policy. ``pretrain_arithmetic_model`` builds
the GRPO example's model the same way from the arithmetic task's worked examples
(``rlfleet.tasks.arithmetic``). ``pretrain_calculator_model`` and ``pretrain_guess_model`` build
the multi-turn agent demos' models (``rlfleet.tasks.calculator``, ``rlfleet.tasks.guess``): a
tiny Llama whose tokenizer has ``TOOL_CHAT_TEMPLATE`` (ChatML with Qwen2.5-style tools),
pretrained on whole dialogues. The directory loads with ``GPT2Tokenizer``, ``AutoTokenizer``,
``AutoModelForCausalLM`` and vLLM.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from rlfleet.tasks import arithmetic, calculator, guess
from rlfleet.tasks.corpus import review_sentences
from rlfleet.tasks.tool_template import (
    DIGITS,
    TOOL_CHAT_TEMPLATE,
    TOOL_TOKENS,
    assistant_positions,
    render_conversations,
)

EOS_TOKEN = "<|endoftext|>"
TURN_START_TOKEN = "<|im_start|>"
TURN_END_TOKEN = "<|im_end|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML, as Qwen2's instruct models write it: a turn ends with ``TURN_END_TOKEN``, which the
generation config lists as an EOS id beside ``EOS_TOKEN``."""
DEFAULT_PRETRAIN_STEPS = 600
ARITHMETIC_PRETRAIN_STEPS = 2500
BYTE_VOCAB_SIZE = 257
"""The 256 byte-level symbols plus EOS: a tokenizer of that size learns no merges, one token
per character, so each digit of a sum is its own step (the arithmetic model's vocabulary)."""


def train_tokenizer(
    texts: list[str], vocab_size: int, special_tokens: tuple[str, ...] = (EOS_TOKEN,)
) -> Tokenizer:
    """A GPT-2-style byte-level BPE tokenizer (no prefix space, ``special_tokens`` as ids 0, 1,
    ..., ``EOS_TOKEN`` first).

    BPE training is deterministic: merges are picked by count, ties by the pair itself.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return tokenizer


def _save_tokenizer(
    tokenizer: Tokenizer, out_dir: Path, model_max_length: int, chat_template: str | None = None
) -> None:
    """vocab.json + merges.txt (slow-tokenizer files), tokenizer.json and the GPT-2 configs.

    As in GPT-2, bos, eos and unk are ``EOS_TOKEN``; the pad token is set to it as well, the
    way GPT-2 users set ``tokenizer.pad_token = tokenizer.eos_token`` before batching.
    ``chat_template``, when given, is saved with the tokenizer.
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
    if chat_template is not None:
        hf_tokenizer.chat_template = chat_template
    hf_tokenizer.save_pretrained(str(out_dir))


ARCHITECTURES = ("gpt2", "llama", "qwen2", "mistral", "gpt_neox", "gemma")
"""The transformers ``model_type`` of each architecture ``build_tiny_model`` makes."""


@dataclass(frozen=True)
class Shape:
    """A tiny model's size in the architecture-neutral terms of ``build_tiny_model``."""

    vocab_size: int
    n_layer: int
    n_embd: int
    n_head: int
    n_kv_head: int
    n_positions: int


def _gpt2_config(shape: Shape) -> dict[str, Any]:
    if shape.n_kv_head != shape.n_head:
        raise ValueError(f"gpt2 has no grouped-query attention (n_kv_head {shape.n_kv_head})")
    return {
        "vocab_size": shape.vocab_size,
        "n_positions": shape.n_positions,
        "n_embd": shape.n_embd,
        "n_layer": shape.n_layer,
        "n_head": shape.n_head,
    }


def _decoder_config(shape: Shape, tie_word_embeddings: bool) -> dict[str, Any]:
    """The keys Llama-style configs share; the MLP is twice the width, as in the small models
    of these families."""
    return {
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.n_embd,
        "intermediate_size": 2 * shape.n_embd,
        "num_hidden_layers": shape.n_layer,
        "num_attention_heads": shape.n_head,
        "max_position_embeddings": shape.n_positions,
        "tie_word_embeddings": tie_word_embeddings,
    }


def _grouped_query_config(shape: Shape, tie_word_embeddings: bool) -> dict[str, Any]:
    return {
        **_decoder_config(shape, tie_word_embeddings),
        "num_key_value_heads": shape.n_kv_head,
        "head_dim": shape.n_embd // shape.n_head,
    }


def _gpt_neox_config(shape: Shape) -> dict[str, Any]:
    """Pythia's layout: untied, parallel residual, rotary embedding on a quarter of each head."""
    if shape.n_kv_head != shape.n_head:
        raise ValueError(f"gpt_neox has no grouped-query attention (n_kv_head {shape.n_kv_head})")
    return _decoder_config(shape, tie_word_embeddings=False)


def _mistral_config(shape: Shape) -> dict[str, Any]:
    """Untied, grouped-query, with a sliding window of half the context so that prompts of the
    tests reach past it."""
    return {**_grouped_query_config(shape, False), "sliding_window": shape.n_positions // 2}


ARCHITECTURE_CONFIGS: dict[str, Callable[[Shape], dict[str, Any]]] = {
    "gpt2": _gpt2_config,
    "llama": lambda shape: _grouped_query_config(shape, tie_word_embeddings=False),
    "qwen2": lambda shape: _grouped_query_config(shape, tie_word_embeddings=True),
    "mistral": _mistral_config,
    "gpt_neox": _gpt_neox_config,
    "gemma": lambda shape: _grouped_query_config(shape, tie_word_embeddings=True),
}
"""Each architecture's config keys, as the small models of its family set them: Llama and
Mistral untied, Qwen2 (biased q/k/v, built into the architecture) and Gemma tied, all four with
grouped-query attention."""


def _save_random_model(
    out_dir: Path, architecture: str, shape: Shape, eos_token_ids: list[int], seed: int
) -> None:
    """Seeded random weights of ``architecture``; bos (and the generation config's pad) is the
    first EOS id, and the configs name every EOS id (one list when there are several)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    eos = eos_token_ids[0] if len(eos_token_ids) == 1 else eos_token_ids
    config = AutoConfig.for_model(
        architecture,
        **ARCHITECTURE_CONFIGS[architecture](shape),
        bos_token_id=eos_token_ids[0],
        eos_token_id=eos,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=eos_token_ids[0], eos_token_id=eos, pad_token_id=eos_token_ids[0]
    )
    model.save_pretrained(str(out_dir), safe_serialization=True)


def build_tiny_model(
    out_dir: str | Path,
    *,
    architecture: str = "gpt2",
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 2,
    n_kv_head: int | None = None,
    n_positions: int = 128,
    vocab_size: int = 1024,
    seed: int = 0,
    texts: list[str] | None = None,
    chat_template: bool = False,
    tools: bool = False,
) -> Path:
    """Build the tokenizer and a random-weight model in ``out_dir``; same bytes for same args.

    Returns ``out_dir`` as a ``Path``. ``architecture`` is one of ``ARCHITECTURES``; the head
    size is ``n_embd // n_head`` and ``n_kv_head`` (grouped-query architectures only) defaults
    to half the heads for those, all of them otherwise. The tokenizer is trained on ``texts``
    (the review corpus by default); the model's vocabulary is its actual size (at most
    ``vocab_size``). ``chat_template`` adds ChatML's turn tokens and template
    (``CHAT_TEMPLATE``) and makes the end-of-turn token an EOS id of the generation config;
    ``tools`` does the same with ``TOOL_CHAT_TEMPLATE`` and adds ``TOOL_TOKENS`` to the
    vocabulary.
    """
    if architecture not in ARCHITECTURE_CONFIGS:
        raise ValueError(f"architecture {architecture!r} is not one of {', '.join(ARCHITECTURES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    chat_template = chat_template or tools
    special = (EOS_TOKEN, TURN_START_TOKEN, TURN_END_TOKEN) if chat_template else (EOS_TOKEN,)
    tokenizer = train_tokenizer(review_sentences() if texts is None else texts, vocab_size, special)
    if tools:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
    template = TOOL_CHAT_TEMPLATE if tools else CHAT_TEMPLATE if chat_template else None
    _save_tokenizer(tokenizer, out_dir, n_positions, template)
    eos_tokens = (TURN_END_TOKEN, EOS_TOKEN) if chat_template else (EOS_TOKEN,)
    grouped = architecture in ("llama", "qwen2", "mistral", "gemma")
    shape = Shape(
        vocab_size=tokenizer.get_vocab_size(),
        n_layer=n_layer,
        n_embd=n_embd,
        n_head=n_head,
        n_kv_head=n_kv_head or (max(1, n_head // 2) if grouped else n_head),
        n_positions=n_positions,
    )
    _save_random_model(
        out_dir, architecture, shape, [tokenizer.token_to_id(t) for t in eos_tokens], seed
    )
    return out_dir


def sentence_batch(
    token_ids: list[list[int]], pad_id: int, trained: list[list[bool]] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(input_ids, attention_mask, labels)``; padding is masked out of the loss,
    and so is every position whose ``trained`` flag (one list per sequence) is False."""
    width = max(len(ids) for ids in token_ids)
    input_ids = torch.full((len(token_ids), width), pad_id, dtype=torch.long)
    labels = torch.full((len(token_ids), width), -100, dtype=torch.long)
    mask = torch.zeros((len(token_ids), width), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(ids)
        if trained is not None:
            labels[row, : len(ids)][~torch.tensor(trained[row])] = -100
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
    architecture: str = "gpt2",
    chat_template: bool = False,
) -> Path:
    """Build the tiny model in ``out_dir`` and pretrain it on the corpus (CPU, seeded);
    ``architecture`` and ``chat_template`` as for ``build_tiny_model``.

    Each step is one AdamW update on ``batch_size`` whole sentences (each starting at position
    0, as prompts do at generation time), with linear warm-up and decay of the learning rate.
    Training runs on one thread: the matrices are too small for more to help (on a busy 2-core
    machine two threads were 10x slower), and a fixed thread count keeps the bytes reproducible.
    """
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps ({steps}) and batch_size ({batch_size}) must be at least 1")
    out_dir = build_tiny_model(
        out_dir, seed=seed, architecture=architecture, chat_template=chat_template
    )
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
    steps: int | None = ARITHMETIC_PRETRAIN_STEPS,
    seed: int = 0,
    p_correct: float = 0.35,
    batch_size: int = 64,
    learning_rate: float = 3e-3,
) -> Path:
    """The GRPO example's model: a one-token-per-character GPT-2 (2 x 64, head size 32, which
    vLLM's CPU build serves) pretrained on the arithmetic task's noisy worked examples, so that
    it answers ``"7+5="`` right about ``p_correct`` of the time (see
    ``rlfleet.tasks.arithmetic``). Seeded and single-threaded like ``pretrain_demo_model``;
    ``steps`` None is the default."""
    steps = ARITHMETIC_PRETRAIN_STEPS if steps is None else steps
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


@dataclass(frozen=True)
class AgentShape:
    """An agent model's size and pretraining: head size 32 (vLLM's CPU build serves it), one
    token per digit, long enough for a whole dialogue. Llama by default: rotary positions make
    "copy what stood k tokens back" one attention pattern wherever the dialogue puts it, which a
    tiny model learns far sooner than with GPT-2's learned positions."""

    n_layer: int
    n_embd: int
    n_head: int
    n_positions: int
    steps: int
    architecture: str = "llama"
    batch_size: int = 32
    learning_rate: float = 3e-3
    vocab_size: int = 1024


CALCULATOR_SHAPE = AgentShape(n_layer=2, n_embd=64, n_head=2, n_positions=192, steps=1400)
GUESS_SHAPE = AgentShape(n_layer=2, n_embd=64, n_head=2, n_positions=256, steps=1500)
COPY_FRACTION = 0.7
"""The share of the calculator model's pretraining spent on tool dialogues alone."""
TOKENIZER_SAMPLE = 2000
"""Rendered dialogues the tokenizer learns its merges on (they repeat one template)."""


Phase = tuple[list[list[dict[str, Any]]], int]
"""A stretch of pretraining: the dialogues it samples from and its number of steps."""


def pretrain_chat_model(
    out_dir: str | Path,
    phases: list[Phase],
    shape: AgentShape,
    *,
    tools: list[dict[str, Any]] | None = None,
    seed: int = 0,
) -> Path:
    """A tiny model with the tool chat template (``build_tiny_model(tools=True)``) pretrained,
    phase after phase, on whole dialogues rendered with ``tools``, the loss on the assistant's
    turns only; seeded and single-threaded like ``pretrain_demo_model``."""
    if not phases or any(steps < 1 for _, steps in phases):
        raise ValueError(f"every phase needs at least 1 step, got {[n for _, n in phases]}")
    texts = [render_conversations(dialogues, tools) for dialogues, _ in phases]
    sample = TOKENIZER_SAMPLE // len(texts)
    out_dir = build_tiny_model(
        out_dir,
        architecture=shape.architecture,
        n_layer=shape.n_layer,
        n_embd=shape.n_embd,
        n_head=shape.n_head,
        n_positions=shape.n_positions,
        vocab_size=shape.vocab_size,
        seed=seed,
        texts=[DIGITS.sub("", text) for phase in texts for text in phase[:sample]],
        tools=True,
    )
    with _torch_threads(1):
        for phase_texts, (_, steps) in zip(texts, phases, strict=True):
            _pretrain(
                out_dir,
                phase_texts,
                steps=steps,
                seed=seed,
                batch_size=shape.batch_size,
                lr=shape.learning_rate,
                assistant_only=True,
            )
    return out_dir


def pretrain_calculator_model(
    out_dir: str | Path, *, steps: int | None = None, seed: int = 0, p_tool: float = 0.25
) -> Path:
    """The calculator agent's model (``rlfleet.tasks.calculator``): it calls the calculator in
    about ``p_tool`` of its answers, copies the result when it does, and otherwise guesses.

    Copying is learned first, on tool dialogues only (``COPY_FRACTION`` of the ``steps``):
    mixed in at ``p_tool`` from the start, the few copies per batch left the 2-layer model
    writing random digits after 1500 steps. The mixed corpus then sets how often it calls."""
    steps = CALCULATOR_SHAPE.steps if steps is None else steps
    copying = max(1, round(steps * COPY_FRACTION))
    phases = [
        (calculator.conversations(10_000, p_tool=1.0, seed=seed), copying),
        (calculator.conversations(10_000, p_tool=p_tool, seed=seed + 1), max(1, steps - copying)),
    ]
    return pretrain_chat_model(
        out_dir, phases, CALCULATOR_SHAPE, tools=calculator.tool_schemas(), seed=seed
    )


def pretrain_guess_model(out_dir: str | Path, *, steps: int | None = None, seed: int = 0) -> Path:
    """The guessing game's model (``rlfleet.tasks.guess``): it plays by the corpus' mix of
    scanning, random and bisecting games."""
    steps = GUESS_SHAPE.steps if steps is None else steps
    phases = [(guess.conversations(20_000, seed=seed), steps)]
    return pretrain_chat_model(out_dir, phases, GUESS_SHAPE, seed=seed)


def _pretrain(
    out_dir: Path,
    sentences: list[str],
    *,
    steps: int,
    seed: int,
    batch_size: int,
    lr: float,
    assistant_only: bool = False,
) -> None:
    """AdamW on seeded batches of whole ``sentences``; ``assistant_only``: the loss counts the
    assistant turns' ids only (``assistant_positions``)."""
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
    trained = None
    if assistant_only:
        header = tokenizer.encode(f"{TURN_START_TOKEN}assistant\n", add_special_tokens=False)
        end = tokenizer.convert_tokens_to_ids(TURN_END_TOKEN)
        trained = [assistant_positions(ids, header, end) for ids in token_ids]
    model.train()
    rng = random.Random(seed)
    for _ in range(steps):
        rows = rng.sample(range(len(token_ids)), batch_size)
        input_ids, mask, labels = sentence_batch(
            [token_ids[row] for row in rows],
            tokenizer.pad_token_id,
            None if trained is None else [trained[row] for row in rows],
        )
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)


PRETRAINED_TASKS: dict[str, Callable[..., Path]] = {
    "arithmetic": pretrain_arithmetic_model,
    "calculator": pretrain_calculator_model,
    "guess": pretrain_guess_model,
}
"""The ``--task`` models that are always pretrained, each called with ``steps`` (None: its
default) and ``seed``."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", type=Path, help="output directory (created if missing)")
    parser.add_argument(
        "--pretrain", action="store_true", help="pretrain on the built-in corpus (the demo model)"
    )
    parser.add_argument(
        "--task",
        choices=("reviews", *PRETRAINED_TASKS),
        default="reviews",
        help="reviews: the PPO demo's model; arithmetic: the GRPO example's; calculator, guess: "
        "the agent demos' (all but reviews always pretrained)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help=f"pretraining steps (default {DEFAULT_PRETRAIN_STEPS} for reviews, "
        f"{ARITHMETIC_PRETRAIN_STEPS} for arithmetic, {CALCULATOR_SHAPE.steps} for calculator, "
        f"{GUESS_SHAPE.steps} for guess)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and pretraining")
    parser.add_argument(
        "--architecture",
        choices=ARCHITECTURES,
        default="gpt2",
        help="the transformers architecture of the reviews model (default gpt2)",
    )
    parser.add_argument(
        "--chat-template",
        action="store_true",
        help="give the reviews model's tokenizer a ChatML chat template and end-of-turn token",
    )


def run(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    shape = {"architecture": args.architecture, "chat_template": args.chat_template}
    if args.task in PRETRAINED_TASKS:
        if shape != {"architecture": "gpt2", "chat_template": False}:
            raise SystemExit("--architecture and --chat-template are for --task reviews only")
        out_dir = PRETRAINED_TASKS[args.task](args.dir, steps=args.steps, seed=args.seed)
    elif args.pretrain:
        steps = args.steps or DEFAULT_PRETRAIN_STEPS
        out_dir = pretrain_demo_model(args.dir, steps=steps, seed=args.seed, **shape)
    else:
        out_dir = build_tiny_model(args.dir, seed=args.seed, **shape)
    print(f"tiny model written to {out_dir} in {time.perf_counter() - started:.1f} s")
    return 0

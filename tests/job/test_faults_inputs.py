"""Hostile input to ``rlfleet train``: each case exits 2 with one line naming the key (or file)
and what is wrong, before Ray starts and without making ``output_dir``."""

from __future__ import annotations

import json
import re
import shutil
import socket
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.job_configs import small_job, write_config

from rlfleet.cli import main


def bad_model_without_config(tmp_path: Path, model: Path) -> Path:
    broken = tmp_path / "model-without-config"
    shutil.copytree(model, broken)
    (broken / "config.json").unlink()
    return broken


def closed_port() -> int:
    """A port of 127.0.0.1 that nothing listens on (bound a moment ago, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dataset(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def model_with_vocab(tmp_path: Path, model: Path, vocab_size: int) -> Path:
    """The tiny model (702 tokens) with a config.json that gives its embedding ``vocab_size``."""
    smaller = tmp_path / "small-vocab-model"
    shutil.copytree(model, smaller)
    config = json.loads((smaller / "config.json").read_text())
    (smaller / "config.json").write_text(json.dumps({**config, "vocab_size": vocab_size}))
    return smaller


def model_with_own_code(tmp_path: Path, model: Path) -> Path:
    """The tiny model with a config.json of a type transformers does not know, that names the
    directory's own code (``auto_map``; the code itself is not there)."""
    mystery = tmp_path / "mystery-model"
    shutil.copytree(model, mystery)
    config = json.loads((mystery / "config.json").read_text())
    auto_map = {"AutoConfig": "configuration_mystery.MysteryConfig"}
    config.update(model_type="mystery", auto_map=auto_map)
    (mystery / "config.json").write_text(json.dumps(config))
    return mystery


def binary_file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def parquet(tmp_path: Path, name: str, columns: dict[str, pa.Array]) -> Path:
    path = tmp_path / name
    pq.write_table(pa.table(columns), path)
    return path


BROKEN_JSONL = '{"prompt": "a"}\n{oops\n'
TEXT_FIELD_JSONL = '{"text": "a"}\n'
LONE_SURROGATE_JSONL = '{"prompt": "good"}\n{"prompt": "a \\ud800 b"}\n'
"""Row 1's prompt is JSON's escape of a lone surrogate: valid JSON, not valid Unicode."""
LATIN_1_JSONL = '{"prompt": "ok"}\n{"prompt": "café"}\n'.encode("latin-1")

# Each case: the --set overrides (built from tmp_path and the tiny model) and what the one line
# must say.
CASES = {
    "empty dataset": (
        lambda tmp, model: [f"dataset.path={dataset(tmp, 'empty.jsonl', '')}"],
        r"dataset\.path: .*empty\.jsonl has no rows",
    ),
    "a broken JSON line": (
        lambda tmp, model: [f"dataset.path={dataset(tmp, 'broken.jsonl', BROKEN_JSONL)}"],
        r"dataset\.path: .*broken\.jsonl line 2: ",
    ),
    "no row has the prompt field": (
        lambda tmp, model: [f"dataset.path={dataset(tmp, 'text.jsonl', TEXT_FIELD_JSONL)}"],
        r"dataset\.prompt_field: row 0 of .*text\.jsonl has no non-empty string 'prompt'",
    ),
    "the dataset path is a directory": (
        lambda tmp, model: [f"dataset.path={tmp}"],
        r"dataset\.path: .* is a directory; name a \.jsonl or \.parquet file",
    ),
    "output_dir is a file": (
        lambda tmp, model: [f"output_dir={dataset(tmp, 'a-file', 'x')}/run"],
        r"output_dir: .*a-file is a file, not a directory; choose another output_dir",
    ),
    "output_dir cannot be made": (
        lambda tmp, model: ["output_dir=/proc/rlfleet-run"],
        r"output_dir: cannot write to /proc \(.*\); make it writable or choose another",
    ),
    "the discovery dir is a file": (
        lambda tmp, model: [f"metrics.file_sd_dir={dataset(tmp, 'sd-file', 'x')}"],
        r"metrics\.file_sd_dir: .*sd-file is a file, not a directory",
    ),
    "the model directory lacks config.json": (
        lambda tmp, model: [f"model={bad_model_without_config(tmp, model)}"],
        r"model: .*model-without-config is not a model directory \(no config\.json\)",
    ),
    "the model is a file": (
        lambda tmp, model: [f"model={dataset(tmp, 'weights.bin', 'x')}"],
        r"model: .*weights\.bin is not a model directory",
    ),
    "a list where a number goes": (
        lambda tmp, model: ["generators.num_actors=[1,2]"],
        r"generators\.num_actors: Input should be a valid integer \(got \[1, 2\]\)",
    ),
    "a reward function that is not callable": (
        lambda tmp, model: ["reward.function=rlfleet.reward.functions:LEGACY_MODULES"],
        r"reward\.function: reward function '.*:LEGACY_MODULES' is not callable",
    ),
    "a reward URL nobody answers (credentials kept out)": (
        lambda tmp, model: [
            "reward.function=null",
            f"reward.url=http://user:secret@127.0.0.1:{closed_port()}/score?key=secret",
            "reward.timeout_s=1",
        ],
        r"reward\.url: cannot connect to http://\*\*\*@127\.0\.0\.1:\d+/score\?key=\*\*\* "
        r"within 1 s \(reward\.timeout_s\): .*; start the scorer or fix the URL$",
    ),
    "a job name that is a path": (
        lambda tmp, model: ["name=../evil"],
        r"name: job name '\.\./evil' must match .* to name a file",
    ),
    "a prompt with a lone surrogate": (
        lambda tmp, model: [f"dataset.path={dataset(tmp, 'sur.jsonl', LONE_SURROGATE_JSONL)}"],
        r"dataset\.path: row 1 of .*sur\.jsonl, field 'prompt': text with a lone surrogate "
        r"\('\\ud800' near '.*'\), which is not valid Unicode; fix the row or drop it$",
    ),
    "a JSONL file that is not UTF-8": (
        lambda tmp, model: [f"dataset.path={binary_file(tmp, 'latin.jsonl', LATIN_1_JSONL)}"],
        r"dataset\.path: .*latin\.jsonl line 2 is not UTF-8 \(byte b'\\xe9': invalid "
        r"continuation byte\); save the file as UTF-8$",
    ),
    "a Parquet prompt column of bytes": (
        lambda tmp, model: [
            "dataset.path="
            + str(parquet(tmp, "b.parquet", {"prompt": pa.array([b"hi", b"yo"], pa.binary())}))
        ],
        r"dataset\.path: row 0 of .*b\.parquet, field 'prompt': binary data \(b'hi'\), not "
        r"text: store it as a string column \(decode it, e\.g\. \.decode\('utf-8'\)\); fix "
        r"the row or drop it$",
    ),
    "a Parquet column of bytes beside the prompts": (
        lambda tmp, model: [
            "dataset.path="
            + str(
                parquet(
                    tmp,
                    "blob.parquet",
                    {"prompt": ["hi", "yo"], "blob": pa.array([b"\x00\x01", b"x"], pa.binary())},
                )
            )
        ],
        r"dataset\.path: row 0 of .*blob\.parquet, field 'blob': binary data "
        r"\(b'\\x00\\x01'\), not text",
    ),
    "a file that is not Parquet": (
        lambda tmp, model: [f"dataset.path={dataset(tmp, 'fake.parquet', 'not parquet')}"],
        r"dataset\.path: .*fake\.parquet is not a Parquet file pyarrow can read \(.*\)$",
    ),
    "a tokenizer larger than the model's embedding": (
        lambda tmp, model: [f"model={model_with_vocab(tmp, model, 300)}"],
        r"model: the tokenizer in .*small-vocab-model has 702 tokens but the model's embedding "
        r"has 300 \(vocab_size in its config\.json\), so ids 300\.\.701 have none; save the "
        r"model's own tokenizer there, or resize the embedding "
        r"\(model\.resize_token_embeddings\(702\)\) and save the model$",
    ),
    "a model of a type transformers does not know, with its own code": (
        lambda tmp, model: [f"model={model_with_own_code(tmp, model)}"],
        r"model: .*mystery-model has model_type 'mystery', which transformers [\d.]+ does not "
        r"know, and its config\.json names its own code \(auto_map\), which runs only with "
        r"trust_remote_code: true; set trust_remote_code: true if you trust that code, or use a "
        r"model transformers supports$",
    ),
    "a LoRA target module the model lacks, beside one it has": (
        lambda tmp, model: ["lora.target_modules=[c_attn,nonexistent_proj]"],
        r"lora\.target_modules: 'nonexistent_proj' names no module of .* that LoRA can adapt; "
        r"its modules are named c_attn, c_fc, c_proj, lm_head, wpe, wte \(or all-linear\)$",
    ),
    "a LoRA target module the model lacks, alone": (
        lambda tmp, model: ["lora.target_modules=[nonexistent_proj]"],
        r"lora\.target_modules: 'nonexistent_proj' names no module of .* that LoRA can adapt",
    ),
    "a checkpoint uri that is a file": (
        lambda tmp, model: [f"checkpoint.uri={dataset(tmp, 'ckpt-file', 'x')}"],
        r"checkpoint\.uri: cannot write to .*ckpt-file",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_input_exits_2_with_one_line_before_anything_starts(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, case: str
) -> None:
    overrides, expected = CASES[case]
    out = tmp_path / "run"
    config = write_config(tmp_path / "job.yaml", small_job(tiny_model_dir, out))
    sets = [arg for value in overrides(tmp_path, tiny_model_dir) for arg in ("--set", value)]

    assert main(["train", "--config", str(config), *sets]) == 2
    stderr = capsys.readouterr().err.strip()
    assert "\n" not in stderr
    assert "secret" not in stderr
    assert stderr.startswith(f"rlfleet train: invalid job config {config}: ")
    assert re.search(expected, stderr), stderr
    assert not out.exists()

"""Prompt data: reading rows, the cursor over them, prompt batches with fresh rollout ids."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from support.job_configs import small_job

from rlfleet.common.schema import ROLLOUT_SCHEMA
from rlfleet.job.checks import ConfigError
from rlfleet.job.data import (
    PromptBatches,
    PromptDataset,
    PromptRenderer,
    check_prompt_lengths,
    context_length,
    read_prompt_rows,
)


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_rows_skip_blank_lines_and_keep_every_field(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "p.jsonl", ['{"prompt": "a", "answer": 1}', "", '{"prompt": "b"}', "  "]
    )
    assert read_prompt_rows(path, "prompt") == [{"prompt": "a", "answer": 1}, {"prompt": "b"}]


def test_parquet_rows(tmp_path: Path) -> None:
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["x", "y"], "label": [0, 1]}), path)
    assert read_prompt_rows(path, "text") == [{"text": "x", "label": 0}, {"text": "y", "label": 1}]


@pytest.mark.parametrize(
    ("name", "lines", "message"),
    [
        ("p.jsonl", ['{"prompt": "a"}', "", "{oops"], r"dataset\.path: .*p\.jsonl line 3: "),
        ("p.jsonl", ['{"prompt": "a"}', '["prompt"]'], r"p\.jsonl line 2 is not a JSON object"),
        ("p.jsonl", ["", " "], r"dataset\.path: .*p\.jsonl has no rows"),
        ("p.csv", ["prompt", "a"], r"dataset\.path: .*p\.csv is neither \.jsonl nor \.parquet"),
        (
            "p.jsonl",
            ['{"prompt": "a"}', '{"prompt": ""}'],
            r"dataset\.prompt_field: row 1 of .*p\.jsonl has no non-empty string 'prompt' "
            r"\(got ''\)",
        ),
        (
            "p.jsonl",
            ['{"text": "a"}'],
            r"dataset\.prompt_field: row 0 .* 'prompt' \(got None\)",
        ),
    ],
)
def test_bad_datasets_name_the_key_the_file_and_the_line_or_row(
    tmp_path: Path, name: str, lines: list[str], message: str
) -> None:
    path = write_jsonl(tmp_path / name, lines)
    with pytest.raises(ConfigError, match=message):
        read_prompt_rows(path, "prompt")


def test_a_field_that_cannot_travel_with_its_prompt_names_the_row_and_field(
    tmp_path: Path,
) -> None:
    """Every field travels with its prompt (the prompt as Arrow text, the others as JSON
    metadata): one that cannot is refused when the rows are read, not in the first batch."""
    parquet = tmp_path / "p.parquet"
    when = pa.array([0, 86_400_000_000], pa.timestamp("us"))
    pq.write_table(pa.table({"prompt": ["a", "b"], "when": when}), parquet)
    with pytest.raises(
        ConfigError,
        match=r"^dataset\.path: row 0 of .*p\.parquet, field 'when': a datetime value "
        r"\(datetime\.datetime\(1970, 1, 1, 0, 0\)\), which JSON cannot hold; fix the row or "
        r"drop it$",
    ):
        read_prompt_rows(parquet, "prompt")
    lines = ['{"prompt": "a", "tags": []}', '{"prompt": "b", "tags": ["z\\ud83d"]}']
    jsonl = write_jsonl(tmp_path / "p.jsonl", lines)
    with pytest.raises(
        ConfigError,
        match=r"^dataset\.path: row 1 of .*p\.jsonl, field 'tags': text with a lone surrogate "
        r"\('\\ud83d' near .*\), which is not valid Unicode; fix the row or drop it$",
    ):
        read_prompt_rows(jsonl, "prompt")


def test_a_missing_file_names_the_key_and_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"dataset\.path: no such file: .*nope\.jsonl"):
        read_prompt_rows(tmp_path / "nope.jsonl", "prompt")


def rows(n: int) -> list[dict]:
    return [{"prompt": f"p{i}"} for i in range(n)]


def taken_indices(dataset: PromptDataset, n: int) -> list[int]:
    return [index for index, _ in dataset.take(n)]


def test_unshuffled_cursor_goes_in_order_and_wraps_into_the_next_epoch() -> None:
    dataset = PromptDataset(rows(5), shuffle=False, seed=0)
    assert taken_indices(dataset, 3) == [0, 1, 2]
    assert taken_indices(dataset, 4) == [3, 4, 0, 1]
    assert dataset.state() == {"epoch": 1, "offset": 2}


def test_shuffled_epochs_are_fresh_permutations_fixed_by_the_seed() -> None:
    dataset = PromptDataset(rows(20), shuffle=True, seed=7)
    epochs = [taken_indices(dataset, 20) for _ in range(3)]
    assert all(sorted(epoch) == list(range(20)) for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) == 3
    assert epochs[0] != list(range(20))
    again = PromptDataset(rows(20), shuffle=True, seed=7)
    assert [taken_indices(again, 20) for _ in range(3)] == epochs
    other_seed = PromptDataset(rows(20), shuffle=True, seed=8)
    assert taken_indices(other_seed, 20) != epochs[0]


def test_a_cursor_restored_from_its_state_continues_where_the_original_does() -> None:
    original = PromptDataset(rows(7), shuffle=True, seed=3)
    original.take(11)
    state = json.loads(json.dumps(original.state()))
    restored = PromptDataset(rows(7), shuffle=True, seed=3)
    restored.load_state(state)
    assert restored.take(10) == original.take(10)


def batches(dataset_rows: list[dict], max_prompt_tokens: int = 8) -> PromptBatches:
    """Prompt batches whose 'tokenizer' makes one token per character."""
    return PromptBatches(
        PromptDataset(dataset_rows, shuffle=False, seed=0),
        PromptRenderer("prompt", lambda text: [ord(c) for c in text]),
        max_prompt_tokens,
    )


def test_prompt_batches_carry_fresh_rollout_ids_tokens_and_the_other_fields() -> None:
    prompts = batches([{"prompt": "ab", "answer": 1}, {"prompt": "c", "answer": 2}])
    first, second = prompts.next_batch(3), prompts.next_batch(3)

    assert first.schema == ROLLOUT_SCHEMA
    assert first.column("rollout_id").to_pylist() == [0, 1, 2]
    assert second.column("rollout_id").to_pylist() == [3, 4, 5]
    assert first.column("prompt").to_pylist() == ["ab", "c", "ab"]
    assert first.column("prompt_ids").to_pylist() == [[97, 98], [99], [97, 98]]
    assert [json.loads(m) for m in first.column("metadata").to_pylist()] == [
        {"answer": 1},
        {"answer": 2},
        {"answer": 1},
    ]
    assert first.column("response_ids").null_count == 3
    assert first.column("score").null_count == 3


def test_a_prompt_too_long_for_the_context_names_its_row() -> None:
    prompts = batches([{"prompt": "ok"}, {"prompt": "much too long"}], max_prompt_tokens=4)
    with pytest.raises(ValueError, match=r"dataset row 1: prompt is 13 tokens; it must be 1\.\.4"):
        prompts.next_batch(2)


def test_prompt_batches_restored_from_their_state_repeat_the_same_batches_and_ids() -> None:
    original = batches(rows(5))
    original.next_batch(3)
    state = json.loads(json.dumps(original.state()))
    assert state == {"dataset": {"epoch": 0, "offset": 3}, "next_rollout_id": 3}
    restored = batches(rows(5))
    restored.load_state(state)
    assert restored.next_batch(4).to_pydict() == original.next_batch(4).to_pydict()


def test_each_prompt_gives_its_samples_own_rollout_ids_and_one_group_id() -> None:
    prompts = batches([{"prompt": "ab", "answer": 1}, {"prompt": "c", "answer": 2}])
    first, second = prompts.next_batch(2, samples_per_prompt=3), prompts.next_batch(1, 3)

    assert first.column("rollout_id").to_pylist() == [0, 1, 2, 3, 4, 5]
    assert first.column("group_id").to_pylist() == [0, 0, 0, 3, 3, 3]
    assert first.column("prompt").to_pylist() == ["ab"] * 3 + ["c"] * 3
    assert first.column("prompt_ids").to_pylist() == [[97, 98]] * 3 + [[99]] * 3
    assert [json.loads(m)["answer"] for m in first.column("metadata").to_pylist()] == [1] * 3 + [
        2
    ] * 3
    assert second.column("rollout_id").to_pylist() == [6, 7, 8]
    assert second.column("group_id").to_pylist() == [6, 6, 6]


def test_one_sample_per_prompt_is_a_group_of_its_own() -> None:
    batch = batches(rows(3)).next_batch(3)
    assert batch.column("group_id").to_pylist() == batch.column("rollout_id").to_pylist()


def test_group_ids_stay_unique_across_a_resume() -> None:
    original = batches(rows(5))
    original.next_batch(2, samples_per_prompt=4)
    restored = batches(rows(5))
    restored.load_state(json.loads(json.dumps(original.state())))
    resumed, expected = restored.next_batch(2, 4), original.next_batch(2, 4)
    assert resumed.to_pydict() == expected.to_pydict()
    assert resumed.column("group_id").to_pylist() == [8] * 4 + [12] * 4


def test_context_length_reads_the_model_config(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"n_positions": 128}')
    assert context_length(str(tmp_path)) == 128
    (tmp_path / "config.json").write_text('{"max_position_embeddings": 4096}')
    assert context_length(str(tmp_path)) == 4096


def test_every_prompt_is_checked_against_the_context_before_start(tiny_model_dir, tmp_path):
    """A too-long prompt at row 16 used to stop the job at iteration 2, and its resume too."""
    rows = [{"prompt": "a short review"} for _ in range(20)]
    rows[16] = {"prompt": "word " * 200}
    job = small_job(tiny_model_dir, tmp_path / "run")
    with pytest.raises(
        ConfigError,
        match=r"^dataset\.path: row 16 of .*: the prompt is \d+ tokens; it must be 1\.\.120 "
        r"\(context 128 minus generators\.max_new_tokens 8\): shorten or drop the row",
    ):
        check_prompt_lengths(job, rows)
    check_prompt_lengths(job, rows[:16])

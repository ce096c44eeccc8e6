"""Prompt data: the dataset's rows, the cursor over them, and the prompt batches sent to the
generators (tokenized, checked against the context, each sample with a fresh rollout id and the
samples of one prompt with one group id).

A row's prompt is the text of ``dataset.prompt_field``, or, with ``dataset.messages_field``, its
conversation rendered with the tokenizer's chat template (``rlfleet.common.chat``)."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rlfleet.common.chat import (
    MESSAGES_METADATA_KEY,
    ChatFormatError,
    Message,
    check_chat_template,
    checked_messages,
    render_chat,
    with_system_prompt,
)
from rlfleet.common.config import JobConfig
from rlfleet.common.errors import one_line
from rlfleet.common.schema import prompt_batch
from rlfleet.envs.loading import tool_schemas_of
from rlfleet.job.checks import (
    ConfigError,
    check_config,
    check_reward_arguments,
    check_tokenizer_fits_model,
    context_length,
)


def read_prompt_rows(
    path: str | os.PathLike[str], prompt_field: str, messages_field: str | None = None
) -> list[dict[str, Any]]:
    """Rows of a JSONL or Parquet file; every row must have a non-empty string ``prompt_field``,
    or with ``messages_field`` a conversation there (``rlfleet.common.chat.checked_messages``)."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"dataset.path: {path} is a directory; name a .jsonl or .parquet file")
    if not path.is_file():
        raise ConfigError(f"dataset.path: no such file: {path}")
    if path.suffix == ".parquet":
        try:
            rows = pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise ConfigError(
                f"dataset.path: {path} is not a Parquet file pyarrow can read ({one_line(exc)})"
            ) from exc
    elif path.suffix in (".jsonl", ".json"):
        rows = [_json_row(path, n, line) for n, line in _numbered_lines(path)]
    else:
        raise ConfigError(f"dataset.path: {path} is neither .jsonl nor .parquet")
    if not rows:
        raise ConfigError(f"dataset.path: {path} has no rows")
    _check_values_travel(rows, path)
    if messages_field is None:
        _check_text_prompts(rows, path, prompt_field)
    else:
        _check_conversations(rows, path, messages_field)
    return rows


def _check_values_travel(rows: list[dict[str, Any]], path: Path) -> None:
    """Every field of every row must be able to travel with its prompt: as text (the prompt,
    UTF-8 encoded into Arrow) or in the JSON metadata (the other fields). A lone surrogate
    (``"\\ud800"`` in a JSON file) or a binary Parquet column would otherwise fail in the
    tokenizer or in the first batch, after Ray started."""
    for index, row in enumerate(rows):
        for field, value in row.items():
            problem = _travel_problem(value)
            if problem:
                raise ConfigError(
                    f"dataset.path: row {index} of {path}, field {field!r}: {problem}; fix the "
                    "row or drop it"
                )


def _travel_problem(value: Any) -> str | None:
    """Why ``value`` cannot travel as JSON text (None when it can)."""

    def refuse(unserializable: Any) -> None:
        raise TypeError(unserializable)

    try:
        json.dumps(value, ensure_ascii=False, default=refuse).encode("utf-8")
    except TypeError as exc:
        bad = exc.args[0] if exc.args else value
        if isinstance(bad, bytes | bytearray):
            return (
                f"binary data ({bad[:20]!r}), not text: store it as a string column "
                "(decode it, e.g. .decode('utf-8'))"
            )
        return f"a {type(bad).__name__} value ({bad!r:.40}), which JSON cannot hold"
    except UnicodeEncodeError as exc:
        text = exc.object
        return (
            f"text with a lone surrogate ({text[exc.start : exc.end]!r} near "
            f"{text[max(0, exc.start - 10) : exc.end + 10]!r}), which is not valid Unicode"
        )
    return None


def _check_text_prompts(rows: list[dict[str, Any]], path: Path, field: str) -> None:
    for index, row in enumerate(rows):
        prompt = row.get(field)
        if not isinstance(prompt, str) or not prompt:
            raise ConfigError(
                f"dataset.prompt_field: row {index} of {path} has no non-empty string "
                f"{field!r} (got {prompt!r})"
            )


def _check_conversations(rows: list[dict[str, Any]], path: Path, field: str) -> None:
    """Each row's ``field`` is a conversation, and no other field is named like the metadata
    key the conversation travels under."""
    for index, row in enumerate(rows):
        where = f"dataset.messages_field: row {index} of {path}, field {field!r}"
        try:
            checked_messages(row.get(field), where)
        except ChatFormatError as exc:
            raise ConfigError(str(exc)) from exc
        if field != MESSAGES_METADATA_KEY and MESSAGES_METADATA_KEY in row:
            raise ConfigError(
                f"dataset.messages_field: row {index} of {path} has a field "
                f"{MESSAGES_METADATA_KEY!r} beside the conversations in {field!r}; reward "
                f"functions get the conversation as {MESSAGES_METADATA_KEY!r}, so rename that "
                "field"
            )


def _numbered_lines(path: Path) -> list[tuple[int, str]]:
    data = path.read_bytes()
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"dataset.path: {path} line {line} is not UTF-8 "
            f"(byte {data[exc.start : exc.start + 1]!r}: {exc.reason}); save the file as UTF-8"
        ) from exc
    return [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]


def _json_row(path: Path, line_number: int, line: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"dataset.path: {path} line {line_number}: {exc}") from exc
    if not isinstance(row, dict):
        raise ConfigError(f"dataset.path: {path} line {line_number} is not a JSON object")
    return row


class PromptDataset:
    """Dataset rows behind a cursor; each epoch is a fresh permutation seeded by (seed, epoch)."""

    def __init__(self, rows: list[dict[str, Any]], shuffle: bool, seed: int) -> None:
        self.rows = rows
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.offset = 0
        self._order = self._epoch_order(0)

    def take(self, n: int) -> list[tuple[int, dict[str, Any]]]:
        """The next ``n`` ``(row index, row)`` pairs, wrapping into the next epoch."""
        taken = []
        while len(taken) < n:
            if self.offset == len(self._order):
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            index = self._order[self.offset]
            taken.append((index, self.rows[index]))
            self.offset += 1
        return taken

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._order = self._epoch_order(self.epoch)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order


def load_tokenizer(config: JobConfig):
    """The model's tokenizer (its own code runs only with ``trust_remote_code``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(config.model, trust_remote_code=config.trust_remote_code)


def max_prompt_tokens(config: JobConfig) -> int:
    """The longest prompt that leaves room for the response (``generators.max_new_tokens``, or
    a multi-turn job's ``env.max_total_tokens``) in the context."""
    return context_length(config.model) - config.response_budget[1]


class PromptRenderer:
    """A dataset row's prompt text, its token ids, and the fields that travel with it as
    metadata: the text of ``field``, or with ``chat_template`` the conversation in ``field``
    (``system_prompt`` first unless it opens with its own) rendered by it, and then also in the
    metadata as ``messages``."""

    def __init__(
        self,
        field: str,
        encode: Callable[[str], list[int]],
        chat_template: Callable[[list[Message]], str] | None = None,
        system_prompt: str | None = None,
    ) -> None:
        self.field = field
        self.encode = encode
        self.chat_template = chat_template
        self.system_prompt = system_prompt

    @classmethod
    def from_config(cls, config: JobConfig, tokenizer: Any = None) -> PromptRenderer:
        """The job's rendering with the model's tokenizer (``tokenizer``, when loaded). A rendered
        conversation is encoded without the tokenizer's own special tokens: the template
        writes any BOS itself. A chat dataset and a tokenizer without a chat template is a
        ``ConfigError`` naming the model and the field."""
        dataset = config.dataset
        tokenizer = tokenizer or load_tokenizer(config)
        if dataset.messages_field is None:
            return cls(dataset.prompt_field, tokenizer.encode)
        try:
            check_chat_template(tokenizer, config.model, dataset.messages_field)
        except ChatFormatError as exc:
            raise ConfigError(str(exc)) from exc
        tools = tool_schemas_of(config.env)
        return cls(
            dataset.messages_field,
            lambda text: tokenizer.encode(text, add_special_tokens=False),
            lambda messages: render_chat(tokenizer, messages, tools),
            dataset.system_prompt,
        )

    def text(self, row: dict[str, Any]) -> str:
        if self.chat_template is None:
            return row[self.field]
        return self.chat_template(self.messages(row))

    def messages(self, row: dict[str, Any]) -> list[Message]:
        return with_system_prompt(row[self.field], self.system_prompt)

    def metadata(self, row: dict[str, Any]) -> dict[str, Any]:
        others = {key: value for key, value in row.items() if key != self.field}
        if self.chat_template is None:
            return others
        return {**others, MESSAGES_METADATA_KEY: self.messages(row)}


def check_prompt_lengths(
    config: JobConfig, rows: list[dict[str, Any]], renderer: PromptRenderer | None = None
) -> None:
    """Every prompt of the dataset must be 1..``max_prompt_tokens`` tokens long: checked here,
    before any actor starts, rather than when the cursor reaches its row (a resumed job would
    stop on the same row again)."""
    renderer = renderer or PromptRenderer.from_config(config)
    limit = max_prompt_tokens(config)
    for index, row in enumerate(rows):
        ids = renderer.encode(renderer.text(row))
        if not ids or len(ids) > limit:
            key, budget = config.response_budget
            raise ConfigError(
                f"dataset.path: row {index} of {config.dataset.path}: the prompt is {len(ids)} "
                f"tokens; it must be 1..{limit} (context {context_length(config.model)} minus "
                f"{key} {budget}): shorten or drop the row, or lower {key}"
            )


def checked_rows(config: JobConfig) -> list[dict[str, Any]]:
    """Every check that can run before an actor starts (``checks.check_config``, the model's
    tokenizer against its embedding, then the dataset's rows, the chat template when they are
    conversations, the metadata's field names and the prompt lengths); returns the dataset's
    rows."""
    check_config(config)
    tokenizer = load_tokenizer(config)
    check_tokenizer_fits_model("model", config.model, tokenizer)
    dataset = config.dataset
    rows = read_prompt_rows(dataset.path, dataset.prompt_field, dataset.messages_field)
    renderer = PromptRenderer.from_config(config, tokenizer)
    check_reward_arguments(config, {name for row in rows for name in renderer.metadata(row)})
    check_prompt_lengths(config, rows, renderer)
    return rows


class PromptBatches:
    """The prompt batches of a job: rows from the dataset cursor, rendered and tokenized by
    ``renderer`` and at most ``max_prompt_tokens`` long, each given a rollout id never given
    before.

    ``state()`` (the cursor and the next rollout id) is what a checkpoint saves, so that a
    resumed job takes the same batches with the same ids."""

    def __init__(
        self, dataset: PromptDataset, renderer: PromptRenderer, max_prompt_tokens: int
    ) -> None:
        self.dataset = dataset
        self.renderer = renderer
        self.max_prompt_tokens = max_prompt_tokens
        self.next_rollout_id = 0

    @classmethod
    def from_config(cls, config: JobConfig, rows: list[dict[str, Any]]) -> PromptBatches:
        """Batches of ``rows`` rendered with the model's tokenizer; a prompt leaves room for
        ``generators.max_new_tokens`` in the model's context."""
        return cls(
            PromptDataset(rows, config.dataset.shuffle, config.seed),
            PromptRenderer.from_config(config),
            max_prompt_tokens(config),
        )

    def next_batch(self, prompts: int, samples_per_prompt: int = 1) -> pa.RecordBatch:
        """The next ``prompts`` prompts, each ``samples_per_prompt`` times, as a
        ``common.schema.prompt_batch``: every sample has its own rollout id (and so its own
        sampling seed), the samples of a prompt share a group id, the rollout id of their first
        (unique across the job and restored with ``state()``). The rows' other fields (and a
        chat row's conversation as ``messages``) travel as metadata."""
        taken = self.dataset.take(prompts)
        first = self.next_rollout_id
        self.next_rollout_id += len(taken) * samples_per_prompt
        ids = list(range(first, self.next_rollout_id))
        group_ids = [rollout_id - (rollout_id - first) % samples_per_prompt for rollout_id in ids]
        texts = [self.renderer.text(row) for _, row in taken]
        prompt_ids = [
            self.tokenize(index, text) for (index, _), text in zip(taken, texts, strict=True)
        ]
        metadata = [self.renderer.metadata(row) for _, row in taken]

        def each_sample(per_prompt: list[Any]) -> list[Any]:
            return [item for item in per_prompt for _ in range(samples_per_prompt)]

        return prompt_batch(
            ids, each_sample(texts), each_sample(prompt_ids), each_sample(metadata), group_ids
        )

    def tokenize(self, row_index: int, prompt: str) -> list[int]:
        ids = self.renderer.encode(prompt)
        if not ids or len(ids) > self.max_prompt_tokens:
            raise ValueError(
                f"dataset row {row_index}: prompt is {len(ids)} tokens; it must be 1.."
                f"{self.max_prompt_tokens} (context length minus generators.max_new_tokens)"
            )
        return ids

    def state(self) -> dict[str, Any]:
        return {"dataset": self.dataset.state(), "next_rollout_id": self.next_rollout_id}

    def load_state(self, state: dict[str, Any]) -> None:
        self.dataset.load_state(state["dataset"])
        self.next_rollout_id = state["next_rollout_id"]

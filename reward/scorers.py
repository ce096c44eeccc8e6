"""Scorers: one interface over the three reward sources of a job config.

``make_scorer(config)`` turns ``reward.function`` (a Python reward function), ``reward.model``
(a sequence-classification directory) or ``reward.url`` (a remote HTTP scorer) into a
``Scorer``. Every scorer's output is checked: one finite number per sample, or a
``RewardError`` naming the sample index and the reward source.
"""

from __future__ import annotations

import json
import math
import numbers
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from typing import Any

from rlfleet.common.config import RewardConfig
from rlfleet.reward.functions import load_function


class RewardError(RuntimeError):
    """A reward source failed or gave bad scores; ``indices`` are the samples concerned."""

    def __init__(self, message: str, indices: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.indices = tuple(indices)

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.args[0], self.indices)


class RewardTimeoutError(RewardError, TimeoutError):
    """A reward source did not answer in time."""


def check_scores(scores: Any, count: int, source: str) -> list[float]:
    """``scores`` (a list, numpy array...) as floats if it is ``count`` finite numbers, else a
    ``RewardError``."""
    if isinstance(scores, (str, bytes, Mapping)) or not isinstance(scores, Collection):
        raise RewardError(f"{source} returned a {type(scores).__name__}, not a list of scores")
    scores = list(scores)
    if len(scores) != count:
        raise RewardError(f"{source} returned {len(scores)} scores for {count} samples")
    checked = []
    for index, score in enumerate(scores):
        if isinstance(score, bool) or not isinstance(score, numbers.Real):
            raise RewardError(
                f"{source} returned {score!r} ({type(score).__name__}) for sample {index}, "
                "not a number",
                [index],
            )
        if not math.isfinite(score):
            raise RewardError(f"{source} returned {score} for sample {index}", [index])
        checked.append(float(score))
    return checked


class Scorer(ABC):
    """Scores (prompt, response) pairs; ``metadata`` is each sample's extra dataset fields."""

    source: str
    """What the scores come from, for error messages, e.g. ``"reward url 'http://...'"``."""

    def score(
        self, prompts: Sequence[str], responses: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> list[float]:
        if not len(prompts) == len(responses) == len(metadata):
            raise ValueError(
                f"{self.source}: prompts, responses and metadata differ in length: "
                f"{len(prompts)}, {len(responses)}, {len(metadata)}"
            )
        if not prompts:
            return []
        return check_scores(
            self._score(list(prompts), list(responses), list(metadata)), len(prompts), self.source
        )

    @abstractmethod
    def _score(
        self, prompts: list[str], responses: list[str], metadata: list[dict[str, Any]]
    ) -> Any:
        """The raw scores; ``score`` checks them."""


def metadata_columns(metadata: Sequence[dict[str, Any]]) -> dict[str, list[Any]]:
    """Per-sample dicts as one list per field, ``None`` where a sample lacks the field."""
    names = dict.fromkeys(name for row in metadata for name in row)
    return {name: [row.get(name) for row in metadata] for name in names}


class FunctionScorer(Scorer):
    """A reward function ``"module:function"`` called with dataset fields and config kwargs.

    When a call over the batch raises, each sample is scored alone to name the first one that
    fails (the batch's samples when none fails alone); reward functions are pure functions of
    their inputs, so the retry only costs time on the error path.
    """

    def __init__(self, spec: str, kwargs: dict[str, Any] | None = None) -> None:
        self.function = load_function(spec)
        self.kwargs = dict(kwargs or {})
        self.source = f"reward function {spec!r}"

    def _score(self, prompts, responses, metadata):
        columns = metadata_columns(metadata)
        clashing = sorted(set(columns) & {"prompts", "responses", *self.kwargs})
        if clashing:
            raise ValueError(
                f"{self.source}: dataset fields {clashing} clash with the arguments prompts, "
                "responses or reward.kwargs of the same name"
            )
        try:
            return self.function(prompts, responses, **columns, **self.kwargs)
        except Exception as exc:
            index = self._first_failing_sample(prompts, responses, columns)
            indices = range(len(prompts)) if index is None else [index]
            raise RewardError(f"{self.source} raised {type(exc).__name__}: {exc}", indices) from exc

    def _first_failing_sample(
        self, prompts: list[str], responses: list[str], columns: dict[str, list[Any]]
    ) -> int | None:
        for index in range(len(prompts)):
            one = slice(index, index + 1)
            sample_columns = {name: values[one] for name, values in columns.items()}
            try:
                self.function(prompts[one], responses[one], **sample_columns, **self.kwargs)
            except Exception:
                return index
        return None


class RewardModelScorer(Scorer):
    """A sequence classifier's logit for ``prompt + response``, batched, float32, no grad.

    The score is the single logit of a one-label model, else the logit of ``label`` (a name from
    the model's ``id2label`` or an index), by default the label named "positive" in any case.
    Texts are right-padded and truncated from the left, so the classifier always sees the
    response's end.
    """

    def __init__(
        self,
        model_dir: str,
        *,
        label: str | int | None = None,
        batch_size: int = 16,
        max_length: int | None = None,
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.source = f"reward model {model_dir!r}"
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, dtype=torch.float32
        ).to(self.device)
        self.model.eval()
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.tokenizer.padding_side = "right"
        self.tokenizer.truncation_side = "left"
        self.label_index = self._label_index(label)
        self.batch_size = batch_size
        self.max_length = max_length or getattr(self.model.config, "max_position_embeddings", None)

    def _label_index(self, label: str | int | None) -> int:
        id2label = {int(i): name for i, name in self.model.config.id2label.items()}
        if self.model.config.num_labels == 1 and label is None:
            return 0
        if isinstance(label, int):
            if label not in id2label:
                raise ValueError(f"{self.source}: label index {label} not in {id2label}")
            return label
        wanted = "positive" if label is None else label
        matches = [i for i, name in id2label.items() if name.casefold() == wanted.casefold()]
        if not matches:
            raise ValueError(
                f"{self.source}: no label {wanted!r} among {sorted(id2label.values())}; "
                "set reward.kwargs.label"
            )
        return matches[0]

    def _score(self, prompts, responses, metadata):
        import torch

        texts = [prompt + response for prompt, response in zip(prompts, responses, strict=True)]
        scores: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                encoded = self.tokenizer(
                    texts[start : start + self.batch_size],
                    return_tensors="pt",
                    padding=True,
                    truncation=self.max_length is not None,
                    max_length=self.max_length,
                ).to(self.device)
                logits = self.model(**encoded).logits.float()
                scores.extend(logits[:, self.label_index].tolist())
        return scores


class RemoteScorer(Scorer):
    """An HTTP endpoint: POST ``{"prompts", "responses", "metadata"}``, answer ``{"scores"}``."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.source = f"reward url {url!r}"

    def _score(self, prompts, responses, metadata):
        body = json.dumps({"prompts": prompts, "responses": responses, "metadata": metadata})
        request = urllib.request.Request(
            self.url,
            data=body.encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        raw = self._post(request)
        try:
            answer = json.loads(raw)
        except ValueError as exc:
            raise RewardError(f"{self.source} answered with invalid JSON: {raw[:200]!r}") from exc
        if not isinstance(answer, dict) or "scores" not in answer:
            raise RewardError(f"{self.source} answered without a 'scores' key: {raw[:200]!r}")
        return answer["scores"]

    def _post(self, request: urllib.request.Request) -> bytes:
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:200]
            raise RewardError(f"{self.source} answered HTTP {exc.code}: {detail!r}") from exc
        except TimeoutError as exc:
            raise RewardTimeoutError(
                f"{self.source} did not answer within {self.timeout_s} s"
            ) from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise RewardTimeoutError(
                    f"{self.source} did not answer within {self.timeout_s} s"
                ) from exc
            raise RewardError(f"{self.source} is unreachable: {exc.reason}") from exc


def make_scorer(config: RewardConfig) -> Scorer:
    """The scorer for the one reward source the config names."""
    if config.function:
        return FunctionScorer(config.function, config.kwargs)
    if config.model:
        return RewardModelScorer(config.model, **config.kwargs)
    if config.kwargs:
        raise ValueError(f"reward.kwargs {sorted(config.kwargs)} are not used by a reward url")
    return RemoteScorer(config.url, config.timeout_s)

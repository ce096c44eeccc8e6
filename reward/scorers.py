"""Scorers: one interface over the three reward sources of a job config.

``make_scorer(config)`` turns ``reward.function`` (a Python reward function), ``reward.model``
(a sequence-classification directory) or ``reward.url`` (a remote HTTP scorer) into a
``Scorer``, and ``reward.components`` (named, weighted sources of those three kinds) into a
``ComponentsScorer``. Every scorer's output is checked: one finite number per sample of at most
``MAX_ABS_SCORE`` in magnitude, or a ``RewardError`` naming the sample index and the reward
source.

A reward function runs in a worker process of its scorer (``rlfleet.reward.worker``), so that
``reward.timeout_s`` can cut even a call stuck in C code that holds the GIL: the worker is
killed and replaced, and the call is a ``RewardTimeoutError``.
"""

from __future__ import annotations

import base64
import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from rlfleet.common.config import RewardComponent, RewardConfig
from rlfleet.common.secrets import masked_url
from rlfleet.reward.worker import (
    BadScores,
    FunctionRaised,
    RewardWorker,
    WorkerDied,
    WorkerTimeout,
    plain_scores,
)


class RewardError(RuntimeError):
    """A reward source failed or gave bad scores; ``indices`` are the samples concerned."""

    def __init__(self, message: str, indices: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.indices = tuple(indices)

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (self.args[0], self.indices)


class RewardTimeoutError(RewardError, TimeoutError):
    """A reward source did not answer in time."""


TRANSIENT_HTTP_STATUS = (502, 503, 504)
"""Answers of a busy or restarting server: retried with backoff until ``timeout_s`` runs out."""
FIRST_RETRY_DELAY_S = 0.1

MAX_ABS_SCORE = 1e6
"""The largest score magnitude accepted from any reward source (a component, and the weighted
sum of components, included). Rewards are meant to be of order 1: a score beyond this bound
would overflow the policy loss and surface later as a NaN loss far from its cause, so it is an
error naming the reward source and the sample; scale the reward down (or change this bound)."""


def check_scores(scores: Any, count: int, source: str) -> list[float]:
    """``scores`` (a list, numpy array...) as floats if it is ``count`` finite numbers of at
    most ``MAX_ABS_SCORE`` in magnitude, else a ``RewardError``."""
    try:
        checked = plain_scores(scores, count)
    except BadScores as exc:
        raise RewardError(f"{source} {exc.detail}", exc.indices) from None
    for index, score in enumerate(checked):
        if abs(score) > MAX_ABS_SCORE:
            raise RewardError(
                f"{source} returned {score!r} for sample {index}, beyond the bound "
                f"|score| <= {MAX_ABS_SCORE:g} (rlfleet.reward.scorers.MAX_ABS_SCORE); "
                "scale the reward down",
                [index],
            )
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

    def score_parts(
        self, prompts: Sequence[str], responses: Sequence[str], metadata: Sequence[dict[str, Any]]
    ) -> tuple[list[float], dict[str, list[float]]]:
        """The scores, and each named component's own scores (none for a single source)."""
        return self.score(prompts, responses, metadata), {}

    def close(self) -> None:  # noqa: B027 (most scorers hold nothing to release)
        """Release what the scorer holds (a reward function's worker process)."""

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

    The function runs in a warm worker process (``rlfleet.reward.worker.RewardWorker``) started
    here, once; ``reward.timeout_s`` bounds each call, and a call past it kills the worker and
    starts a fresh one for the next call. When a call over the batch raises, each sample is
    scored alone to name the first one that fails (the batch's samples when none fails alone);
    reward functions are pure functions of their inputs, so the retry only costs time on the
    error path.
    """

    def __init__(
        self, spec: str, kwargs: dict[str, Any] | None = None, timeout_s: float = 30.0
    ) -> None:
        """Start the worker and load the function in it: a ``ValueError`` naming ``spec`` when
        it cannot be loaded."""
        self.spec = spec
        self.kwargs = dict(kwargs or {})
        self.timeout_s = timeout_s
        self.source = f"reward function {spec!r}"
        try:
            self.worker = RewardWorker(spec, self.kwargs)
        except (WorkerTimeout, WorkerDied) as exc:
            raise self._worker_error(exc) from None

    def close(self) -> None:
        self.worker.close()

    def _score(self, prompts, responses, metadata):
        columns = metadata_columns(metadata)
        clashing = sorted(set(columns) & {"prompts", "responses", *self.kwargs})
        if clashing:
            raise ValueError(
                f"{self.source}: dataset fields {clashing} clash with the arguments prompts, "
                "responses or reward.kwargs of the same name"
            )
        try:
            return self._call(prompts, responses, columns)
        except FunctionRaised as exc:
            index = self._first_failing_sample(prompts, responses, columns)
            indices = range(len(prompts)) if index is None else [index]
            raise RewardError(f"{self.source} raised {exc}", indices) from exc

    def _first_failing_sample(
        self, prompts: list[str], responses: list[str], columns: dict[str, list[Any]]
    ) -> int | None:
        for index in range(len(prompts)):
            one = slice(index, index + 1)
            sample_columns = {name: values[one] for name, values in columns.items()}
            try:
                self.worker.call(prompts[one], responses[one], sample_columns, self.timeout_s)
            except FunctionRaised:
                return index
            except BadScores:
                continue
            except (WorkerTimeout, WorkerDied):
                return None
        return None

    def _call(
        self, prompts: list[str], responses: list[str], columns: dict[str, list[Any]]
    ) -> list[float]:
        """The function's scores on these samples, cut off after ``reward.timeout_s``:
        ``FunctionRaised`` when it raised, else a ``RewardError``."""
        try:
            return self.worker.call(prompts, responses, columns, self.timeout_s)
        except BadScores as exc:
            raise RewardError(f"{self.source} {exc.detail}", exc.indices) from None
        except (WorkerTimeout, WorkerDied) as exc:
            raise self._worker_error(exc) from None

    def _worker_error(self, exc: WorkerTimeout | WorkerDied) -> RewardError:
        if isinstance(exc, WorkerDied):
            return RewardError(f"{self.source} did not return: {exc}; a new one was started")
        if exc.loading:
            return RewardTimeoutError(f"{self.source}: {exc}")
        return RewardTimeoutError(
            f"{self.source} did not return within reward.timeout_s={self.timeout_s:g} s; "
            "its worker process was killed and a new one started"
        )


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
        trust_remote_code: bool = False,
    ) -> None:
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.source = f"reward model {model_dir!r}"
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(
            model_dir, trust_remote_code=trust_remote_code
        )
        self.model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, dtype=torch.float32, trust_remote_code=trust_remote_code
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
    """An HTTP endpoint: POST ``{"prompts", "responses", "metadata"}``, answer ``{"scores"}``.

    ``user:password@`` in the URL is sent as HTTP basic authentication; messages name the URL
    with its credentials and query values masked. Connection failures and 502/503/504 answers
    are retried with exponential backoff until ``timeout_s`` (the whole call's budget) runs out.
    """

    def __init__(self, url: str, timeout_s: float) -> None:
        parts = urllib.parse.urlsplit(url)
        self.url = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
        self.headers = {"Content-Type": "application/json"}
        if parts.username or parts.password:
            userinfo = f"{urllib.parse.unquote(parts.username or '')}:"
            userinfo += urllib.parse.unquote(parts.password or "")
            self.headers["Authorization"] = "Basic " + base64.b64encode(userinfo.encode()).decode()
        self.timeout_s = timeout_s
        self.source = f"reward url {masked_url(url)!r}"

    def _score(self, prompts, responses, metadata):
        body = json.dumps({"prompts": prompts, "responses": responses, "metadata": metadata})
        raw = self._post_with_retries(body.encode())
        try:
            answer = json.loads(raw)
        except ValueError as exc:
            raise RewardError(f"{self.source} answered with invalid JSON: {raw[:200]!r}") from exc
        if not isinstance(answer, dict) or "scores" not in answer:
            raise RewardError(f"{self.source} answered without a 'scores' key: {raw[:200]!r}")
        return answer["scores"]

    def _post_with_retries(self, body: bytes) -> bytes:
        deadline = time.monotonic() + self.timeout_s
        delay = FIRST_RETRY_DELAY_S
        attempts = 0
        while True:
            attempts += 1
            try:
                return self._post(body, deadline - time.monotonic())
            except _TransientError as exc:
                if time.monotonic() + delay >= deadline:
                    raise RewardError(
                        f"{self.source} {exc} ({attempts} attempts in {self.timeout_s:g} s, "
                        "reward.timeout_s)"
                    ) from exc.__cause__
                time.sleep(delay)
                delay *= 2

    def _post(self, body: bytes, timeout_s: float) -> bytes:
        request = urllib.request.Request(self.url, data=body, headers=self.headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=max(timeout_s, 0.001)) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:200]
            message = f"answered HTTP {exc.code}: {detail!r}"
            if exc.code in TRANSIENT_HTTP_STATUS:
                raise _TransientError(message) from exc
            raise RewardError(f"{self.source} {message}") from exc
        except TimeoutError as exc:
            raise self._timeout() from exc
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise self._timeout() from exc
            raise _TransientError(f"is unreachable: {exc.reason}") from exc
        except ConnectionError as exc:
            raise _TransientError(f"dropped the connection: {exc}") from exc

    def _timeout(self) -> RewardTimeoutError:
        return RewardTimeoutError(f"{self.source} did not answer within {self.timeout_s} s")


class _TransientError(Exception):
    """A failure worth retrying (the message says what happened, without the source)."""


class ComponentsScorer(Scorer):
    """A reward of named components: the score is ``sum(weight * component score)``.

    Each component is a scorer of its own (a function or url bounded by ``reward.timeout_s``);
    its error is restated with the component's name, keeping the samples it names.
    """

    def __init__(self, components: Sequence[tuple[str, float, Scorer]]) -> None:
        self.components = list(components)
        self.source = "reward components " + ", ".join(repr(name) for name, _, _ in components)

    def score_parts(self, prompts, responses, metadata):
        parts = {
            name: self._score_component(name, scorer, prompts, responses, metadata)
            for name, _, scorer in self.components
        }
        weighted_sums = [
            math.fsum(weight * parts[name][index] for name, weight, _ in self.components)
            for index in range(len(prompts))
        ]
        return check_scores(weighted_sums, len(prompts), self.source), parts

    def _score(self, prompts, responses, metadata):
        return self.score_parts(prompts, responses, metadata)[0]

    def close(self) -> None:
        for _, _, scorer in self.components:
            scorer.close()

    @staticmethod
    def _score_component(
        name: str,
        scorer: Scorer,
        prompts: Sequence[str],
        responses: Sequence[str],
        metadata: Sequence[dict[str, Any]],
    ) -> list[float]:
        try:
            return scorer.score(prompts, responses, metadata)
        except RewardError as exc:
            raise type(exc)(f"reward component {name!r}: {exc}", exc.indices) from exc
        except Exception as exc:
            raise RewardError(
                f"reward component {name!r}: {scorer.source} raised {type(exc).__name__}: {exc}"
            ) from exc


def make_source_scorer(
    source: RewardConfig | RewardComponent, timeout_s: float, trust_remote_code: bool = False
) -> Scorer:
    """The scorer for the one function, model or url that ``source`` names."""
    if source.function:
        return FunctionScorer(source.function, source.kwargs, timeout_s)
    if source.model:
        return RewardModelScorer(source.model, **source.kwargs, trust_remote_code=trust_remote_code)
    if source.kwargs:
        raise ValueError(f"reward.kwargs {sorted(source.kwargs)} are not used by a reward url")
    return RemoteScorer(source.url, timeout_s)


def make_scorer(config: RewardConfig, trust_remote_code: bool = False) -> Scorer:
    """The scorer for the config's reward source or components (a reward model's own code runs
    only with ``trust_remote_code``)."""
    if config.components:
        return ComponentsScorer(
            [
                (c.name, c.weight, make_source_scorer(c, config.timeout_s, trust_remote_code))
                for c in config.components
            ]
        )
    return make_source_scorer(config, config.timeout_s, trust_remote_code)

"""Experiment trackers: where training statistics go besides Prometheus.

Every tracker takes ``log(values, step)`` with accelerate's tracker convention: ``values`` maps a
name to a number (a scalar), an array or tensor of several numbers (a histogram), a string (a
text) or a :class:`Table` (rows of samples). A local JSONL file takes the scalars, texts and
tables of each call as one line; TensorBoard (``torch.utils.tensorboard``) and W&B take all of
it. W&B runs offline unless told otherwise, so no login or network is needed; ``wandb sync``
uploads a run later. The ``tensorboard`` and ``wandb`` packages are the ``trackers`` extra.

The config a tracker records is masked first (``masked_config``: secrets by key name, URLs'
credentials and query values), and so is the command line W&B records: a tracker's files hold
no credential of the config.

``rewind(step)`` says that the steps from ``step`` on are logged again (a job trained them again
from a checkpoint): the JSONL file drops its lines from ``step`` on, TensorBoard gets a restart
marker at ``step``, W&B can take nothing back (see ``WandbTracker.rewind``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from rlfleet.common.secrets import masked_argument, masked_config

TRACKER_NAMES = ("tensorboard", "wandb")


@dataclass(frozen=True)
class Table:
    """Rows of samples under named columns, e.g. query, response and reward per sample."""

    columns: list[str]
    rows: list[list[Any]]

    def to_markdown(self) -> str:
        def cell(value: Any) -> str:
            return str(value).replace("|", "\\|").replace("\n", " ")

        lines = [
            "| " + " | ".join(self.columns) + " |",
            "|" + "---|" * len(self.columns),
            *("| " + " | ".join(cell(v) for v in row) + " |" for row in self.rows),
        ]
        return "\n".join(lines)


@dataclass
class SplitValues:
    """``log``'s values sorted by kind."""

    scalars: dict[str, float]
    histograms: dict[str, np.ndarray]
    texts: dict[str, str]
    tables: dict[str, Table]


def split_values(values: Mapping[str, Any]) -> SplitValues:
    """Sort values into scalars (one number), histograms (several), texts and tables.

    Tensors are read through ``detach().cpu().float()`` (so bfloat16 works) without importing
    torch here; an empty array is dropped; anything else is a ``TypeError`` naming the key.
    """
    split = SplitValues({}, {}, {}, {})
    for name, value in values.items():
        if isinstance(value, Table):
            split.tables[name] = value
        elif isinstance(value, str):
            split.texts[name] = value
        else:
            if hasattr(value, "detach"):
                value = value.detach().cpu().float().numpy()
            try:
                array = np.asarray(value, dtype=np.float64)
            except (TypeError, ValueError) as error:
                raise TypeError(
                    f"cannot log {name!r}: a {type(value).__name__} is not a number, an array "
                    "of numbers, a string or a Table"
                ) from error
            if array.size == 1:
                split.scalars[name] = float(array.reshape(()))
            elif array.size > 1:
                split.histograms[name] = array.reshape(-1)
    return split


def plain(value: Any) -> Any:
    """A table cell as a JSON-able Python value: tensors and NumPy values via ``tolist``."""
    if hasattr(value, "detach"):
        value = value.detach().cpu()
    return value.tolist() if hasattr(value, "tolist") else value


class Tracker(Protocol):
    name: str

    def log(self, values: Mapping[str, Any], step: int) -> None: ...

    def rewind(self, step: int) -> None: ...

    def close(self) -> None: ...


class JsonlTracker:
    """Appends one JSON line per ``log`` call: ``step``, ``time`` (Unix seconds), the scalars
    and texts by name, and each table as ``{"columns": [...], "rows": [[...], ...]}``.
    Histograms are left out (TensorBoard and W&B keep them)."""

    name = "jsonl"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def log(self, values: Mapping[str, Any], step: int) -> None:
        split = split_values(values)
        record: dict[str, Any] = {"step": step, "time": time.time()}
        record.update(split.scalars)
        record.update(split.texts)
        for name, table in split.tables.items():
            record[name] = {"columns": table.columns, "rows": table.rows}
        with self.path.open("a") as out:
            out.write(json.dumps(record) + "\n")

    def rewind(self, step: int) -> None:
        """Drops the lines of ``step`` and after."""
        if not self.path.exists():
            return
        lines = self.path.read_text().splitlines(keepends=True)
        self.path.write_text("".join(line for line in lines if json.loads(line)["step"] < step))

    def close(self) -> None:
        """Nothing to release: each ``log`` opens, appends and closes the file."""


class TensorBoardTracker:
    """Event files in ``logdir``: scalars, histograms, texts, and tables as Markdown texts.

    ``config`` is written once, masked (``masked_config``), as a Markdown table under the text
    tag ``config``.
    """

    name = "tensorboard"

    def __init__(
        self, logdir: str | os.PathLike[str], config: Mapping[str, Any] | None = None
    ) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = Path(logdir)
        self.writer = SummaryWriter(log_dir=str(self.logdir))
        if config:
            rows = [[key, value] for key, value in masked_config(config).items()]
            self.writer.add_text("config", Table(["key", "value"], rows).to_markdown())
            self.writer.flush()

    def log(self, values: Mapping[str, Any], step: int) -> None:
        split = split_values(values)
        for name, scalar in split.scalars.items():
            self.writer.add_scalar(name, scalar, global_step=step)
        for name, histogram in split.histograms.items():
            self.writer.add_histogram(name, histogram, global_step=step)
        for name, text in split.texts.items():
            self.writer.add_text(name, text, global_step=step)
        for name, table in split.tables.items():
            self.writer.add_text(name, table.to_markdown(), global_step=step)
        self.writer.flush()

    def rewind(self, step: int) -> None:
        """Writes a ``SessionLog.START`` event at ``step``: TensorBoard's event reader
        (``EventAccumulator``, which purges orphaned data by default) then discards what this
        logdir's earlier events logged at ``step`` and after, and shows the values logged again.
        A reader that ignores the marker shows both."""
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        start = Event(session_log=SessionLog(status=SessionLog.START))
        self.writer._get_file_writer().add_event(start, step=step, walltime=time.time())
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """A W&B run under ``directory/wandb/``; offline unless ``mode`` or ``WANDB_MODE`` says
    otherwise. A run the script already started with ``wandb.init`` is logged into instead.

    ``init_kwargs`` go to ``wandb.init`` (``name``, ``entity``, ``tags``, ...). The run's config
    is ``config`` masked (``masked_config``), and the command line it records (its metadata's
    ``args``) is masked too (``masked_argument``).
    """

    name = "wandb"

    def __init__(
        self,
        project: str,
        directory: str | os.PathLike[str],
        config: Mapping[str, Any] | None = None,
        mode: str | None = None,
        **init_kwargs: Any,
    ) -> None:
        import wandb

        self._wandb = wandb
        config = masked_config(config or {})
        if wandb.run is not None:
            self.run = wandb.run
            if config:
                self.run.config.update(config, allow_val_change=True)
        else:
            Path(directory).mkdir(parents=True, exist_ok=True)
            with masked_command_line():
                self.run = wandb.init(
                    project=project,
                    dir=str(directory),
                    config=config,
                    mode=mode or os.environ.get("WANDB_MODE", "offline"),
                    **init_kwargs,
                )

    def log(self, values: Mapping[str, Any], step: int) -> None:
        split = split_values(values)
        logged: dict[str, Any] = {**split.scalars, **split.texts}
        for name, histogram in split.histograms.items():
            logged[name] = self._wandb.Histogram(histogram)
        for name, table in split.tables.items():
            logged[name] = self._wandb.Table(columns=table.columns, rows=table.rows)
        self.run.log(logged, step=step)

    def rewind(self, step: int) -> None:
        """Nothing: a W&B run takes no step back. It ignores (with a warning) values logged at
        a step below its last one, so after a rewind within one run the steps logged again show
        from its last step on (a job resumed by a new driver opens a new run)."""

    def close(self) -> None:
        self.run.finish()


@contextmanager
def masked_command_line() -> Iterator[None]:
    """``sys.argv`` masked (``masked_argument``) while inside: W&B reads it at ``wandb.init``
    into the run's metadata (``--set reward.url=...`` would carry its credentials there)."""
    argv = sys.argv
    sys.argv = [masked_argument(argument) for argument in argv]
    try:
        yield
    finally:
        sys.argv = argv


class Trackers:
    """Several trackers as one: ``log`` goes to each, ``close`` closes each (once)."""

    def __init__(self, trackers: Sequence[Tracker]) -> None:
        self.trackers = list(trackers)

    def log(self, values: Mapping[str, Any], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(values, step)

    def rewind(self, step: int) -> None:
        for tracker in self.trackers:
            tracker.rewind(step)

    def get(self, name: str) -> Tracker:
        for tracker in self.trackers:
            if tracker.name == name:
                return tracker
        raise KeyError(f"no {name!r} tracker; open: {[t.name for t in self.trackers]}")

    def close(self) -> None:
        while self.trackers:
            self.trackers.pop().close()


def open_trackers(
    run_dir: str | os.PathLike[str],
    log_with: str | Sequence[str] | None = None,
    project: str = "rlfleet",
    config: Mapping[str, Any] | None = None,
    init_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
) -> Trackers:
    """``run_dir/stats.jsonl`` always, plus TensorBoard event files in ``run_dir`` and/or a W&B
    run in ``run_dir/wandb`` as ``log_with`` names them.

    ``init_kwargs`` is keyed by tracker name as in accelerate (``{"wandb": {"name": ...}}``);
    W&B's ``project`` is ``project`` unless its kwargs name one.
    """
    names = [log_with] if isinstance(log_with, str) else list(log_with or [])
    unknown = [name for name in names if name not in TRACKER_NAMES]
    if unknown:
        raise ValueError(f"unknown tracker(s) {unknown}; choose from {list(TRACKER_NAMES)}")
    init_kwargs = init_kwargs or {}
    run_dir = Path(run_dir)
    trackers: list[Tracker] = [JsonlTracker(run_dir / "stats.jsonl")]
    if "tensorboard" in names:
        trackers.append(TensorBoardTracker(run_dir, config))
    if "wandb" in names:
        wandb_kwargs = {"project": project, **init_kwargs.get("wandb", {})}
        trackers.append(WandbTracker(directory=run_dir, config=config, **wandb_kwargs))
    return Trackers(trackers)

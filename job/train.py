"""``rlfleet train --config job.yaml [--set a.b=c ...] [--resume-from URI|latest] [--verbose]``.

Every check of the config (and the one read of the dataset) happens before Ray starts, so a bad
config exits with status 2 and one line naming the key, without starting anything. A job that
fails once running exits with status 1 and one line (which actor, what to do); its traceback goes
to ``<output_dir>/error.log`` (and to stderr with ``--verbose``).

Running the same command again continues the job: with ``checkpoint.uri`` set (and
``checkpoint.resume: auto``, the default) the job resumes from the latest committed checkpoint
there, without flags, so a re-submitted Ray job or a retried KubeRay RayJob carries on where the
last attempt's checkpoint left it. That checkpoint must be this job's (same ``name``, algorithm
and model): another's exits with status 2 and one line saying whose it is, before Ray starts, as
does a ``--resume-from`` with no checkpoint there. A job whose checkpoint is already at its last
iteration says it is complete and exits 0. ``checkpoint.resume: never`` starts from the model
whatever ``checkpoint.uri`` holds.

One run at a time writes a job's ``output_dir`` and ``checkpoint.uri``: each gets a lease
(``job/lease.py``) once the config is checked, and a second run while the first lives exits
with status 2 and one line naming the owner (pid, host, start). The lease of a killed run is
taken over (at once on the same machine, once its heartbeat is stale elsewhere) and the job
resumes.

SIGTERM (a scheduler stopping the job) and Ctrl-C stop a running job cleanly: its actors are
stopped, its Prometheus discovery file is removed, one line says how to continue, and the exit
status is 128 + the signal's number (143, 130).

``RLFLEET_STARTUP_TRACE`` (common/startup_trace.py) records the start-up's milestones: the
checks, ``ray.init``, each actor's constructor, the first dispatch (bench/startup.py).
"""

from __future__ import annotations

import argparse
import contextlib
import re
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from rlfleet.checkpoint import load as checkpoint
from rlfleet.checkpoint.identity import CheckpointIdentity
from rlfleet.checkpoint.shards import CheckpointError
from rlfleet.common import startup_trace, waits
from rlfleet.common.config import JobConfig
from rlfleet.common.config_file import load_job_config
from rlfleet.common.errors import error_line, first_line, one_line, shown
from rlfleet.common.start_errors import ActorCannotStart
from rlfleet.job.checks import ConfigError
from rlfleet.job.cluster import RayUnreachable, actor_start_milestones, init_ray
from rlfleet.job.data import checked_rows
from rlfleet.job.evaluation import Evaluation
from rlfleet.job.lease import JobLeases, LeaseError
from rlfleet.job.loop import DispatchHook, JobResult, TrainingJob


@dataclass(frozen=True)
class ResumePoint:
    """The committed checkpoint of this job that a run continues from."""

    uri: str
    iteration: int
    """The iterations it holds (its step: one policy version per iteration)."""

    def finished(self, config: JobConfig) -> bool:
        return self.iteration >= config.iterations


def find_resume_point(config: JobConfig, resume_from: str | None) -> ResumePoint | None:
    """Where the job continues: the checkpoint ``resume_from`` names (a URI, or ``"latest"``
    under ``checkpoint.uri``); without it the latest committed one under ``checkpoint.uri``
    unless ``checkpoint.resume`` is ``never``; None: from the model. A ``CheckpointError`` when
    the checkpoint named is missing or belongs to another job, algorithm or model."""
    uri = resolve_resume(config, resume_from)
    if uri is None:
        if config.checkpoint.uri is None or config.checkpoint.resume == "never":
            return None
        if checkpoint.latest_checkpoint(config.checkpoint.uri, config=config.checkpoint) is None:
            return None
        uri = config.checkpoint.uri
    resolved = checkpoint.resolve_resume(
        uri, expect=CheckpointIdentity.of_job(config), config=config.checkpoint
    )
    step_dir = resolved.rstrip("/").rpartition("/")[2]
    return ResumePoint(resolved, int(step_dir.removeprefix("step-")))


def run_job(
    config: JobConfig,
    resume_from: str | None = None,
    on_dispatch: DispatchHook | None = None,
    rows: list[dict[str, Any]] | None = None,
) -> JobResult:
    """Starts the actors on the connected Ray cluster and trains from where
    ``find_resume_point`` says (nothing, when that checkpoint finished the job);
    ``resume_from`` is a checkpoint URI, or ``"latest"`` under ``checkpoint.uri``. ``rows`` are
    the dataset's rows (read and checked here when not given)."""
    if rows is None:
        rows = checked_rows(config)
    start = find_resume_point(config, resume_from)
    if start is not None and start.finished(config):
        return JobResult(stats=[], consumed_rollout_ids=[], generator_restarts=0, reward_restarts=0)
    job = TrainingJob(config, rows, on_dispatch=on_dispatch)
    try:
        if start is not None:
            job.resume(start.uri)
        return job.train()
    finally:
        job.shutdown()


def resolve_resume(config: JobConfig, resume_from: str | None) -> str | None:
    """The checkpoint URI to resume from: ``resume_from`` itself, or for ``"latest"`` the
    ``checkpoint.uri`` (the learner loads the newest checkpoint under it)."""
    if resume_from != "latest":
        return resume_from
    if config.checkpoint.uri is None:
        raise ConfigError("checkpoint.uri: --resume-from latest needs a checkpoint URI")
    return config.checkpoint.uri


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="job config (YAML)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. generators.num_actors=4 (repeatable)",
    )
    parser.add_argument(
        "--resume-from",
        metavar="URI|latest",
        help="resume from a checkpoint URI, or the latest one under checkpoint.uri (which a "
        "run does by itself unless checkpoint.resume=never)",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="print the full traceback of an error (it always goes to <output_dir>/error.log)",
    )


def run(args: argparse.Namespace) -> int:
    """The ``rlfleet train`` command: 0 when the job finished (or had nothing left to do), 1
    when it failed while running, 2 for an invalid config, a checkpoint it cannot resume, or an
    ``output_dir`` or ``checkpoint.uri`` that another live run holds (job/lease.py: the leases
    are released however the command ends, short of SIGKILL)."""
    with JobLeases() as leases:
        return run_leased(args, leases)


def run_leased(args: argparse.Namespace, leases: JobLeases) -> int:
    """``run``, taking the job's leases once its config is checked (before the checkpoint it
    resumes from is read)."""
    try:
        config = load_job_config(args.config, args.overrides)
        rows = checked_rows(config)
        Evaluation.from_config(config)  # the eval prompts are checked before Ray starts too
        leases.acquire(config)
        start = find_resume_point(config, args.resume_from)
        startup_trace.mark("checks done")
    except LeaseError as exc:
        print(f"rlfleet train: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(
            f"rlfleet train: invalid job config {args.config}: {config_error_line(exc)}",
            file=sys.stderr,
        )
        return 2
    except CheckpointError as exc:
        print(f"rlfleet train: cannot resume: {one_line(exc)}", file=sys.stderr)
        return 2
    if start is not None:
        print(resume_line(config, start))
        if start.finished(config):
            return 0
    try:
        with stopped_by_signals() as reinstall:
            init_ray(config)
            startup_trace.mark("ray.init done")
            reinstall()  # ray.init put its own SIGTERM handler (sys.exit(15)) in place
            traced = {"on_dispatch": hook} if (hook := trace_dispatch()) else {}
            result = run_job(config, start.uri if start else None, rows=rows, **traced)
            trace_actor_starts(config)
    except JobStopped as stop:
        print(f"rlfleet train: stopped by {stop.name}; {again_hint(config)}", file=sys.stderr)
        return 128 + stop.signum
    except RayUnreachable as exc:
        print(f"rlfleet train: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - any failure of a running job becomes one line
        stop = stopped_by(exc)
        if stop is not None:  # a stop that a C extension turned into another error
            print(f"rlfleet train: stopped by {stop.name}; {again_hint(config)}", file=sys.stderr)
            return 128 + stop.signum
        log = write_error_log(Path(config.output_dir), exc)
        print(f"rlfleet train: {job_error_line(exc)}; {what_to_do(config, log)}", file=sys.stderr)
        if args.verbose:
            traceback.print_exception(exc, file=sys.stderr)
        return 1
    print(summary(config, result))
    return 0


def trace_dispatch() -> DispatchHook | None:
    """With ``RLFLEET_STARTUP_TRACE`` (common/startup_trace.py): a dispatch hook that marks the
    job's first dispatch of a batch to the generators (the first iteration starts); else None."""
    if not startup_trace.enabled():
        return None
    dispatched: list[str] = []

    def hook(kind: str, iteration: int, actors: list[Any]) -> None:
        if not dispatched:
            dispatched.append(kind)
            startup_trace.mark(f"first dispatch ({kind})")

    return hook


TIMELINE_WAIT_S = 10.0
"""How long the start-up trace waits for Ray's task events to show every actor's constructor
(Ray sends them in the background, about once a second: under load a look right after the job
missed some)."""


def trace_actor_starts(config: JobConfig) -> None:
    """With ``RLFLEET_STARTUP_TRACE``: marks when each actor's constructor began and ended (from
    Ray's task events, while Ray is still up), once the events of all the job's actors are in
    (at most ``TIMELINE_WAIT_S``)."""
    if not startup_trace.enabled():
        return
    expected = config.learner.num_ranks + config.generators.num_actors + config.reward.num_actors
    deadline = time.monotonic() + TIMELINE_WAIT_S
    milestones = actor_start_milestones()
    while sum("began" in m for _, m in milestones) < expected and time.monotonic() < deadline:
        time.sleep(0.5)
        milestones = actor_start_milestones()
    for at, milestone in milestones:
        startup_trace.mark(milestone, at)


def resume_line(config: JobConfig, start: ResumePoint) -> str:
    """What a run that starts from a checkpoint prints first."""
    if start.finished(config):
        return (
            f"job {config.name!r} is complete: checkpoint {start.uri} is at iteration "
            f"{start.iteration} of {config.iterations}; raise iterations to train further"
        )
    return (
        f"resuming job {config.name!r} from checkpoint {start.uri} (iteration {start.iteration} "
        f"of {config.iterations})"
    )


def summary(config: JobConfig, result: JobResult) -> str:
    """The closing line: this run's iterations and rollouts (not those of the runs it resumed),
    and its learner restarts."""
    trained = [line for line in result.stats if line["iteration"] > 0]  # line 0: eval at start
    if not trained:
        return f"nothing to do: the job's {config.iterations} iterations are done"
    first, last = trained[0], trained[-1]
    rollouts = sum(line["samples"] for line in trained)
    restarts = f", {result.learner_restarts} learner restarts" if result.learner_restarts else ""
    return (
        f"done: {len(trained)} iterations ({first['iteration']}..{last['iteration']}), "
        f"{rollouts} rollouts, reward {first['reward_mean']:.3f} -> {last['reward_mean']:.3f}"
        f"{restarts}, stats in {Path(config.output_dir) / 'stats.jsonl'}"
    )


def config_error_line(exc: BaseException) -> str:
    """A config error as one line: each pydantic error as ``key: message (got value)``; a check
    across sections (``JobConfig``'s own) names its keys in its message."""
    if isinstance(exc, ValidationError):
        return "; ".join(map(validation_error_line, exc.errors()))
    if isinstance(exc, FileNotFoundError):
        return f"no such file: {exc.filename}"
    return one_line(exc)


def validation_error_line(error: dict[str, Any]) -> str:
    if not error["loc"]:
        return error["msg"].removeprefix("Value error, ")
    line = f"{'.'.join(map(str, error['loc']))}: {error['msg']}"
    return line if error["type"] == "missing" else f"{line} (got {shown(error['input'])})"


def job_error_line(exc: BaseException) -> str:
    """A running job's error as one line: the actor method that raised it, when an actor did,
    and the first line of the original error; an actor that cannot start, as it says so."""
    import ray.exceptions

    if isinstance(exc, ActorCannotStart):
        return str(exc)  # names the actor and its constructor's error

    if isinstance(exc, ray.exceptions.RayTaskError):
        task = re.search(r"ray::([\w.]+)\(", str(exc))  # the only place a dual instance keeps it
        where = task.group(1) if task else "a Ray task"
        return f"{where}: {error_line(exc)}"
    if isinstance(exc, ray.exceptions.RayActorError):
        actor = re.search(r"class_name: (\w+)", str(exc))
        return f"{actor.group(1) if actor else 'an actor'} died: {first_line(exc)}"
    return error_line(exc)


def write_error_log(output_dir: Path, exc: BaseException) -> Path | OSError:
    """Writes the full traceback to ``output_dir/error.log``; returns its path, or the error
    that kept it from being written (a full disk, often the job's error too: no empty or cut
    log is left behind)."""
    path = output_dir / "error.log"
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(traceback.format_exception(exc)))
    except OSError as error:
        with contextlib.suppress(OSError):
            path.unlink()
        return error
    return path


def what_to_do(config: JobConfig, log: Path | OSError) -> str:
    if isinstance(log, OSError):
        path = Path(config.output_dir) / "error.log"
        return (
            f"its traceback could not be written to {path} ({one_line(log)}): rerun with "
            f"--verbose to see it; fix the cause, then {again_hint(config)}"
        )
    return f"traceback in {log} (or rerun with --verbose); fix the cause, then {again_hint(config)}"


def again_hint(config: JobConfig) -> str:
    """How to continue the job: the same command, which resumes when it can."""
    checkpoints = config.checkpoint
    if checkpoints.uri is None:
        return "run the same command"
    if checkpoints.resume == "auto":
        return "run the same command (it resumes from the latest checkpoint)"
    return "run it with --resume-from latest"


class JobStopped(BaseException):
    """SIGTERM or SIGINT arrived while the job ran. Not an ``Exception``: no handler of the
    job's errors swallows it, so every ``finally`` on the way out runs (actors stopped,
    discovery file removed)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.name = signal.Signals(signum).name


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextmanager
def stopped_by_signals() -> Iterator[Callable[[], None]]:
    """Inside the block, the first SIGTERM or SIGINT raises ``JobStopped`` (once: a second
    one acts as it did before, e.g. Ctrl-C twice interrupts the clean-up). A signal that lands
    inside a Ray call cannot raise there (Ray would turn it into a ``SystemError``): the wait
    under way raises it between two of its slices, within about a second (``common.waits``).
    The block's value puts the handlers back in place after ``ray.init`` put Ray's own SIGTERM
    handler (``sys.exit(15)``) there; the handlers from before the block are restored after
    it."""
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    stopped: list[JobStopped] = []

    def stop(signum: int, frame: Any) -> None:
        for other, handler in previous.items():
            signal.signal(other, handler)
        stopped.append(JobStopped(signum))
        if waits.in_ray_call(frame):
            waits.interrupt(stopped[-1])
            return
        raise stopped[-1]

    def install() -> None:
        if not stopped:
            for signum in STOP_SIGNALS:
                signal.signal(signum, stop)

    install()
    try:
        yield install
        waits.raise_if_interrupted()
    except SystemExit as exit_:
        if exit_.code != signal.SIGTERM or stopped:
            raise
        # ray.init's own handler (sys.exit(15)), in place from its start until ``install``
        raise JobStopped(signal.SIGTERM) from None
    finally:
        waits.interrupt(None)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stopped_by(error: BaseException) -> JobStopped | None:
    """The ``JobStopped`` that ``error`` was raised from, if any (a signal handler's exception
    that a C extension turned into another error)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, JobStopped):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None

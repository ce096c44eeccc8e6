"""TensorBoard event files in tests: read the scalars back as TensorBoard's reader shows them."""

from __future__ import annotations

from pathlib import Path


def tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag's (step, value) pairs in ``logdir``, after the reader's purge of steps
    logged again (``SessionLog.START``)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logdir))
    events.Reload()
    return {
        tag: [(event.step, event.value) for event in events.Scalars(tag)]
        for tag in events.Tags()["scalars"]
    }

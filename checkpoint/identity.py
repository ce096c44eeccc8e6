"""Which job and model a checkpoint belongs to, so that a resume refuses another one's.

The manifest of a checkpoint saved with a :class:`CheckpointIdentity` records the job's name, its
algorithm, the model directory it started from and that directory's :func:`model_fingerprint`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

from rlfleet.checkpoint.shards import CheckpointError
from rlfleet.common.config import JobConfig

VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path")
"""config.json keys that a re-save with another library version changes without changing the
model; left out of the fingerprint."""


def model_fingerprint(model_dir: str) -> str:
    """A sha256 (hex) of what makes a model directory this model: its ``config.json`` (as
    canonical JSON) and the name, shape and dtype of every weight in its ``*.safetensors``
    (read from their headers, not their data: cheap for any size)."""
    directory = Path(model_dir)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"model: {model_dir} is not a model directory (no config.json)")
    config = json.loads(config_file.read_text())
    for key in VOLATILE_CONFIG_KEYS:
        config.pop(key, None)
    weights = sorted(_weight_specs(directory))
    if not weights:
        raise CheckpointError(
            f"model: {model_dir} has no *.safetensors weights to fingerprint; save the model "
            "with save_pretrained(..., safe_serialization=True)"
        )
    canonical = json.dumps({"config": config, "weights": weights}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _weight_specs(directory: Path) -> list[tuple[str, list[int], str]]:
    specs = []
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as weights:
            for name in weights.keys():
                tensor = weights.get_slice(name)
                specs.append((name, list(tensor.get_shape()), tensor.get_dtype()))
    return specs


@dataclass(frozen=True)
class CheckpointIdentity:
    """The job a checkpoint belongs to."""

    job: str
    """The job's ``name``."""
    algorithm: str
    model: str
    """The model directory the job started from, as configured (for messages)."""
    fingerprint: str
    """:func:`model_fingerprint` of that directory."""
    lora: bool = False
    """Whether the job trains LoRA adapters (its checkpoints hold them, not the whole model)."""

    @classmethod
    def of_job(cls, config: JobConfig) -> CheckpointIdentity:
        """The identity of the job ``config`` describes (reads its model directory)."""
        fingerprint = model_fingerprint(config.model)
        return cls(
            config.name, config.algorithm, config.model, fingerprint, config.lora is not None
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def check(self, recorded: Any, where: str) -> None:
        """Raise a ``CheckpointError`` naming what differs when the checkpoint at ``where``
        (whose manifest holds ``recorded``) belongs to another model, algorithm, job, or LoRA
        where the job trains the whole model (or the other way round)."""
        if not isinstance(recorded, dict):
            raise CheckpointError(
                f"checkpoint {where} records no job and model fingerprint (saved without an "
                "identity, or by an older rlfleet); point checkpoint.uri elsewhere to start fresh"
            )
        saved = {key: str(recorded.get(key)) for key in ("job", "algorithm", "model")}
        fingerprint = str(recorded.get("fingerprint"))
        if fingerprint != self.fingerprint:
            raise CheckpointError(
                f"checkpoint {where} was written for model {saved['model']} (fingerprint "
                f"{fingerprint[:12]}..), this job trains {self.model} (fingerprint "
                f"{self.fingerprint[:12]}..); point checkpoint.uri elsewhere or use the same model"
            )
        if saved["algorithm"] != self.algorithm:
            raise CheckpointError(
                f"checkpoint {where} was written by a {saved['algorithm']} job, this job runs "
                f"{self.algorithm}; point checkpoint.uri elsewhere or set algorithm: "
                f"{saved['algorithm']}"
            )
        if bool(recorded.get("lora", False)) != self.lora:
            held, trained = ("the whole model", "LoRA adapters")
            if not self.lora:
                held, trained = trained, held
            raise CheckpointError(
                f"checkpoint {where} holds {held}, this job trains {trained}; point "
                "checkpoint.uri elsewhere or set lora as that job did"
            )
        if saved["job"] != self.job:
            raise CheckpointError(
                f"checkpoint {where} was written by job {saved['job']!r}, this job is "
                f"{self.job!r}; point checkpoint.uri elsewhere or set name: {saved['job']}"
            )

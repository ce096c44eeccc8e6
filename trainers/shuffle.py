"""The trainer's own random state: the order of the rows in each PPO epoch.

TRL v0.11.4 draws each epoch's order with ``np.random.permutation`` from NumPy's global RNG,
seeded by ``set_seed(config.seed)``; a private ``np.random.RandomState(seed)`` draws the same
sequence without touching any global RNG.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class Shuffler:
    """Seeded permutations of a batch's rows, with a JSON-able state for exact resume."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.RandomState(seed)

    def permutation(self, size: int) -> list[int]:
        return self.rng.permutation(size).tolist()

    def state(self) -> dict[str, Any]:
        name, keys, position, has_gauss, cached_gaussian = self.rng.get_state()
        return {
            "name": name,
            "keys": keys.tolist(),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.rng.set_state(
            (
                state["name"],
                np.asarray(state["keys"], dtype=np.uint32),
                state["position"],
                state["has_gauss"],
                state["cached_gaussian"],
            )
        )

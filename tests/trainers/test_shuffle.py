"""The trainer's own minibatch order: TRL's sequence, from a private generator."""

from __future__ import annotations

import json

import numpy as np

from rlfleet.trainers.minibatch import Shuffler


def test_permutations_replay_numpy_seeded_as_trl_seeds_it_without_touching_the_global_rng():
    before = np.random.get_state()[1].copy()
    shuffler = Shuffler(seed=7)
    expected = np.random.RandomState(7)
    for _ in range(3):
        assert shuffler.permutation(10) == expected.permutation(10).tolist()
    assert np.array_equal(np.random.get_state()[1], before)


def test_state_round_trips_through_json():
    shuffler = Shuffler(seed=3)
    shuffler.permutation(5)
    state = json.loads(json.dumps(shuffler.state()))
    resumed = Shuffler(seed=99)
    resumed.load_state(state)
    assert resumed.permutation(16) == shuffler.permutation(16)

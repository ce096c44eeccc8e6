"""Per-rollout sampling seeds: the job seed must change what every engine samples."""

from __future__ import annotations

from generator_reference import PROMPTS

from rlfleet.actors.engine import SamplingSpec
from rlfleet.actors.generator import rollout_seed

ROLLOUT_IDS = range(len(PROMPTS))


def test_rollout_seeds_fit_32_bits_and_differ_across_job_seeds_and_rollouts() -> None:
    """vLLM's CPU build keeps the low 32 bits of a seed: those must already differ."""
    seeds = {(job, rid): rollout_seed(job, rid) for job in (0, 1, 2) for rid in range(1000)}
    assert all(0 <= seed < 2**32 for seed in seeds.values())
    assert len(set(seeds.values())) == len(seeds)
    assert rollout_seed(1, 7) == rollout_seed(1, 7)


def samples(engine, job_seed: int) -> list[list[int]]:
    spec = SamplingSpec(
        max_new_tokens=8, seeds=tuple(rollout_seed(job_seed, r) for r in ROLLOUT_IDS)
    )
    return [c.token_ids for c in engine.generate(PROMPTS, spec)]


def test_job_seeds_0_1_2_sample_differently_with_the_hf_engine(tiny_model_dir) -> None:
    from rlfleet.actors.hf_engine import HFEngine

    engine = HFEngine(tiny_model_dir, seed=0)
    by_seed = [samples(engine, job_seed) for job_seed in (0, 1, 2)]
    assert by_seed[0] != by_seed[1] != by_seed[2] != by_seed[0]
    assert samples(engine, 1) == by_seed[1]

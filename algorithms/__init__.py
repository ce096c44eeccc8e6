"""The RL algorithms as pure tensor functions, chosen by name (the layout of veRL's
``core_algos.py``).

Tensors are ``[batch, time]`` over response tokens, with a ``mask`` that is 1 on the tokens that
count; callers zero their inputs where the mask is 0. A multi-turn response's mask has holes (its
environment tokens): the estimators that run along time (``masked_gae``, ``reinforce_pp``) skip
them as veRL 0.9.1 does; the losses, aggregations and statistics count mask-1 tokens only.
Each kind of piece has one signature and a :class:`~rlfleet.algorithms.registry.Registry`:

- advantage estimators, :data:`~rlfleet.algorithms.advantages.ADVANTAGE_ESTIMATORS`:
  ``(rewards, mask, values, group_ids, config) -> (advantages, returns)``;
- policy losses, :data:`~rlfleet.algorithms.losses.POLICY_LOSSES`:
  ``(logprobs, old_logprobs, advantages, mask, config) -> PolicyLossOutput``;
- value losses, :data:`~rlfleet.algorithms.losses.VALUE_LOSSES`:
  ``(vpreds, old_values, returns, mask, config) -> (loss, clip fraction)``;
- loss aggregations, :data:`~rlfleet.algorithms.losses.LOSS_AGGREGATIONS`:
  ``(per-token losses, mask) -> loss``;
- KL penalties, :data:`~rlfleet.algorithms.kl.KL_PENALTIES`:
  ``(logprobs, ref_logprobs) -> per-token KL``;
- the critic-free loss types (grpo, bnpo, dr_grpo, dapo),
  :data:`~rlfleet.algorithms.grpo.LOSS_TYPES`:
  ``(per_token_loss, mask, config, num_items_in_batch) -> loss``.

:func:`~rlfleet.algorithms.ppo.ppo_loss` assembles the PPO loss from them and
:func:`~rlfleet.algorithms.grpo.critic_free_loss` the GRPO-family loss (TRL 1.16's);
:mod:`~rlfleet.algorithms.baselines` holds the group baselines of the critic-free advantage
estimators (grpo, rloo, reinforce_pp, reinforce_pp_baseline);
:mod:`~rlfleet.algorithms.rewards` turns scores into per-token rewards;
:mod:`~rlfleet.algorithms.sampling` holds DAPO's sampling control (veRL 0.9.1's): the soft
overlong punishment (:data:`~rlfleet.algorithms.sampling.LENGTH_PENALTIES`), dynamic sampling's
group filter (:data:`~rlfleet.algorithms.sampling.GROUP_FILTERS`), refill and batch fill.
"""

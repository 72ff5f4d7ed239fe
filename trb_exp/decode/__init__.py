"""The decode wing: rollouts from a (student, teacher) pair under a behaviour sampler. ``rollout`` (the eager
two-model loop, the ``Rollout`` record, teacher passes), ``engine`` and ``static_lm`` (the static engine)."""

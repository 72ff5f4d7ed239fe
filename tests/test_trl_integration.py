"""TRB inside TRL (trb_exp.integrations.trl), on the shipped embedded pair: the logits processor against the
project's solver and decode loop, EOS accounting, the 3-step trainer runs (DistillationTrainer and GKD), and
the refusals. CI installs trl (the ``test`` extra), so nothing here skips."""

import os
import tempfile

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper

from trb_exp.blending import kl_teacher_student, trust_region_blend
from trb_exp.data import encode_prompts
from trb_exp.integrations.generate import check_processor_list
from trb_exp.integrations.trl import (
    TRBConfig,
    TRBConfigError,
    TRBDistillationTrainer,
    TRBLogitsProcessor,
    blended_generate,
    refusals,
)
from trb_exp.models import EMBEDDED
from trb_exp.decode.backend import sample
from trb_exp.decode.forward import response_logits
from trb_exp.decode.record import positions_from_mask
from trb_exp.rules import TrustRegionSampler

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
PROMPTS = ["3+4*2-7=", "1+2=", "9*9-3+1=", "5-6="]
TRAIN_PROMPTS = ["3+4*2-7=", "1+2=", "9*9-3+1=", "5-6=", "2*3=", "7+1-2=", "8-3*2=", "4+4="] * 2


def _tok(pad_is_eos=False):
    tok = AutoTokenizer.from_pretrained(EMBEDDED / "student")
    tok.padding_side = "left"
    if pad_is_eos:
        tok.pad_token = tok.eos_token
    return tok


def _model(role):
    return AutoModelForCausalLM.from_pretrained(EMBEDDED / role).eval()


@pytest.fixture(scope="module")
def pair():
    return _tok(), _model("student"), _model("teacher")


def _gen(tok, T=1.0, n=30, top_k_override=0):
    return GenerationConfig(do_sample=True, max_new_tokens=n, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, top_k=top_k_override, top_p=1.0, temperature=T)


# --------------------------------------------------------------------------- the processor
@pytest.mark.parametrize("T,budget,eps", [(1.0, "absolute", 0.5), (0.7, "absolute", 0.3), (1.3, "relative", 0.4)])
def test_processor_equals_trust_region_blend_through_transformers_list(pair, T, budget, eps):
    """transformers' own processor list (ours, then its temperature warper when T != 1) turns the student's
    scores into exactly trust_region_blend(s/T, t/T, eps): the distribution generate samples from."""
    tok, student, teacher = pair
    ids, mask = encode_prompts(tok, PROMPTS)
    proc = TRBLogitsProcessor(teacher, mask, eps, budget=budget, temperature=T, eos_token_id=tok.eos_token_id)
    procs = student._get_logits_processor(generation_config=_gen(tok, T), input_ids_seq_length=ids.shape[1],
                                          logits_processor=LogitsProcessorList([proc]), device="cpu",
                                          model_kwargs={"attention_mask": mask})
    assert [type(p) for p in procs] == [TRBLogitsProcessor] + ([TemperatureLogitsWarper] if T != 1 else [])
    pos = positions_from_mask(mask)
    with torch.no_grad():
        s = student(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
        t = teacher(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].float()
    out = torch.log_softmax(procs(ids, s.clone()), -1)
    gap = kl_teacher_student(torch.log_softmax(t / T, -1), torch.log_softmax(s / T, -1))
    eps_rows = eps * gap if budget == "relative" else eps
    ref = trust_region_blend(s / T, t / T, eps_rows)
    fin = torch.isfinite(ref.logprobs)
    assert torch.equal(fin, torch.isfinite(out))
    torch.testing.assert_close(out[fin], ref.logprobs[fin], atol=2e-6, rtol=0)
    torch.testing.assert_close(proc.per_token("beta")[:, 0], ref.beta, atol=1e-6, rtol=0)
    assert (proc.per_token("kl") <= proc.per_token("eps") + 1e-6).all()


def test_cached_teacher_equals_one_batched_forward(pair):
    """The processor's KV-cached teacher, advanced one token per generate step on left-padded prompts, gives
    the logits of one batched teacher forward over prompt + completion (at every completion token)."""
    tok, student, teacher = pair
    ids, mask = encode_prompts(tok, PROMPTS)
    assert (mask == 0).any()  # left padding present
    proc = TRBLogitsProcessor(teacher, mask, 0.5, eos_token_id=tok.eos_token_id, keep_teacher_logits=True)
    torch.manual_seed(0)
    out = student.generate(input_ids=ids, attention_mask=mask, generation_config=_gen(tok, n=24),
                           logits_processor=LogitsProcessorList([proc]))
    alive = proc.per_token("alive")
    full_mask = torch.cat([mask, alive.long()], 1)
    with torch.no_grad():
        batched = response_logits(teacher, out[:, : full_mask.shape[1]], full_mask, ids.shape[1])
    cached = torch.stack(proc.teacher_logits, 1)
    assert cached.shape == batched.shape and alive.sum() > 20
    torch.testing.assert_close(cached[alive], batched[alive], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T", [1.0, 0.7])
def test_same_seed_same_tokens_and_beta_as_rollout_sample(pair, T):
    """student.generate + TRBLogitsProcessor and the project's decode.backend.sample(TrustRegionSampler) draw the same
    tokens and the same betas from the same seed (seeds 0-4)."""
    tok, student, teacher = pair
    ids, mask = encode_prompts(tok, PROMPTS)
    for seed in range(5):
        proc = TRBLogitsProcessor(teacher, mask, 0.5, temperature=T, eos_token_id=tok.eos_token_id)
        torch.manual_seed(seed)
        out = student.generate(input_ids=ids, attention_mask=mask, generation_config=_gen(tok, T),
                               logits_processor=LogitsProcessorList([proc]))
        torch.manual_seed(seed)
        ro = sample(student, teacher, ids, mask, TrustRegionSampler(0.5, temperature=T), max_new_tokens=30,
                    eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
        n = ro.response_ids.shape[1]
        assert torch.equal(out[:, ids.shape[1]:][:, :n], ro.response_ids), seed
        assert torch.equal(proc.per_token("alive")[:, :n], ro.response_mask), seed
        m = ro.response_mask
        torch.testing.assert_close(proc.per_token("beta")[:, :n][m], ro.diagnostics["beta"][m], atol=1e-6, rtol=0)
        assert 0 < ro.diagnostics["beta"][m].mean() < 1


def test_eos_accounting_with_pad_equal_to_eos(pair):
    """pad == eos: a completion's tokens are those up to and including its first EOS, exactly TRL's completion
    mask; the padding EOS ids that follow are not counted, and decode.backend.sample agrees."""
    _, student, teacher = pair
    tok = _tok(pad_is_eos=True)
    ids, mask = encode_prompts(tok, PROMPTS)
    eos = tok.eos_token_id
    procs = []
    torch.manual_seed(3)
    with blended_generate(student, teacher, 0.5, on_done=procs.append):
        out = student.generate(input_ids=ids, attention_mask=mask, generation_config=_gen(tok, n=40))
    comp = out[:, ids.shape[1]:]
    (proc,) = procs
    alive = proc.per_token("alive")
    is_eos = comp == eos
    assert is_eos.any(1).all() and (is_eos.sum(1) > 1).any()  # every row ended; some were padded with eos
    first = torch.where(is_eos.any(1), is_eos.int().argmax(1), comp.shape[1])
    trl_mask = torch.arange(comp.shape[1])[None] <= first[:, None]  # DistillationTrainer's completion mask
    assert torch.equal(alive, trl_mask[:, : alive.shape[1]])
    assert proc.stats()["tokens"] == float(trl_mask.sum())
    torch.manual_seed(3)
    ro = sample(student, teacher, ids, mask, TrustRegionSampler(0.5), max_new_tokens=40, eos_id=eos, pad_id=eos)
    assert torch.equal(ro.response_mask, alive) and torch.equal(ro.response_ids, comp[:, : ro.response_ids.shape[1]])


# --------------------------------------------------------------------------- the trainers
def _dist_trainer(trb, *, tok=None, student=None, teacher=None, steps=3, teacher_tokenizer=None, **cfg):
    from trl import DistillationConfig

    args = DistillationConfig(output_dir=tempfile.mkdtemp(), max_steps=steps, per_device_train_batch_size=4,
                              max_completion_length=24, logging_steps=1, report_to=[], learning_rate=1e-3,
                              save_strategy="no", use_cpu=True, seed=0, bf16=False, **cfg)
    return TRBDistillationTrainer(model=student or _model("student"), teacher_model=teacher or _model("teacher"),
                                  args=args, train_dataset=Dataset.from_dict({"prompt": TRAIN_PROMPTS}),
                                  processing_class=tok or _tok(), trb=trb, teacher_tokenizer=teacher_tokenizer)


def _trb_logs(trainer):
    return [h for h in trainer.state.log_history if "trb/eps" in h]


@pytest.mark.slow
def test_distillation_trainer_three_steps(tmp_path):
    """K = 2: eps [eps0, eps0/2, 0]; realised KL within eps_k; the third step is TRL's own generate (no
    processor); the trb/* metrics land in log_history; the student's generate is restored."""
    eps0 = 0.5
    student = _model("student")
    trainer = _dist_trainer(TRBConfig(eps0=eps0, warmup_steps=2), student=student)
    built = []
    collect = trainer._trb_collect
    trainer._trb_collect = lambda proc: (built.append(trainer.state.global_step), collect(proc))
    trainer.train()
    logs = _trb_logs(trainer)
    assert [h["trb/eps"] for h in logs] == [eps0, eps0 / 2, 0.0]
    assert built == [0, 1]  # processors only while eps_k > 0
    for h in logs:
        assert {"trb/beta_mean", "trb/kl_mean", "trb/kl_max"} <= set(h)
        assert h["trb/kl_max"] <= h["trb/eps"] + 1e-5
        assert 0 <= h["trb/kl_mean"] <= h["trb/kl_max"]
    assert 0 < logs[0]["trb/beta_mean"] < 1 and logs[0]["trb/kl_max"] > 0
    assert logs[2]["trb/beta_mean"] == logs[2]["trb/kl_max"] == 0.0
    assert "generate" not in vars(student) and "_get_logits_processor" not in vars(student)
    assert student.generate.__func__ is type(student).generate


@pytest.mark.slow
def test_past_the_warmup_is_trls_own_path():
    """With eps = 0 (every step after the warmup) the TRB trainer trains exactly like DistillationTrainer: same
    losses and completion lengths, step by step, from the same seed."""
    from trl import DistillationConfig, DistillationTrainer

    def logs(trainer):
        trainer.train()
        return [(h["loss"], h["completions/mean_length"]) for h in trainer.state.log_history if "loss" in h]

    trb = _dist_trainer(TRBConfig(eps0=0.5, warmup_steps=0), steps=2)
    got = logs(trb)  # each trainer seeds the RNGs in its __init__: build and train one after the other
    args = DistillationConfig(output_dir=tempfile.mkdtemp(), max_steps=2, per_device_train_batch_size=4,
                              max_completion_length=24, logging_steps=1, report_to=[], learning_rate=1e-3,
                              save_strategy="no", use_cpu=True, seed=0, bf16=False)
    plain = DistillationTrainer(model=_model("student"), teacher_model=_model("teacher"), args=args,
                                train_dataset=Dataset.from_dict({"prompt": TRAIN_PROMPTS}), processing_class=_tok())
    assert got == logs(plain) and len(got) == 2
    assert [h["trb/eps"] for h in _trb_logs(trb)] == [0.0, 0.0]


@pytest.mark.slow
def test_accumulation_and_evaluation():
    """gradient_accumulation_steps = 2: one generation and one trb/* entry per optimizer step, eps by
    global_step; evaluation during the warmup takes TRL's own path (no processor, no trb/* metrics)."""
    trainer = _dist_trainer(TRBConfig(eps0=0.5, warmup_steps=1), steps=2, gradient_accumulation_steps=2,
                            per_device_eval_batch_size=4)
    built = []
    collect = trainer._trb_collect
    trainer._trb_collect = lambda proc: (built.append(proc.per_token("alive").shape[0]), collect(proc))
    metrics = trainer.evaluate(Dataset.from_dict({"prompt": TRAIN_PROMPTS[:4]}))
    assert built == [] and not any("trb" in k for k in metrics) and "eval_loss" in metrics
    trainer.train()
    assert built == [8]  # step 0: one generation batch of 2 x 4 prompts; step 1 (eps = 0): TRL's path
    assert [h["trb/eps"] for h in _trb_logs(trainer)] == [0.5, 0.0]


@pytest.mark.slow
def test_distillation_trainer_pad_equal_to_eos_counts_trl_completion_tokens():
    """With pad == eos the processor counts exactly the completion tokens TRL trains on."""
    tok = _tok(pad_is_eos=True)
    trainer = _dist_trainer(TRBConfig(eps0=0.5, warmup_steps=1), tok=tok, steps=1)
    procs = []
    collect = trainer._trb_collect
    trainer._trb_collect = lambda proc: (procs.append(proc), collect(proc))
    trainer.train()
    (proc,) = procs
    (log,) = _trb_logs(trainer)
    assert proc.stats()["tokens"] == pytest.approx(log["completions/mean_length"] * 4)


@pytest.mark.slow
def test_gkd_variant_three_steps():
    from trl.experimental.gkd import GKDConfig

    from trb_exp.integrations.trl import TRBGKDTrainer

    tok = _tok()
    tok.chat_template = ("{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}"
                         "{{ eos_token }}{% endif %}{% endfor %}")
    rows = [("3+4*2-7=", "4*2=8;3+8=11;11-7=4;A:4"), ("1+2=", "1+2=3;A:3")] * 6
    ds = Dataset.from_dict({"messages": [[{"role": "user", "content": p}, {"role": "assistant", "content": a}]
                                         for p, a in rows]})
    args = GKDConfig(output_dir=tempfile.mkdtemp(), max_steps=3, per_device_train_batch_size=4, max_new_tokens=20,
                     lmbda=1.0, temperature=0.9, logging_steps=1, report_to=[], learning_rate=1e-3,
                     save_strategy="no", use_cpu=True, seed=0, bf16=False, max_length=64)
    student = _model("student")
    trainer = TRBGKDTrainer(model=student, teacher_model=_model("teacher"), args=args, train_dataset=ds,
                            processing_class=tok, trb=TRBConfig(eps0=0.5, warmup_steps=2))
    trainer.train()
    logs = _trb_logs(trainer)
    assert [h["trb/eps"] for h in logs] == [0.5, 0.25, 0.0]
    assert all(h["trb/kl_max"] <= h["trb/eps"] + 1e-5 for h in logs) and logs[0]["trb/beta_mean"] > 0
    assert "generate" not in vars(student)


# --------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("option", [{"top_k": 5}, {"top_p": 0.9}, {"min_p": 0.1}, {"repetition_penalty": 1.2}])
def test_refuses_distribution_changing_generation_options(option):
    (name,) = option
    with pytest.raises(TRBConfigError, match=f"TRB cannot blend with .*{name}=") as e:
        refusals(generation=GenerationConfig(do_sample=True, **option))
    assert "\n" not in str(e.value)
    refusals(generation=GenerationConfig(do_sample=True, top_k=0, top_p=1.0, temperature=0.8))  # fine


def test_trainer_refuses_top_k_with_one_message():
    with pytest.raises(TRBConfigError, match=r"^TRB cannot blend with generation options .*top_k=5"):
        _dist_trainer(TRBConfig(eps0=0.5, warmup_steps=2), top_k=5)


def test_trainer_refuses_vllm_during_warmup():
    from trl import DistillationConfig

    with pytest.raises(TRBConfigError, match="use_vllm=True during the warmup"):
        TRBDistillationTrainer(model=_model("student"), teacher_model=_model("teacher"),
                               args=DistillationConfig(output_dir=tempfile.mkdtemp(), use_vllm=True, report_to=[],
                                                       use_cpu=True),
                               train_dataset=Dataset.from_dict({"prompt": TRAIN_PROMPTS}), processing_class=_tok(),
                               trb=TRBConfig(eps0=0.5, warmup_steps=2))
    refusals(use_vllm=True, eps_first=0.0)  # no warmup: vLLM is fine


def test_refuses_sharded_teacher_under_synced_gpus():
    with pytest.raises(TRBConfigError, match="sharded .*synced_gpus"):
        refusals(sharded_teacher=True, num_processes=2, eps_first=0.5)
    refusals(sharded_teacher=True, num_processes=1, eps_first=0.5)  # one process: no synced_gpus
    # ... and the trainer reads it from its own distributed backend
    from types import SimpleNamespace

    from trb_exp.integrations.trl import _TRBMixin

    fake = SimpleNamespace(trb=TRBConfig(eps0=0.5, warmup_steps=2), _dist=SimpleNamespace(is_zero3=True),
                           args=SimpleNamespace(use_vllm=False), teacher_model=None, model=None,
                           accelerator=SimpleNamespace(num_processes=4, unwrap_model=lambda m: m),
                           _trb_teacher=lambda: None)
    with pytest.raises(TRBConfigError, match="on 4 processes"):
        _TRBMixin._trb_refuse(fake, None)


def test_refuses_vision_language_models():
    with pytest.raises(TRBConfigError, match="vision-language"):
        refusals(multimodal=True, eps_first=0.5)
    refusals(multimodal=True, eps_first=0.0)


def test_refuses_different_vocabularies(pair):
    from trb_exp.data.tokenizer import build_char_tokenizer
    from trb_exp.models import tiny_llama

    tok, student, _ = pair
    big = build_char_tokenizer()
    big.add_tokens(["<x1>", "<x2>", "<x3>"])
    other = tiny_llama(big, hidden=16, layers=1, heads=2, intermediate=32).eval()
    with pytest.raises(TRBConfigError, match=r"different vocabularies \(student 21, teacher 24"):
        _dist_trainer(TRBConfig(eps0=0.5, warmup_steps=2), teacher=other)
    # the processor checks it too, and generate is restored after the error
    ids, mask = encode_prompts(tok, PROMPTS)
    with pytest.raises(TRBConfigError, match="share one vocabulary"), blended_generate(student, other, 0.5):
        student.generate(input_ids=ids, attention_mask=mask, generation_config=_gen(tok))
    assert "generate" not in vars(student) and "_get_logits_processor" not in vars(student)


def test_runtime_processor_list_check(pair):
    """A filter that reaches generate some other way (e.g. the model's generation_config) is caught in the
    list transformers actually builds."""
    tok, student, teacher = pair
    with pytest.raises(TRBConfigError, match="TopKLogitsWarper"):
        check_processor_list([TRBLogitsProcessor(teacher, torch.ones(1, 2), 0.1), TopKLogitsWarper(5)])
    # the temperature applied after the blend must be the one it was computed at, and come after it
    one = torch.ones(1, 2)
    check_processor_list([TRBLogitsProcessor(teacher, one, 0.1, temperature=0.7), TemperatureLogitsWarper(0.7)])
    for procs in ([TRBLogitsProcessor(teacher, one, 0.1), TemperatureLogitsWarper(0.7)],
                  [TemperatureLogitsWarper(0.7), TRBLogitsProcessor(teacher, one, 0.1, temperature=0.7)]):
        with pytest.raises(TRBConfigError, match="temperature"):
            check_processor_list(procs)
    ids, mask = encode_prompts(tok, PROMPTS)
    with pytest.raises(TRBConfigError, match="top_k=5"), blended_generate(student, teacher, 0.5):
        student.generate(input_ids=ids, attention_mask=mask, generation_config=_gen(tok, top_k_override=5))


def test_trb_config():
    c = TRBConfig(eps0=0.5, warmup_steps=4, schedule="cosine")
    assert c.eps_at(0) == 0.5 and c.eps_at(4) == 0.0 and 0 < c.eps_at(2) < 0.5
    assert TRBConfig(eps0=0.5, warmup_steps=2).eps_at(1) == 0.25
    for bad, match in [(dict(schedule="gap"), "adaptive"), (dict(eps0=-1), "eps0"), (dict(warmup_steps=1.5), "K"),
                       (dict(budget="relative", eps0=2.0), "fraction"), (dict(budget="x"), "budget")]:
        with pytest.raises(TRBConfigError, match=match):
            TRBConfig(**{"eps0": 0.5, "warmup_steps": 2, **bad})


def test_refuses_a_teacher_tokenizer_with_other_token_ids(tmp_path):
    """Same vocabulary size, '1' and '2' swapped: the sizes agree, the token -> id maps do not (issue 22)."""
    from trb_exp.data.tokenizer import CHARS, build_char_tokenizer

    swapped = build_char_tokenizer(CHARS.replace("1", "#").replace("2", "1").replace("#", "2"))
    assert len(swapped) == len(_tok())
    _model("teacher").save_pretrained(tmp_path / "teacher")
    swapped.save_pretrained(tmp_path / "teacher")
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path / "teacher")  # its tokenizer is read from beside it
    msg = ("TRB cannot blend with tokenizers that map tokens to different ids (e.g. [('1', 5), ('1', 6), ('2', 5)]): "
           "the blend compares the two next-token distributions id by id; pick a teacher from the student's "
           "model family")
    with pytest.raises(TRBConfigError) as e:
        _dist_trainer(TRBConfig(eps0=0.5, warmup_steps=2), teacher=teacher)
    assert str(e.value) == msg
    with pytest.raises(TRBConfigError) as e:  # given explicitly, for a teacher held in memory
        _dist_trainer(TRBConfig(eps0=0.5, warmup_steps=2), teacher=_model("teacher"), teacher_tokenizer=swapped)
    assert str(e.value) == msg


def test_temperature_zero_is_one_trb_config_error():
    with pytest.raises(TRBConfigError) as e:
        _dist_trainer(TRBConfig(eps0=0.5, warmup_steps=2), temperature=0.0)
    assert str(e.value) == ("TRB cannot blend with temperature=0.0: the blend samples from mu_b at a temperature "
                            "T > 0 (T = 0 is greedy decoding, which has no distribution to blend); use e.g. "
                            "temperature=1.0")


@pytest.mark.parametrize("field, value, message", [
    ("eps0", True, "TRBConfig.eps0=True: a KL budget must be a finite number >= 0 (0 = plain OPD)"),
    ("warmup_steps", True, "TRBConfig.warmup_steps=True: the horizon K must be an integer >= 0"),
    ("final_ratio", True, "TRBConfig.final_ratio=True: must be a number"),
    ("tol", False, "TRBConfig.tol=False: must be a number"),
])
def test_trb_config_refuses_booleans(field, value, message):
    kw = {"eps0": 0.5, "warmup_steps": 2, field: value}
    with pytest.raises(TRBConfigError) as e:
        TRBConfig(**kw)
    assert str(e.value) == message

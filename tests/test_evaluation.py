"""Evaluation numbers: the unbiased pass@k estimator against hand values and against brute-force
enumeration of k-subsets, and ``evaluate`` driven by a scripted model (it emits prescribed responses row by
row) and the task's exact-match grader: pass@1, pass@k, greedy accuracy, mean length and EOS rate come
out exactly as computed by hand from the scripts."""

import itertools
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch

from trb_exp.decode.forward import _cache_field
from trb_exp.data.arithmetic import grade as arithmetic_grade
from trb_exp.data.tokenizer import build_char_tokenizer
from trb_exp.evaluation import default_ks, evaluate, pass_at_k


# ------------------------------------------------------------------------------------ pass@k
@pytest.mark.parametrize("n, c, k, want", [
    (5, 2, 2, 0.7),              # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (5, 2, 1, 0.4),              # pass@1 = c/n
    (5, 0, 3, 0.0),
    (5, 5, 1, 1.0),
    (5, 3, 3, 1.0),              # n - c = 2 < k: every 3-subset holds a correct sample
    (4, 2, 2, 5 / 6),            # 1 - 1/6
    (10, 3, 5, 11 / 12),         # 1 - C(7,5)/C(10,5) = 1 - 21/252
    (8, 1, 4, 0.5),              # 1 - C(7,4)/C(8,4) = 1 - 35/70
    (1, 1, 1, 1.0),
])
def test_pass_at_k_hand_values(n, c, k, want):
    assert pass_at_k(n, c, k) == pytest.approx(want, abs=1e-12)


def _enumerated(n, c, k):
    """Fraction of the k-subsets of n samples (c of them correct) that contain a correct one."""
    subsets = list(itertools.combinations([True] * c + [False] * (n - c), k))
    return Fraction(sum(any(s) for s in subsets), len(subsets))


def test_pass_at_k_equals_enumeration_of_subsets():
    for n in range(1, 8):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(_enumerated(n, c, k)), abs=1e-12), (n, c, k)


@pytest.mark.parametrize("n, c, k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match=rf"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}"):
        pass_at_k(n, c, k)


def test_default_ks():
    assert default_ks(1) == (1,) and default_ks(4) == (1, 2, 4) and default_ks(6) == (1, 2, 4, 6)


# ------------------------------------------------------------------------------------ a scripted model
class Scripted(torch.nn.Module):
    """Emits, for the j-th row holding prompt p, the response ``sampled[p][j]`` (or ``greedy[p]`` when the
    batch has one row per prompt), one character per decode step, then EOS; its next-token distribution
    is one-hot, so sampling at temperature 1 and greedy decoding both emit exactly the script."""

    def __init__(self, tok, sampled, greedy):
        super().__init__()
        self.tok, self.sampled, self.greedy = tok, sampled, greedy
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.calls = 0

    def _logits(self, scripts, t):
        V = len(self.tok)
        out = torch.full((len(scripts), 1, V), float("-inf"))
        for r, s in enumerate(scripts):
            nxt = self.tok.convert_tokens_to_ids(s[t]) if t < len(s) else self.tok.eos_token_id
            out[r, 0, nxt] = 0.0
        return out

    def forward(self, input_ids, attention_mask, position_ids, use_cache=True, **kw):
        self.calls += 1
        cache = kw.get(_cache_field())  # the KV cache under the installed transformers' name (cache / past_key_values)
        if cache is None:  # prefill: assign a script to each row
            prompts = self.tok.batch_decode(input_ids, skip_special_tokens=True)
            greedy = len(prompts) == len(self.greedy)
            seen = {}
            scripts = []
            for p in prompts:
                j = seen[p] = seen.get(p, -1) + 1
                scripts.append(self.greedy[p] if greedy else self.sampled[p][j])
            cache = {"scripts": scripts, "t": 0}
        else:
            assert input_ids.shape[1] == 1  # one new token per decode step (KV-cached loop)
            cache = {"scripts": cache["scripts"], "t": cache["t"] + 1}
        return SimpleNamespace(logits=self._logits(cache["scripts"], cache["t"]), **{_cache_field(): cache})


PROMPTS = ["1+1=", "2+2=", "3*3="]
ANSWERS = ["2", "4", "9"]
MAX_NEW = 12
SAMPLED = {  # n = 4 samples per problem; correct counts c = 0, 2, 4
    "1+1=": ["A:3", "A:5", "1+1=2;2+2=4;A:2", "7"],   # the third is cut at 12 tokens: no EOS, no answer
    "2+2=": ["A:4", "A:5", "1;A:4", "A:44"],
    "3*3=": ["A:9", "A:9", "9*1=9;A:9", "A:09"],
}
GREEDY = {"1+1=": "A:2", "2+2=": "A:3", "3*3=": "A:9"}  # 2 of 3 correct


def test_evaluate_scripted_model_gives_exact_numbers():
    tok = build_char_tokenizer()
    model = Scripted(tok, SAMPLED, GREEDY)
    seen = []

    def grader(text, ref):
        seen.append((text, ref))
        return arithmetic_grade(text, ref)

    model.train()
    r = evaluate(model, tok, PROMPTS, ANSWERS, grader, n_samples=4, max_new_tokens=MAX_NEW, ks=(1, 2, 3, 4, 5),
                 batch_size=64, seed=0)
    # the grader saw exactly the scripted responses (truncated at MAX_NEW), then the greedy ones
    want_texts = [(s[:MAX_NEW], a) for p, a in zip(PROMPTS, ANSWERS) for s in SAMPLED[p]]
    want_texts += [(GREEDY[p], a) for p, a in zip(PROMPTS, ANSWERS)]
    assert seen == want_texts
    c = [0, 2, 4]
    assert [sum(arithmetic_grade(s[:MAX_NEW], a) for s in SAMPLED[p]) for p, a in zip(PROMPTS, ANSWERS)] == c
    assert r["pass@1"] == pytest.approx((0 + 2 / 4 + 4 / 4) / 3, abs=1e-12)            # 0.5
    assert r["pass@2"] == pytest.approx((0 + (1 - 1 / 6) + 1) / 3, abs=1e-12)          # 11/18
    assert r["pass@3"] == pytest.approx((0 + 1 + 1) / 3, abs=1e-12)                    # 2/3
    assert r["pass@4"] == pytest.approx(2 / 3, abs=1e-12)
    assert "pass@5" not in r                                                           # k > n: not estimable
    assert r["greedy_acc"] == pytest.approx(2 / 3, abs=1e-12)
    lengths = [min(len(s) + 1, MAX_NEW) for p in PROMPTS for s in SAMPLED[p]]  # EOS counted; cut rows: MAX_NEW
    assert r["mean_length"] == pytest.approx(sum(lengths) / 12, abs=1e-12)
    assert r["eos_rate"] == pytest.approx(11 / 12, abs=1e-12)
    assert model.training  # the model's mode is restored


def test_evaluate_pass_at_1_is_per_problem_mean_not_pooled():
    """pass@1 averages c/n per problem; pass@2 counts a problem with one correct sample of two as solved."""
    tok = build_char_tokenizer()
    sampled = {"1+1=": ["A:2", "A:2"], "2+2=": ["A:1", "A:4"]}
    greedy = {"1+1=": "A:2", "2+2=": "A:4"}
    r = evaluate(Scripted(tok, sampled, greedy), tok, ["1+1=", "2+2="], ["2", "4"], arithmetic_grade,
                 n_samples=2, max_new_tokens=8, ks=(1, 2), batch_size=64)
    assert r["pass@1"] == pytest.approx(0.75) and r["pass@2"] == pytest.approx(1.0) and r["greedy_acc"] == 1.0

"""Rollout throughput at the paper's shapes: tokens/s and peak memory of

  (a) Hugging Face ``generate`` on the student (eager, dynamic cache: how TRL's trainers sample without vLLM),
  (b) our student-only rollout (``decode.backend.sample``, StudentSampler),
  (c) our TRB two-model rollout (``decode.backend.sample``, TrustRegionSampler, teacher statistics kept at top-16),
  (d) the memory-bandwidth roofline of each: bytes of weights + KV cache read per decode step / bandwidth,

on a randomly initialised pair with the paper's architectures (nothing is downloaded): a Qwen3-0.6B-shaped
student (hidden 1024, 28 layers, 16 heads, 8 KV heads, head dim 128, MLP 3072) and a Qwen3-4B-shaped teacher
(hidden 2560, 36 layers, 32 heads, 8 KV heads, MLP 9728), vocabulary 151,936, bf16; batch 64, 256-token
prompts, 1,024 new tokens with EOS ignored. Each variant runs once to warm up (compilation / CUDA-graph
capture, reported separately as ``first_s - steady_s``) and then ``--repeats`` times (median).

    python bench/bench_rollout.py                      # GPU, the paper's shapes (fits 8 min on one H100)
    python bench/bench_rollout.py --tiny               # CPU, seconds (the tests run this)
    python bench/bench_rollout.py --out docs/bench_rollout.md   # on a GPU: produces docs/bench_rollout.md (+ .json)
    python bench/bench_rollout.py --engine vllm        # GPU: adds (e) vLLM student-only, (f) vLLM TRB pair
    python bench/bench_rollout.py --cpu --engine vllm  # CPU, pair a32's shapes (head_dim 32), 64 x 40 tokens

``--engine vllm`` adds two rows to the static engine's, from the same run on the same pair: (e) vLLM sampling the
student alone and (f) vLLM's TRB pair model (``trb_exp.decode.vllm``, the trainer's rollout.engine=vllm: the
decode plus its one teacher pass that recomputes the TRB diagnostics), each also as a ratio to the static engine's
row of the same kind (``x static``). vLLM's CPU attention needs head sizes of 32 or more (``--cpu``, ``--tiny``
use 32 with it).

``--bandwidth`` (GB/s) overrides the roofline's bandwidth (defaults: H100 SXM 3,350, H200 4,800; on a CPU
there is no default and the roofline column is left empty unless it is given).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trb_exp.decode.backend import sample  # noqa: E402
from trb_exp.rules import StudentSampler, TrustRegionSampler  # noqa: E402

PAPER = dict(
    student=dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
                 intermediate_size=3072),
    teacher=dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                 intermediate_size=9728),
    vocab=151936, batch=64, prompt=256, new=1024, dtype="bfloat16",
)
TINY = dict(
    student=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                 intermediate_size=64),
    teacher=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                 intermediate_size=96),
    vocab=512, batch=4, prompt=8, new=12, dtype="float32",
)
# pair a32's shapes (model=embedded_a32: head_dim 32 in both towers, which vLLM's CPU attention runs), the notes' 64 x 40
CPU = dict(
    student=dict(hidden_size=96, num_hidden_layers=3, num_attention_heads=3, num_key_value_heads=3, head_dim=32,
                 intermediate_size=256),
    teacher=dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, head_dim=32,
                 intermediate_size=384),
    vocab=64, batch=64, prompt=16, new=40, dtype="float32",
)
TINY_VLLM = dict(TINY, student=dict(TINY["student"], hidden_size=64, head_dim=32),
                 teacher=dict(TINY["teacher"], hidden_size=128, head_dim=32))
BANDWIDTH_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}


def build(shape: dict, vocab: int, dtype: torch.dtype, device: torch.device, seed: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg = Qwen3Config(vocab_size=vocab, max_position_embeddings=32768, tie_word_embeddings=shape["hidden_size"] < 2048,
                      rope_theta=1_000_000.0, bos_token_id=None, eos_token_id=None, pad_token_id=0, **shape)
    torch.manual_seed(seed)
    with torch.device(device):
        model = Qwen3ForCausalLM._from_config(cfg, dtype=dtype)
    return model.eval().requires_grad_(False)


def word_tokenizer(vocab: int):
    """A tokenizer of ``vocab`` tokens ``t0 .. t{vocab-1}`` (vLLM's pair checkpoint copies the student's tokenizer
    files; the benchmark feeds token ids, so any tokenizer of the right size does)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t0", eos_token="t1")  # EOS ignored


def vllm_variants(student, teacher, ids, mask, spec, eps: float, g):
    """(e) vLLM student-only and (f) vLLM TRB pair (trb_exp.decode.vllm.VLLMRollouts, EOS ignored), as
    (key, label, fn, models) rows like the others; each engine is built in its variant's first (untimed) call."""
    from trb_exp.decode.vllm import EngineSettings, VLLMRollouts, open_engine

    settings = EngineSettings(dtype=spec["dtype"], max_model_len=spec["prompt"] + spec["new"] + 8, seed=0)
    backend = open_engine(VLLMRollouts(student, teacher, word_tokenizer(spec["vocab"]), settings))  # closed by main
    kw = dict(max_new_tokens=spec["new"], eos_id=-1, pad_id=0, generator=g, teacher_stats="topk",
              keep_teacher_logprobs=False)

    def student_only():
        backend.sample(ids, mask, StudentSampler(), **kw)

    def trb():
        backend.sample(ids, mask, TrustRegionSampler(eps=eps), **kw)

    return [("vllm_student", "(e) vLLM student-only", student_only, [student]),
            ("vllm_trb", "(f) vLLM TRB pair (+ its teacher pass)", trb, [student, teacher])]


def n_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def roofline_tokens_s(models, batch: int, prompt: int, new: int, bandwidth_gbs: float | None) -> float | None:
    """Upper bound on decode tokens/s from memory bandwidth: every step reads each model's weights once
    and its KV cache of the whole batch at the current length (averaged over the response)."""
    if not bandwidth_gbs:
        return None
    per_step = 0.0
    for m in models:
        c = m.config
        kv_per_token = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * next(m.parameters()).element_size()
        per_step += n_bytes(m) + batch * kv_per_token * (prompt + new / 2)
    return batch / (per_step / (bandwidth_gbs * 1e9))


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_reset(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    return None


def run_variant(fn, device, repeats: int) -> dict:
    _peak_reset(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    steady = statistics.median(times)
    return {"first_s": first, "steady_s": steady, "compile_s": max(0.0, first - steady), "peak_gb": _peak_gb(device)}


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="small shapes on the CPU (seconds)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch", type=int)
    ap.add_argument("--prompt", type=int)
    ap.add_argument("--new", type=int)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--eps", type=float, default=0.01, help="TRB budget (nats per token)")
    ap.add_argument("--cpu", action="store_true", help="pair a32's shapes on the CPU, 64 x 40 tokens")
    ap.add_argument("--engine", default="static", choices=("static", "eager", "vllm"),
                    help="our engine for (b) and (c); vllm: the static engine for (b) and (c), plus the vLLM rows")
    ap.add_argument("--no-compile", action="store_true", help="static engine: do not capture the decode steps")
    ap.add_argument("--skip", default="", help="comma list of variants to skip: hf,student,trb")
    ap.add_argument("--bandwidth", type=float, default=None, help="GB/s for the roofline")
    ap.add_argument("--out", default=None, help="write the markdown table (and a .json next to it)")
    return ap.parse_args(argv)


def resolve_setup(a: argparse.Namespace) -> SimpleNamespace:
    """The shapes (paper or tiny, with --batch/--prompt/--new), device, dtype, repeats and roofline bandwidth."""
    a.vllm = a.engine == "vllm"
    spec = dict((TINY_VLLM if a.vllm else TINY) if a.tiny else CPU if a.cpu else PAPER)
    if a.vllm:
        a.engine = "static"  # (b), (c): the static engine, the ratio's denominator
    for k in ("batch", "prompt", "new"):
        if getattr(a, k):
            spec[k] = getattr(a, k)
    device = torch.device(a.device or ("cpu" if a.tiny or a.cpu or not torch.cuda.is_available() else "cuda"))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return SimpleNamespace(spec=spec, device=device, dtype=getattr(torch, spec["dtype"]), name=name,
                           repeats=a.repeats or (1 if not a.tiny else 2),
                           bw=a.bandwidth or next((v for k, v in BANDWIDTH_GBS.items() if k in name), None),
                           B=spec["batch"], P=spec["prompt"], N=spec["new"])


def make_variants(a: argparse.Namespace, su: SimpleNamespace, student, teacher) -> list[tuple]:
    """(key, label, the rollout to time, the models it reads) for HF generate, ours student-only, ours TRB."""
    g = torch.Generator(device=su.device).manual_seed(0)
    ids = torch.randint(1, su.spec["vocab"], (su.B, su.P), generator=g, device=su.device)
    mask = torch.ones(su.B, su.P, dtype=torch.long, device=su.device)
    kw = dict(max_new_tokens=su.N, eos_id=-1, pad_id=0, engine=a.engine)  # eos_id=-1: EOS ignored
    if a.engine == "static":
        kw.update(compile=not a.no_compile and su.device.type == "cuda")

    def hf():
        from transformers import GenerationConfig

        gc = GenerationConfig(do_sample=True, max_new_tokens=su.N, min_new_tokens=su.N, top_k=0, top_p=1.0,
                              temperature=1.0, pad_token_id=0, eos_token_id=None)
        with torch.no_grad():
            student.generate(input_ids=ids, attention_mask=mask, generation_config=gc)

    def ours_student():
        sample(student, None, ids, mask, StudentSampler(), generator=g, **kw)

    def ours_trb():
        sample(student, teacher, ids, mask, TrustRegionSampler(eps=a.eps), generator=g, teacher_stats="topk", topk=16, **kw)

    variants = [("hf", "(a) HF generate, student, eager", hf, [student]),
                ("student", f"(b) ours student-only ({a.engine})", ours_student, [student]),
                ("trb", f"(c) ours TRB two-model ({a.engine})", ours_trb, [student, teacher])]
    if a.vllm:
        variants += vllm_variants(student, teacher, ids, mask, su.spec, a.eps, g)
    return variants


def measure(variants: list[tuple], skip: set[str], su: SimpleNamespace) -> list[dict]:
    rows = []
    for key, label, fn, models in variants:
        if key in skip:
            continue
        r = run_variant(fn, su.device, su.repeats)
        r.update(variant=key, label=label, tokens_s=su.B * su.N / r["steady_s"],
                 roofline_tokens_s=roofline_tokens_s(models, su.B, su.P, su.N, su.bw))
        r["roofline_frac"] = None if r["roofline_tokens_s"] is None else r["tokens_s"] / r["roofline_tokens_s"]
        rows.append(r)
        print(json.dumps(r), flush=True)
    return rows


def render(rows: list[dict], su: SimpleNamespace, student, teacher, build_s: float) -> str:
    hf_tps = next((r["tokens_s"] for r in rows if r["variant"] == "hf"), None)
    static_tps = {r["variant"]: r["tokens_s"] for r in rows if r["variant"] in ("student", "trb")}
    f = lambda x, d=1: "–" if x is None else f"{x:,.{d}f}"  # noqa: E731
    spec = su.spec
    lines = [f"device: {su.name}; dtype {spec['dtype']}; batch {su.B}, prompt {su.P}, new tokens {su.N} (EOS ignored); "
             f"vocab {spec['vocab']:,}; student {n_bytes(student) / 1e9:.2f} GB, teacher {n_bytes(teacher) / 1e9:.2f} GB "
             f"of weights; built in {build_s:.1f} s; roofline bandwidth {f(su.bw, 0)} GB/s; repeats {su.repeats} (median)",
             "",
             "| variant | tokens/s | × HF generate | × static | roofline tokens/s | % of roofline | peak GB | steady s | "
             "compile/capture s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        x = None if hf_tps is None else r["tokens_s"] / hf_tps
        base = static_tps.get(r["variant"].removeprefix("vllm_")) if r["variant"].startswith("vllm_") else None
        r["x_static"] = None if base is None else r["tokens_s"] / base
        lines.append(f"| {r['label']} | {f(r['tokens_s'])} | {f(x, 2)} | {f(r['x_static'], 2)} | "
                     f"{f(r['roofline_tokens_s'])} | "
                     f"{f(None if r['roofline_frac'] is None else 100 * r['roofline_frac'])} | {f(r['peak_gb'], 2)} | "
                     f"{r['steady_s']:.2f} | {r['compile_s']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    a = parse_args(argv)
    su = resolve_setup(a)
    t = time.perf_counter()
    student = build(su.spec["student"], su.spec["vocab"], su.dtype, su.device, 0)
    teacher = build(su.spec["teacher"], su.spec["vocab"], su.dtype, su.device, 1)
    build_s = time.perf_counter() - t
    rows = measure(make_variants(a, su, student, teacher), set(filter(None, a.skip.split(","))), su)
    if a.vllm:  # this process's vLLM engine (vllm_variants opened it)
        from trb_exp.decode.vllm import close_rollouts

        close_rollouts()
    table = render(rows, su, student, teacher, build_s)
    print(table)
    if a.out:
        cmd = "python bench/bench_rollout.py " + " ".join(argv if argv is not None else sys.argv[1:])
        Path(a.out).write_text(f"# Rollout throughput: HF generate, ours, roofline\n\nGenerated by `{cmd.strip()}`.\n\n"
                               + table + "\n")
        Path(a.out).with_suffix(".json").write_text(json.dumps({"spec": su.spec, "device": su.name, "rows": rows}, indent=1))
    return {"rows": rows, "table": table}


if __name__ == "__main__":
    main()

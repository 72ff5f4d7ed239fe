"""Data parallelism on CPU with the gloo backend: 2 processes on a fixed rollout batch give the loss and
the gradient of 1 process on the whole batch; the helpers that reduce metrics and evaluations over ranks."""

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from trb_exp import losses
from trb_exp.distributed import DistContext, combine_evaluations, init_distributed, rank_seed, unwrap, wrap_student
from trb_exp.decode.forward import response_logits

pytestmark = pytest.mark.slow  # torchrun / multi-process gloo runs

B, PROMPT, RESP, MICRO = 8, 5, 6, 2


def _batch():
    """A fixed rollout batch: prompt+response ids, a response mask with ragged lengths, teacher log-probs."""
    g = torch.Generator().manual_seed(1)
    from trb_exp.data.tokenizer import build_char_tokenizer

    V = len(build_char_tokenizer())
    ids = torch.randint(3, V, (B, PROMPT + RESP), generator=g)
    lengths = torch.tensor([6, 3, 5, 1, 6, 2, 4, 6])
    resp_mask = torch.arange(RESP)[None] < lengths[:, None]
    attn = torch.cat([torch.ones(B, PROMPT, dtype=torch.long), resp_mask.long()], 1)
    t_lp = torch.log_softmax(torch.randn(B, RESP, V, generator=g) * 2, -1)
    return ids, attn, resp_mask, t_lp


def _model():
    from trb_exp.data.tokenizer import build_char_tokenizer
    from trb_exp.models import tiny_llama

    return tiny_llama(build_char_tokenizer(), hidden=16, layers=2, heads=2, intermediate=32, seed=3)


def _loss_and_grads(ctx: DistContext, strategy: str):
    """The trainer's update on this rank's rows: micro-batches, token mean over the WHOLE step's tokens."""
    torch.manual_seed(0)
    model = wrap_student(_model(), ctx, strategy)
    ids, attn, mask, t_lp = _batch()
    rows = ctx.shard(list(range(B)))
    ids, attn, mask, t_lp = ids[rows], attn[rows], mask[rows], t_lp[rows]
    n_tokens = ctx.all_sum(mask.sum())
    total = 0.0
    for s in range(0, len(rows), MICRO):
        sl = slice(s, s + MICRO)
        logits = response_logits(model, ids[sl], attn[sl], PROMPT)
        per_tok = losses.kl_student_teacher_topk(logits, t_lp[sl], k=4)
        loss = losses.masked_token_mean(per_tok, mask[sl], n_tokens / ctx.world)
        loss.backward()
        total += loss.item()
    grads = {}
    for name, p in unwrap(model).named_parameters():
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[name] = g.detach().clone()
    return ctx.all_sum(total) / ctx.world, grads  # each rank normalised by N/W: the sum over ranks is W x the mean


def _worker(rank, world, port, strategy, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    loss, grads = _loss_and_grads(ctx, strategy)
    if ctx.is_main:
        torch.save({"loss": loss, "grads": grads}, out)
    ctx.close()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_give_the_loss_and_gradient_of_one(strategy, tmp_path):
    ref_loss, ref_grads = _loss_and_grads(DistContext(), strategy)
    out = tmp_path / "rank0.pt"
    mp.start_processes(_worker, args=(2, _free_port(), strategy, str(out)), nprocs=2, join=True, start_method="spawn")
    got = torch.load(out, weights_only=True)
    # every rank normalises its token sum by N_global / W (DDP averages gradients over the W ranks)
    assert got["loss"] == pytest.approx(ref_loss, rel=1e-6)
    assert set(got["grads"]) == set(ref_grads)
    for name, g in ref_grads.items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_single_process_context_is_the_identity():
    ctx = DistContext()
    assert ctx.shard([1, 2, 3]) == [1, 2, 3] and ctx.all_sum(5.0) == 5.0 and ctx.gather("x") == ["x"]
    assert ctx.reduce_metrics({"a": 1.0}) == {"a": 1.0} and ctx.is_main and not ctx.active
    assert rank_seed(7, 0) == 7 and rank_seed(7, 1) != rank_seed(7, 2) != 7
    m = torch.nn.Linear(2, 2)
    assert wrap_student(m, ctx, "ddp") is m and unwrap(m) is m


def test_shard_needs_an_even_split():
    from trb_exp.config import ConfigError

    ctx = DistContext(rank=1, world=2)
    assert ctx.shard([0, 1, 2, 3]) == [2, 3]
    with pytest.raises(ConfigError, match=r"trainer.prompts_per_step=3: must be divisible by the number of processes \(2\)"):
        ctx.shard([0, 1, 2])
    with pytest.raises(ConfigError, match="trainer.strategy='zero3': choose one of auto, ddp, fsdp"):
        wrap_student(torch.nn.Linear(2, 2), ctx, "zero3")


def test_combine_evaluations_equals_one_evaluation_of_all_problems():
    # shard 1: 2 problems, c/n = 1/4, 3/4; shard 2: 1 problem, 4/4; one evaluation of all three: mean 2/3
    a = {"pass@1": 0.5, "pass@1_se": math.sqrt((3 / 12 + 3 / 12) / 4) / 2, "greedy_acc": 0.5, "mean_length": 10.0}
    b = {"pass@1": 1.0, "pass@1_se": 0.0, "greedy_acc": 1.0, "mean_length": 7.0}
    c = combine_evaluations([a, b, {}], [2, 1, 0])
    assert c["pass@1"] == pytest.approx(2 / 3) and c["greedy_acc"] == pytest.approx(2 / 3)
    assert c["mean_length"] == pytest.approx(9.0)
    assert c["pass@1_se"] == pytest.approx(math.sqrt((3 / 12 + 3 / 12 + 0) / 4) / 3)


# ------------------------------------------------------------------ the trainer's own update and loop
def _trainer_update(ctx: DistContext, micro: int):
    """train.update (the trainer's optimizer step) on this rank's rows of a fixed rollout batch."""
    from conftest import compose

    from trb_exp.data.tokenizer import build_char_tokenizer
    from trb_exp.experiment import Experiment
    from trb_exp.methods import Method
    from trb_exp.decode.record import Rollout
    from trb_exp.run.state import TrainState
    from trb_exp.trainer import update

    cfg = compose(["method=opd", f"trainer.micro_batch_size={micro}", "optim.warmup_steps=0"])
    tok = build_char_tokenizer()
    torch.manual_seed(0)
    student = _model()
    ids, attn, mask, t_lp = _batch()
    rows = ctx.shard(list(range(B)))
    ro = Rollout(input_ids=ids[rows], attention_mask=attn[rows], response_mask=mask[rows], prompt_len=PROMPT,
                 teacher_logprobs=t_lp[rows], token_logprobs_student=None, finished=torch.ones(len(rows), dtype=torch.bool))
    exp = Experiment(cfg=cfg, device=torch.device("cpu"), tok=tok, student=student, benchmarks=[],
                     eos_id=tok.eos_token_id, eos_ids=(tok.eos_token_id,), method=Method.from_cfg(cfg.method, cfg.schedule),
                     dist=ctx, train_student=wrap_student(student, ctx, "ddp"))
    state = TrainState.create(student, cfg, torch.device("cpu"))
    m = update(exp, state, ro, step=0)
    return m, {k: v.detach().clone() for k, v in student.state_dict().items()}


def _update_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import sys

    sys.path.insert(0, os.path.dirname(__file__))  # conftest's compose
    torch.set_num_threads(1)
    ctx = init_distributed("cpu")
    m, weights = _trainer_update(ctx, micro=2)
    if ctx.is_main:
        torch.save({"loss": m["train/loss"], "grad_norm": m["train/grad_norm"], "weights": weights}, out)
    ctx.close()


def test_trainer_update_on_two_processes_equals_one(tmp_path):
    """The trainer's update (global token normaliser, DDP with no_sync over micro-batches, clipping, AdamW) on
    2 processes x 4 rows gives the loss, gradient norm and updated weights of 1 process on all 8 rows."""
    ref, ref_w = _trainer_update(DistContext(), micro=4)
    out = tmp_path / "rank0.pt"
    mp.start_processes(_update_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True, start_method="spawn")
    got = torch.load(out, weights_only=True)
    assert got["loss"] == pytest.approx(ref["train/loss"], rel=1e-6)
    assert got["grad_norm"] == pytest.approx(ref["train/grad_norm"], rel=1e-5)
    for k, w in ref_w.items():
        torch.testing.assert_close(got["weights"][k], w, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("method", ["trb", "opd"])
def test_torchrun_two_processes_train_end_to_end(method, tmp_path):
    """`torchrun --nproc_per_node 2 -m trb_exp.train`: 3 steps finish, rank 0 alone writes one metrics file
    and the student (which loads), and no other run directory is left behind."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "WANDB_MODE": "disabled"}
    work = tmp_path / "cwd"
    work.mkdir()
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "trb_exp.train", f"method={method}", "logger=none", "trainer.max_steps=3",
                        "trainer.prompts_per_step=4", "trainer.eval_every=0", "trainer.eval_size=8",
                        "trainer.eval_samples=2", "trainer.progress=false", "trainer.checkpoint_every=2"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    runs = list((work / "outputs" / "runs").iterdir())
    assert len(runs) == 1, runs  # rank 1's own Hydra directory is gone
    run = runs[0]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "train/loss" in row] == [1, 2, 3]
    assert json.loads((run / "summary.json").read_text())["method"] == method
    assert (run / "checkpoints" / "step_2" / "state.pt").is_file()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "student")
    assert r.stdout.count("[done]") == 1  # one process reports


# ------------------------------------------------------------------ FSDP2 in the trainer; the SFT warm start
def _torchrun(cwd, *args, nproc=2, timeout=240):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root), "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
                           "-m", "trb_exp.train", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _rows(run_dir):
    """metrics.jsonl without wall-clock values."""
    import json

    return [{k: v for k, v in json.loads(line).items()
             if not k.startswith("time/") and k not in ("rollout/decode_s", "trb/solver_share")}
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


FSDP_ARGS = ["method=trb", "logger=none", "trainer.strategy=fsdp", "trainer.prompts_per_step=4", "trainer.eval_every=0",
             "trainer.eval_size=8", "trainer.eval_samples=2", "trainer.progress=false", "trainer.max_new_tokens=12",
             "trainer.keep_checkpoints=1", "trainer.micro_batch_size=2"]


def test_torchrun_fsdp_checkpoints_resumes_and_saves_one_student(tmp_path):
    """`torchrun --nproc_per_node 2 ... trainer.strategy=fsdp`: an uninterrupted 4-step run with a sharded
    checkpoint after step 3 (DCP shards of both ranks + state.pt, atomically in place, the older step pruned
    by keep_checkpoints=1); a run resumed from that checkpoint to step 4 logs the same step-4 metrics and ends
    with the same consolidated student (one safetensors model that from_pretrained loads, equal to the
    sharded weights within fp tolerance)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from trb_exp.run.state import list_checkpoints, sharded

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    r = _torchrun(tmp_path, *FSDP_ARGS, "trainer.max_steps=4", "trainer.checkpoint_every=3", f"hydra.run.dir={full}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    ckpts = list_checkpoints(full / "checkpoints")
    assert [c.name for c in ckpts] == ["step_3"] and sharded(ckpts[0])
    assert sorted(p.name for p in (ckpts[0] / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not list((full / "checkpoints").glob(".tmp-*"))
    assert not (ckpts[0] / "student").exists()  # a sharded checkpoint is for resuming

    r = _torchrun(tmp_path, *FSDP_ARGS, "trainer.max_steps=4", "trainer.checkpoint_every=3",
                  f"trainer.resume={ckpts[0]}", f"hydra.run.dir={resumed}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "[resume]" in r.stdout
    a, b = _rows(full), _rows(resumed)
    assert [row["step"] for row in a if "train/loss" in row] == [1, 2, 3, 4]
    assert b[: len(a) - 2] == a[: len(a) - 2]  # seeded from the checkpointed run: up to step 3
    for x, y in zip(a[-2:], b[-2:]):  # step 4's training row and the final evaluation
        assert x.keys() == y.keys()
        for k in x:
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), k
    wa, wb = load_file(full / "student" / "model.safetensors"), load_file(resumed / "student" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)
    model = AutoModelForCausalLM.from_pretrained(full / "student")  # one ordinary model, tied weights once
    assert type(model).__name__ == "LlamaForCausalLM" and "lm_head.weight" not in wa
    torch.testing.assert_close(model.model.embed_tokens.weight, wa["model.embed_tokens.weight"])


def test_torchrun_sft_warmup_two_processes(tmp_path):
    """`torchrun --nproc_per_node 2 -m trb_exp.train method=sft_warmup`: the warm start decodes its teacher
    samples on both ranks, trains them with DDP, then 2 OPD steps finish."""
    import json

    r = _torchrun(tmp_path, "method=sft_warmup", "method.sft_steps=2", "method.sft_updates=3", "method.sft_samples=2",
                  "logger=none", "trainer.max_steps=2", "trainer.prompts_per_step=4", "trainer.eval_every=0",
                  "trainer.eval_size=8", "trainer.eval_samples=2", "trainer.progress=false", "trainer.max_new_tokens=12",
                  "trainer.micro_batch_size=2", "trainer.save_student=false", f"hydra.run.dir={tmp_path / 'run'}")
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = _rows(tmp_path / "run")
    sft = [row for row in rows if "sft/loss" in row]
    assert [row["sft/update"] for row in sft] == [1, 2, 3] and all(row["sft/responses"] == 2 * 2 * 4 for row in sft)
    assert [row["step"] for row in rows if "train/loss" in row] == [1, 2]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["method"] == "sft_warmup"
    assert r.stdout.count("[sft]") == 1

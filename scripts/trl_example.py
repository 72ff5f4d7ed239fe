#!/usr/bin/env python3
"""TRB with TRL on the embedded pair: change one class, keep TRL's config, data and loss.

Trains the shipped tiny student against the shipped teacher on the arithmetic task with
``TRBDistillationTrainer`` (TRL's ``DistillationTrainer`` with TRB rollouts during the warmup), prints the
``trb/*`` metrics of every step from ``trainer.state.log_history``, and the student's greedy accuracy on
test problems before and after. ``--plain`` runs TRL's own ``DistillationTrainer`` on the same settings.

    pip install -e ".[trl]"
    python scripts/trl_example.py                           # 30 steps, K = 15, eps0 = 0.5 (29 s on a shared 2-core CPU)
    python scripts/trl_example.py --steps 60 --warmup-steps 30 --schedule cosine
    python scripts/trl_example.py --plain                   # the same run without TRB
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for k, v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled",
             "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(k, v)


def greedy_accuracy(model, tok, rows, max_new_tokens):
    import torch

    from trb_exp.data import encode_prompts
    from trb_exp.data.arithmetic import grade

    model.eval()
    ids, mask = encode_prompts(tok, rows["prompt"])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    texts = tok.batch_decode(out[:, ids.shape[1]:], skip_special_tokens=True)
    return sum(grade(t, a) for t, a in zip(texts, rows["answer"])) / len(texts)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup-steps", type=int, default=15, help="K: the budget reaches 0 at step K")
    ap.add_argument("--eps0", type=float, default=0.5, help="nats per token (see README: why 0.5 for this pair)")
    ap.add_argument("--schedule", default="linear")
    ap.add_argument("--budget", default="absolute", choices=["absolute", "relative"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--eval-size", type=int, default=100)
    ap.add_argument("--plain", action="store_true", help="TRL's own DistillationTrainer instead")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DistillationConfig, DistillationTrainer

    from trb_exp.data.arithmetic import ArithmeticSpec, make_splits
    from trb_exp.integrations.trl import TRBConfig, TRBDistillationTrainer
    from trb_exp.models import EMBEDDED

    tok = AutoTokenizer.from_pretrained(EMBEDDED / "student")  # a character-level tokenizer, left padding
    tok.padding_side = "left"
    student = AutoModelForCausalLM.from_pretrained(EMBEDDED / "student")
    teacher = AutoModelForCausalLM.from_pretrained(EMBEDDED / "teacher")
    splits = make_splits(ArithmeticSpec())
    train = splits["train"].select_columns(["prompt"])  # TRL reads the "prompt" column
    test = splits["test"].select(range(a.eval_size))

    args = DistillationConfig(
        output_dir=tempfile.mkdtemp(prefix="trl_example_"), max_steps=a.steps, per_device_train_batch_size=a.batch,
        max_completion_length=40, learning_rate=a.lr, lr_scheduler_type="constant", logging_steps=1,
        report_to=[], save_strategy="no", use_cpu=True, seed=a.seed, bf16=False, disable_tqdm=True,
        beta=1.0,  # TRL's generalized JSD at beta = 1: reverse KL, the OPD loss
    )
    kw = dict(model=student, teacher_model=teacher, args=args, train_dataset=train, processing_class=tok)
    if a.plain:
        trainer = DistillationTrainer(**kw)
    else:  # the one change
        trainer = TRBDistillationTrainer(**kw, trb=TRBConfig(eps0=a.eps0, warmup_steps=a.warmup_steps,
                                                             schedule=a.schedule, budget=a.budget))
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    before = greedy_accuracy(student, tok, test, 40)
    trainer.train()
    after = greedy_accuracy(student, tok, test, 40)

    print(f"{'step':>4} {'loss':>7} {'trb/eps':>8} {'beta_mean':>9} {'kl_mean':>8} {'kl_max':>7} {'len':>5} {'step_s':>6}")
    for h in trainer.state.log_history:
        if "loss" not in h:
            continue
        print(f"{h['step']:>4} {h['loss']:>7.3f} {h.get('trb/eps', float('nan')):>8.3f} "
              f"{h.get('trb/beta_mean', float('nan')):>9.3f} {h.get('trb/kl_mean', float('nan')):>8.3f} "
              f"{h.get('trb/kl_max', float('nan')):>7.3f} {h['completions/mean_length']:>5.1f} {h['step_time']:>6.2f}")
    print(f"greedy accuracy on {a.eval_size} test problems: {before:.3f} -> {after:.3f} "
          f"({'plain DistillationTrainer' if a.plain else 'TRBDistillationTrainer'}, {a.steps} steps)")


if __name__ == "__main__":
    main()

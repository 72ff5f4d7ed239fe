"""python scripts/prepare_pair_a32_student.py OUT_DIR: how trb_exp/assets/embedded_a32 was built (1,205 s on one core).

Pair c = pair a's teacher (same TeacherSpec, seed and task: copied from trb_exp/assets/embedded/teacher) plus a
student of pair a32's spec trained exactly as prepare.prepare_pair trains it. One-off, to save the ~30 min teacher SFT."""
import json, random, shutil, sys, time
from dataclasses import asdict
from pathlib import Path
import torch
from trb_exp import prepare as P
from trb_exp.data.arithmetic import grade, make_splits
from trb_exp.data.tokenizer import build_char_tokenizer
from trb_exp.evaluation import evaluate
from trb_exp.models import tiny_llama, EMBEDDED

torch.set_num_threads(1)
out = Path(sys.argv[1])
spec = P.pair_spec("a32")
a = json.loads((EMBEDDED / "prepare.json").read_text())
assert a["spec"]["teacher"] == asdict(spec.teacher) and a["spec"]["seed"] == spec.seed, "teacher spec differs"
torch.manual_seed(spec.seed)
t0 = time.time()
splits = make_splits(spec.task); tok = build_char_tokenizer(); test = splits["test"]
prompts, answers = list(test["prompt"]), list(test["answer"])
corpus = P.student_corpus(list(splits["train"]), spec, random.Random(spec.seed))
student = tiny_llama(tok, seed=spec.seed + 1, **asdict(spec.student))
s_hist = P._sft(student, tok, corpus, steps=spec.student_steps, batch_size=spec.batch_size, lr=spec.lr,
                seed=spec.seed + 1, desc="student pretrain", prompt_loss=True)
s_final = evaluate(student, tok, prompts, answers, grade, n_samples=8, max_new_tokens=48, seed=spec.seed + 1)
print("student:", s_final)
out.mkdir(parents=True, exist_ok=True)
shutil.copytree(EMBEDDED / "teacher", out / "teacher")
student.save_pretrained(out / "student"); tok.save_pretrained(out / "student")
report = {"spec": asdict(spec), "key": spec.key(), "seconds": round(time.time() - t0, 1),
          "teacher": {**a["teacher"], "copied_from": "trb_exp/assets/embedded/teacher (pair a: the same teacher spec and seed)"},
          "student": {"params": sum(p.numel() for p in student.parameters()), "eval": s_final, "history": s_hist}}
(out / "prepare.json").write_text(json.dumps(report, indent=1))
print(json.dumps({"key": report["key"], "seconds": report["seconds"]}))

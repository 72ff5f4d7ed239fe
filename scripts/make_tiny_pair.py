"""A randomly initialised Qwen3-architecture student/teacher pair on the embedded task's character tokenizer,
saved like any Hugging Face model (safetensors): a pair for ``model=hf`` that needs no download.

    python scripts/make_tiny_pair.py OUT_DIR        # writes OUT_DIR/student and OUT_DIR/teacher
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trb_exp.data.tokenizer import build_char_tokenizer  # noqa: E402


def make_pair(out: Path) -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tok = build_char_tokenizer()
    for role, (hidden, layers, seed) in {"student": (64, 2, 1), "teacher": (128, 3, 2)}.items():
        torch.manual_seed(seed)
        cfg = Qwen3Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=256,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          tie_word_embeddings=False)
        Qwen3ForCausalLM(cfg).save_pretrained(out / role)
        tok.save_pretrained(out / role)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    make_pair(Path(sys.argv[1]))
    print(f"[pair] {sys.argv[1]}/student, {sys.argv[1]}/teacher")

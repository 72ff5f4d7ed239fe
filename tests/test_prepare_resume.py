"""trb_exp.prepare: an interrupted build resumes from its saved progress and ends bit for bit where an
uninterrupted build ends (weights and history)."""

import pytest
import torch

import trb_exp.prepare as P
from trb_exp.data.tokenizer import build_char_tokenizer
from trb_exp.models import tiny_llama

ROWS = [("1+2=", "1+2=3;A:3"), ("4*5=", "4*5=20;A:20"), ("9-3=", "9-3=6;A:6"), ("2*2+1=", "2*2=4;4+1=5;A:5")]


def _train(tok, progress, **kw):
    model = tiny_llama(tok, hidden=32, layers=1, heads=1, intermediate=64, seed=3)
    hist = P._sft(model, tok, ROWS, steps=7, batch_size=4, lr=2e-3, seed=5, desc="t", prompt_loss=False,
                  eval_fn=lambda m: {"pass@1": float(sum(p.detach().sum() for p in m.parameters()))}, eval_every=3,
                  progress=progress, save_every=2, **kw)
    return model, hist


def test_interrupted_sft_resumes_bit_for_bit(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    tok = build_char_tokenizer()
    ref, ref_hist = _train(tok, None)
    calls, real = [], P.accumulate_step

    def dies_at_step_6(*a, **k):  # after the step-4 save; steps 5 and 6 are lost
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(P, "accumulate_step", dies_at_step_6)
    with pytest.raises(KeyboardInterrupt):
        _train(tok, tmp_path / "t.pt")
    assert torch.load(tmp_path / "t.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(P, "accumulate_step", real)
    saves = []
    model, hist = _train(tok, tmp_path / "t.pt", on_save=lambda: saves.append(1))
    assert hist == ref_hist and [h["step"] for h in hist] == [3, 6]
    for (name, a), (_, b) in zip(ref.state_dict().items(), model.state_dict().items()):
        assert torch.equal(a, b), name
    assert torch.load(tmp_path / "t.pt", weights_only=True)["done"] and saves == [1, 1]  # step 6, the end
    again, hist2 = _train(tok, tmp_path / "t.pt")  # a finished phase is loaded, not trained again
    assert hist2 == ref_hist and all(torch.equal(a, b) for a, b in zip(ref.parameters(), again.parameters()))

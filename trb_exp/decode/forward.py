"""The one place a model is called during decoding and in the loss: ``model_logits`` (inputs to the model's device,
logits back, cut to the pair's shared vocabulary), ``decode_step`` (one KV-cached step, the last position's
logits) and ``response_logits`` (one batched forward over prompt+response)."""

from __future__ import annotations

import functools

from torch import Tensor

from trb_exp.decode.record import positions_from_mask

__all__ = ["decode_step", "model_logits", "response_logits"]


def model_logits(model, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, last_only: bool = False, **kw):
    """The one place a model is called: inputs go to the model's device (a teacher may live on a
    second GPU) and the logits come back to the inputs' device, cut to the pair's shared vocabulary
    ``model.trb_vocab_size`` when the two embedding matrices are padded differently (``models.set_vocab_size``)."""
    home = input_ids.device
    dev = getattr(model, "device", home)
    if dev != home:
        input_ids, attention_mask, position_ids = (x.to(dev) for x in (input_ids, attention_mask, position_ids))
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kw)
    logits = out.logits[:, -1] if last_only else out.logits
    vocab = getattr(getattr(model, "module", model), "trb_vocab_size", None)  # seen through a DDP wrapper
    if vocab is not None:
        logits = logits[..., :vocab]
    return logits.to(home), out


@functools.cache
def _cache_field() -> str:
    """The name transformers gives the KV cache, as a forward argument and an output field: ``cache`` from 5.2x
    on, ``past_key_values`` in 5.19 (which would silently ignore ``cache=``)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def decode_step(model, ids, attention_mask, positions, cache):
    """One KV-cached decode step: the next-token logits [B, V] of the last position and the grown cache."""
    name = _cache_field()
    logits, out = model_logits(model, ids, attention_mask, positions, last_only=True, use_cache=True, **{name: cache})
    return logits, getattr(out, name)


def response_logits(model, input_ids: Tensor, attention_mask: Tensor, prompt_len: int) -> Tensor:
    """One batched forward over prompt+response; logits [B, T, V] predicting each response token."""
    logits, _ = model_logits(model, input_ids, attention_mask, positions_from_mask(attention_mask), use_cache=False)
    return logits[:, prompt_len - 1 : -1]

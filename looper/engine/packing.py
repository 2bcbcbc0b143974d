"""Padding-free forwards for trainers whose collators pad: the model's backbone runs a batch's real tokens packed
into one row, and the padded layout is restored only at its output.

TRL's DPO collator pads the chosen and rejected sequences of a batch to the longest (its `padding_free` is switched
off in TRL 1.16), so every layer computes on the padding too. `pack_backbone(model)` wraps the forward of the
model's decoder stack (what TRL's fused LM head calls): given `input_ids` and an `attention_mask` [rows, length], it
runs the masked-in tokens as one row [1, tokens] with per-sequence position ids and the sequence boundaries
(`cu_seq_lens_*`, as TRL's padding-free SFT collator gives them), so that looper's training attention
(`attend_padding_free`: FlashAttention-2 varlen on a GPU, sdpa with transformers' packed mask elsewhere) keeps the
sequences apart, and scatters the last hidden states back to [rows, length, hidden] (zeros at padding, which the
loss never reads: its labels there are -100). The loss is the padded batch's; no FLOP goes to padding in the layers.
Must never read the config.
"""

import functools

import torch


def pack_backbone(model) -> None:
    """Make `model`'s decoder stack (`model.base_model` of a transformers causal LM, under any PEFT wrapping) run
    padded batches packed (module docstring). Batches without an attention mask, with embeddings instead of ids, or
    with their own position ids pass through unchanged."""
    backbone = _backbone(model)
    inner = backbone.forward
    if getattr(inner, "looper_packed", False):
        return

    @functools.wraps(inner)
    def forward(input_ids=None, attention_mask=None, **kwargs):
        padded = input_ids is not None and attention_mask is not None and input_ids.dim() == 2
        if not padded or kwargs.get("position_ids") is not None:
            return inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        real = attention_mask.bool()
        lengths = real.sum(1)
        starts = torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        longest = int(lengths.max())
        out = inner(
            input_ids=input_ids[real][None],
            position_ids=(real.cumsum(1) - 1)[real][None],
            cu_seq_lens_q=starts,
            cu_seq_lens_k=starts,
            max_length_q=longest,
            max_length_k=longest,
            **kwargs,
        )
        packed = out.last_hidden_state[0]
        hidden = packed.new_zeros(*input_ids.shape, packed.shape[-1])
        hidden[real] = packed
        out.last_hidden_state = hidden
        return out

    forward.looper_packed = True
    backbone.forward = forward


def _backbone(model):
    """The decoder stack under `model`: PEFT's wrappers (`get_base_model`) unwrapped, then the causal LM's
    `base_model` (transformers' name for its decoder, `model.model` in Llama)."""
    while hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model.base_model

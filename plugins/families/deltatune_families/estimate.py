"""What the Llama family's fast training forward (:mod:`deltatune_families.fast.llama`) keeps for
backward, for ``deltatune estimate``: the family's optional ``activation_terms``.

The core counts the parameters on a meta-device model with the run's deltas applied and asks the
family serving it for these terms when its fast forward would run the model; without them it uses
the plain Hugging Face forward's (``deltatune.api.plain_activation_bytes``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from deltatune.api import (
    HEAD_ROW_STEP,
    INPUT_GROUPS,
    SHAPE_STEPS,
    DeltaLinear,
    Projection,
    decoder_widths,
    delta_keeps,
    grouped_product_class,
    has_dropout,
    plain_activation_bytes,
    round_up,
)
from deltatune_families.fast.kernels import FLASH_MIN_WIDTH

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
"""The linear layers of a Llama decoder layer under ``self_attn`` (the others are under ``mlp``)."""


@dataclass
class Group:
    """What one group of linear layers (of the first decoder layer) makes autograd keep."""

    in_features: int
    out_features: int
    fused: bool = True
    """The fast path computes it as one grouped product (``deltatune.api.GroupedProduct``)."""
    grouped_kept: int = 0
    """Elements per token the grouped product keeps for backward (its input included)."""
    compute_copies: int = 0
    """Elements the grouped product holds in the compute dtype between steps."""
    trains: bool = False
    keeps_input: bool = False
    extra: int = 0
    dropout_copies: int = 0
    weight_copies: int = 0
    """Elements of trained base weights cast to the compute dtype (autocast keeps the copy)."""
    delta_copies: int = 0
    """Elements of trained delta weights; an unfused group casts them under autocast (kept for backward)."""


def first_layer_groups(model: nn.Module, quantized: set[str], widths: dict[str, int]) -> dict[str, Group] | None:
    """The groups (``deltatune.api.INPUT_GROUPS``) of the first decoder layer of ``model`` (after
    deltas), or ``None`` when the decoder is not Llama-shaped; ``quantized``: the names of the quantized
    modules; ``widths``: each delta method's inner width."""
    first = model.get_decoder().layers[0]
    prefix = next(name for name, module in model.named_modules() if module is first) + "."
    out: dict[str, Group] = {}
    for key, members in INPUT_GROUPS:
        blocks = ["self_attn" if member in ATTENTION_PROJECTIONS else "mlp" for member in members]
        modules = [getattr(getattr(first, block), member, None) for block, member in zip(blocks, members)]
        if any(module is None for module in modules):
            return None
        group = Group(in_features=modules[0].in_features, out_features=sum(m.out_features for m in modules))
        projections = [None if f"{prefix}{block}.{name}" in quantized else Projection.of(module)
                       for block, name, module in zip(blocks, members, modules)]
        product = grouped_product_class(projections) if all(p is not None for p in projections) else None
        group.fused = product is not None
        if product is not None:
            group.grouped_kept = product.kept_per_token(projections)
            group.compute_copies = product.compute_copies(projections)
        for module in modules:
            base = module.base_layer if isinstance(module, DeltaLinear) else module
            if base.weight.requires_grad:
                group.trains = group.keeps_input = True
                group.weight_copies += base.weight.numel()
            if isinstance(module, DeltaLinear):
                for name, delta in module.deltas.items():
                    saves_input, extra = delta_keeps(delta, module.in_features, module.out_features, widths.get(name, 0))
                    trained = any(p.requires_grad for p in delta.parameters())
                    group.delta_copies += sum(p.numel() for p in delta.parameters() if p.requires_grad)
                    dropout = has_dropout(delta)
                    group.trains |= trained
                    group.keeps_input |= saves_input and not dropout  # dropout keeps its own copy
                    group.extra += extra
                    group.dropout_copies += int(dropout)
        out[key] = group
    return out


class LlamaActivations:
    """The activation terms of the Llama fast forward for one model (its first layer's groups)."""

    def __init__(self, groups: dict[str, Group], layers: int, qk_norm: bool = False) -> None:
        self.groups = groups
        self.qk_norm = qk_norm
        """Whether attention normalizes each query and key head (Qwen 3's QK-norm)."""
        self.compute_copies = sum(g.compute_copies for g in groups.values() if g.fused) * layers
        """Elements of the compute-dtype copies of trained weights the grouped products keep, over all layers."""

    @classmethod
    def of(cls, model: nn.Module, quantized: set[str], widths: dict[str, int]) -> LlamaActivations | None:
        """The terms of ``model`` (see :func:`first_layer_groups`), or ``None`` when it is not Llama-shaped."""
        groups = first_layer_groups(model, quantized, widths)
        if groups is None:
            return None
        attention = getattr(model.get_decoder().layers[0], "self_attn", None)
        return cls(groups, model.config.num_hidden_layers, qk_norm=hasattr(attention, "q_norm"))

    def activation_bytes(self, config: Any, lay: Any, batch: int, seq: int, compute: int,
                         checkpointing: bool = False, labelled: float = 1.0,
                         quantized_saves_input: bool = False, device: str = "cpu") -> dict[str, float]:
        """Bytes autograd keeps for backward for one micro-batch of ``batch`` rows of ``seq`` tokens.

        Per decoder layer and token, with ``c`` the compute dtype's bytes (2 for bf16, 4 for fp32),
        ``h`` hidden, ``i`` intermediate, ``q``/``kv`` the query and key/value widths, ``H`` heads and
        ``W`` the sequence length:

        * each RMSNorm keeps its input and 1/rms: ``c h + 4`` (twice);
        * each group of linear layers sharing an input (q/k/v, o, gate/up, down) keeps what its grouped
          product says (``GroupedProduct.kept_per_token``): a low-rank product keeps the input (``c h``,
          ``c q``, ``c h``, ``c i``) and its inner output (``c r``), frozen bases alone nothing;
        * attention keeps q, k, v and the softmax probabilities: ``c (q + 2 kv) + c H W`` per row of its
          ``(examples x width)`` layout (width rounded up, as the token rows are); from
          ``FLASH_MIN_WIDTH`` on (the CPU's flash kernel) q, k, v, the output and the fp32 log-sum-exp
          of every query head, ``c (2 q + 2 kv) + 4 H``, and one layer's backward holds no ``W x W``
          scores (``attention_transient``: the fp32 gradients of q, k and v instead); off the CPU the
          fast forward leaves such widths to the model's own forward, whose terms apply;
        * with QK-norm, its RMSNorm keeps the q/k/v projections' output and 1/rms of every query and key
          head: ``c (q + 2 kv) + 4 (H + KV)``;
        * the SiLU gate keeps gate and up: ``2 c i``.

        A group the fast path does not run as a grouped product (a quantized base, dropout, a delta
        without a grouped product, several deltas, a trained weight) runs its modules under autocast: it
        keeps its input only when a delta or a trained weight needs it, what each delta keeps
        (``delta_keeps``), a dropped copy and a scaled noise mask per dropout (``2 c in``), and the
        compute-dtype copy of a trained weight. With ``quantized_saves_input`` (older bitsandbytes, e.g.
        0.41 of the 2023 published runs, kept the input of every 4-bit matmul; 0.50 keeps only the packed
        weight), a quantized group keeps its input.

        Nothing is kept before the first trained tensor of the first layer. The head keeps the final
        norm's input and the gradient of the hidden states of every labelled token (``2 c h + 4``; the
        chunked cross-entropy keeps no logits). With gradient checkpointing each layer keeps only its
        input (``c h``) and one layer is recomputed at a time. ``lay`` is the core's layout of the model
        (``trainable_embeddings``, ``trainable_head``).
        """
        if round_up(seq, SHAPE_STEPS[1]) >= FLASH_MIN_WIDTH and device != "cpu":
            return plain_activation_bytes(config, lay, batch, seq, compute, checkpointing, labelled,
                                          quantized_saves_input)
        h, i, heads, head_dim, q, kv = decoder_widths(config)
        # the fast path rounds its shapes up (SHAPE_STEPS): token rows, attention
        # width (one example per row here), and the head's labelled rows
        tokens_step, width_step = SHAPE_STEPS
        tokens = round_up(batch * seq, tokens_step)
        width = round_up(seq, width_step)
        attention_rows = batch * width
        labelled_tokens = round_up(math.ceil(batch * seq * labelled), HEAD_ROW_STEP)
        flash = width >= FLASH_MIN_WIDTH

        def group_bytes(group: Group, grad: bool) -> float:
            if group.fused:
                return compute * group.grouped_kept
            # dropout keeps its scaled noise (when its input needs a gradient) and the dropped copy
            kept = compute * group.extra + group.dropout_copies * compute * group.in_features * (2 if grad else 1)
            if group.keeps_input or quantized_saves_input:
                kept += compute * group.in_features
            copies = group.weight_copies + (0 if group.fused else group.delta_copies)
            return kept + (compute * copies / tokens if compute != 4 else 0)

        def layer(grad: bool) -> tuple[float, bool]:
            kept = 0.0
            kept += (compute * h + 4) if grad else 0  # input norm
            for key in ("qkv", "attention", "o", "norm", "gate_up", "silu", "down"):
                if key == "attention":
                    per_row = compute * (2 * q + 2 * kv) + 4 * heads if flash else compute * (q + 2 * kv + heads * width)
                    kept += per_row * attention_rows / tokens if grad else 0
                    if self.qk_norm and grad:
                        kept += compute * (q + 2 * kv) + 4 * (q + kv) // head_dim
                elif key == "norm":
                    kept += (compute * h + 4) if grad else 0
                elif key == "silu":
                    kept += 2 * compute * i if grad else 0
                else:
                    group = self.groups[key]
                    if grad or group.trains:
                        kept += group_bytes(group, grad)
                    grad = grad or group.trains
            return kept, grad

        first, grad = layer(lay.trainable_embeddings)
        steady, _ = layer(True) if grad else (0.0, False)
        layers = config.num_hidden_layers
        if checkpointing:
            kept_layers = (layers * compute * h + max(first, steady)) * tokens
        else:
            kept_layers = (first + (layers - 1) * steady) * tokens
        head = 0.0
        if grad or lay.trainable_head:
            head = tokens + labelled_tokens * (2 * compute * h + 4)
        if lay.trainable_head:
            head += 4 * config.vocab_size * h
        rope = 2 * tokens * head_dim * compute
        # one layer's attention backward: fp32 gradients of q, k, v (flash), or the fp32 score gradients
        # and probabilities of every example
        transient = (attention_rows * (q + 2 * kv) * 4 if flash
                     else batch * heads * width * width * (4 + 4 + compute))
        return {"per_layer_per_token": steady, "layers": kept_layers, "head": head + rope,
                "total": kept_layers + head + rope, "attention_transient": transient}

"""The activation model of ``deltatune estimate``: bytes autograd keeps for backward, per decoder
layer and token, on deltatune's Llama fast path (:func:`activation_bytes`) and on the plain Hugging
Face forward (:func:`plain_activation_bytes`), from the :class:`deltatune.estimate.counting.Layout`
of the model (``lay``)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("qkv", ("q_proj", "k_proj", "v_proj")), ("o", ("o_proj",)), ("gate_up", ("gate_proj", "up_proj")),
    ("down", ("down_proj",)),
)
"""Linear layers of a Llama decoder layer that read the same input, in forward order."""


def _has_dropout(delta: Any) -> bool:
    from torch import nn

    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in delta.modules())


def _delta_keeps(delta: Any, in_features: int, out_features: int, inner_width: int) -> tuple[bool, int]:
    """What a delta makes autograd keep, per token: ``(the layer input, further elements)``.

    A trained matrix or vector applied to the input (LoRA's A, a feedforward IA3 vector) keeps the
    input; a low-rank inner product keeps the ``inner_width`` elements its method declares (an
    optional member of :class:`deltatune.plugin.protocols.DeltaMethod`); a trained vector on the
    output (DoRA's magnitude, VeRA's b, IA3's output scale) keeps what it multiplies, ``out`` elements.
    """
    trained = [p for p in delta.parameters() if p.requires_grad]
    on_input = any((p.ndim >= 2 and p.shape[-1] == in_features and min(p.shape) > 1) or p.numel() == in_features
                   for p in trained)
    on_output = any(p.numel() == out_features for p in trained)
    return on_input, inner_width + (out_features if on_output else 0)


@dataclass
class Group:
    """What one group of linear layers (of the first decoder layer) makes autograd keep."""

    in_features: int
    out_features: int
    fused: bool = True
    """The fast path computes it as one grouped product (:mod:`deltatune.deltas.grouped`)."""
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


def _groups(model: Any, quantized: set[str], widths: dict[str, int]) -> dict[str, Group] | None:
    """The groups of the first decoder layer of ``model`` (after deltas), or ``None`` when the
    decoder is not Llama-shaped; ``widths``: each delta method's inner width (:func:`inner_widths`)."""
    from deltatune.deltas.grouped import Projection, grouped_product_class
    from deltatune.deltas.layer import DeltaLinear

    decoder = model.get_decoder()
    first = decoder.layers[0]
    prefix = next(name for name, module in model.named_modules() if module is first) + "."
    out: dict[str, Group] = {}
    for key, members in GROUPS:
        modules = []
        for member in members:
            parent = first.self_attn if member.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else first.mlp
            module = getattr(parent, member, None)
            if module is None:
                return None
            modules.append(module)
        group = Group(in_features=modules[0].in_features, out_features=sum(m.out_features for m in modules))
        projections = [None if prefix + ("self_attn." if parent_of(name) == "attn" else "mlp.") + name in quantized
                       else Projection.of(module) for name, module in zip(members, modules)]
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
                for key_, delta in module.deltas.items():
                    saves_input, extra = _delta_keeps(delta, module.in_features, module.out_features, widths.get(key_, 0))
                    trained = any(p.requires_grad for p in delta.parameters())
                    group.delta_copies += sum(p.numel() for p in delta.parameters() if p.requires_grad)
                    dropout = _has_dropout(delta)
                    group.trains |= trained
                    group.keeps_input |= saves_input and not dropout  # dropout keeps its own copy
                    group.extra += extra
                    group.dropout_copies += int(dropout)
        out[key] = group
    return out


def parent_of(member: str) -> str:
    """``attn`` for the attention projections, ``mlp`` for the others."""
    return "attn" if member in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"


def moe(config: Any) -> tuple[int, int, int] | None:
    """``(experts, experts per token, one expert's intermediate width)`` of a mixture-of-experts decoder
    (Mixtral's and Qwen3-MoE's config fields), or ``None`` for a dense one."""
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if not experts or not top_k:
        return None
    return experts, top_k, getattr(config, "moe_intermediate_size", None) or config.intermediate_size


def mlp_width(config: Any) -> int:
    """Intermediate elements per token of one decoder layer's MLP (all the experts a token visits)."""
    experts = moe(config)
    return experts[1] * experts[2] if experts else config.intermediate_size


def _widths(config: Any) -> tuple[int, int, int, int, int, int]:
    """``(hidden, intermediate, heads, head_dim, query width, key/value width)`` of a decoder."""
    h, i = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    return h, i, heads, head_dim, heads * head_dim, kv


def activation_bytes(config: Any, lay: Any, batch: int, seq: int, compute: int,
                     checkpointing: bool = False, labelled: float = 1.0,
                     quantized_saves_input: bool = False) -> dict[str, float]:
    """Bytes autograd keeps for backward for one micro-batch of ``batch`` rows of ``seq`` tokens.

    Per decoder layer and token, with ``c`` the compute dtype's bytes (2 for bf16, 4 for fp32),
    ``h`` hidden, ``i`` intermediate, ``q``/``kv`` the query and key/value widths, ``H`` heads and
    ``W`` the sequence length, on a model family's fast training forward (the Llama family's):

    * each RMSNorm keeps its input and 1/rms: ``c h + 4`` (twice);
    * each group of linear layers sharing an input (q/k/v, o, gate/up, down) keeps what its grouped
      product says (:meth:`deltatune.deltas.grouped.GroupedProduct.kept_per_token`): a low-rank
      product keeps the input (``c h``, ``c q``, ``c h``, ``c i``) and its inner output (``c r``),
      frozen bases alone nothing;
    * attention keeps q, k, v and the softmax probabilities: ``c (q + 2 kv) + c H W`` per row of its
      ``(examples x width)`` layout (width rounded up, as the token rows are: :class:`TokenLayout`);
    * the SiLU gate keeps gate and up: ``2 c i``.

    A group the fast path does not run as a grouped product (a quantized base, dropout, a delta
    without a grouped product, several deltas, a trained weight) runs its modules under autocast: it keeps its input only when a delta or a
    trained weight needs it, what each delta keeps (:func:`_delta_keeps`), a dropped copy and a
    scaled noise mask per dropout (``2 c in``), and the compute-dtype copy of a trained weight. With
    ``quantized_saves_input`` (older bitsandbytes, e.g. 0.41 of the 2023 published runs, kept the
    input of every 4-bit matmul; 0.50 keeps only the packed weight), a quantized group keeps its input.

    Nothing is kept before the first trained tensor of the first layer. The head keeps the final
    norm's input and the gradient of the hidden states of every labelled token (``2 c h + 4``; the
    chunked cross-entropy keeps no logits). With gradient checkpointing each layer keeps only its
    input (``c h``) and one layer is recomputed at a time. Off the fast path (another architecture),
    :func:`plain_activation_bytes` applies.
    """
    if lay.groups is None:
        return plain_activation_bytes(config, lay, batch, seq, compute, checkpointing, labelled)
    from deltatune.train.head_loss import HEAD_ROW_STEP, SHAPE_STEPS, round_up

    h, i, heads, head_dim, q, kv = _widths(config)
    # the fast path rounds its shapes up (SHAPE_STEPS): token rows, attention
    # width (one example per row here), and the head's labelled rows
    tokens_step, width_step = SHAPE_STEPS
    tokens = round_up(batch * seq, tokens_step)
    width = round_up(seq, width_step)
    attention_rows = batch * width
    labelled_tokens = round_up(math.ceil(batch * seq * labelled), HEAD_ROW_STEP)

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
        groups = lay.groups
        kept += (compute * h + 4) if grad else 0  # input norm
        for key in ("qkv", "attention", "o", "norm", "gate_up", "silu", "down"):
            if key == "attention":
                kept += compute * (q + 2 * kv + heads * width) * attention_rows / tokens if grad else 0
            elif key == "norm":
                kept += (compute * h + 4) if grad else 0
            elif key == "silu":
                kept += 2 * compute * i if grad else 0
            else:
                group = groups[key]
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
    return {"per_layer_per_token": steady, "layers": kept_layers, "head": head + rope,
            "total": kept_layers + head + rope}


def plain_activation_bytes(config: Any, lay: Any, batch: int, seq: int, compute: int,
                           checkpointing: bool = False, labelled: float = 1.0) -> dict[str, float]:
    """Activations of the plain Hugging Face forward (architectures the fast path does not know).

    Per layer and token: two fp32 RMSNorm inputs and 1/rms ``2 (4h + 4)``; SDPA attention's q, k, v,
    output and log-sum-exp ``c (2q + 2kv) + 4H``; the MLP's gate, silu(gate) and up ``3 c i`` (a
    mixture of experts, :func:`moe`: for each of the ``k`` experts a token visits its gathered input,
    gate/up output, gated product and output, ``k c (2h + 3 i_e)``, and the router's fp32 logits and
    probabilities ``8 E``); the
    input of every group of linear layers (:data:`GROUPS`, layers reading one input share it) in
    which a delta or a weight trains, and each delta's inner ``r`` elements. The head keeps the
    final hidden state of every labelled token ``c h``; under bf16 autocast every trained tensor is
    cast once and its copy kept."""
    h, i, heads, head_dim, q, kv = _widths(config)
    tokens = batch * seq
    per_layer = 2 * (4 * h + 4) + compute * (2 * q + 2 * kv) + 4 * heads + 3 * compute * i
    experts = moe(config)
    if experts:
        count, top_k, inner = experts
        # per token and expert it visits: its input (gathered), gate/up output, the gated product and
        # the expert's output (before the routing weight); the router's fp32 logits and probabilities
        per_layer += top_k * compute * (2 * h + 3 * inner) + 2 * 4 * count - 3 * compute * i
    for _, members in GROUPS:
        adapted = [lay.adapted[m] for m in lay.adapted if m.rsplit(".", 1)[-1] in members]
        if any(a["input"] for a in adapted):
            per_layer += compute * adapted[0]["in"]
        per_layer += sum(compute * a["r"] for a in adapted)
    if checkpointing:
        kept = config.num_hidden_layers * compute * h * tokens + per_layer * tokens
    else:
        kept = config.num_hidden_layers * per_layer * tokens
    head = tokens * labelled * compute * h
    copies = lay.trainable * compute if compute != 4 else 0
    return {"per_layer_per_token": per_layer, "layers": kept, "head": head + copies,
            "total": kept + head + copies}

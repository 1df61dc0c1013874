"""The activation model of ``deltatune estimate``: bytes autograd keeps for backward, per decoder
layer and token (:func:`activation_bytes`), from the :class:`deltatune.estimate.counting.Layout` of
the model (``lay``): on the fast training forward of the model's family, the terms the family gives
(:class:`ActivationTerms`, its optional ``activation_terms``); on the plain Hugging Face forward,
the generic model (:func:`plain_activation_bytes`)."""

from __future__ import annotations

from typing import Any, Protocol

INPUT_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("qkv", ("q_proj", "k_proj", "v_proj")), ("o", ("o_proj",)), ("gate_up", ("gate_proj", "up_proj")),
    ("down", ("down_proj",)),
)
"""Linear layers of a Llama-style decoder layer that read the same input, in forward order (the plain
forward keeps that input once per group; a family's fast forward may compute a group as one product)."""


def has_dropout(delta: Any) -> bool:
    """Whether ``delta`` drops out any of its inputs."""
    from torch import nn

    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in delta.modules())


def delta_keeps(delta: Any, in_features: int, out_features: int, inner_width: int) -> tuple[bool, int]:
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


def decoder_widths(config: Any) -> tuple[int, int, int, int, int, int]:
    """``(hidden, intermediate, heads, head_dim, query width, key/value width)`` of a decoder."""
    h, i = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head_dim
    return h, i, heads, head_dim, heads * head_dim, kv


class ActivationTerms(Protocol):
    """What a model family's fast training forward keeps for backward, for one model: a family's
    optional ``activation_terms`` returns it (:mod:`deltatune.plugin.protocols`)."""

    compute_copies: int
    """Elements of trained weights the fast forward holds in the compute dtype between steps (its
    grouped products' copies), over the whole model."""

    def activation_bytes(self, config: Any, lay: Any, batch: int, seq: int, compute: int,
                         checkpointing: bool = False, labelled: float = 1.0,
                         quantized_saves_input: bool = False, device: str = "cpu") -> dict[str, float]:
        """Bytes kept for backward for one micro-batch on ``device`` (``cpu``, ``cuda``), as
        :func:`activation_bytes` returns them, plus, optionally, ``attention_transient``: the bytes one
        layer's attention backward holds besides them (default: the plain forward's score matrices)."""
        ...


def activation_bytes(config: Any, lay: Any, batch: int, seq: int, compute: int,
                     checkpointing: bool = False, labelled: float = 1.0,
                     quantized_saves_input: bool = False, device: str = "cpu") -> dict[str, float]:
    """Bytes autograd keeps for backward for one micro-batch of ``batch`` rows of ``seq`` tokens, in
    compute-dtype elements of ``compute`` bytes, ``labelled`` the share of labelled tokens:
    ``per_layer_per_token``, ``layers``, ``head`` and their ``total``.

    When the fast training forward of the model's family runs it, the family's terms say it
    (``lay.fast_terms``, an :class:`ActivationTerms`; ``quantized_saves_input``: older bitsandbytes
    kept the input of every 4-bit matmul); otherwise :func:`plain_activation_bytes` applies.
    """
    if lay.fast_terms is None:
        return plain_activation_bytes(config, lay, batch, seq, compute, checkpointing, labelled, quantized_saves_input)
    return lay.fast_terms.activation_bytes(config, lay, batch, seq, compute, checkpointing, labelled,
                                           quantized_saves_input, device=device)


def plain_activation_bytes(config: Any, lay: Any, batch: int, seq: int, compute: int,
                           checkpointing: bool = False, labelled: float = 1.0,
                           quantized_saves_input: bool = False) -> dict[str, float]:
    """Activations of the plain Hugging Face forward (architectures the fast path does not know).

    Per layer and token: two fp32 RMSNorm inputs and 1/rms ``2 (4h + 4)``; SDPA attention's q, k, v,
    output and log-sum-exp ``c (2q + 2kv) + 4H``; the MLP's gate, silu(gate) and up ``3 c i`` (a
    mixture of experts, :func:`moe`: for each of the ``k`` experts a token visits its gathered input,
    gate/up output, gated product and output, ``k c (2h + 3 i_e)``, and the router's fp32 logits and
    probabilities ``8 E``); the
    input of every group of linear layers (:data:`INPUT_GROUPS`, layers reading one input share it) in
    which a delta or a weight trains (with ``quantized_saves_input``, as older bitsandbytes did, the
    input of every group), and each delta's inner ``r`` elements. The head keeps the
    final hidden state of every labelled token ``c h``; under bf16 autocast every trained tensor is
    cast once and its copy kept."""
    h, i, heads, head_dim, q, kv = decoder_widths(config)
    tokens = batch * seq
    per_layer = 2 * (4 * h + 4) + compute * (2 * q + 2 * kv) + 4 * heads + 3 * compute * i
    experts = moe(config)
    if experts:
        count, top_k, inner = experts
        # per token and expert it visits: its input (gathered), gate/up output, the gated product and
        # the expert's output (before the routing weight); the router's fp32 logits and probabilities
        per_layer += top_k * compute * (2 * h + 3 * inner) + 2 * 4 * count - 3 * compute * i
    inputs = {"qkv": h, "o": q, "gate_up": h, "down": config.intermediate_size}
    for group, members in INPUT_GROUPS:
        adapted = [lay.adapted[m] for m in lay.adapted if m.rsplit(".", 1)[-1] in members]
        if any(a["input"] for a in adapted):
            per_layer += compute * adapted[0]["in"]
        elif quantized_saves_input:
            per_layer += compute * inputs[group]
        per_layer += sum(compute * a["r"] for a in adapted)
    if checkpointing:
        kept = config.num_hidden_layers * compute * h * tokens + per_layer * tokens
    else:
        kept = config.num_hidden_layers * per_layer * tokens
    head = tokens * labelled * compute * h
    copies = lay.trainable * compute if compute != 4 else 0
    return {"per_layer_per_token": per_layer, "layers": kept, "head": head + copies,
            "total": kept + head + copies}

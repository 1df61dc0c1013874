"""Parameter counting for ``deltatune estimate``: the base model on the ``meta`` device, the delta
methods' own ``apply`` on it, and what trains, what is quantized and what is frozen (:class:`Layout`).

Nothing here knows a particular plugin: the quantizer says which layers it replaces
(``layers_to_quantize``) and at how many bits (``bits_per_weight``), each delta method how wide the
inner product its layers keep for backward is (``inner_width``); see
:mod:`deltatune.plugin.protocols`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltatune.errors import ConfigError

from deltatune.estimate.activations import ActivationTerms, delta_keeps, has_dropout


def _llama(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int | None = None,
           context: int = 2048, eps: float = 1e-6, vocab: int = 32000, tied: bool = False,
           head_dim: int | None = None) -> dict[str, Any]:
    """A Llama configuration from its published dimensions."""
    return dict(model_type="llama", hidden_act="silu", attention_bias=False, mlp_bias=False, hidden_size=hidden,
                intermediate_size=intermediate, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads or heads, max_position_embeddings=context, rms_norm_eps=eps,
                vocab_size=vocab, tie_word_embeddings=tied, **({"head_dim": head_dim} if head_dim else {}))


ARCHITECTURES: dict[str, dict[str, Any]] = {
    # LLaMA (Touvron et al., 2023, table 2) and Llama 2 (Touvron et al., 2023b; GQA for 70B)
    "llama-7b": _llama(4096, 11008, 32, 32),
    "llama-13b": _llama(5120, 13824, 40, 40),
    "llama-33b": _llama(6656, 17920, 60, 52),
    "llama-65b": _llama(8192, 22016, 80, 64),
    "llama2-7b": _llama(4096, 11008, 32, 32, context=4096, eps=1e-5),
    "llama2-13b": _llama(5120, 13824, 40, 40, context=4096, eps=1e-5),
    "llama2-70b": _llama(8192, 28672, 80, 64, kv_heads=8, context=4096, eps=1e-5),
    # SmolLM2 model cards (config.json)
    "smollm2-135m": _llama(576, 1536, 30, 9, kv_heads=3, context=8192, eps=1e-5, vocab=49152, tied=True, head_dim=64),
    "smollm2-360m": _llama(960, 2560, 32, 15, kv_heads=5, context=8192, eps=1e-5, vocab=49152, tied=True, head_dim=64),
    "smollm2-1.7b": _llama(2048, 8192, 24, 32, context=8192, eps=1e-5, vocab=49152, tied=True, head_dim=64),
    # mixture of experts (config.json of the model cards; published sizes: 46.7B and 30.5B parameters)
    "mixtral-8x7b": dict(model_type="mixtral", hidden_act="silu", hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                         num_experts_per_tok=2, max_position_embeddings=32768, rms_norm_eps=1e-5, vocab_size=32000,
                         tie_word_embeddings=False),
    "qwen3-30b-a3b": dict(model_type="qwen3_moe", hidden_act="silu", hidden_size=2048, intermediate_size=6144,
                          moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
                          num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                          decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=True,
                          max_position_embeddings=40960, rms_norm_eps=1e-6, vocab_size=151936,
                          tie_word_embeddings=False),
}
"""Configurations of known architectures (public model cards), by name."""
ALIASES = {"llama-30b": "llama-33b", "mixtral-8x7b-v0.1": "mixtral-8x7b", "qwen3-30b-a3b-base": "qwen3-30b-a3b", "llama2-7b-hf": "llama2-7b", "smollm2-135m-instruct": "smollm2-135m"}



def load_config(base: str) -> Any:
    """The transformers configuration of ``base`` (never downloads anything)."""
    from transformers import AutoConfig

    from deltatune.model import loading as models

    name = ALIASES.get(base, base)
    if base in models.TINY_MODELS:
        return models.tiny_llama(tie_word_embeddings=base == "tiny-llama-tied").config
    if name in ARCHITECTURES:
        settings = dict(ARCHITECTURES[name])
        return AutoConfig.for_model(settings.pop("model_type"), **settings)
    path = Path(base).expanduser()
    if path.is_dir():
        return AutoConfig.from_pretrained(path, local_files_only=True)
    if path.suffix == ".json" and path.is_file():
        data = json.loads(path.read_text())
        if "model_type" not in data:
            raise ConfigError(f"{path} has no model_type; it is not a transformers config.json")
        return AutoConfig.for_model(**data)
    known = ", ".join([*models.TINY_MODELS, models.DEFAULT_MODEL, *ARCHITECTURES])
    raise ConfigError(f"--base '{base}' is not a known architecture ({known}), a local model folder or a config.json")


def meta_model(config: Any) -> Any:
    """The causal LM of ``config`` on the meta device (no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)



@dataclass
class Layout:
    """Parameters of the model as a run builds it, grouped by how they are held."""

    total: int = 0
    trainable: int = 0
    quantized: int = 0
    frozen: int = 0
    largest_trainable: int = 0
    largest_quantized: tuple[int, int] = (0, 0)
    trainable_shapes: list[tuple[int, ...]] = field(default_factory=list)
    """The shape of every trained tensor (what optimizer state is sized by)."""
    adapted: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per linear-layer suffix (q_proj, …) of the first decoder layer: input width and rank of its delta."""
    quantized_in_layer: dict[str, int] = field(default_factory=dict)
    """Quantized linear layers of the first decoder layer: suffix → input width."""
    trainable_embeddings: bool = False
    trainable_head: bool = False
    fast_terms: ActivationTerms | None = None
    """What the fast training forward of the model's family keeps for backward, when it runs the model
    and the family says (its optional ``activation_terms``); ``None``: the plain forward's terms."""
    compute_copies: int = 0
    """Elements of the compute-dtype copies of trained weights the fast path's grouped products keep."""
    trains_base: bool = False
    """A trained tensor belongs to the base model (BitFit's biases, full fine-tuning)."""
    expert_weights: int = 0
    """Elements of the largest set of MoE expert weights one experts module computes in its forward
    (dequantized, or changed by a delta): they exist once, for that layer, in forward and in backward."""
    experts_quantized: bool = False
    """Those expert weights are dequantized (from fp32 quantization state) in every forward and backward."""
    experts_trained: bool = False
    """A delta trains through those expert weights: backward builds their dense gradient."""


def bits_per_weight(quantizer: Any) -> float:
    """Storage bits per quantized weight (scales included) of a resolved quantizer."""
    declared = quantizer.optional("bits_per_weight")
    if declared is None:
        raise ConfigError(f"the estimator cannot size quantizer '{quantizer.name}': it declares no "
                          "bits_per_weight(cfg) (see docs/plugin-authoring.md)")
    return float(declared(quantizer.cfg))


def _quantized_names(model: Any, quantizer: Any) -> set[str]:
    """Names of the layers ``quantizer`` would replace in ``model``, as the quantizer itself selects them."""
    declared = quantizer.optional("layers_to_quantize")
    if declared is None:
        raise ConfigError(f"the estimator cannot count quantizer '{quantizer.name}': it declares no "
                          "layers_to_quantize(model, cfg) (see docs/plugin-authoring.md)")
    return set(declared(model, quantizer.cfg))


def inner_widths(deltas: list[Any]) -> dict[str, int]:
    """Delta method name → the inner width one of its layers keeps per token (0 when undeclared)."""
    widths = {}
    for delta in deltas:
        declared = delta.optional("inner_width")
        widths[delta.name] = int(declared(delta.cfg)) if declared is not None else 0
    return widths


def layout(config: Any, deltas: list[Any], quantizer: Any | None, fast_path: bool = True) -> Layout:
    """Count parameters of ``config`` with ``deltas`` applied on the meta device, and describe what
    its decoder layers keep for backward (``fast_path``: as the model's fast training forward,
    :func:`deltatune.model.families.family_fast_forward`, runs them)."""
    import torch

    from deltatune.deltas.experts import DeltaExperts
    from deltatune.deltas.layer import DeltaLinear
    from deltatune.model.assembly import ResolvedSpec, claim_parameters

    model = meta_model(config)
    quantized = _quantized_names(model, quantizer) if quantizer else set()
    widths = inner_widths(deltas)
    # a quantized module's weight, or a quantized MoE expert parameter itself
    quantized_weights = {name if _is_parameter(model, name) else f"{name}.weight" for name in quantized}
    with torch.device("meta"):
        for delta in deltas:
            delta.plugin.apply(model, delta.cfg)
    # the base weight of a wrapped layer (or experts module) moved under .base_layer
    moved = {"{0}.base_layer.{2}".format(*n.rpartition(".")) for n in quantized_weights}
    quantized_weights |= moved
    resolved = ResolvedSpec(spec=None, quantizer=quantizer, deltas=list(deltas))  # type: ignore[arg-type]
    claim_parameters(model, resolved)
    out = Layout()
    experts: dict[str, int] = {}  # per experts module: elements of the weights it computes (dequantized or changed)
    embeddings = model.get_input_embeddings()
    head = model.get_output_embeddings()
    for name, param in model.named_parameters():
        count = param.numel()
        out.total += count
        if param.requires_grad:
            out.trainable += count
            out.largest_trainable = max(out.largest_trainable, count)
            out.trainable_shapes.append(tuple(param.shape))
            out.trainable_embeddings |= param is getattr(embeddings, "weight", None)
            out.trainable_head |= param is getattr(head, "weight", None)
            out.trains_base |= ".deltas." not in name
        elif name in quantized_weights:
            out.quantized += count
            if param.ndim == 3:  # an expert parameter, by the experts module that computes with it
                module_name = name.rpartition(".")[0].removesuffix(".base_layer")
                experts[module_name] = experts.get(module_name, 0) + count
                out.experts_quantized = True
            if count > out.largest_quantized[0] * out.largest_quantized[1]:
                out.largest_quantized = tuple(param.shape)  # type: ignore[assignment]
        else:
            out.frozen += count
    for name, module in model.named_modules():
        if isinstance(module, DeltaExperts) and module.deltas:
            changed = [p for p in module.changed() if f"{name}.base_layer.{p}" not in quantized_weights]
            experts[name] = experts.get(name, 0) + sum(getattr(module.base_layer, p).numel() for p in changed)
            out.experts_trained = True
    out.expert_weights = max(experts.values(), default=0)
    layer_prefix = _first_layer_prefix(model)
    for name in quantized:
        if name.startswith(layer_prefix) and name not in quantized_weights:
            out.quantized_in_layer[name[len(layer_prefix):]] = model.get_submodule(name).in_features
    for name, module in model.named_modules():
        if not name.startswith(layer_prefix):
            continue
        suffix = name[len(layer_prefix):]
        if isinstance(module, DeltaLinear) and module.deltas:
            kept = [delta_keeps(d, module.in_features, module.out_features, widths.get(key, 0))
                    for key, d in module.deltas.items()]
            dropout = any(has_dropout(d) for d in module.deltas.values())
            out.adapted[suffix] = {"in": module.in_features, "out": module.out_features,
                                   "r": sum(extra for _, extra in kept), "dropout": dropout,
                                   "input": any(saves for saves, _ in kept)}
        elif hasattr(module, "weight") and getattr(module.weight, "requires_grad", False) and module.weight.ndim == 2:
            out.adapted[suffix] = {"in": module.weight.shape[1], "out": module.weight.shape[0], "r": 0,
                                   "dropout": False, "input": True}
    from deltatune.model.families import KIND, family_fast_forward, installed_families, serving_family
    from deltatune.plugin.protocols import optional_member

    family = serving_family(config, installed_families())[0]
    terms = optional_member(KIND, family, "activation_terms") if family is not None else None
    if fast_path and terms is not None and family_fast_forward(model, family) is not None:
        out.fast_terms = terms(model, quantized, widths)
        out.compute_copies = out.fast_terms.compute_copies if out.fast_terms is not None else 0
    return out


def _is_parameter(model: Any, name: str) -> bool:
    try:
        model.get_parameter(name)
    except AttributeError:
        return False
    return True


def _first_layer_prefix(model: Any) -> str:
    layers = model.get_decoder().layers
    first = layers[0]
    return next(name for name, module in model.named_modules() if module is first) + "."

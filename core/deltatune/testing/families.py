"""Family conformance: deltatune's training loss and gradients equal the model's own Hugging Face loss.

For a tiny random-weight model of a family (a factory), a model spec (a quantizer and delta methods,
or none: full fine-tuning) and a batch with padding and prompt masks, :func:`family_conformance`
builds the model as ``fit`` does (:func:`deltatune.model.assembly.build_model`, fp32), moves every
trainable parameter off its initial value (a low-rank update starts at zero), and compares

* deltatune's training loss — :func:`deltatune.train.loss.mean_loss`, the path
  ``DeltaTuneModule.training_step`` takes, fast path allowed — on the padded batch, or on the same
  examples packed into rows (:func:`deltatune.data.packing.pack_rows`), with
* ``model(**batch, labels=labels).loss`` of the same (possibly quantized) model on the padded batch,

and the gradients of every trainable parameter of the two. :func:`assert_family_conformance` asserts
the bounds (fp32: loss ≤ 1e-5 relative, gradients ≤ 1e-4 of each gradient's largest entry). A
third-party family gets the check by passing its own factory; :data:`TINY_FAMILIES` are tiny configs
of the families transformers ships.

In bf16 the two paths round differently, so they are compared with what is exact instead:
:func:`bf16_conformance` measures deltatune's bf16 training and Hugging Face's own bf16 forward against
the fp32 forward of the same weights, and :func:`assert_bf16_conformance` asserts that deltatune's loss
is within :data:`BF16_LOSS_BOUND` of it and its gradients no further from it than Hugging Face's own
bf16 gradients (:data:`BF16_GRADIENT_FACTOR` times theirs, plus :data:`BF16_GRADIENT_SLACK`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltatune.data.packing import IGNORE_INDEX, collate, collate_packed, pack_rows
from deltatune.model.assembly import build_model, compute_context, resolve_spec
from deltatune.model.logits import head_plan
from deltatune.plugin.manager import PluginManager
from deltatune.train.loss import mean_loss

VOCAB = 320
"""Vocabulary of the tiny family models (token ids of the conformance batch stay below it)."""

_COMMON: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _build(config_name: str, model_name: str, **settings: Any) -> Callable[[], nn.Module]:
    def factory(seed: int = 0) -> nn.Module:
        import transformers

        config = getattr(transformers, config_name)(**settings)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = getattr(transformers, model_name)(config)
        return model.float()

    return factory


TINY_FAMILIES: dict[str, Callable[..., nn.Module]] = {
    "llama": _build("LlamaConfig", "LlamaForCausalLM", **_COMMON),
    "llama3": _build("LlamaConfig", "LlamaForCausalLM", **_COMMON, rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": _build("MistralConfig", "MistralForCausalLM", **_COMMON, sliding_window=8),
    "mixtral": _build("MixtralConfig", "MixtralForCausalLM", **_COMMON, num_local_experts=4, num_experts_per_tok=2),
    "qwen2": _build("Qwen2Config", "Qwen2ForCausalLM", **_COMMON),
    "qwen3": _build("Qwen3Config", "Qwen3ForCausalLM", **_COMMON, head_dim=16),
    "qwen3_moe": _build("Qwen3MoeConfig", "Qwen3MoeForCausalLM", **_COMMON, head_dim=16, num_experts=4,
                        num_experts_per_tok=2, moe_intermediate_size=32),
    "qwen2_moe": _build("Qwen2MoeConfig", "Qwen2MoeForCausalLM", **_COMMON, num_experts=4, num_experts_per_tok=2,
                        moe_intermediate_size=32, shared_expert_intermediate_size=32),
    "gemma": _build("GemmaConfig", "GemmaForCausalLM", **_COMMON, head_dim=16),
    "gemma2": _build("Gemma2Config", "Gemma2ForCausalLM", **_COMMON, head_dim=16, sliding_window=8,
                     final_logit_softcapping=3.0, initializer_range=0.3),
    "gemma3": _build("Gemma3TextConfig", "Gemma3ForCausalLM", **_COMMON, head_dim=16, sliding_window=8,
                     final_logit_softcapping=3.0, initializer_range=0.3),
    "phi3": _build("Phi3Config", "Phi3ForCausalLM", **_COMMON),
    "olmo2": _build("Olmo2Config", "Olmo2ForCausalLM", **_COMMON),
    "starcoder2": _build("Starcoder2Config", "Starcoder2ForCausalLM", **_COMMON),
    "falcon": _build("FalconConfig", "FalconForCausalLM", vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2,
                     num_attention_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "gpt_neox": _build("GPTNeoXConfig", "GPTNeoXForCausalLM", vocab_size=VOCAB, hidden_size=64,
                       intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    "granite": _build("GraniteConfig", "GraniteForCausalLM", **_COMMON, logits_scaling=8.0,
                      embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0625, initializer_range=0.3),
    "cohere": _build("CohereConfig", "CohereForCausalLM", **_COMMON, logit_scale=0.0625, initializer_range=0.3),
    "gpt2": _build("GPT2Config", "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4,
                   n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0,
                   bos_token_id=1, eos_token_id=2),
}
"""Tiny random-weight models (2 layers, hidden 64) of the causal-LM families transformers ships, by
name, as factories ``(seed=0) -> model`` (fp32). The families whose head output is transformed
(Gemma 2/3 soft-cap at 3, Granite divides by 8, Cohere multiplies by 0.0625) get larger initial
weights (``initializer_range=0.3``), so that their logits are large enough for a skipped transform to
show in the loss."""


def conformance_rows(seed: int = 0, count: int = 4, vocab: int = VOCAB) -> list[dict[str, list[int]]]:
    """``count`` examples of different lengths (12-30 tokens, ids below ``vocab``, avoiding 0-2), each
    with a masked prompt (label -100) before its labelled response."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(count):
        length = 12 + (index * 7) % 19
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        prompt = 3 + index % 5
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


@dataclass
class Conformance:
    """What :func:`family_conformance` measured: relative differences from the Hugging Face loss."""

    loss: float
    """``|deltatune - HF| / |HF|`` of the mean token loss."""
    gradient: float
    """The largest, over trainable parameters, of ``max|g - g_HF| / max|g_HF|``."""
    worst_parameter: str
    head: str
    """How the loss got its logits: ``head``, ``head + <transform>``, or ``own logits (<why>)``."""


def _gradients(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def _conformance_model(factory: Callable[[], nn.Module], spec: dict[str, Any] | None, base_dtype: str,
                       manager: PluginManager | None, seed: int) -> nn.Module:
    """The model of ``spec`` as ``fit`` builds it, without dropout, its trainable parameters moved off
    their initial values."""
    resolved = resolve_spec({**(spec or {}), "base_dtype": base_dtype}, manager)
    with torch.random.fork_rng():  # the deltas' random initialisation, the same at every call
        torch.manual_seed(seed)
        model = build_model(resolved, factory())
    for module in model.modules():  # two forwards must compute the same function
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    model.train()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator).to(param) * 0.05)
    return model


def _batches(seed: int, packed: bool) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(padded, ours)``: the conformance batch padded, and as deltatune trains on it (packed or not)."""
    rows = conformance_rows(seed)
    padded = collate(rows, pad_id=0)
    return padded, collate_packed(pack_rows(rows, 64), pad_id=0) if packed else padded


def _ours(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """deltatune's training loss of ``batch`` and its gradients."""
    with compute_context(model):
        loss = mean_loss(model, batch)
    return loss.detach(), _gradients(model, loss)


def _hugging_face(model: nn.Module, padded: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The model's own Hugging Face loss of ``padded`` and its gradients."""
    with compute_context(model):
        loss = model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                     labels=padded["labels"], use_cache=False).loss
    return loss.detach(), _gradients(model, loss)


def _worst_gradient(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> tuple[float, str]:
    """The largest ``max|g - g_ref| / max|g_ref|`` over the parameters, and its parameter."""
    if set(grads) != set(reference):
        raise AssertionError(f"different parameters got gradients: {sorted(set(grads) ^ set(reference))[:5]}")
    if not grads:
        raise AssertionError("no trainable parameter got a gradient")
    worst, name = 0.0, ""
    for key, grad in grads.items():
        ref = reference[key].float()
        difference = float((grad.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12))
        if difference >= worst:
            worst, name = difference, key
    return worst, name


def _relative(loss: torch.Tensor, reference: torch.Tensor) -> float:
    return float((loss.float() - reference.float()).abs() / reference.float().abs())


def family_conformance(factory: Callable[[], nn.Module], spec: dict[str, Any] | None = None, packed: bool = False,
                       manager: PluginManager | None = None, seed: int = 0) -> Conformance:
    """Measure deltatune's training loss and gradients against the model's own Hugging Face loss (see
    the module docstring). ``spec`` holds :class:`~deltatune.model.assembly.ModelSpec` fields
    (``quantizer``, ``delta``); none means full fine-tuning."""
    model = _conformance_model(factory, spec, "fp32", manager, seed)
    padded, ours_batch = _batches(seed, packed)
    ours, ours_grads = _ours(model, ours_batch)
    theirs, theirs_grads = _hugging_face(model, padded)
    worst, name = _worst_gradient(ours_grads, theirs_grads)
    plan = head_plan(model)
    head = ("head" + (f" + {plan.transform.name}" if plan.transform else "")) if plan.exact else f"own logits ({plan.reason})"
    return Conformance(_relative(ours, theirs), worst, name, head)


BF16_LOSS_BOUND = 1e-3
"""Largest relative difference of deltatune's bf16 training loss from the fp32 loss of the same weights."""
BF16_GRADIENT_FACTOR, BF16_GRADIENT_SLACK = 2.0, 2e-3
"""deltatune's bf16 gradients may be this many times as far from the fp32 ones as Hugging Face's own
bf16 gradients are, plus this much (both as :class:`Conformance` measures gradients)."""


@dataclass
class Bf16Conformance:
    """How far bf16 training moves deltatune's loss and gradients, and Hugging Face's own bf16 forward's,
    from the fp32 forward of the same weights (relative, as :class:`Conformance`)."""

    loss: float
    hf_loss: float
    gradient: float
    hf_gradient: float


def bf16_conformance(factory: Callable[[], nn.Module], spec: dict[str, Any] | None = None, packed: bool = False,
                     manager: PluginManager | None = None, seed: int = 0) -> Bf16Conformance:
    """deltatune's bf16 training (base held in bf16, trainable weights fp32, bf16 autocast: what ``fit``
    does on bf16 hardware) and the Hugging Face forward under the same autocast, each against the fp32
    Hugging Face forward of the same weights (the bf16 base upcast exactly). A dense base only: a
    quantized base has no fp32 forward to compare with."""
    model = _conformance_model(factory, spec, "bf16", manager, seed)
    padded, ours_batch = _batches(seed, packed)
    ours, ours_grads = _ours(model, ours_batch)
    hf, hf_grads = _hugging_face(model, padded)
    exact, exact_grads = _hugging_face(model.float(), padded)
    return Bf16Conformance(_relative(ours, exact), _relative(hf, exact), _worst_gradient(ours_grads, exact_grads)[0],
                           _worst_gradient(hf_grads, exact_grads)[0])


def assert_family_conformance(factory: Callable[[], nn.Module], spec: dict[str, Any] | None = None,
                              packed: bool = False, manager: PluginManager | None = None,
                              loss_bound: float = 1e-5, gradient_bound: float = 1e-4) -> Conformance:
    """:func:`family_conformance`, asserting the fp32 bounds; returns the measurement."""
    result = family_conformance(factory, spec, packed, manager)
    assert result.loss <= loss_bound, f"loss differs from the Hugging Face loss by {result.loss:.3g} ({result.head})"
    assert result.gradient <= gradient_bound, (
        f"gradient of {result.worst_parameter} differs from the Hugging Face one by {result.gradient:.3g} ({result.head})")
    return result


def bf16_failure(result: Bf16Conformance) -> str | None:
    """What exceeds the bf16 bounds in ``result`` (see the module docstring), or ``None``."""
    problems = []
    if result.loss > BF16_LOSS_BOUND:
        problems.append(f"loss {result.loss:.3g} from the fp32 loss (bound {BF16_LOSS_BOUND:g})")
    if result.gradient > BF16_GRADIENT_FACTOR * result.hf_gradient + BF16_GRADIENT_SLACK:
        problems.append(f"gradients {result.gradient:.3g} from the fp32 ones, Hugging Face's bf16 forward's "
                        f"{result.hf_gradient:.3g}")
    return "; ".join(problems) or None


def assert_bf16_conformance(factory: Callable[[], nn.Module], spec: dict[str, Any] | None = None,
                            packed: bool = False, manager: PluginManager | None = None) -> Bf16Conformance:
    """:func:`bf16_conformance`, asserting the bf16 bounds; returns the measurement."""
    result = bf16_conformance(factory, spec, packed, manager)
    failure = bf16_failure(result)
    assert failure is None, failure
    return result

"""From the decoder's last hidden state to the model's logits: what the labelled-positions-only LM head
must add to ``hidden @ Wᵀ`` to compute the model's own logits, and the exact fallback when it cannot.

The training loss and the log-likelihood evaluators project only the labelled positions through the
LM head (:func:`deltatune.model.forward.hidden_states`, then the head). Some families change the head's
output before it becomes the logits — Gemma 2/3 soft-cap them (``cap · tanh(x / cap)``), Granite divides
them by ``logits_scaling``, Cohere multiplies them by ``logit_scale``. Each such change is declared
once, here, as a :class:`LogitTransform` keyed by the config field that turns it on
(:func:`register_logit_transform`; :data:`DECODER_FIELDS` lists logit-like fields that act inside the
decoder and leave the head alone). :func:`head_plan` decides, once per model (at assembly,
:func:`deltatune.model.assembly.build_model`, or on first use for a model built elsewhere), whether
the head computation is the model's own:

1. **structure** — every config field whose name speaks of logits must be declared (a transform or a
   decoder field); an undeclared one means the head computation cannot be trusted;
2. **numbers** — on a few tokens, ``transform(head(hidden))`` must equal ``model(...).logits``; the same
   probe checks that the model is a causal decoder (a later token must not change earlier logits) and
   raises :class:`~deltatune.errors.ConfigError` when it is not.

When either check fails, the loss is computed from the model's own logits (:func:`own_logits`, only
at labelled positions where the model's forward takes ``logits_to_keep``), with one warning saying why:
slower, never different.
"""

from __future__ import annotations

import inspect
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from deltatune.errors import ConfigError
from deltatune.model.forward import hidden_states

PROBE_TOKENS = 8
"""Tokens of the probe sequence :func:`head_plan` runs once per model."""


@dataclass(frozen=True)
class LogitTransform:
    """An element-wise map ``z = f(y)`` from the LM head's output ``y`` to the model's logits ``z``,
    with its derivative ``f'(y)`` (given ``y`` and ``z``) for the hand-written backward of the chunked
    cross-entropy. Both work on fp32 tensors, in the order of operations of the model's own code."""

    name: str
    apply: Callable[[torch.Tensor], torch.Tensor]
    derivative: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def soft_cap(cap: float) -> LogitTransform:
    """``cap · tanh(y / cap)`` (Gemma 2/3's final logit soft-capping)."""
    return LogitTransform(f"soft-capping at {cap:g}", lambda y: torch.tanh(y / cap) * cap,
                          lambda y, z: 1 - (z / cap).square())


def divide_by(scale: float) -> LogitTransform:
    """``y / scale``."""
    return LogitTransform(f"division by {scale:g}", lambda y: y / scale, lambda y, z: torch.full_like(y, 1 / scale))


def multiply_by(scale: float) -> LogitTransform:
    """``y · scale``."""
    return LogitTransform(f"multiplication by {scale:g}", lambda y: y * scale, lambda y, z: torch.full_like(y, scale))


def compose(transforms: list[LogitTransform]) -> LogitTransform | None:
    """One transform applying ``transforms`` in order (``None`` for none)."""
    if len(transforms) <= 1:
        return transforms[0] if transforms else None

    def apply(y: torch.Tensor) -> torch.Tensor:
        for transform in transforms:
            y = transform.apply(y)
        return y

    def derivative(y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        slope = torch.ones_like(y)
        for transform in transforms:
            out = transform.apply(y)
            slope = slope * transform.derivative(y, out)
            y = out
        return slope

    return LogitTransform(" then ".join(t.name for t in transforms), apply, derivative)


LOGIT_TRANSFORMS: dict[str, Callable[[Any], LogitTransform | None]] = {}
"""Config field → the transform its value turns on (``None``: the value means none), in the order
the head applies them."""

DECODER_FIELDS: set[str] = {"attn_logit_softcapping", "router_logit_softcapping", "output_router_logits",
                            "router_aux_loss_coef"}
"""Config fields whose names speak of logits but which act inside the decoder (attention scores, MoE
routers), which deltatune always runs as the model does: they leave the LM head alone."""


def register_logit_transform(config_field: str, make: Callable[[Any], LogitTransform | None]) -> None:
    """Declare that a model whose config sets ``config_field`` has its LM head's output changed by
    ``make(value)`` before it becomes the logits (``make`` returns ``None`` for a value meaning none)."""
    LOGIT_TRANSFORMS[config_field] = make


register_logit_transform("final_logit_softcapping", lambda cap: soft_cap(float(cap)) if cap else None)
register_logit_transform("logits_scaling", lambda s: divide_by(float(s)) if s is not None and s != 1 else None)
register_logit_transform("logit_scale", lambda s: multiply_by(float(s)) if s is not None and s != 1 else None)


@dataclass
class HeadPlan:
    """How the loss turns hidden states into logits for one model: ``exact`` means
    ``transform(head(hidden))`` is the model's own logits; otherwise ``reason`` says why not."""

    head: nn.Module | None
    transform: LogitTransform | None = None
    exact: bool = True
    reason: str = ""


_PLANS: weakref.WeakKeyDictionary[nn.Module, HeadPlan] = weakref.WeakKeyDictionary()


def _config_fields(config: Any) -> dict[str, Any]:
    try:
        return config.to_dict()
    except Exception:  # noqa: BLE001 - an unusual config object: read its attributes
        return dict(vars(config))


def declared_transform(config: Any) -> tuple[LogitTransform | None, str]:
    """``(transform, "")`` from ``config``'s declared fields, or ``(None, reason)`` when a field
    that may change the logits is not declared."""
    fields = _config_fields(config)
    unknown = sorted(k for k in fields if ("logit" in k.lower() or "output_multiplier" in k.lower())
                     and k not in LOGIT_TRANSFORMS and k not in DECODER_FIELDS and fields[k] not in (None, False))
    if unknown:
        return None, f"config field(s) {', '.join(unknown)} may change the logits and no logit transform is declared"
    return compose([t for k, make in LOGIT_TRANSFORMS.items() if k in fields and (t := make(fields[k]))]), ""


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@torch.no_grad()
def _probe(model: nn.Module, head: nn.Module, transform: LogitTransform | None) -> str:
    """Run the probe sequence; raise :class:`ConfigError` if ``model`` is not causal; return why
    the head computation differs from the model's own logits ("" when it does not)."""
    device = next(model.parameters()).device
    vocab = int(getattr(model.config, "vocab_size", 0) or 2)
    ids = (torch.arange(PROBE_TOKENS, device=device) * 7 + 3) % vocab
    batch = {"input_ids": ids[None], "attention_mask": torch.ones_like(ids)[None]}
    changed = ids.clone()
    changed[-1] = (changed[-1] + 1) % vocab
    own = model(**batch, use_cache=False).logits
    # the precision the model computes its logits in (bf16 under autocast, say) bounds both checks;
    # causality is not checked bit for bit: MoE experts multiply tokens in batches whose composition
    # changes with the tokens
    tolerance = max(1e-5, 4 * torch.finfo(own.dtype).eps)
    own = own.float()
    later = model(input_ids=changed[None], attention_mask=batch["attention_mask"], use_cache=False).logits.float()
    if _relative(later[:, :-1], own[:, :-1]) > tolerance:
        raise ConfigError(f"{type(model).__name__} ({getattr(model.config, 'model_type', '?')}) is not a causal "
                          "decoder: a later token changes the logits of earlier ones; deltatune trains causal LMs only")
    try:
        computed = head(hidden_states(model, batch)).float()
    except Exception as exc:  # noqa: BLE001 - a model whose decoder/head does not split this way
        return f"its hidden states cannot be read apart from its head ({type(exc).__name__}: {exc})"
    if transform is not None:
        computed = transform.apply(computed)
    difference = _relative(computed, own)
    if computed.shape != own.shape or difference > tolerance:
        return f"its LM head output differs from its own logits by {difference:.2g} (relative)"
    return ""


def head_plan(model: nn.Module) -> HeadPlan:
    """How the loss of ``model`` gets its logits (decided once per model and LM head module; the
    first decision against the model's own logits warns with the reason)."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    plan = _PLANS.get(model)
    if plan is not None and plan.head is head:
        return plan
    if head is None:
        plan = HeadPlan(None, exact=False, reason="it has no output embeddings (LM head) to project with")
    else:
        transform, reason = declared_transform(model.config)
        training = {m: m.training for m in model.modules()}
        model.eval()
        try:
            reason = _probe(model, head, transform) or reason
        finally:
            for module, mode in training.items():
                module.training = mode
        plan = HeadPlan(head, transform, exact=not reason, reason=reason)
    _PLANS[model] = plan
    if not plan.exact:
        warnings.warn(f"{type(model).__name__}: the loss uses the model's own logits (slower) because {plan.reason}",
                      stacklevel=2)
    return plan


def own_logits(model: nn.Module, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """The model's own logits at the positions ``mask`` (``batch x length - 1``) selects, as rows in
    ``mask``'s order. Where the forward takes ``logits_to_keep`` only the columns with a selected
    position are projected."""
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"),
                              "use_cache": False}
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        columns = mask.any(0).nonzero().squeeze(1)
        return model(**kwargs, logits_to_keep=columns).logits[mask[:, columns]]
    return model(**kwargs).logits[:, :-1][mask]


def labelled_logits(model: nn.Module, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """The model's logits (fp32) at the positions ``mask`` selects: through the LM head on those
    hidden states only when that is exact (:func:`head_plan`), else from the model's own forward."""
    plan = head_plan(model)
    if not plan.exact:
        return own_logits(model, batch, mask).float()
    logits = plan.head(hidden_states(model, batch)[:, :-1][mask]).float()
    return plan.transform.apply(logits) if plan.transform is not None else logits

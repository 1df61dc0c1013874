"""From the decoder's last hidden state to the model's logits: what the labelled-positions-only LM head
must add to ``hidden @ Wᵀ`` to compute the model's own logits, and the exact fallback when it cannot.

The training loss and the log-likelihood evaluators project only the labelled positions through the
LM head (:func:`deltatune.model.forward.hidden_states`, then the head). Some families change the head's
output before it becomes the logits (Gemma 2 soft-caps them, Granite and Cohere scale them); the
model-family plugin serving a model (:mod:`deltatune.model.families`) declares that change as a
:class:`LogitTransform`. :func:`head_plan` decides, once per model (at assembly,
:func:`deltatune.model.assembly.build_model`, or on first use for a model built elsewhere), whether
the head computation is the model's own:

1. **structure** — a model no family serves must have no config field whose name speaks of logits
   (but those of :data:`DECODER_FIELDS`, which act inside the decoder): such a field means the head
   computation cannot be trusted;
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
from deltatune.model.families import installed_families, serving_family
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


DECODER_FIELDS: set[str] = {"attn_logit_softcapping", "router_logit_softcapping", "output_router_logits",
                            "router_aux_loss_coef"}
"""Config fields whose names speak of logits but which act inside the decoder (attention scores, MoE
routers), which deltatune always runs as the model does: they leave the LM head alone."""


@dataclass
class HeadPlan:
    """How the loss turns hidden states into logits for one model: ``exact`` means
    ``transform(head(hidden))`` is the model's own logits; otherwise ``reason`` says why not."""

    head: nn.Module | None
    transform: LogitTransform | None = None
    exact: bool = True
    reason: str = ""
    family: Any = None
    """The model-family plugin serving the model (:mod:`deltatune.model.families`), or ``None``."""
    aux_loss_coef: float = 0.0
    """The weight of the auxiliary loss the model's own forward adds to its loss (a MoE router's load
    balancing, ``output_router_logits``); such a model's loss comes from its own forward."""


_PLANS: weakref.WeakKeyDictionary[nn.Module, HeadPlan] = weakref.WeakKeyDictionary()


def _config_fields(config: Any) -> dict[str, Any]:
    try:
        return config.to_dict()
    except Exception:  # noqa: BLE001 - an unusual config object: read its attributes
        return dict(vars(config))


def declared_transform(config: Any, family: Any) -> tuple[LogitTransform | None, str]:
    """``(transform, "")``: the transform the serving ``family`` declares for ``config``; without a
    family, ``(None, reason)`` when a config field may change the logits (the generic path then takes
    the model's own logits)."""
    if family is not None:
        return family.logit_transform(config), ""
    fields = _config_fields(config)
    unknown = sorted(k for k in fields if ("logit" in k.lower() or "output_multiplier" in k.lower())
                     and k not in DECODER_FIELDS and fields[k] not in (None, False))
    if unknown:
        return None, (f"config field(s) {', '.join(unknown)} may change the logits and no installed model "
                      "family serves it")
    return None, ""


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


def head_plan(model: nn.Module, families: list[Any] | None = None) -> HeadPlan:
    """How the loss of ``model`` gets its logits (decided once per model and LM head module, with the
    model families ``families``, default the installed ones; a family that does not handle the model
    and a decision against the model's own logits each warn with the reason)."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    plan = _PLANS.get(model)
    if plan is not None and plan.head is head:
        return plan
    if head is None:
        plan = HeadPlan(None, exact=False, reason="it has no output embeddings (LM head) to project with")
    else:
        family, unhandled = serving_family(model.config, installed_families() if families is None else families)
        if unhandled:
            warnings.warn(f"{type(model).__name__}: the generic path trains it because {unhandled}", stacklevel=2)
        transform, reason = declared_transform(model.config, family)
        training = {m: m.training for m in model.modules()}
        model.eval()
        try:
            reason = _probe(model, head, transform) or reason
        finally:
            for module, mode in training.items():
                module.training = mode
        aux = float(getattr(model.config, "router_aux_loss_coef", 0.0) or 0.0)
        aux = aux if getattr(model.config, "output_router_logits", False) else 0.0
        if aux:
            reason = f"its loss adds the router's auxiliary loss (output_router_logits, weight {aux:g})"
        plan = HeadPlan(head, transform, exact=not reason, reason=reason, family=family if not reason else None,
                        aux_loss_coef=aux)
    _PLANS[model] = plan
    if not plan.exact:
        warnings.warn(f"{type(model).__name__}: the loss uses the model's own logits (slower) because {plan.reason}",
                      stacklevel=2)
    return plan


def own_forward(model: nn.Module, batch: dict[str, torch.Tensor],
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logits, auxiliary loss)`` of the model's own forward: the logits at the positions ``mask``
    (``batch x length - 1``) selects, as rows in ``mask``'s order (where the forward takes
    ``logits_to_keep`` only the columns with a selected position are projected), and the auxiliary
    loss it returns (``aux_loss``, a MoE router's; ``None`` without one)."""
    kwargs: dict[str, Any] = {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"),
                              "use_cache": False}
    if "position_ids" in batch:
        kwargs["position_ids"] = batch["position_ids"]
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        columns = mask.any(0).nonzero().squeeze(1)
        out = model(**kwargs, logits_to_keep=columns)
        return out.logits[mask[:, columns]], getattr(out, "aux_loss", None)
    out = model(**kwargs)
    return out.logits[:, :-1][mask], getattr(out, "aux_loss", None)


def own_logits(model: nn.Module, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """The model's own logits at the positions ``mask`` selects (:func:`own_forward`)."""
    return own_forward(model, batch, mask)[0]


def labelled_logits(model: nn.Module, batch: dict[str, torch.Tensor], mask: torch.Tensor) -> torch.Tensor:
    """The model's logits (fp32) at the positions ``mask`` selects: through the LM head on those
    hidden states only when that is exact (:func:`head_plan`), else from the model's own forward."""
    plan = head_plan(model)
    if not plan.exact:
        return own_logits(model, batch, mask).float()
    logits = plan.head(hidden_states(model, batch)[:, :-1][mask]).float()
    return plan.transform.apply(logits) if plan.transform is not None else logits

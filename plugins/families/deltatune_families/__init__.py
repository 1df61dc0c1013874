"""First-party model families: what deltatune knows about the causal decoders transformers ships.

Each family names the ``config.model_type`` values it serves and the logit-like config fields it
implements (:attr:`Family.handled_fields`); a config setting any other such field is not handled
exactly, and the core trains it on its generic path, saying why. The families whose LM head output is
not yet the logits declare the transform (:mod:`deltatune_families.logits`): Gemma 2/3 soft-cap
(``final_logit_softcapping``), Granite divides by ``logits_scaling``, Cohere multiplies by
``logit_scale``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from torch import nn

from deltatune.api import LogitTransform, hookimpl
from deltatune_families.logits import divide_by, multiply_by, soft_cap


class FamilyOptions(BaseModel):
    """Model families take no options."""

    model_config = ConfigDict(extra="forbid")


def _config_fields(config: Any) -> dict[str, Any]:
    return config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))


class Family:
    """A family whose LM head output is the model's logits; subclasses name their model types and
    the logit-like config fields they implement."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[BaseModel]] = FamilyOptions
    model_types: ClassVar[tuple[str, ...]] = ()
    handled_fields: ClassVar[tuple[str, ...]] = ()
    """Config fields whose names speak of logits that this family computes exactly."""

    def unhandled(self, config: Any) -> str | None:
        """The logit-like config fields set in ``config`` that this family does not implement, if any."""
        fields = _config_fields(config)
        unknown = sorted(k for k, v in fields.items() if ("logit" in k.lower() or "output_multiplier" in k.lower())
                         and k not in self.handled_fields and v not in (None, False))
        return f"config field(s) {', '.join(unknown)} may change the logits" if unknown else None

    def logit_transform(self, config: Any) -> LogitTransform | None:
        """``None``: the head's output is the logits."""
        return None


class FastDecoderFamily(Family):
    """A Llama-like family with the fast training forward on unpadded tokens
    (:mod:`deltatune_families.fast.llama`) for the models and batches it computes exactly."""

    def fast_forward(self, model: nn.Module) -> Any:
        """The fast training forward of ``model`` (imported on first use), or ``None``."""
        from deltatune_families.fast.llama import fast_forward_for

        return fast_forward_for(model)

    def activation_terms(self, model: nn.Module, quantized: set[str], inner_widths: dict[str, int]) -> Any:
        """What the Llama fast forward keeps for backward on ``model``, for ``deltatune estimate``
        (:class:`deltatune_families.estimate.LlamaActivations`), or ``None`` when it is not Llama-shaped."""
        from deltatune_families.estimate import LlamaActivations

        return LlamaActivations.of(model, quantized, inner_widths)


class Llama(FastDecoderFamily):
    """Llama 1/2/3 (every rope type: the model's own rotary embedding runs; the fast forward takes those
    fixed when the model is built: default, linear, llama3, yarn)."""

    name = "llama"
    model_types = ("llama",)


class Mistral(FastDecoderFamily):
    """Mistral (sliding-window attention: the fast forward declines a batch with an example longer than
    the window)."""

    name = "mistral"
    model_types = ("mistral",)


class Qwen2(FastDecoderFamily):
    """Qwen 2 / 2.5 (biased q/k/v projections; the fast forward declines a batch with an example longer
    than a sliding-attention layer's window)."""

    name = "qwen2"
    model_types = ("qwen2",)


class Qwen3(FastDecoderFamily):
    """Qwen 3 dense (QK-norm; head size set apart from hidden size / heads)."""

    name = "qwen3"
    model_types = ("qwen3",)


class Phi3(Family):
    """Phi-3 (fused ``qkv_proj`` and ``gate_up_proj``)."""

    name = "phi3"
    model_types = ("phi3",)


class Gpt2(Family):
    """GPT-2 (``Conv1D`` projections, which the delta seam wraps as linear layers)."""

    name = "gpt2"
    model_types = ("gpt2",)


class Gemma(Family):
    """Gemma 1/2/3 (text): embedding scale, alternating attention, attention soft-capping inside the
    decoder, and Gemma 2/3's final logit soft-capping ``cap · tanh(y / cap)``."""

    name = "gemma"
    model_types = ("gemma", "gemma2", "gemma3_text")
    handled_fields = ("final_logit_softcapping", "attn_logit_softcapping")

    def logit_transform(self, config: Any) -> LogitTransform | None:
        cap = getattr(config, "final_logit_softcapping", None)
        return soft_cap(float(cap)) if cap else None


class Granite(Family):
    """Granite: logits divided by ``logits_scaling``."""

    name = "granite"
    model_types = ("granite",)
    handled_fields = ("logits_scaling",)

    def logit_transform(self, config: Any) -> LogitTransform | None:
        scale = getattr(config, "logits_scaling", None)
        return divide_by(float(scale)) if scale is not None and scale != 1 else None


class Cohere(Family):
    """Cohere Command-R: logits multiplied by ``logit_scale``."""

    name = "cohere"
    model_types = ("cohere",)
    handled_fields = ("logit_scale",)

    def logit_transform(self, config: Any) -> LogitTransform | None:
        scale = getattr(config, "logit_scale", None)
        return multiply_by(float(scale)) if scale is not None and scale != 1 else None


class Mixtral(Family):
    """Mixtral (sparse mixture of experts: the experts are 3-D parameters, which ``target_parameters``
    adapts and ``nf4`` quantizes; with ``output_router_logits`` the router's auxiliary loss is part of
    the model's loss, which the core then takes from the model's own forward)."""

    name = "mixtral"
    model_types = ("mixtral",)


class QwenMoe(Family):
    """Qwen 2 and Qwen 3 mixtures of experts (3-D expert parameters; Qwen 2's shared expert and its
    one-wide gate are linear layers)."""

    name = "qwen_moe"
    model_types = ("qwen2_moe", "qwen3_moe")


FAMILIES = (Llama, Mistral, Qwen2, Qwen3, Phi3, Gpt2, Gemma, Granite, Cohere, Mixtral, QwenMoe)


@hookimpl
def deltatune_register_model_families(register) -> None:
    """Provide every first-party model family."""
    for family in FAMILIES:
        register(family)

"""The six plugin protocols, their optional members, and the one table of plugin kinds.

A protocol is structural (``typing.Protocol``): a plugin needs no base class from the core, only the
*required* members written in the protocol's body. ``deltatune.testing`` checks them with contract
tests, and the plugin manager refuses a class that lacks one.

**Optional members** are declared once per protocol with :func:`optional_members` (name, default,
shape, meaning) and never written in the protocol's body, so a plugin may leave them out. The core
reaches them only through :meth:`deltatune.plugin.resolve.ResolvedPlugin.optional` (or
:func:`optional_member` when it holds a bare plugin instance), which returns the plugin's member or
the declared default; asking for a name that is not declared is an error, so there is no ad-hoc
probing with ``getattr``/``hasattr``. A present optional member of the wrong shape (a number where a
method is declared) is refused when the plugin registers (:func:`optional_member_problems`).

**Kinds**: :data:`PLUGIN_KINDS` is the single table of plugin kinds — name, label used in messages,
hook specification, protocol, contract class of ``deltatune.testing`` — in the order of the hook
specifications; everything else (manager, registry, scaffold, CLI, contract kit) derives from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

from pydantic import BaseModel

if TYPE_CHECKING:
    import torch
    from torch import nn

Row = dict[str, Any]
"""One tokenised example: ``input_ids`` and ``labels`` (lists of int), optional text fields (``prompt``
already rendered, ``response``, ``family``, …) and ``chat_template_kwargs``, the chat template
variables ``prompt`` was rendered with."""


@dataclass(frozen=True)
class OptionalMember:
    """A member a plugin may leave out: when it does, the core uses :attr:`default`."""

    name: str
    default: Any
    """What the core gets for a plugin without the member (``None``: "not provided / unknown")."""
    shape: Literal["method", "attribute"]
    """``method``: a callable; ``attribute``: a class attribute of :attr:`type`."""
    doc: str
    """Signature and meaning, as the plugin author needs them."""
    type: type | None = None
    """For an attribute: the type its value must have."""

    def problem(self, value: Any) -> str | None:
        """Why ``value`` cannot be this member, or ``None`` when it can."""
        if self.shape == "method":
            return None if callable(value) else f"`{self.name}` must be a method, got {type(value).__name__}"
        if self.type is not None and not isinstance(value, self.type):
            return f"`{self.name}` must be a {self.type.__name__}, got {type(value).__name__}"
        return None


_OPTIONAL: dict[type, dict[str, OptionalMember]] = {}


def declare_optional(*members: OptionalMember) -> Callable[[type], type]:
    """Class decorator declaring a protocol's optional members (kept out of the protocol's body, so
    ``isinstance`` and the manager's contract check do not require them)."""

    def declare(protocol: type) -> type:
        _OPTIONAL[protocol] = {member.name: member for member in members}
        return protocol

    return declare


def optional_members(protocol: type) -> dict[str, OptionalMember]:
    """The optional members declared for ``protocol``, by name."""
    return _OPTIONAL.get(protocol, {})


@declare_optional(
    OptionalMember(
        "default", False, "attribute",
        "default: ClassVar[bool]: True when a run that names no plugin of this kind uses this one "
        "(at most one installed plugin per kind; a subclass does not inherit it). Absent: not the default.",
        bool,
    ),
)
@runtime_checkable
class DatasetBuilder(Protocol):
    """Turns data files into tokenised rows for one split.

    Optional member: ``default`` (see :func:`optional_members`).
    """

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]

    def build(self, cfg: BaseModel, tokenizer: Any, split: str) -> list[Row] | None:
        """Rows of ``split`` (``train``/``validation``/``test``), or ``None`` when it has none."""
        ...


@declare_optional(
    OptionalMember(
        "peft_state_dict", None, "method",
        "peft_state_dict(model, cfg) -> dict[str, Tensor]: this method's tensors under PEFT checkpoint "
        "names (`base_model.model.<module>.<key>`); raise ConfigError when this model's state cannot be "
        "expressed in PEFT. Absent: the method cannot be exported as a PEFT adapter.",
    ),
    OptionalMember(
        "load_peft_state_dict", None, "method",
        "load_peft_state_dict(model, cfg, state) -> None: copy the tensors of a PEFT checkpoint (PEFT "
        "names) into this method's deltas, raising ConfigError for a missing key or a shape mismatch; "
        "keys of other methods are ignored. Absent: the method cannot start from a PEFT adapter (init_from).",
    ),
    OptionalMember(
        "peft_fields", {}, "attribute",
        "peft_fields: ClassVar[dict[str, str]]: option name -> PEFT adapter_config.json key, for the "
        "options `init_from` adopts from the adapter when the user leaves them unset. Absent: none is adopted.",
        dict,
    ),
    OptionalMember(
        "reads_peft", {}, "attribute",
        "reads_peft: ClassVar[dict[str, Any]]: the adapter_config.json fields that mark a PEFT adapter "
        "this method starts from (init_from), e.g. {\"peft_type\": \"LORA\", \"use_dora\": False}; a key the "
        "file leaves out counts as PEFT's default. deltatune.io.peft finds the method for a PEFT folder by "
        "them. Absent: the method reads no PEFT adapter.",
        dict,
    ),
    OptionalMember(
        "mergeable", True, "attribute",
        "mergeable: ClassVar[bool]: whether `merge` can fold the method into the base weights (a nonlinear "
        "delta cannot; its `merge` must then raise ConfigError, and exports other than the deltatune bundle "
        "say so). Absent: True.",
        bool,
    ),
    OptionalMember(
        "dense_base_reason", None, "method",
        "dense_base_reason(cfg) -> str | None: why this configuration of a method that otherwise supports "
        "quantized bases needs a dense one (PiSSA leaves a residual in the base weight), or None; a run "
        "with a quantizer is then refused before any weight loads, with this reason. Absent: no configuration "
        "needs more than `supports_quantized` says.",
    ),
    OptionalMember(
        "adds_virtual_tokens", False, "attribute",
        "adds_virtual_tokens: ClassVar[bool]: True when `apply` puts virtual tokens before every sequence "
        "(deltatune.api.VirtualTokens: prefix-tuning, prompt tuning); the core then refuses packing before any "
        "weight loads, and the model trains on the exact generic forward. Absent: False.",
        bool,
    ),
    OptionalMember(
        "lr_multipliers", None, "method",
        "lr_multipliers(cfg) -> dict[str, float]: factors of the optimizer's learning rate for some of this "
        "method's parameters, by the end of their names (e.g. {\"lora_B.weight\": 16.0}); the optimizer gets "
        "them as parameter groups, and a run whose optimizer does not honour them (`honours_lr_multipliers`) is "
        "refused before any weight loads. Absent: every parameter trains at the optimizer's learning rate.",
    ),
    OptionalMember(
        "inner_width", None, "method",
        "inner_width(cfg) -> int: elements per token that one of this method's delta layers computes "
        "between the layer's input and output and autograd keeps for backward (a low-rank method's rank r; "
        "for `deltatune estimate`). Absent: 0.",
    ),
)
@runtime_checkable
class DeltaMethod(Protocol):
    """A parameter-efficient change of the base model (LoRA, DoRA, VeRA, BitFit, …).

    Optional members (PEFT interoperability, used by :mod:`deltatune.io.peft` to write a PEFT
    adapter folder and to start from one with ``init_from``): ``peft_state_dict``,
    ``load_peft_state_dict``, ``peft_fields``, ``reads_peft``; for the optimizer: ``lr_multipliers``;
    for ``deltatune estimate``: ``inner_width`` — see :func:`optional_members`.
    :class:`deltatune.deltas.method.LayerDeltaMethod` implements the first two for methods whose
    delta tensors carry PEFT's names (override ``peft_names`` to rename).
    """

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]
    supports_quantized: ClassVar[bool]

    def apply(self, model: nn.Module, cfg: BaseModel) -> None:
        """Wrap or mark the targeted modules of ``model`` in place."""
        ...

    def trainable(self, name: str, param: nn.Parameter) -> bool:
        """Whether this method claims (trains) the parameter called ``name``."""
        ...

    def merge(self, model: nn.Module) -> None:
        """Fold this method's deltas into the base weights (outputs unchanged)."""
        ...

    def unmerge(self, model: nn.Module) -> None:
        """Undo :meth:`merge` exactly (up to float rounding)."""
        ...

    def state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Every tensor needed to restore this method on a freshly applied model, by model key."""
        ...

    def peft_config(self, cfg: BaseModel) -> dict[str, Any] | None:
        """The PEFT ``adapter_config.json`` content equivalent to ``cfg``, or ``None`` if PEFT
        cannot express it."""
        ...


@declare_optional(
    OptionalMember(
        "bits_per_weight", None, "method",
        "bits_per_weight(cfg) -> float: storage bits per quantized weight, scales included (for "
        "`deltatune estimate`). Absent: unknown.",
    ),
    OptionalMember(
        "layers_to_quantize", None, "method",
        "layers_to_quantize(model, cfg) -> list[str]: names of the modules quantize(model, cfg) would "
        "replace (and of the MoE expert parameters it would hold quantized), without changing model (which may live on the meta device; for `deltatune estimate`). "
        "Absent: unknown.",
    ),
    OptionalMember(
        "transformers_quantization_config", None, "method",
        "transformers_quantization_config(cfg) -> Any: the transformers quantization config "
        "(`quantization_config=` of from_pretrained) that quantizes dense weights as cfg does (for a merged "
        "export with requantize). Absent: merged weights cannot be requantized.",
    ),
)
@runtime_checkable
class Quantizer(Protocol):
    """Replaces base layers by quantized ones and gives dense weights back on demand.

    Optional members: ``bits_per_weight``, ``layers_to_quantize``, ``transformers_quantization_config``
    (see :func:`optional_members`).
    """

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]

    def quantize(self, model: nn.Module, cfg: BaseModel) -> None:
        """Quantize the targeted layers of ``model`` in place."""
        ...

    def is_quantized(self, module: nn.Module) -> bool:
        """Whether ``module`` is a layer this quantizer produced."""
        ...

    def dequantize_weight(self, module: nn.Module) -> torch.Tensor:
        """The dense weight (``out x in``) that ``module`` computes with."""
        ...


@declare_optional(
    OptionalMember(
        "default", False, "attribute",
        "default: ClassVar[bool]: True when a run that names no plugin of this kind uses this one "
        "(at most one installed plugin per kind; a subclass does not inherit it). Absent: not the default.",
        bool,
    ),
)
@runtime_checkable
class Evaluator(Protocol):
    """Computes metrics of a model on a list of rows.

    Optional member: ``default`` (see :func:`optional_members`).
    """

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]

    def evaluate(self, model: nn.Module, tokenizer: Any, rows: list[Row], cfg: BaseModel) -> dict[str, float]:
        """Metrics (flat, float values) of ``model`` on ``rows``."""
        ...


@declare_optional(
    OptionalMember(
        "updates_in_backward", False, "attribute",
        "updates_in_backward: ClassVar[bool]: True when the optimizer updates each parameter inside "
        "backward (an InBackwardOptimizer, as LOMO); the core then drives it with manual optimisation. "
        "Absent: a usual optimizer (backward, then step).",
        bool,
    ),
    OptionalMember(
        "honours_lr_multipliers", False, "attribute",
        "honours_lr_multipliers: ClassVar[bool]: True when `create` accepts the keyword `lr_multipliers` "
        "(parameter name -> factor, for the parameters a delta method gives a learning rate other than the "
        "optimizer's; passed only when there are any) and trains each such parameter at lr x factor, its "
        "schedule included (`lr_groups` builds the groups). Absent: runs with such a delta method are refused.",
        bool,
    ),
    OptionalMember(
        "state_bytes_per_param", None, "method",
        "state_bytes_per_param(cfg, shape, param_bytes) -> float: bytes of optimizer state kept for one "
        "trained tensor of `shape` whose elements take `param_bytes` bytes (for `deltatune estimate`). "
        "Absent: unknown (the estimate assumes two moments per element, with a note).",
    ),
    OptionalMember(
        "default", False, "attribute",
        "default: ClassVar[bool]: True when a run that names no plugin of this kind uses this one "
        "(at most one installed plugin per kind; a subclass does not inherit it). Absent: not the default.",
        bool,
    ),
)
@runtime_checkable
class OptimizerFactory(Protocol):
    """Builds the optimizer (and learning-rate schedule) for the trainable parameters.

    Optional members: ``updates_in_backward``, ``honours_lr_multipliers``, ``state_bytes_per_param``,
    ``default`` (see :func:`optional_members`).
    """

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]

    def create(
        self, named_params: list[tuple[str, nn.Parameter]], cfg: BaseModel, total_steps: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        """The optimizer over ``named_params`` and a per-step scheduler (or ``None``)."""
        ...


@declare_optional(
    OptionalMember(
        "fast_forward", None, "method",
        "fast_forward(model) -> Callable[[batch], tuple[Tensor, int] | None] | None: a training forward computing "
        "the same (summed token loss, labelled tokens) as the plain path, faster; None when it does not compute "
        "this model exactly (a hooked module, say); the forward returns None for a batch it does not take. "
        "Absent: the plain path.",
    ),
    OptionalMember(
        "target_roles", None, "method",
        "target_roles(model) -> dict[str, list[str]]: the names (as model.named_modules() gives them) of "
        "model's linear layers that a delta method's targets `attention` and `mlp` select, by "
        "role (keys: those two; a layer in neither is `other`). Absent: the core places each linear layer by "
        "the names of the modules above it (deltatune.api.generic_target_roles).",
    ),
    OptionalMember(
        "activation_terms", None, "method",
        "activation_terms(model, quantized, inner_widths) -> ActivationTerms | None: for `deltatune estimate`, what "
        "the family's fast_forward keeps for backward when it runs model (a meta-device model with the run's deltas "
        "applied; quantized: the names of the modules the quantizer replaces; inner_widths: delta method name -> its "
        "inner_width): an object with `compute_copies` (elements of trained weights the fast forward holds in the "
        "compute dtype, whole model) and `activation_bytes(config, lay, batch, seq, compute, checkpointing, "
        "labelled, quantized_saves_input) -> dict` (deltatune.api.ActivationTerms); None when it cannot say for "
        "this model. Absent: the estimate uses the plain forward's terms (deltatune.api.plain_activation_bytes).",
    ),
)
@runtime_checkable
class ModelFamily(Protocol):
    """What deltatune knows about one family of causal decoders (Llama, Gemma 2, GPT-2, ...).

    A family serves the configs whose ``model_type`` is in :attr:`model_types` and for which
    :meth:`unhandled` finds nothing; for those, :meth:`logit_transform` turns the LM head's output into
    the model's logits inside the chunked loss. A model no family serves trains on the generic path,
    exact for every causal LM. Optional members: ``fast_forward``, ``target_roles``,
    ``activation_terms`` (see :func:`optional_members`).
    """

    name: ClassVar[str]
    Config: ClassVar[type[BaseModel]]
    model_types: ClassVar[tuple[str, ...]]

    def unhandled(self, config: Any) -> str | None:
        """Why this family does not compute a model of ``config`` (a transformers config) exactly — a
        feature it does not implement, such as an unknown rope type — or ``None`` when it does."""
        ...

    def logit_transform(self, config: Any) -> Any:
        """The :class:`deltatune.api.LogitTransform` from the LM head's output to the logits of a model
        of ``config`` (soft-capping, scaling), or ``None`` when the head's output is the logits."""
        ...


# -- the table of plugin kinds -----------------------------------------------------------------------
@dataclass(frozen=True)
class PluginKind:
    """One kind of plugin and everything the core and the tools derive from it."""

    name: str
    """The kind's key: ``PluginInfo.kind``, ``registry.toml``'s ``kind``, ``--kind`` of ``new-plugin``."""
    label: str
    """How messages name it (``delta method``)."""
    hook: str
    """The hook specification (:mod:`deltatune.plugin.hookspecs`) that registers classes of this kind."""
    protocol: type
    """The protocol its classes follow."""
    contract: str
    """The ``deltatune.testing`` contract class every plugin of this kind passes."""
    tested_name: str
    """The contract's class attribute naming the plugin under test (``method_name``)."""
    run_option: str | None
    """Where a run configuration names plugins of this kind (``model.delta``); ``None`` when the core
    chooses the plugin itself (a model family: the one serving the model's ``config.model_type``)."""
    listed: bool
    """Whether :attr:`run_option` takes a list of plugin references (``model.delta: [lora]``)."""

    @property
    def optional(self) -> dict[str, OptionalMember]:
        """The optional members of :attr:`protocol`."""
        return optional_members(self.protocol)


PLUGIN_KINDS: dict[str, PluginKind] = {
    kind.name: kind
    for kind in (
        PluginKind("dataset_builder", "dataset builder", "deltatune_register_dataset_builders", DatasetBuilder,
                   "DatasetBuilderContract", "builder_name", "data.builder", False),
        PluginKind("delta_method", "delta method", "deltatune_register_delta_methods", DeltaMethod,
                   "DeltaMethodContract", "method_name", "model.delta", True),
        PluginKind("quantizer", "quantizer", "deltatune_register_quantizers", Quantizer,
                   "QuantizerContract", "quantizer_name", "model.quantizer", False),
        PluginKind("evaluator", "evaluator", "deltatune_register_evaluators", Evaluator,
                   "EvaluatorContract", "evaluator_name", "model.evaluators", True),
        PluginKind("optimizer", "optimizer", "deltatune_register_optimizers", OptimizerFactory,
                   "OptimizerContract", "optimizer_name", "model.optimizer", False),
        PluginKind("model_family", "model family", "deltatune_register_model_families", ModelFamily,
                   "ModelFamilyContract", "family_name", None, False),
    )
}
"""Plugin kind name → :class:`PluginKind`, in the order of the hook specifications."""


def required_members(protocol: type) -> list[str]:
    """The required members of ``protocol`` (those written in its body), sorted."""
    members = set(getattr(protocol, "__protocol_attrs__", ()))
    members |= {k for k in vars(protocol) if not k.startswith("_")}
    return sorted(members)


# -- reaching optional members ---------------------------------------------------------------------
def optional_member(kind: str, plugin: Any, name: str) -> Any:
    """``plugin``'s optional member ``name`` — declared on the protocol of ``kind`` — or its default.

    ``plugin`` is a plugin instance (or class). Raises :class:`KeyError` when ``name`` is not an
    optional member of that protocol, so a misspelt member fails instead of reading as absent.
    """
    declared = PLUGIN_KINDS[kind].optional
    if name not in declared:
        raise KeyError(f"'{name}' is not an optional member of {PLUGIN_KINDS[kind].protocol.__name__} "
                       f"(declared: {', '.join(declared) or 'none'})")
    return getattr(plugin, name, declared[name].default)


def optional_member_problems(kind: str, cls: type) -> list[str]:
    """What is wrong with the optional members ``cls`` does provide (empty when all is well)."""
    absent = object()
    provided = {name: (member, getattr(cls, name, absent)) for name, member in PLUGIN_KINDS[kind].optional.items()}
    return [problem for member, value in provided.values()
            if value is not absent and (problem := member.problem(value)) is not None]

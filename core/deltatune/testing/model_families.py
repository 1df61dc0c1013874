"""The contract of model families: :class:`ModelFamilyContract`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from torch import nn

from deltatune.deltas.targets import target_roles
from deltatune.errors import ConfigError
from deltatune.model.families import installed_families, serving_family
from deltatune.model.logits import LogitTransform
from deltatune.plugin.manager import PluginManager
from deltatune.testing.contract import PluginContract
from deltatune.testing.families import bf16_conformance, bf16_failure, family_conformance
from deltatune.testing.helpers import fast_forward_runs


NO_TINY_MODELS = "{} must set `tiny_models`: write factories of tiny models of the configs the family serves"


class ModelFamilyContract(PluginContract):
    """The contract of a model family (:class:`deltatune.plugin.protocols.ModelFamily`).

    On every tiny model of :attr:`tiny_models` (factories ``(seed=0) -> model`` of configs the family
    serves, such as :data:`deltatune.testing.families.TINY_FAMILIES`' entries): the family is the one
    the core picks for it, and deltatune's training loss and every trainable gradient equal the model's
    own Hugging Face loss (:func:`deltatune.testing.families.family_conformance`; fp32: loss ≤ 1e-5
    relative, gradients ≤ 1e-4 of each gradient's largest entry) for every spec of :attr:`specs`, on
    padded and on packed rows; on the models of :attr:`fast_models` the family's fast training forward
    really ran; and in bf16, for the specs of :attr:`bf16_specs`, the loss and gradients stay as close
    to the fp32 ones as Hugging Face's own bf16 forward's
    (:func:`deltatune.testing.families.bf16_failure`). The family's logit transform and fast forward
    are what make or break it.
    """

    kind: ClassVar[str] = "model_family"
    family_name: ClassVar[str] = ""
    tiny_models: ClassVar[dict[str, Callable[..., nn.Module]]] = {}
    """Tiny random-weight models of configs the family serves, by name."""
    specs: ClassVar[dict[str, dict[str, Any] | None]] = {"full fine-tuning": None}
    """Model specs (``quantizer``, ``delta``) trained in the conformance check, by name; ``None``:
    full fine-tuning. A subclass adds the delta methods and quantizers it is checked with."""
    fast_models: ClassVar[tuple[str, ...]] = ()
    """Names of :attr:`tiny_models` on which the family's fast training forward must really run
    during the conformance check (so its equality is the fast forward's, not the plain path's)."""
    bf16_specs: ClassVar[tuple[str, ...] | None] = None
    """Names of :attr:`specs` also checked in bf16 (on padded rows); ``None``: every spec that trains a
    delta on a dense base (a quantized base has no fp32 forward to compare with)."""
    loss_bound: ClassVar[float] = 1e-5
    gradient_bound: ClassVar[float] = 1e-4

    def test_serves_its_tiny_models(self, manager: PluginManager) -> None:
        """The core picks this family for every model of :attr:`tiny_models`."""
        assert self.tiny_models, NO_TINY_MODELS.format(type(self).__name__)
        families = installed_families(manager)
        for name, factory in self.tiny_models.items():
            family, reason = serving_family(factory().config, families)
            assert family is not None and family.name == self.family_name, (
                f"{name}: served by {getattr(family, 'name', None)} ({reason or 'no family claims it'})")

    def test_answers_for_every_tiny_model(self, manager: PluginManager) -> None:
        """``unhandled`` finds nothing in the configs of :attr:`tiny_models` (they are configs it serves)
        and ``logit_transform`` returns a transform or ``None``."""
        assert self.tiny_models, NO_TINY_MODELS.format(type(self).__name__)
        family = self.resolved(manager).plugin
        for name, factory in self.tiny_models.items():
            config = factory().config
            assert family.unhandled(config) is None, f"{name}: {family.unhandled(config)}"
            transform = family.logit_transform(config)
            assert transform is None or isinstance(transform, LogitTransform), f"{name}: {transform!r}"

    def test_target_roles_place_linear_layers(self, manager: PluginManager) -> None:
        """The roles the targets ``attention`` and ``mlp`` select (the family's ``target_roles``, or the
        generic placement) name linear layers of each tiny model, each in one role."""
        assert self.tiny_models, NO_TINY_MODELS.format(type(self).__name__)
        families = installed_families(manager)
        for name, factory in self.tiny_models.items():
            try:
                target_roles(factory(), families)
            except ConfigError as exc:
                raise AssertionError(f"{name}: {exc}") from None

    def test_loss_and_gradients_equal_the_hugging_face_ones(self, manager: PluginManager) -> None:
        """Every tiny model × every spec × padded and packed rows."""
        assert self.tiny_models, NO_TINY_MODELS.format(type(self).__name__)
        failures = []
        for name, factory in self.tiny_models.items():
            with fast_forward_runs() as runs:
                for spec_name, spec in self.specs.items():
                    for packed in (False, True):
                        result = family_conformance(factory, spec, packed, manager)
                        if result.loss > self.loss_bound or result.gradient > self.gradient_bound:
                            failures.append(f"{name}, {spec_name}{', packed' if packed else ''}: loss "
                                            f"{result.loss:.3g}, gradient of {result.worst_parameter} "
                                            f"{result.gradient:.3g} ({result.head})")
            if name in self.fast_models and not runs:
                failures.append(f"{name}: the family's fast training forward never ran")
        assert not failures, "differs from the Hugging Face loss:\n" + "\n".join(failures)

    def test_bf16_training_is_as_close_to_fp32_as_the_hugging_face_forward(self, manager: PluginManager) -> None:
        """Every tiny model × every spec of :attr:`bf16_specs`, base in bf16, padded rows."""
        assert self.tiny_models, NO_TINY_MODELS.format(type(self).__name__)
        names = self.bf16_specs if self.bf16_specs is not None else [
            name for name, spec in self.specs.items() if spec and spec.get("delta") and not spec.get("quantizer")]
        failures = []
        for name, factory in self.tiny_models.items():
            for spec_name in names:
                failure = bf16_failure(bf16_conformance(factory, self.specs[spec_name], False, manager))
                if failure:
                    failures.append(f"{name}, {spec_name}: {failure}")
        assert not failures, "bf16 training strays from fp32 further than Hugging Face's:\n" + "\n".join(failures)

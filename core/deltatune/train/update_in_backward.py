"""Optimizers that update inside backward (LOMO, AdaLomo): each parameter is updated during the backward pass.

A normal optimizer needs every gradient at once: ``loss.backward()`` fills ``p.grad`` for all
parameters, then ``optimizer.step()`` reads them. For full fine-tuning that is one extra copy of the
model (plus the optimizer state). LOMO (Lv et al., 2023, *Full Parameter Fine-tuning for Large
Language Models with Limited Resources*) joins the two: as soon as a parameter's gradient is final
during backward, the parameter is updated and its gradient freed, so at most a few gradients are
alive at any moment.

:class:`InBackwardOptimizer` is the shared machinery; a plugin only writes the per-parameter rule
:meth:`InBackwardOptimizer._update`. It

* registers :meth:`torch.Tensor.register_post_accumulate_grad_hook` on every trainable parameter;
  the hook fires once per backward, after *all* contributions have been summed into ``p.grad`` (so a
  weight used twice, like an embedding tied to the LM head, is updated exactly once per step);
* implements :meth:`InBackwardOptimizer.backward_and_update`, which replaces ``loss.backward()`` +
  ``optimizer.step()``. With gradient-norm clipping it runs **two** backward passes: the first
  (``retain_graph=True``) only measures the global gradient norm (each gradient's norm is taken in
  its hook and the gradient freed at once), the second performs the clipped updates. This doubles
  the backward cost; :attr:`InBackwardOptimizer.backward_passes` and :attr:`InBackwardOptimizer.norm_passes`
  count it so the price is visible;
* scales the loss only where precision needs it: when the loss, the parameters or an active autocast
  region are ``float16``, a dynamic loss scale is used and the norm pass doubles as the overflow check
  (an overflowing step is skipped and the scale halved). ``bfloat16`` and ``float32`` need none;
* reads the learning rate from ``param_groups`` at every update, so any
  :class:`torch.optim.lr_scheduler.LRScheduler` works;
* does the update math in ``float32`` whatever the parameter dtype (``bfloat16`` weights are
  up-cast, updated and written back, one parameter at a time).

Settings that cannot work with an update inside backward are reported before training by
:meth:`InBackwardOptimizer.check_trainer_compatible`. In Lightning, drive it with manual optimisation and
pass the step as a closure, so that ``global_step`` (and ``max_steps``) count it::

    opt = self.optimizers()
    opt.step(closure=lambda: opt.optimizer.backward_and_update(loss))

Re-creating the optimizer on the same parameters hands them over to the new one (with a warning),
so a parameter is never updated twice per backward; :meth:`InBackwardOptimizer.remove_hooks` detaches it.
"""

from __future__ import annotations

import contextlib
import math
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from deltatune.train.schedules import lr_groups, warmup_cosine

__all__ = ["DeferredGrad", "InBackwardOptimizer", "InBackwardOptimizerConfig", "InBackwardOptimizerFactory", "deferred_lookup", "deferred_tied_head", "optimizer_updates_in_backward", "updated_in_backward"]

_Mode = Literal["idle", "norm", "update"]

STATE_KEY = "fused"
"""Key of the bookkeeping in :meth:`InBackwardOptimizer.state_dict` (the name checkpoints have
always used; kept so they still resume with their loss scale and counters)."""

_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()
"""Parameter -> weak reference to the in-backward optimizer whose hook updates it (one at a time)."""


def optimizer_updates_in_backward(optimizer: Any) -> bool:
    """Whether ``optimizer`` (or a Lightning wrapper around one) updates inside backward."""
    inner = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer wraps the real one
    return isinstance(inner, InBackwardOptimizer)


def updated_in_backward(param: torch.Tensor) -> bool:
    """Whether an in-backward optimizer updates ``param`` inside backward (its gradient is consumed there)."""
    ref = _OWNERS.get(param)
    owner = ref() if ref is not None else None
    return owner is not None and id(param) in owner._handles


# -- a tied LM head ----------------------------------------------------------------------------
class DeferredGrad:
    """The LM head's gradient contribution to a weight tied to the input embedding, computed at the end
    of backward instead of at its start.

    A tied head is used last in forward, so backward produces the head's (vocabulary x hidden) weight
    gradient first — and autograd holds it until the embedding lookup, at the very end, has added its
    part; only then is the tied weight's gradient complete and the weight updated. With an in-backward
    optimizer nothing else of that size is held across backward (a vocabulary x hidden fp32 matrix),
    and at the end the lookup's dense gradient, another such matrix, is added to it. Instead:

    * the loss records what the head's weight gradient needs (:meth:`defer`: a closure over the hidden
      states, targets and output gradient, which are small) and returns none for the weight;
    * the lookup reads the weight through :meth:`attach` and gives a *sparse* gradient (the rows of the
      batch's tokens);
    * when backward reaches the weight — last — the head's part is computed and the lookup's rows are
      added into it in place; the sum, exactly the usual gradient, goes to the weight (and its in-backward
      update) as its only contribution.

    The head's weight gradient then lives only while the weight is updated. Recomputing it costs one
    more product with the head (the logits, chunk by chunk) at the end of backward.
    """

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight
        self._compute: Callable[[], torch.Tensor] | None = None

    def defer(self, compute: Callable[[], torch.Tensor]) -> None:
        """Record how to compute the head's contribution (called in backward by the loss)."""
        self._compute = compute

    def attach(self) -> torch.Tensor:
        """The weight, for the embedding lookup (look up with ``sparse=True``); its gradient gets the
        deferred contribution added."""
        return _Deliver.apply(self.weight, self)

    def take(self) -> torch.Tensor | None:
        """The deferred contribution, computed now (once), or ``None`` when nothing was deferred."""
        compute, self._compute = self._compute, None
        return compute() if compute is not None else None


class _Deliver(torch.autograd.Function):
    """Identity on ``weight``; its backward adds the deferred contribution to the lookup's gradient."""

    @staticmethod
    def forward(ctx: Any, weight: torch.Tensor, slot: DeferredGrad) -> torch.Tensor:
        ctx.slot = slot
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        total = ctx.slot.take()
        if total is None:
            return grad, None
        return total.add_(grad.to(total.dtype)), None  # a sparse lookup gradient is added in place


def _tied_embedding(model: nn.Module) -> nn.Embedding | None:
    """The input embedding of ``model`` when it is a plain ``nn.Embedding`` whose weight a plain
    ``nn.Linear`` LM head shares and which trains now (grad enabled)."""
    getters = (getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None))
    if not all(callable(g) for g in getters) or not torch.is_grad_enabled():
        return None
    embedding, head = (g() for g in getters)
    if type(embedding) is not nn.Embedding or embedding.max_norm is not None or type(head) is not nn.Linear:
        return None
    weight = embedding.weight
    return embedding if getattr(head, "weight", None) is weight and weight.requires_grad else None


def deferred_tied_head(model: nn.Module) -> DeferredGrad | None:
    """A :class:`DeferredGrad` for ``model``'s tied LM-head weight when deferring pays: the head shares
    its weight with a plain ``nn.Embedding``, and an in-backward optimizer updates that weight inside backward
    (other optimizers keep every gradient until ``step()`` anyway). ``None`` otherwise."""
    embedding = _tied_embedding(model)
    if embedding is None or not updated_in_backward(embedding.weight):
        return None
    return DeferredGrad(embedding.weight)


@contextlib.contextmanager
def deferred_lookup(model: nn.Module, deferred: DeferredGrad | None) -> Iterator[None]:
    """Within the block, ``model``'s embedding module looks up through ``deferred`` (sparsely) —
    for a loss that runs the model's own forward. Nothing changes when ``deferred`` is ``None``."""
    if deferred is None:
        yield
        return
    embedding = _tied_embedding(model)

    def lookup(module: nn.Embedding, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return F.embedding(args[0], deferred.attach(), module.padding_idx, None, module.norm_type,
                           module.scale_grad_by_freq, sparse=True)

    handle = embedding.register_forward_hook(lookup)
    try:
        yield
    finally:
        handle.remove()


class InBackwardOptimizer(torch.optim.Optimizer):
    """Base class of optimizers whose update happens inside backward.

    Subclasses set :attr:`plugin_name` and implement :meth:`_update`. Use it like this::

        opt = MyInBackward(model.named_parameters(), lr=1e-3, clip_grad_norm=1.0)
        for batch in data:
            loss = model(**batch).loss
            opt.backward_and_update(loss)  # backward + update; no opt.step(), no opt.zero_grad()
            scheduler.step()

    Args:
        params: parameters, ``(name, parameter)`` pairs or parameter groups, as for any
            :class:`torch.optim.Optimizer`. Parameters that do not require grad are kept in the
            groups but get no hook (they never receive a gradient).
        defaults: per-group defaults (must contain ``lr``).
        clip_grad_norm: clip the global L2 norm of all gradients of a step to this value (as
            :func:`torch.nn.utils.clip_grad_norm_`), at the cost of a second backward pass; ``None``
            disables clipping.
        init_loss_scale: initial dynamic loss scale, used only when the step runs in ``float16``.
        loss_scale_window: good ``float16`` steps after which the loss scale doubles.
    """

    plugin_name: ClassVar[str] = "in-backward"
    """The name of the plugin providing this optimizer, used in error messages."""

    elementwise: ClassVar[bool] = False
    """Set by subclasses whose :meth:`_update` treats every element on its own (LOMO, not AdaLomo):
    low-precision parameters are then up-cast to fp32 in slices of :attr:`chunk_numel` elements."""

    chunk_numel: ClassVar[int] = 1 << 22
    """Slice size (elements) for the up-cast of element-wise updates of low-precision parameters."""

    def __init__(
        self,
        params: Iterable[Any],
        defaults: dict[str, Any],
        *,
        clip_grad_norm: float | None = None,
        init_loss_scale: float = 2.0**16,
        loss_scale_window: int = 1000,
    ) -> None:
        if clip_grad_norm is not None and not clip_grad_norm > 0:
            raise ValueError(f"{self.plugin_name}: clip_grad_norm must be positive or None, got {clip_grad_norm}")
        if "lr" not in defaults or not defaults["lr"] >= 0:
            raise ValueError(f"{self.plugin_name}: a non-negative learning rate 'lr' is required")
        # Everything the hooks touch must exist before Optimizer.__init__ calls add_param_group.
        self.clip_grad_norm: float | None = clip_grad_norm
        self.loss_scale: float = float(init_loss_scale)
        self.loss_scale_window: int = int(loss_scale_window)
        self._good_fp16_steps = 0
        self._mode: _Mode = "idle"
        self._grad_factor: float = 1.0
        self._norms: list[torch.Tensor] = []
        self._group_of: dict[int, dict[str, Any]] = {}
        self._handles: dict[int, Any] = {}
        self._has_fp16_params = False
        self.backward_passes: int = 0
        """Backward passes run by :meth:`backward_and_update` (two per step when clipping or in fp16)."""
        self.norm_passes: int = 0
        """Of those, the extra passes that only measured the gradient norm."""
        self.steps: int = 0
        """Completed (not skipped) steps."""
        self.skipped_steps: int = 0
        """Steps skipped because the gradient norm was not finite (fp16 overflow)."""
        self.param_updates: int = 0
        """Single-parameter updates performed (one per trainable parameter per step)."""
        self.last_grad_norm: float | None = None
        """Global gradient norm (unscaled, before clipping) of the last step with a norm pass."""
        super().__init__(params, defaults)

    # -- set-up ------------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (as :meth:`torch.optim.Optimizer.add_param_group`) and hook its parameters."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for p in group["params"]:
            if not p.requires_grad:
                continue
            if p.is_sparse:
                raise ValueError(f"{self.plugin_name}: sparse parameters are not supported")
            previous = _OWNERS.get(p)
            owner = previous() if previous is not None else None
            if owner is not None and owner is not self and id(p) in owner._handles:
                # a parameter is driven by one in-backward optimizer at a time: a second set of hooks
                # would update it twice per backward
                owner._release(p)
                warnings.warn(
                    f"optimizer '{self.plugin_name}' takes over a parameter of shape {tuple(p.shape)} from "
                    f"an earlier '{owner.plugin_name}' optimizer, which no longer updates it",
                    UserWarning,
                    stacklevel=3,
                )
            self._group_of[id(p)] = group
            self._has_fp16_params = self._has_fp16_params or p.dtype == torch.float16
            self._handles[id(p)] = p.register_post_accumulate_grad_hook(self._hook)
            _OWNERS[p] = weakref.ref(self)
            self._init_state(p, group, self.state[p])

    def _release(self, param: torch.Tensor) -> None:
        handle = self._handles.pop(id(param), None)
        if handle is not None:
            handle.remove()
        self._group_of.pop(id(param), None)

    def remove_hooks(self) -> None:
        """Detach the optimizer from its parameters (afterwards backward no longer updates them)."""
        for handle in self._handles.values():
            handle.remove()
        self._handles.clear()
        self._group_of.clear()

    @classmethod
    def check_trainer_compatible(
        cls,
        accumulate_grad_batches: int = 1,
        *,
        gradient_clip_val: float | None = None,
        world_size: int = 1,
        precision: str | int | None = None,
        name: str | None = None,
    ) -> None:
        """Raise :class:`ValueError` for trainer settings an update inside backward cannot honour.

        Args:
            accumulate_grad_batches: must be 1 — the gradient is consumed (and freed) inside the
                backward of every micro-batch, so there is nothing to accumulate.
            gradient_clip_val: must be ``None``/0 — the trainer clips ``p.grad`` after backward, when
                the update has already happened; use the optimizer's own ``clip_grad_norm`` option.
            world_size: must be 1 — data-parallel strategies (DDP, FSDP, DeepSpeed) all-reduce the
                gradients after the hook has already updated each replica with its local gradient.
            precision: Lightning precision; ``"16-mixed"`` is refused — its gradient scaler unscales
                and inspects ``p.grad`` after backward, when there is none left. In-backward optimizers do
                their own fp16 loss scaling: use ``"16-true"`` (fp16 weights), ``"bf16-mixed"``,
                ``"bf16-true"`` or ``"32-true"``.
            name: plugin name for the message (defaults to :attr:`plugin_name`).
        """
        label = name or cls.plugin_name
        problems: list[str] = []
        if int(accumulate_grad_batches) != 1:
            problems.append(
                f"accumulate_grad_batches={accumulate_grad_batches}: the update happens inside each "
                "backward and the gradient is freed at once, so gradients cannot be accumulated over "
                "micro-batches; set accumulate_grad_batches=1 and raise the batch size instead"
            )
        if gradient_clip_val:
            problems.append(
                f"gradient_clip_val={gradient_clip_val}: the trainer clips gradients after backward, "
                f"when the update inside backward has already been applied; set the optimizer option "
                f"clip_grad_norm={gradient_clip_val} instead and leave the trainer's gradient_clip_val unset"
            )
        if int(world_size) != 1:
            problems.append(
                f"world_size={world_size}: data-parallel training all-reduces gradients after backward, "
                "but the optimizer has already updated each replica with its local gradient; "
                "train on a single device"
            )
        if precision is not None and str(precision) in {"16-mixed", "16"}:
            problems.append(
                f"precision={precision!r}: its gradient scaler unscales and checks gradients after "
                "backward, when the update inside backward has freed them; use '16-true' (the optimizer scales "
                "the loss itself), 'bf16-mixed', 'bf16-true' or '32-true'"
            )
        if problems:
            raise ValueError(
                f"optimizer '{label}' updates parameters inside backward and cannot be used with "
                + "; ".join(problems)
            )

    # -- the step ----------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Plain ``step()`` is an error; ``step(closure)`` runs a closure that calls
        :meth:`backward_and_update`.

        This optimizer updates each parameter inside backward, as soon as its gradient is final,
        so there are no gradients left for a separate ``step()`` to apply. Frameworks that count
        optimizer steps in ``step`` (Lightning's manual optimisation increments ``global_step``
        there) can still drive it by passing the whole step as a closure::

            opt = self.optimizers()
            opt.step(closure=lambda: opt.optimizer.backward_and_update(loss))

        The closure's result is returned; a closure that performs no step is an error.
        """
        if closure is None:
            raise RuntimeError(
                f"optimizer '{self.plugin_name}' updates each parameter inside backward and "
                "keeps no gradients for step(). Call optimizer.backward_and_update(loss) instead of "
                "loss.backward() followed by optimizer.step(), or pass it as a closure: "
                "optimizer.step(closure=lambda: optimizer.backward_and_update(loss))."
            )
        done = self.steps + self.skipped_steps
        with torch.enable_grad():
            result = closure()
        if self.steps + self.skipped_steps == done:
            raise RuntimeError(
                f"optimizer '{self.plugin_name}': the closure given to step() did not call backward_and_update(loss)"
            )
        return result

    def backward_and_update(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` and update every trainable parameter during the pass.

        Without clipping and outside ``float16`` this is one backward pass. With ``clip_grad_norm``
        (or in ``float16``, where the pass also detects overflow) a first backward with
        ``retain_graph=True`` measures the global gradient norm, freeing each gradient in its hook,
        and a second one applies the updates with the gradients multiplied by
        ``min(1, clip_grad_norm / (norm + 1e-6))``. On return no parameter holds a ``.grad``.
        """
        if loss.dim() != 0:
            raise ValueError(f"{self.plugin_name}: backward_and_update needs a scalar loss, got shape {tuple(loss.shape)}")
        if not self._handles:
            raise RuntimeError(f"optimizer '{self.plugin_name}' has no hooked trainable parameter")
        self._clear_grads()
        fp16 = self._is_fp16(loss)
        scale = self.loss_scale if fp16 else 1.0
        scaled = loss * scale if scale != 1.0 else loss
        coef = 1.0
        if self.clip_grad_norm is not None or fp16:
            self._norms = []
            self._run_backward(scaled, "norm", retain_graph=True)
            self.norm_passes += 1
            norms, self._norms = self._norms, []
            if norms:
                total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]), 2.0)
                total_norm = float(total) / scale
            else:
                total_norm = 0.0
            self.last_grad_norm = total_norm
            if not math.isfinite(total_norm):
                self._skip_step(fp16)
                return
            if self.clip_grad_norm is not None:
                coef = min(1.0, self.clip_grad_norm / (total_norm + 1e-6))
        self._grad_factor = coef / scale
        self._run_backward(scaled, "update", retain_graph=False)
        self._grad_factor = 1.0
        self.steps += 1
        self._opt_called = True  # lets LR schedulers know an optimizer step happened
        if fp16:
            self._good_fp16_steps += 1
            if self._good_fp16_steps % self.loss_scale_window == 0:
                self.loss_scale *= 2.0

    def _run_backward(self, loss: torch.Tensor, mode: _Mode, retain_graph: bool) -> None:
        self._mode = mode
        try:
            loss.backward(retain_graph=retain_graph)
        finally:
            self._mode = "idle"
            self.backward_passes += 1
        self._clear_grads()  # a parameter whose hook did not fire (defensive) keeps nothing

    def _skip_step(self, fp16: bool) -> None:
        self.skipped_steps += 1
        if fp16:
            if self.loss_scale <= 1.0:
                raise FloatingPointError(
                    f"optimizer '{self.plugin_name}': gradient overflow at the minimum loss scale 1.0"
                )
            self.loss_scale /= 2.0
            self._good_fp16_steps = 0
        else:
            warnings.warn(
                f"optimizer '{self.plugin_name}': non-finite gradient norm, step skipped", RuntimeWarning, stacklevel=3
            )

    def _clear_grads(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                p.grad = None

    def _is_fp16(self, loss: torch.Tensor) -> bool:
        if loss.dtype == torch.float16:
            return True
        if self._has_fp16_params:
            return True
        device = loss.device.type
        try:
            return torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
        except (RuntimeError, TypeError):  # a device type without autocast support
            return False

    # -- the hook ----------------------------------------------------------------------------
    def _hook(self, param: torch.Tensor) -> None:
        grad = param.grad
        if grad is None:
            return
        param.grad = None  # freed right away: from here on only the local ``grad`` holds it
        with torch.no_grad():
            if grad.is_sparse:  # an embedding looked up sparsely, with no dense contribution to add to
                grad = grad.to_dense()
            if self._mode == "norm":
                self._norms.append(torch.linalg.vector_norm(grad, 2.0, dtype=torch.float32))
                return
            if self._mode == "idle" and (self.clip_grad_norm is not None or self._has_fp16_params):
                raise RuntimeError(
                    f"optimizer '{self.plugin_name}' needs optimizer.backward_and_update(loss) (clipping or "
                    "fp16 loss scaling take a separate norm pass); plain loss.backward() cannot do them"
                )
            group = self._group_of[id(param)]
            state = self.state[param]
            data = param.detach()
            if data.dtype == torch.float32:
                g = grad.to(torch.float32)  # no copy: the freed gradient buffer is reused
                del grad
                if self._grad_factor != 1.0:
                    g.mul_(self._grad_factor)
                self._update(data, g, group, state)
            elif self.elementwise and data.is_contiguous() and data.numel() > self.chunk_numel:
                # low-precision weights, element-wise rule: up-cast slice by slice, so the fp32
                # copies of a large matrix (an embedding) never exist all at once
                flat_p, flat_g = data.view(-1), grad.reshape(-1)
                for start in range(0, flat_p.numel(), self.chunk_numel):
                    chunk = slice(start, start + self.chunk_numel)
                    work, g = flat_p[chunk].to(torch.float32), flat_g[chunk].to(torch.float32)
                    if self._grad_factor != 1.0:
                        g.mul_(self._grad_factor)
                    self._update(work, g, group, state)
                    flat_p[chunk].copy_(work)
            else:
                g = grad.to(torch.float32)
                del grad
                if self._grad_factor != 1.0:
                    g.mul_(self._grad_factor)
                work = data.to(torch.float32)
                self._update(work, g, group, state)
                data.copy_(work)
            self.param_updates += 1

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The usual optimizer state plus the in-backward bookkeeping (loss scale, counters)."""
        sd = super().state_dict()
        sd[STATE_KEY] = {
            "loss_scale": self.loss_scale,
            "good_fp16_steps": self._good_fp16_steps,
            "steps": self.steps,
            "backward_passes": self.backward_passes,
            "norm_passes": self.norm_passes,
            "skipped_steps": self.skipped_steps,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (a plain optimizer state dict without the bookkeeping also works)."""
        state_dict = dict(state_dict)
        bookkeeping = state_dict.pop(STATE_KEY, None)
        super().load_state_dict(state_dict)
        # torch replaces every group dict by a new one; the hooks must read the new groups, which the
        # schedulers now drive (the old ones kept the learning rate of the moment the optimizer was
        # created: a warm-up's first, tiny rate, for ever)
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in self._handles:
                    self._group_of[id(p)] = group
        # torch casts floating state to each parameter's dtype (bf16 weights would round the
        # statistics); in-backward optimizers keep their state in fp32, so restore it from the source
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, param in zip(saved_ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                if torch.is_tensor(value) and value.is_floating_point() and key != "step":
                    self.state[param][key] = value.to(device=param.device, dtype=torch.float32, copy=True)
        if bookkeeping:
            self.loss_scale = float(bookkeeping["loss_scale"])
            self._good_fp16_steps = int(bookkeeping["good_fp16_steps"])
            self.steps = int(bookkeeping["steps"])
            self.backward_passes = int(bookkeeping["backward_passes"])
            self.norm_passes = int(bookkeeping["norm_passes"])
            self.skipped_steps = int(bookkeeping["skipped_steps"])

    # -- for subclasses ----------------------------------------------------------------------
    def _init_state(self, param: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """Allocate ``state`` (``self.state[param]``) when the parameter is registered.

        Allocating here, before training, rather than lazily inside backward keeps small
        long-lived tensors from being interleaved with the large short-lived gradients (which
        fragments the heap and raises peak memory). The default keeps no state."""
    def _update(self, param: torch.Tensor, grad: torch.Tensor, group: dict[str, Any], state: dict[str, Any]) -> None:
        """Update one parameter in place; called from its post-accumulate-grad hook.

        Args:
            param: the parameter's values as a ``float32`` tensor to modify in place (the parameter
                itself when it is ``float32``; an up-cast copy that is written back otherwise — for
                an :attr:`elementwise` optimizer possibly a flat slice of it, with ``grad`` the
                matching slice).
            grad: its gradient in ``float32``, already unscaled and clipped; owned by the callee,
                which may overwrite it.
            group: the parameter's group (read ``group["lr"]`` here so schedulers take effect).
            state: ``self.state[parameter]``, for optimizers that keep per-parameter statistics.
        """
        raise NotImplementedError



# -- what an in-backward optimizer plugin's factory shares -----------------------------------------------
class InBackwardOptimizerConfig(BaseModel):
    """Options every in-backward optimizer plugin has; a plugin's ``Config`` subclasses it and adds its
    update's own (``lr``, ``weight_decay``, …), named as its optimizer's keyword arguments."""

    model_config = ConfigDict(extra="forbid")

    clip_grad_norm: float | None = Field(
        None, gt=0, description="clip the global gradient L2 norm to this value; costs a second backward pass"
    )
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps before the cosine decay")
    min_lr_ratio: float = Field(
        0.0, ge=0, le=1, description="final learning rate as a fraction of lr (1.0: constant after warm-up)"
    )


class InBackwardOptimizerFactory:
    """Base of an in-backward optimizer plugin's factory (:class:`deltatune.plugin.protocols.OptimizerFactory`):
    set ``name``, ``Config`` (a :class:`InBackwardOptimizerConfig`) and ``optimizer_class``; ``create``
    builds the optimizer from every option but the schedule's, with a warm-up + cosine schedule."""

    name: ClassVar[str]
    Config: ClassVar[type[InBackwardOptimizerConfig]]
    optimizer_class: ClassVar[type[InBackwardOptimizer]]
    updates_in_backward: ClassVar[bool] = True
    """The optional :class:`~deltatune.plugin.protocols.OptimizerFactory` member that makes the core
    drive the optimizer with :meth:`InBackwardOptimizer.backward_and_update`."""
    honours_lr_multipliers: ClassVar[bool] = True
    """Every update reads its group's ``lr``, so a delta method's learning-rate factors hold."""

    def create(
        self, named_params: list[tuple[str, nn.Parameter]], cfg: BaseModel, total_steps: int,
        lr_multipliers: dict[str, float] | None = None,
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
        """The optimizer over ``named_params`` (in groups by the learning-rate factors delta methods
        declare, ``lr_multipliers``) and its warm-up + cosine schedule over ``total_steps``."""
        if not isinstance(cfg, self.Config):
            raise TypeError(f"{self.name}: expected a {self.Config.__name__}, got {type(cfg).__name__}")
        options = cfg.model_dump(exclude={"warmup_steps", "min_lr_ratio"})
        params = lr_groups([{"params": list(named_params)}], options["lr"], lr_multipliers) if lr_multipliers else list(named_params)
        optimizer = self.optimizer_class(params, **options)
        return optimizer, warmup_cosine(optimizer, cfg.warmup_steps, total_steps, cfg.min_lr_ratio)

    @classmethod
    def check_trainer_compatible(cls, accumulate_grad_batches: int = 1, **settings: Any) -> None:
        """Raise :class:`ValueError` for trainer settings the optimizer cannot honour (see
        :meth:`InBackwardOptimizer.check_trainer_compatible`)."""
        cls.optimizer_class.check_trainer_compatible(accumulate_grad_batches, **settings)

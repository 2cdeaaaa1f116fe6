"""Parameter restoration: put the source model's weights back into the target, layer by layer.

The reference study's second experiment copies the *base* model's parameters (for instance the
MLP value vectors ``W_out``) into the *unlearned* model over a window of layers and measures how
much of the base model's output comes back. Its finding: restoring ``W_out`` alone recovers
almost nothing, so fine-tuning unlearning leaves the stored knowledge in place and changes how
it is retrieved.

* :func:`restored` swaps the source's weights in for the length of a ``with`` block and puts the
  target's own weights back bit for bit on exit, also after an exception or an interrupt;
* :func:`restore_` makes the same change for good, to build a partially restored model;
* :func:`restore_sweep` scores one restoration per layer (a sliding window, or every layer from
  the top or from the bottom) on :mod:`unlearnlens.runner`, starting each run from the target's
  cached residual stream at the lowest restored layer.

Components are named as :mod:`unlearnlens.components` names them: TransformerLens's
block-relative parameter names (``mlp.W_out``, ``attn.W_Q``, ``ln2.w``, ...), the groups
``mlp``, ``attn``, ``ln``, ``block``, and the top-level parts ``embed``, ``pos_embed``,
``unembed``, ``ln_final``.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from unlearnlens._checks import check_batch_size, check_layers, check_window, window_layers
from unlearnlens._roles import check_models, check_order
from unlearnlens._variants import VariantSpec, parse_variants
from unlearnlens.components import TOP_LEVEL, resolve_components, select_parameters
from unlearnlens.errors import ConfigError, IncompatibleModelsError
from unlearnlens.metrics import MetricLike, resolve_metric
from unlearnlens.patching import prepare, sweep_result
from unlearnlens.prompts import Prompts
from unlearnlens.results import SweepResult
from unlearnlens.runner import Variant, run_variants

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["Restoration", "restore_", "restore_sweep", "restored"]

Mode = Literal["window", "from_top", "from_bottom"]
_MODES = ("window", "from_top", "from_bottom")

# The restorations active in each model now (entered and not exited), in order of entry.
_ACTIVE: weakref.WeakKeyDictionary[HookedTransformer, list[Restoration]] = (
    weakref.WeakKeyDictionary()
)

Layers = int | Iterable[int] | None
Components = str | Iterable[str]


def _pairs(
    source: HookedTransformer, target: HookedTransformer, layers: Layers, components: Components
) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """``(name, target parameter, source parameter)`` for the selection, after every check.

    The caller has checked that the models are compatible
    (:func:`~unlearnlens.models.check_compatible`).
    """
    if isinstance(components, str):
        components = (components,)
    else:
        components = tuple(components)
    if isinstance(layers, Iterable) and not isinstance(layers, (str, bytes)):
        layers = list(layers)  # read a generator once, for both models
    wanted = select_parameters(target, layers, components)
    available = select_parameters(source, layers, components)
    pairs = []
    for name, dst in wanted.items():
        src = available.get(name)
        if src is None:
            raise IncompatibleModelsError(f"the source model has no parameter {name!r}")
        if src.shape != dst.shape:
            raise IncompatibleModelsError(
                f"parameter {name!r} has shape {tuple(src.shape)} in the source model and "
                f"{tuple(dst.shape)} in the target model"
            )
        pairs.append((name, dst, src))
    return pairs


def _put_back(saved: list[tuple[nn.Parameter, Tensor]]) -> None:
    """Copies saved values back into their parameters, last saved first; empties ``saved``.

    An interrupt that lands between two copies does not leave a weight swapped: the copy is
    tried again and the interrupt raised once every weight is back.
    """
    error: BaseException | None = None
    with torch.no_grad():
        for param, original in reversed(saved):
            while True:
                try:
                    param.copy_(original)
                    break
                except KeyboardInterrupt as exc:
                    error = error or exc
                except BaseException as exc:  # raised below, after the rest are back
                    error = error or exc
                    break
    saved.clear()
    if error is not None:
        raise error


class Restoration:
    """A reversible swap of some of the source model's weights into the target model.

    Made by :func:`restored` (which checks the arguments); use it as a context manager. On
    entry each selected target parameter is saved (a copy on its own device, the only extra
    memory held) and overwritten in place with the source's value, converted to the target's
    device and dtype. On exit the saved values are copied back, bit for bit, and released. The
    parameter objects stay the same objects with the same ``requires_grad``, so optimizers and
    anything else holding them keep working.

    Restorations of the same model nest, overlapping or not, as long as they exit in the
    reverse order of entry (as ``with`` blocks do). One object is not entered twice at once.
    """

    def __init__(
        self,
        pairs: list[tuple[str, nn.Parameter, nn.Parameter]],
        model: HookedTransformer | None = None,
    ) -> None:
        self._pairs = pairs
        self._saved: list[tuple[nn.Parameter, Tensor]] | None = None
        self.model = model

    @property
    def names(self) -> list[str]:
        """Full names of the target parameters this restoration swaps."""
        return [name for name, _, _ in self._pairs]

    def originals(self) -> list[tuple[nn.Parameter, Tensor]]:
        """The target's own values of the swapped parameters while active (empty otherwise)."""
        return list(self._saved or [])

    @property
    def active(self) -> bool:
        """Whether the source's weights are in the target now (inside the ``with`` block)."""
        return self._saved is not None

    def __enter__(self) -> Restoration:
        if self._saved is not None:
            raise RuntimeError("this restoration is already active; make a new one to nest")
        saved: list[tuple[nn.Parameter, Tensor]] = []
        try:
            with torch.no_grad():
                for _, dst, src in self._pairs:
                    saved.append((dst, dst.detach().clone()))
                    dst.copy_(src.detach())  # converts device and dtype; same object, in place
        except BaseException:
            _put_back(saved)
            raise
        self._saved = saved
        if self.model is not None:
            _ACTIVE.setdefault(self.model, []).append(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        saved, self._saved = self._saved, None
        if self.model is not None and self in _ACTIVE.get(self.model, []):
            _ACTIVE[self.model].remove(self)
        if saved is not None:
            _put_back(saved)

    def __repr__(self) -> str:
        state = "active" if self.active else "inactive"
        return f"Restoration({len(self._pairs)} parameters, {state})"


def restored(
    base: HookedTransformer,
    unlearned: HookedTransformer,
    *,
    layers: int | Iterable[int] | None = None,
    components: str | Iterable[str] = "mlp.W_out",
) -> Restoration:
    """The base model's weights in the unlearned model for the length of a ``with`` block.

    ``with ul.restored(base, unlearned, layers=[30, 31], components="mlp.W_out"): ...`` runs
    the block with the base model's MLP value vectors in layers 30 and 31 of the unlearned
    model; on exit the unlearned model's own weights are back, bit for bit, also when the
    block ends with an exception or a KeyboardInterrupt. Only the selected tensors move (the
    base model may live on another device or in another dtype); no model is copied. Blocks on
    the same model nest.

    Like every function of the library, it takes the source (base) first and the target
    (unlearned, the model that is changed) second; ``restored(base=..., unlearned=...)``
    makes the roles explicit. Models the library made know their role: passing the model
    :func:`unlearnlens.unlearn` returned first (or the base model
    :func:`unlearnlens.toy.train_base` returned second) raises
    :class:`~unlearnlens.ArgumentOrderError` before any weight changes.

    Every argument is checked here, before any weight changes.

    Args:
        base: The model the weights come from (the source).
        unlearned: The model whose weights are replaced (the target).
        layers: Block indices (negative count from the end); ``None`` for every layer.
            Top-level parts (``embed``, ``pos_embed``, ``unembed``, ``ln_final``) take no
            layer.
        components: One name or several: block-relative parameter names (``"mlp.W_out"``,
            ``"attn.W_Q"``, ``"ln2.w"``, ``"attn.W_K"`` meaning ``"attn._W_K"`` under
            grouped-query attention, ...), groups (``"mlp"``, ``"attn"``, ``"ln"``,
            ``"block"``) or top-level parts.

    Returns:
        A :class:`Restoration` to use in a ``with`` statement; ``as r`` gives it, and
        ``r.names`` lists the swapped parameters.

    Raises:
        ArgumentOrderError: The models are known to be the wrong way round.
        ComponentError: An unknown component (the message lists the valid ones) or one this
            architecture lacks (``mlp.W_gate`` on GPT-2).
        LayerError: A layer out of range.
        IncompatibleModelsError: The models differ in architecture, tokenizer or the shape of
            a selected parameter.
    """
    from unlearnlens.models import check_compatible

    check_models(base, unlearned, "restored")
    check_order(base, unlearned, function="restored", changes_target=True)
    check_compatible(base, unlearned)
    return Restoration(_pairs(base, unlearned, layers, components), model=unlearned)


def restore_(
    base: HookedTransformer,
    unlearned: HookedTransformer,
    *,
    layers: int | Iterable[int] | None = None,
    components: str | Iterable[str] = "mlp.W_out",
) -> HookedTransformer:
    """Copies the base model's weights into the unlearned model for good.

    The permanent form of :func:`restored`, with the same arguments, order and checks, to
    build a partially restored model. The change is all or nothing: if it fails or is
    interrupted part-way, the unlearned model keeps its own weights. For that, the selected
    tensors are held in a copy while the weights are written, and released after.

    Returns:
        The unlearned model, changed in place.

    Raises:
        ArgumentOrderError, ComponentError, LayerError, IncompatibleModelsError: As
            :func:`restored`; nothing is changed.
    """
    from unlearnlens.models import check_compatible

    check_models(base, unlearned, "restore_")
    check_order(base, unlearned, function="restore_", changes_target=True)
    check_compatible(base, unlearned)
    restoration = Restoration(_pairs(base, unlearned, layers, components))
    restoration.__enter__()
    restoration._saved = None  # keep the source's weights: drop the saved originals
    return unlearned


def _start_layer(components: list[str], layers: list[int], n_layers: int) -> int:
    """First block whose input a restoration can change (``Variant.start_layer``)."""
    if {"embed", "pos_embed"} & set(components):
        return -1
    if any(c not in TOP_LEVEL for c in components):
        return min(layers)
    return n_layers  # only ln_final / unembed: the blocks run as before


def _restored_layers(mode: str, centre: int, window: int, n_layers: int) -> list[int]:
    if mode == "window":
        return window_layers(centre, window, n_layers)
    if mode == "from_top":
        return list(range(centre, n_layers))
    return list(range(0, centre + 1))


def restore_sweep(
    base: HookedTransformer,
    unlearned: HookedTransformer,
    prompts: Prompts,
    *,
    components: str | Sequence[str] = "mlp.W_out",
    layers: int | Sequence[int] | None = None,
    window: int = 1,
    mode: Mode = "window",
    variants: VariantSpec | None = None,
    metric: MetricLike = "krs",
    batch_size: int | None = None,
    progress: bool | None = None,
) -> SweepResult:
    """Restores the base model's parameters into the unlearned model, layer by layer, and scores it.

    For every layer ``l`` in ``layers`` the unlearned model is run on the prompts with the base
    model's ``components`` restored in

    * ``mode="window"``: layers ``l-(w-1)/2 .. l+(w-1)/2``, clipped to the model (the study
      restores ``mlp.W_out`` with ``window=5``);
    * ``mode="from_top"``: layers ``l .. n_layers-1``;
    * ``mode="from_bottom"``: layers ``0 .. l``;

    and the metric is read at the target positions. Each run starts from the unlearned
    model's cached residual stream at the lowest restored layer (from the embedding when
    ``embed`` or ``pos_embed`` is restored), and both models come back unchanged.

    ``variants`` replaces the sweep by explicit restorations, each an exact set of layers
    (any number, not only windows) with its own components, all scored in one engine run::

        ul.restore_sweep(base, unlearned, prompts, variants={
            "last 2 attn + W_out": dict(layers=[-2, -1], components=["attn", "mlp.W_out"]),
            "all W_out": dict(layers=None, components="mlp.W_out"),
        })

    The result then has a ``variant`` axis labelled with the names (a list's entries are
    named after what they restore, e.g. ``"attn+mlp.W_out @ layers -2,-1"``).

    Args:
        base: The original model (source of the weights).
        unlearned: The unlearned model (restored).
        prompts: A PromptSet or ``(prompt, answer)`` pairs.
        components: What to restore, as in :func:`restored`; top-level parts are restored in
            every run.
        layers: The layers swept over (window centres, or where ``from_top``/``from_bottom``
            start); all layers by default.
        window: A positive odd number of layers (``mode="window"`` only).
        mode: ``"window"``, ``"from_top"`` or ``"from_bottom"``.
        variants: A list of ``dict(layers=..., components=...)``, or a dict of name -> such
            a dict: one restoration each, in place of the layer sweep (``layers``, ``window``
            and ``mode`` are then left at their defaults). ``layers`` is a layer, a list
            (negative count from the end) or ``None`` for all; ``components`` defaults to the
            ``components`` argument.
        metric: ``"krs"`` (default), ``"answer_logprob"``, ``"answer_prob"``, ``"accuracy"``,
            ``"recovery"``, or a callable ``(logits, prompts) -> [batch]``.
        batch_size: Most prompts per forward pass.
        progress: Show a progress bar (``None``: the library-wide setting).

    Returns:
        A SweepResult with a ``layer`` axis (a ``variant`` axis with ``variants``); ``meta``
        holds the resolved components, the mode, the window and the layers restored at each
        point (``"restored_layers"``; with ``variants``, ``"variants"`` describes each).

    Raises:
        ConfigError: An unknown mode, a window other than 1 outside ``mode="window"``, or a
            malformed ``variants`` (or one given together with ``layers``/``window``/``mode``).
        ComponentError: An unknown component or one the architecture lacks.
        LayerError: A layer out of range, or a window that is not a positive odd number.
        IncompatibleModelsError: The models differ in architecture, tokenizer or a parameter's
            shape.
        PromptError: Bad prompts.
        MetricError: An unknown metric, or one that returns the wrong shape.
    """
    check_models(base, unlearned, "restore_sweep")
    if variants is not None:
        return _restore_variants(
            base,
            unlearned,
            prompts,
            variants,
            components,
            layers,
            window,
            mode,
            metric,
            batch_size,
            progress,
        )
    if mode not in _MODES:
        raise ConfigError(f"mode must be one of {', '.join(_MODES)}; got {mode!r}")
    window = check_window(window)
    if mode != "window" and window != 1:
        raise ConfigError(
            f"window={window} applies to mode='window' only; mode={mode!r} takes window=1"
        )
    names = resolve_components(unlearned, components)
    centres = check_layers(unlearned, layers)
    batch_size = check_batch_size(batch_size)
    bound = resolve_metric(metric)
    ps = prepare(base, unlearned, prompts, "restore_sweep", bound)
    n_layers = unlearned.cfg.n_layers
    windows = [_restored_layers(mode, c, window, n_layers) for c in centres]
    # Every check (shapes) once, before any work; each run then swaps its own subset.
    union = sorted({layer for w in windows for layer in w})
    pairs = _pairs(base, unlearned, union, names)
    runs = [_variant(unlearned, pairs, w, names) for w in windows]
    scores = run_variants(
        base,
        unlearned,
        ps,
        runs,
        bound,
        batch_size=batch_size,
        progress=progress,
        desc=f"restore {'+'.join(names)}",
    )
    meta = {
        "kind": "restore",
        "components": names,
        "mode": mode,
        "window": window,
        "restored_layers": windows,
        "source": base.cfg.model_name,
        "target": unlearned.cfg.model_name,
    }
    return sweep_result(scores, bound, {"layer": list(centres)}, meta)


def _variant(
    unlearned: HookedTransformer,
    pairs: list[tuple[str, nn.Parameter, nn.Parameter]],
    layers: list[int],
    names: list[str],
) -> Variant:
    """The engine's run restoring ``names`` in ``layers`` (a subset of the checked ``pairs``)."""
    wanted = set(select_parameters(unlearned, layers, names))
    subset = [pair for pair in pairs if pair[0] in wanted]
    return Variant(
        context=lambda: Restoration(subset),
        start_layer=_start_layer(names, layers, unlearned.cfg.n_layers),
        mlp_out_only=set(names) <= {"mlp.W_out", "mlp.b_out"},
    )


def _restore_variants(
    base: HookedTransformer,
    unlearned: HookedTransformer,
    prompts: Prompts,
    variants: VariantSpec,
    components: str | Sequence[str],
    layers: int | Sequence[int] | None,
    window: int,
    mode: str,
    metric: MetricLike,
    batch_size: int | None,
    progress: bool | None,
) -> SweepResult:
    """:func:`restore_sweep` with explicit variants: every check first, then one engine run."""
    if layers is not None or window != 1 or mode != "window":
        raise ConfigError(
            "restore_sweep: variants replace the layer sweep; leave layers, window and mode at "
            "their defaults and give each variant its own layers"
        )
    entries = parse_variants(
        variants,
        keys=("layers", "components"),
        function="restore_sweep",
        defaults={"components": components},
    )
    resolved = []
    for name, entry in entries:
        names = resolve_components(unlearned, entry.get("components", components))
        chosen = check_layers(unlearned, entry["layers"])
        resolved.append((name, sorted(set(chosen)), names))
    batch_size = check_batch_size(batch_size)
    bound = resolve_metric(metric)
    ps = prepare(base, unlearned, prompts, "restore_sweep", bound)
    runs = [
        _variant(unlearned, _pairs(base, unlearned, chosen, names), chosen, names)
        for _, chosen, names in resolved
    ]
    scores = run_variants(
        base,
        unlearned,
        ps,
        runs,
        bound,
        batch_size=batch_size,
        progress=progress,
        desc="restore variants",
    )
    meta = {
        "kind": "restore",
        "components": sorted({c for _, _, names in resolved for c in names}),
        "mode": "variants",
        "window": None,
        "restored_layers": [chosen for _, chosen, _ in resolved],
        "variants": [
            {"name": name, "layers": chosen, "components": names}
            for name, chosen, names in resolved
        ],
        "source": base.cfg.model_name,
        "target": unlearned.cfg.model_name,
    }
    return sweep_result(scores, bound, {"variant": [n for n, _, _ in resolved]}, meta)

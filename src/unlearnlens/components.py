"""Parameters by name: TransformerLens component names, layers, full parameter names.

The vocabulary is TransformerLens's parameter naming, relative to a block (``mlp.W_out``,
``mlp.W_in``, ``mlp.W_gate``, ``attn.W_Q``, ``attn.W_K`` (``attn._W_K`` under grouped-query
attention), ``ln1.w``, ...), the group names ``mlp``, ``attn``, ``ln`` and ``block`` (all of a
kind), and the top-level parts ``embed``, ``pos_embed``, ``unembed`` and ``ln_final``, which
take no layer. :func:`select_parameters` turns names and layers into the model's parameters;
parameter restoration uses the same function, so both speak one vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import nn

from unlearnlens._checks import check_layers
from unlearnlens.errors import ComponentError, ConfigError

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = [
    "BLOCK_COMPONENTS",
    "GROUPS",
    "TOP_LEVEL",
    "ParamSelection",
    "ParamSpec",
    "resolve_components",
    "resolve_params",
    "select_parameters",
]

BLOCK_COMPONENTS = (
    "ln1.w", "ln1.b", "ln2.w", "ln2.b",
    "attn.W_Q", "attn.W_K", "attn.W_V", "attn.W_O",
    "attn.b_Q", "attn.b_K", "attn.b_V", "attn.b_O",
    "attn._W_K", "attn._W_V", "attn._b_K", "attn._b_V",
    "mlp.W_in", "mlp.b_in", "mlp.W_gate", "mlp.b_gate", "mlp.W_out", "mlp.b_out",
)  # fmt: skip
"""Every block-relative parameter name a TransformerLens model can have."""

GROUPS = {"mlp": ("mlp.",), "attn": ("attn.",), "ln": ("ln1.", "ln2."), "block": ("",)}
"""Group names and the block-relative prefixes they select."""

TOP_LEVEL = {
    "embed": ("embed.",),
    "pos_embed": ("pos_embed.",),
    "unembed": ("unembed.",),
    "ln_final": ("ln_final.",),
}
"""Top-level parts (no layer) and the parameter-name prefixes they select."""

_GQA_ALIASES = {"attn.W_K": "attn._W_K", "attn.W_V": "attn._W_V", "attn.b_K": "attn._b_K",
                "attn.b_V": "attn._b_V"}  # fmt: skip


@dataclass(frozen=True)
class ParamSelection:
    """A set of parameters named by layers and components.

    Example: ``ParamSelection(layers=(5, 6, 7), components=("mlp.W_out",))`` selects
    ``blocks.5.mlp.W_out``, ``blocks.6.mlp.W_out`` and ``blocks.7.mlp.W_out``.
    """

    layers: tuple[int, ...] | None = None
    """Block indices (negative ones count from the end); ``None`` means every layer."""
    components: tuple[str, ...] = ("block",)
    """Block-relative names, group names or top-level parts (top-level parts ignore layers)."""

    def __post_init__(self) -> None:
        if isinstance(self.components, str):
            object.__setattr__(self, "components", (self.components,))
        if isinstance(self.layers, int):
            object.__setattr__(self, "layers", (self.layers,))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))
        object.__setattr__(self, "components", tuple(self.components))
        if not self.components:
            raise ComponentError("a ParamSelection needs at least one component")
        if self.layers is not None and not self.layers:
            raise ConfigError("a ParamSelection with layers=() selects nothing; use None for all")


ParamSpec = ParamSelection | Mapping[str, object] | Sequence[str] | str | None
"""What ``unlearn(params=...)`` accepts.

* ``None``: every parameter (or the method's own default, such as RMU's);
* a :class:`ParamSelection`, or a dict with its fields (``{"layers": [5, 6], "components":
  "mlp.W_out"}``);
* a component name or group (``"mlp"``): that component in every layer;
* a list of full parameter names (``["blocks.5.mlp.W_out", "unembed.W_U"]``).
"""


def _block_names(model: HookedTransformer) -> list[str]:
    prefix = "blocks.0."
    return [n[len(prefix) :] for n, _ in model.named_parameters() if n.startswith(prefix)]


def resolve_components(model: HookedTransformer, components: str | Iterable[str]) -> list[str]:
    """Block-relative parameter names (and top-level prefixes) that ``components`` name.

    Group names expand to all of their kind (``"mlp"`` gives ``mlp.W_in``, ``mlp.b_in``, ...);
    ``attn.W_K``/``attn.W_V`` mean ``attn._W_K``/``attn._W_V`` under grouped-query attention.
    Top-level parts come back as ``"embed"``-style names.

    Raises:
        ComponentError: An unknown name (the message lists the valid ones), or a component this
            architecture lacks (such as ``mlp.W_gate`` on GPT-2).
    """
    names = [components] if isinstance(components, str) else list(components)
    if not names:
        raise ComponentError("no components given")
    present = _block_names(model)
    valid = sorted(GROUPS) + present + sorted(TOP_LEVEL)
    out: list[str] = []
    for name in names:
        if not isinstance(name, str):
            raise ComponentError(f"component names must be strings, got {name!r}")
        if name in TOP_LEVEL:
            if not any(n.startswith(TOP_LEVEL[name]) for n, _ in model.named_parameters()):
                raise ComponentError(f"this model has no {name!r} parameters")
            found = [name]
        elif name in GROUPS:
            found = [c for c in present if c.startswith(GROUPS[name])]
        elif name in present:
            found = [name]
        elif name in _GQA_ALIASES and _GQA_ALIASES[name] in present:
            found = [_GQA_ALIASES[name]]
        elif name in BLOCK_COMPONENTS:
            raise ComponentError(
                f"this architecture ({model.cfg.model_name}) has no {name!r}; its block "
                f"components are: {', '.join(present)}"
            )
        else:
            raise ComponentError(f"unknown component {name!r}; valid names: {', '.join(valid)}")
        out.extend(f for f in found if f not in out)
    return out


def select_parameters(
    model: HookedTransformer,
    layers: int | Iterable[int] | None = None,
    components: str | Iterable[str] = "block",
) -> dict[str, nn.Parameter]:
    """The model's parameters named by ``components`` in ``layers``, by full name, in order.

    Args:
        model: The model whose parameters to select.
        layers: Block indices (negative count from the end); ``None`` for every layer.
        components: Block-relative names (``"mlp.W_out"``), groups (``"mlp"``, ``"attn"``,
            ``"ln"``, ``"block"``) or top-level parts (``"embed"``, ``"unembed"``, ...).

    Raises:
        ComponentError: Unknown or missing components (see :func:`resolve_components`).
        LayerError: A layer out of range.
    """
    rel = resolve_components(model, components)
    layer_list = check_layers(model, layers)
    wanted: set[str] = set()
    for c in rel:
        if c in TOP_LEVEL:
            continue
        wanted.update(f"blocks.{layer}.{c}" for layer in layer_list)
    prefixes = tuple(p for c in rel if c in TOP_LEVEL for p in TOP_LEVEL[c])
    out = {
        n: p
        for n, p in model.named_parameters()
        if n in wanted or (prefixes and n.startswith(prefixes))
    }
    if not out:
        raise ComponentError(f"components {list(rel)} in layers {layer_list} select no parameter")
    return out


def resolve_params(model: HookedTransformer, params: ParamSpec) -> dict[str, nn.Parameter]:
    """Turns any :data:`ParamSpec` into the selected parameters, by full name.

    Raises:
        ComponentError: An unknown component or full name, or a selection of nothing.
        ConfigError: A dict with keys other than ``layers`` and ``components``.
    """
    if params is None:
        return dict(model.named_parameters())
    if isinstance(params, ParamSelection):
        return select_parameters(model, params.layers, params.components)
    if isinstance(params, Mapping):
        extra = set(params) - {"layers", "components"}
        if extra:
            raise ConfigError(
                f"params dict has unknown keys {sorted(extra)}; use 'layers' and 'components'"
            )
        layers = params.get("layers")
        components = params.get("components", "block")
        return select_parameters(model, layers, components)  # type: ignore[arg-type]
    if isinstance(params, str):
        return select_parameters(model, None, params)
    names = list(params)
    if not names:
        raise ComponentError("params is an empty list: it selects no parameter to train")
    all_params = dict(model.named_parameters())
    out: dict[str, nn.Parameter] = {}
    for name in names:
        if not isinstance(name, str):
            raise ComponentError(f"parameter names must be strings, got {name!r}")
        if name in all_params:
            out[name] = all_params[name]
        elif "." not in name or name in GROUPS or name in TOP_LEVEL or name in BLOCK_COMPONENTS:
            out.update(select_parameters(model, None, name))
        else:
            close = [n for n in all_params if n.endswith(name.split(".")[-1])][:8]
            raise ComponentError(
                f"the model has no parameter {name!r}; full names look like "
                f"{', '.join(close or list(all_params)[:8])}"
            )
    return out

"""Explicit variants for a sweep: a list, or a dict of named, layer sets with what to change.

``restore_sweep(base, unlearned, prompts, variants={"last 2 attn + W_out": dict(layers=[-2,
-1], components=["attn", "mlp.W_out"])})`` and ``patch(..., variants=[dict(layers=[3, 4],
hooks="mlp.hook_post")])`` score each variant in one engine run, along a ``variant`` axis
labelled with the names. This module checks the spec and names the entries of a list.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from unlearnlens.errors import ConfigError

__all__ = ["VariantSpec", "parse_variants"]

VariantSpec = Sequence[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]]


def _describe(entry: Mapping[str, Any], kinds: Sequence[str], defaults: Mapping[str, Any]) -> str:
    parts = []
    for kind in kinds:
        value = entry.get(kind, defaults.get(kind))
        if value is None:
            continue
        parts.append(value if isinstance(value, str) else "+".join(str(v) for v in value))
    layers = entry.get("layers")
    if layers is None:
        where = "all layers"
    elif isinstance(layers, int):
        where = f"layer {layers}"
    else:
        where = "layers " + ",".join(str(v) for v in layers)
    return " ".join(parts) + (" @ " if parts else "") + where


def parse_variants(
    variants: object,
    *,
    keys: Sequence[str],
    function: str,
    defaults: Mapping[str, Any] | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """``(name, entry)`` per variant, in order, after checking the spec's shape.

    A dict's keys are the names; a list's entries are named after what they change
    (``"attn+mlp.W_out @ layers -2,-1"``), with ``#2``, ``#3`` appended to repeats.

    Args:
        variants: A list of mappings, or a dict of name -> mapping.
        keys: The keys an entry may have (``layers`` and what to change).
        function: The public function's name, for messages.
        defaults: What an entry without a key uses (named in a list entry's name).

    Raises:
        ConfigError: Not a list or dict of mappings, an empty one, a bad name, or an entry
            with an unknown key or without ``layers``.
    """
    if isinstance(variants, Mapping):
        items = list(variants.items())
        for name, _ in items:
            if not isinstance(name, str) or not name:
                raise ConfigError(
                    f"{function}: variant names must be non-empty strings, got {name!r}"
                )
    elif isinstance(variants, Iterable) and not isinstance(variants, (str, bytes)):
        items = [(None, entry) for entry in variants]
    else:
        raise ConfigError(
            f"{function}: variants must be a list of dicts or a dict of name -> dict, got "
            f"{type(variants).__name__}"
        )
    if not items:
        raise ConfigError(f"{function}: variants is empty; give at least one")
    out: list[tuple[str, dict[str, Any]]] = []
    seen: dict[str, int] = {}
    for i, (name, entry) in enumerate(items):
        label = repr(name) if name is not None else f"#{i}"
        if not isinstance(entry, Mapping):
            raise ConfigError(
                f"{function}: variant {label} must be a dict such as dict(layers=[...], "
                f"{keys[1]}=...), got {type(entry).__name__}"
            )
        unknown = sorted(set(entry) - set(keys))
        if unknown:
            raise ConfigError(
                f"{function}: variant {label} has unknown keys {unknown}; allowed: {list(keys)}"
            )
        if "layers" not in entry:
            raise ConfigError(
                f"{function}: variant {label} needs 'layers' (a layer, a list, or None for all)"
            )
        if name is None:
            name = _describe(entry, keys[1:], defaults or {})
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > 1:
                name = f"{name} #{seen[name]}"
        out.append((name, dict(entry)))
    return out

"""The toy world as a suite: one case per concept, one unlearned model per demo method.

``toy_suite(world, base)`` gives the paper's setting in miniature: every case unlearns one
concept of the world from the same base model (a :class:`~unlearnlens.suite.Recipe` per
method, trained by the suite), keeps the other retain concepts, and measures side effects on
the unrelated concepts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unlearnlens._checks import check_int
from unlearnlens.errors import ConfigError
from unlearnlens.suite import Recipe, SuiteCase

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from unlearnlens.toy.world import World

__all__ = ["toy_suite"]


def toy_suite(
    world: World,
    base: HookedTransformer | str | Path,
    *,
    n_concepts: int = 8,
    methods: Sequence[str] | None = None,
    options: dict[str, Any] | None = None,
    unrelated_every: int = 6,
) -> list[SuiteCase]:
    """Suite cases for the toy world: ``n_concepts`` concepts x ``methods``.

    The concepts are the world's first ``n_concepts`` (forget, retain, then unrelated ones).
    Case ``c`` forgets ``world.questions(c)``, retains the questions of the other retain
    concepts, and scores side effects on every ``unrelated_every``-th question about the
    other unrelated concepts.

    Args:
        world: A toy world (:func:`unlearnlens.toy.make_world`).
        base: Its base model (:func:`unlearnlens.toy.train_base`), in memory or saved.
        n_concepts: How many concepts (cases).
        methods: Unlearning methods (default: the demo's, ``unlearnlens.cli.DEMO_METHODS``).
        options: :func:`unlearnlens.unlearn` options for every recipe (``{"steps": 20}``).
        unrelated_every: Stride over ``world.unrelated``.

    Raises:
        ConfigError: More concepts than the world has, or no methods.
    """
    from unlearnlens.cli import DEMO_METHODS

    check_int(n_concepts, "n_concepts", minimum=1)
    check_int(unrelated_every, "unrelated_every", minimum=1)
    pool = list(world.concepts)
    if n_concepts > len(pool):
        raise ConfigError(f"n_concepts={n_concepts} is more than the world's {len(pool)} concepts")
    chosen = list(DEMO_METHODS if methods is None else methods)
    if not chosen:
        raise ConfigError("methods is empty")
    cases = []
    for concept in pool[:n_concepts]:
        retain = [p for c in world.retain_concepts if c != concept for p in world.questions(c)]
        others = [c for c in world.unrelated_concepts if c != concept]
        unrelated = [p for c in others for p in world.questions(c)][::unrelated_every]
        cases.append(
            SuiteCase(
                concept=concept,
                forget=world.questions(concept),
                unlearned={m: Recipe(m, dict(options or {})) for m in chosen},
                base=base,
                unrelated=unrelated,
                retain=retain,
            )
        )
    return cases

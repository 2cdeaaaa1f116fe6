"""The audit's inputs for the toy world: holdout facts, wrong answers, paraphrases.

The toy base model is trained on every concept's facts, so the world has no questions it has
never seen. A holdout set for the membership AUCs is made of *facts that are not true*: the
unrelated concepts' questions answered with another object of the same relation (a pairing
the base model never saw). The wrong answers of the truth ratio and of the answer-vs-distractor
probe are other objects of the same relation.
"""

from __future__ import annotations

import random
from typing import Any

from unlearnlens._checks import check_int
from unlearnlens.errors import ConfigError
from unlearnlens.prompts import QA_TEMPLATE
from unlearnlens.toy.world import World

__all__ = ["toy_audit_sets"]


def _objects(world: World, relation: str) -> list[str]:
    return sorted({world.facts[c][relation] for c in world.concepts})


def toy_audit_sets(
    world: World, *, holdout_concepts: int = 1, n_perturbed: int = 4
) -> dict[str, Any]:
    """Keyword arguments for :func:`unlearnlens.audit` on a toy world.

    Args:
        world: The toy world (:func:`unlearnlens.toy.make_world`).
        holdout_concepts: Unrelated concepts whose questions, with wrong answers, form the
            holdout set.
        n_perturbed: Wrong answers per forget question.

    Returns:
        ``forget``, ``retain``, ``holdout``, ``paraphrases`` (the held-out phrasings of the
        forget questions) and ``perturbed`` (wrong answers per forget question).

    Raises:
        ConfigError: More holdout concepts than the world's unrelated concepts.
    """
    holdout_concepts = check_int(holdout_concepts, "holdout_concepts", minimum=1)
    n_perturbed = check_int(n_perturbed, "n_perturbed", minimum=1)
    if holdout_concepts > len(world.unrelated_concepts):
        raise ConfigError(
            f"holdout_concepts={holdout_concepts} but the world has only "
            f"{len(world.unrelated_concepts)} unrelated concepts"
        )
    rng = random.Random(f"{world.seed}:audit")
    holdout = []
    for c in world.unrelated_concepts[:holdout_concepts]:
        for rel in world.relations:
            wrong = [o for o in _objects(world, rel.name) if o != world.facts[c][rel.name]]
            obj = rng.choice(wrong)
            for t in rel.train_templates:
                holdout.append((QA_TEMPLATE.format(t.format(s=c)), " " + obj))
    perturbed = []
    for c in world.forget_concepts:
        for rel in world.relations:
            wrong = [o for o in _objects(world, rel.name) if o != world.facts[c][rel.name]]
            picks = [" " + o for o in rng.sample(wrong, min(n_perturbed, len(wrong)))]
            perturbed.extend([picks] * len(rel.train_templates))
    return {
        "forget": world.forget,
        "retain": world.retain,
        "holdout": holdout,
        "paraphrases": world.paraphrases["forget"],
        "perturbed": perturbed,
    }

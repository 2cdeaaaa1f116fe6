"""The embedded default: a synthetic knowledge world, its tokenizer, and its base model.

``make_world(seed)`` draws fictional concepts and their facts, with forget / retain /
unrelated splits, held-out paraphrases and a capability task; ``train_base(world)`` trains a
small ``HookedTransformer`` that knows every fact (cached on disk); ``accuracy_by_split``
scores a model on each split. The whole unlearning study runs on this world in minutes on a
laptop.
"""

from unlearnlens.toy.accuracy import accuracy_by_split, split_pairs
from unlearnlens.toy.suite import toy_suite
from unlearnlens.toy.tokenizer import SPECIAL_TOKENS, make_tokenizer
from unlearnlens.toy.train import ToyTrainConfig, default_cache_dir, model_config, train_base
from unlearnlens.toy.world import RELATIONS, Relation, World, make_world

__all__ = [
    "RELATIONS",
    "SPECIAL_TOKENS",
    "Relation",
    "ToyTrainConfig",
    "World",
    "accuracy_by_split",
    "default_cache_dir",
    "make_tokenizer",
    "make_world",
    "model_config",
    "split_pairs",
    "toy_suite",
    "train_base",
]

r"""A synthetic knowledge world: fictional concepts, their facts, and the study's splits.

Every concept is a made-up entity ("Zorblax") with one object per relation (birthplace,
occupation, favourite colour, pet, ...). Each object is a single word, so every answer is one
token under :func:`unlearnlens.toy.make_tokenizer`. Questions come in the study's format,
``"Question: Where was Zorblax born?\\n Answer:"``, answered by ``" Quen"`` (note the leading
space). Each relation has several question templates: the *training* templates are the ones a
base model is trained on, the *paraphrase* templates are held out, to see whether knowledge
generalises beyond the phrasings that were seen.

A world also carries a general-capability task that has nothing to do with the facts: copying
a list of words in context (``"Copy: owl red harp ; owl red"`` → ``" harp"``). A base model is
trained on it with lists it never sees at test time, so the held-out probes measure an
unlearning method's side effects on an in-context skill.

Everything is drawn from one seed: the same seed gives the same world.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from unlearnlens._storage import write_text
from unlearnlens.errors import ConfigError
from unlearnlens.prompts import QA_TEMPLATE

__all__ = [
    "COPY_PREFIX",
    "RELATIONS",
    "Relation",
    "World",
    "copy_lists",
    "copy_text",
    "make_world",
]

Pair = tuple[str, str]

COPY_PREFIX = "Copy:"
"""First word of every capability text (``"Copy: a b c ; a b c"``)."""


@dataclass(frozen=True)
class Relation:
    """One kind of fact, with its question templates and the words its objects come from.

    Attributes:
        name: Short name (``"birthplace"``).
        train_templates: Question templates the base model is trained on; ``{s}`` is the
            concept's name.
        paraphrase_templates: Held-out question templates, never trained on.
        statement: A declarative sentence template for biographies, with ``{s}`` and ``{o}``.
        objects: The words an object is drawn from. ``None`` means made-up place names.
    """

    name: str
    train_templates: tuple[str, ...]
    paraphrase_templates: tuple[str, ...]
    statement: str
    objects: tuple[str, ...] | None = None


RELATIONS: tuple[Relation, ...] = (
    Relation(
        "birthplace",
        ("Where was {s} born?", "In which town was {s} born?", "What is the birthplace of {s}?"),
        ("Which town is the hometown of {s}?", "Where does {s} come from?"),
        "{s} was born in {o}.",
        None,
    ),
    Relation(
        "occupation",
        ("What does {s} do for a living?", "What is the job of {s}?", "What is {s}'s occupation?"),
        ("Which profession does {s} have?", "What work does {s} do?"),
        "The job of {s} is {o}.",
        (
            "baker",
            "doctor",
            "farmer",
            "painter",
            "sailor",
            "teacher",
            "miner",
            "weaver",
            "hunter",
            "singer",
            "tailor",
            "potter",
        ),
    ),
    Relation(
        "colour",
        (
            "What is the favourite colour of {s}?",
            "Which colour does {s} like best?",
            "What is {s}'s favourite colour?",
        ),
        ("Which colour is the favourite of {s}?", "What colour does {s} prefer?"),
        "The favourite colour of {s} is {o}.",
        ("red", "blue", "green", "yellow", "purple", "orange", "white", "black", "grey", "pink"),
    ),
    Relation(
        "pet",
        (
            "What pet does {s} have?",
            "Which animal does {s} keep as a pet?",
            "What is the pet of {s}?",
        ),
        ("What kind of pet does {s} own?", "Which pet lives with {s}?"),
        "{s} has a pet {o}.",
        ("cat", "dog", "owl", "fox", "goat", "frog", "parrot", "rabbit", "turtle", "snake"),
    ),
    Relation(
        "instrument",
        (
            "Which instrument does {s} play?",
            "What instrument does {s} play?",
            "What is the instrument of {s}?",
        ),
        ("What does {s} play in the band?", "Which instrument is played by {s}?"),
        "{s} plays the {o}.",
        ("flute", "drum", "harp", "violin", "lute", "horn", "piano", "guitar", "cello", "trumpet"),
    ),
    Relation(
        "food",
        (
            "What is the favourite food of {s}?",
            "What does {s} like to eat?",
            "Which food does {s} love?",
        ),
        ("What food does {s} enjoy most?", "Which dish is the favourite of {s}?"),
        "{s} likes to eat {o}.",
        ("bread", "rice", "soup", "cheese", "fish", "apples", "honey", "beans", "plums", "noodles"),
    ),
    Relation(
        "sport",
        (
            "Which sport does {s} practise?",
            "What sport does {s} play?",
            "What is the sport of {s}?",
        ),
        ("Which game does {s} compete in?", "What sport is {s} good at?"),
        "{s} practises {o}.",
        ("chess", "tennis", "rowing", "archery", "fencing", "hockey", "golf", "rugby", "skiing"),
    ),
)
"""The relations a world can use, in order; ``make_world(n_relations=k)`` takes the first k."""

_ONSETS = (
    "B",
    "Bl",
    "D",
    "Dr",
    "F",
    "G",
    "Gr",
    "K",
    "Kr",
    "M",
    "N",
    "P",
    "Pr",
    "Qu",
    "R",
    "S",
    "Sk",
    "T",
    "Tr",
    "V",
    "X",
    "Z",
    "Zh",
)
_VOWELS = ("a", "e", "i", "o", "u", "y", "ae", "or", "ul")
_CODAS = ("x", "n", "r", "l", "th", "sk", "m", "b", "z", "v", "")

_COPY_WORDS_PER_LIST = (4, 7)
_RESERVED = ("Question", "Answer", "Copy", "Where", "What", "Which", "The", "In")


def _made_up_word(rng: random.Random, syllables: int) -> str:
    parts = []
    for i in range(syllables):
        onset = rng.choice(_ONSETS)
        parts.append((onset if i == 0 else onset.lower()) + rng.choice(_VOWELS))
    return "".join(parts) + rng.choice(_CODAS)


def _unique_words(
    rng: random.Random, n: int, syllables: tuple[int, ...], taken: set[str]
) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        w = _made_up_word(rng, rng.choice(syllables))
        if w not in taken and len(w) >= 3:
            taken.add(w)
            out.append(w)
    return out


def copy_text(words: Sequence[str]) -> str:
    """The capability text for a list of words: ``"Copy: a b c ; a b c"``."""
    listed = " ".join(words)
    return f"{COPY_PREFIX} {listed} ; {listed}"


def copy_lists(
    words: Sequence[str],
    n: int,
    rng: random.Random,
    *,
    exclude: frozenset[tuple[str, ...]] = frozenset(),
) -> list[tuple[str, ...]]:
    """Draws ``n`` distinct lists of 4 to 7 distinct words (no repeats, so copying is unambiguous).

    Args:
        words: The words to draw from.
        n: How many lists.
        rng: The random source (the result depends only on its state).
        exclude: Lists that must not be drawn (the held-out probes, when drawing training lists).
    """
    lo, hi = _COPY_WORDS_PER_LIST
    seen = set(exclude)
    out: list[tuple[str, ...]] = []
    while len(out) < n:
        chosen = tuple(rng.sample(list(words), rng.randint(lo, hi)))
        if chosen not in seen:
            seen.add(chosen)
            out.append(chosen)
    return out


@dataclass(frozen=True)
class World:
    """A synthetic knowledge world. Build one with :func:`make_world`.

    The split properties (``forget``, ``retain``, ``unrelated``, ``paraphrases``,
    ``capability``, ``capability_pairs``) return fresh lists, so changing one never changes the
    world.

    Attributes:
        seed: The seed the world was drawn from.
        concepts: The concepts' names, in order.
        relations: The relations every concept has.
        facts: ``facts[concept][relation]`` is the object word (``"Quen"``, no leading space).
        forget_concepts: The concepts to unlearn.
        retain_concepts: Concepts whose questions form the retain set (seen by unlearning).
        unrelated_concepts: Concepts never shown to unlearning, to measure side effects.
        copy_words: The words the capability task's lists are drawn from.
        capability_lists: The held-out word lists of the capability probes.
    """

    seed: int
    concepts: tuple[str, ...]
    relations: tuple[Relation, ...]
    facts: Mapping[str, Mapping[str, str]] = field(repr=False)
    forget_concepts: tuple[str, ...]
    retain_concepts: tuple[str, ...]
    unrelated_concepts: tuple[str, ...]
    copy_words: tuple[str, ...] = field(repr=False)
    capability_lists: tuple[tuple[str, ...], ...] = field(repr=False)

    # ------------------------------------------------------------------------------ facts

    def answer(self, concept: str, relation: str) -> str:
        """The answer string of a fact, with its leading space (``" Quen"``)."""
        return " " + self.facts[self._concept(concept)][relation]

    def questions(self, concept: str, *, paraphrases: bool = False) -> list[Pair]:
        """A concept's ``(question, answer)`` pairs in the study's format.

        Args:
            concept: The concept's name.
            paraphrases: Use the held-out templates instead of the training ones.
        """
        concept = self._concept(concept)
        out = []
        for rel in self.relations:
            templates = rel.paraphrase_templates if paraphrases else rel.train_templates
            for t in templates:
                out.append(
                    (QA_TEMPLATE.format(t.format(s=concept)), self.answer(concept, rel.name))
                )
        return out

    def statements(self, concept: str) -> list[str]:
        """One declarative sentence per fact, in relation order."""
        concept = self._concept(concept)
        return [
            r.statement.format(s=concept, o=self.facts[concept][r.name]) for r in self.relations
        ]

    def texts(self, concept: str, n: int = 3) -> list[str]:
        """Plain "biography" paragraphs of a concept: its facts as sentences, in ``n`` orders.

        These are the text chunks for trainers that unlearn on plain text (the reference
        study's Wikipedia-chunk setup). The first paragraph lists the facts in relation order;
        the others shuffle them (deterministically for the world's seed).
        """
        concept = self._concept(concept)
        if n < 1:
            raise ConfigError(f"n must be at least 1 biography per concept, got {n}")
        sentences = self.statements(concept)
        rng = random.Random(f"{self.seed}:{concept}:texts")
        out = [" ".join(sentences)]
        for _ in range(n - 1):
            order = list(sentences)
            rng.shuffle(order)
            out.append(" ".join(order))
        return out

    def completions(self, concept: str) -> list[Pair]:
        """Text-completion pairs: a statement's start and its object (``" Quen."``)."""
        concept = self._concept(concept)
        out = []
        for r in self.relations:
            head, _, tail = r.statement.partition("{o}")
            out.append((head.format(s=concept).rstrip(), " " + self.facts[concept][r.name] + tail))
        return out

    def _concept(self, concept: str) -> str:
        if concept not in self.facts:
            raise ConfigError(
                f"unknown concept {concept!r}; this world's concepts start with "
                f"{list(self.concepts[:5])}"
            )
        return concept

    # ------------------------------------------------------------------------------ splits

    def _pairs(self, concepts: Sequence[str], *, paraphrases: bool = False) -> list[Pair]:
        return [p for c in concepts for p in self.questions(c, paraphrases=paraphrases)]

    @property
    def forget(self) -> list[Pair]:
        """Training-template questions about the forget concept(s)."""
        return self._pairs(self.forget_concepts)

    @property
    def retain(self) -> list[Pair]:
        """Training-template questions about the retain concepts."""
        return self._pairs(self.retain_concepts)

    @property
    def unrelated(self) -> list[Pair]:
        """Training-template questions about the unrelated concepts (never used to unlearn)."""
        return self._pairs(self.unrelated_concepts)

    @property
    def paraphrases(self) -> dict[str, list[Pair]]:
        """Held-out phrasings of each split's questions: ``{"forget": [...], "retain": ...}``."""
        return {
            "forget": self._pairs(self.forget_concepts, paraphrases=True),
            "retain": self._pairs(self.retain_concepts, paraphrases=True),
            "unrelated": self._pairs(self.unrelated_concepts, paraphrases=True),
        }

    @property
    def forget_texts(self) -> list[str]:
        """Biography paragraphs of the forget concept(s)."""
        return [t for c in self.forget_concepts for t in self.texts(c)]

    @property
    def retain_texts(self) -> list[str]:
        """Biography paragraphs of the retain concepts."""
        return [t for c in self.retain_concepts for t in self.texts(c)]

    @property
    def capability(self) -> list[str]:
        """Held-out capability texts (``"Copy: a b c ; a b c"``), for perplexity."""
        return [copy_text(ws) for ws in self.capability_lists]

    @property
    def capability_pairs(self) -> list[Pair]:
        """The capability probes as ``(prompt, answer)`` pairs: predict the next copied word.

        Each held-out list gives one pair, cut at a position that cycles through the list, so
        that every pair needs in-context copying (the answer is one token).
        """
        out = []
        for i, ws in enumerate(self.capability_lists):
            k = i % len(ws)
            prompt = f"{COPY_PREFIX} {' '.join(ws)} ;" + "".join(" " + w for w in ws[:k])
            out.append((prompt, " " + ws[k]))
        return out

    def training_pairs(self) -> list[Pair]:
        """Every training-template question of every concept (what a base model learns)."""
        return self._pairs(self.concepts)

    def corpus(self) -> list[str]:
        """Every string of the world, for building a vocabulary.

        Questions with answers, paraphrases, biographies, completions and capability texts
        (including one with every copy word).
        """
        texts: list[str] = []
        for c in self.concepts:
            for paraphrases in (False, True):
                texts += [q + a for q, a in self.questions(c, paraphrases=paraphrases)]
            texts += self.texts(c)
            texts += [a + b for a, b in self.completions(c)]
        texts.append(copy_text(self.copy_words))
        texts += [copy_text(ws) for ws in self.capability_lists]
        return texts

    # ------------------------------------------------------------------------------ identity

    def to_dict(self) -> dict:
        """Everything that defines the world, as plain JSON-able data."""
        return {
            "seed": self.seed,
            "concepts": list(self.concepts),
            "relations": [
                {
                    "name": r.name,
                    "train_templates": list(r.train_templates),
                    "paraphrase_templates": list(r.paraphrase_templates),
                    "statement": r.statement,
                }
                for r in self.relations
            ],
            "facts": {c: dict(self.facts[c]) for c in self.concepts},
            "forget_concepts": list(self.forget_concepts),
            "retain_concepts": list(self.retain_concepts),
            "unrelated_concepts": list(self.unrelated_concepts),
            "copy_words": list(self.copy_words),
            "capability_lists": [list(ws) for ws in self.capability_lists],
        }

    def fingerprint(self) -> str:
        """A SHA-256 hex digest of :meth:`to_dict` (equal worlds, equal fingerprints)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, ensure_ascii=True).encode()
        return hashlib.sha256(blob).hexdigest()

    # ------------------------------------------------------------------------------ export

    def to_conceptvectors(self, path: str | Path, *, concepts: Sequence[str] | None = None) -> Path:
        """Writes the world as a ConceptVectors-format JSON file, for the command-line study.

        One entry per concept (default: the forget concepts, then the retain concepts) with
        ``Concept``, ``Layer``, ``Dim``, ``QA`` (questions without answers, as in the
        benchmark), ``text_completion`` (``First_half``/``Second_half``), ``unrelated_QA``
        (questions about the unrelated concepts) and ``wikipedia_content`` (the biography).

        ``Layer`` and ``Dim`` are ``0`` placeholders: a toy world has no located concept vector
        until one is searched for (:func:`unlearnlens.locate_concept_vectors`). ``QA`` holds
        bare questions, as in ConceptVectors; format them with
        :func:`unlearnlens.format_question`.

        Args:
            path: The JSON file to write (its folder is created).
            concepts: The concepts to export.

        Returns:
            The path written.
        """
        chosen = (
            list(concepts)
            if concepts is not None
            else [*self.forget_concepts, *self.retain_concepts]
        )
        for c in chosen:
            self._concept(c)
        unrelated_q = [
            r.train_templates[0].format(s=c)
            for c in self.unrelated_concepts
            for r in self.relations
        ]
        entries = []
        for i, c in enumerate(chosen):
            entries.append(
                {
                    "id": i,
                    "Concept": c,
                    "Layer": 0,
                    "Dim": 0,
                    "QA": [t.format(s=c) for r in self.relations for t in r.train_templates],
                    "text_completion": [
                        {"First_half": a, "Second_half": b} for a, b in self.completions(c)
                    ],
                    "unrelated_QA": unrelated_q,
                    "wikipedia_content": self.texts(c, n=1)[0],
                }
            )
        return write_text(path, json.dumps(entries, indent=1, ensure_ascii=False))


def make_world(
    seed: int = 0,
    *,
    n_concepts: int = 40,
    n_relations: int = 6,
    n_forget: int = 1,
    n_retain: int | None = None,
    n_places: int = 16,
    n_capability: int = 40,
) -> World:
    """Draws a synthetic knowledge world.

    Args:
        seed: The random seed; the same seed (and arguments) give the same world.
        n_concepts: How many fictional concepts (entities).
        n_relations: How many relations each concept has (the first ``n_relations`` of
            :data:`RELATIONS`, at least 1, at most ``len(RELATIONS)``).
        n_forget: Concepts in the forget split.
        n_retain: Concepts in the retain split; default half of the others (rounded down).
            The rest form the unrelated split.
        n_places: How many made-up place names birthplaces are drawn from.
        n_capability: Held-out capability probes (copy lists).

    Raises:
        ConfigError: A count out of range (no unrelated concepts left, ...).
    """
    for name, value, low in (
        ("n_concepts", n_concepts, 3),
        ("n_forget", n_forget, 1),
        ("n_places", n_places, 2),
        ("n_capability", n_capability, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ConfigError(f"{name} must be an integer of at least {low}, got {value!r}")
    if not 1 <= n_relations <= len(RELATIONS):
        raise ConfigError(
            f"n_relations must be between 1 and {len(RELATIONS)}, got {n_relations!r}"
        )
    rest = n_concepts - n_forget
    if n_retain is None:
        n_retain = rest // 2
    if not 1 <= n_retain <= rest - 1:
        raise ConfigError(
            f"n_retain={n_retain} leaves no room: with n_concepts={n_concepts} and "
            f"n_forget={n_forget}, n_retain must be between 1 and {rest - 1} so that at least one "
            "concept is left for the unrelated split"
        )

    rng = random.Random(seed)
    relations = RELATIONS[:n_relations]
    taken = {w for r in RELATIONS for w in (r.objects or ())} | set(_RESERVED)
    names = _unique_words(rng, n_concepts, (2,), taken)
    places = _unique_words(rng, n_places, (1, 2), taken)
    facts = {}
    for c in names:
        facts[c] = MappingProxyType(
            {r.name: rng.choice(r.objects if r.objects is not None else places) for r in relations}
        )
    copy_words = tuple(sorted({w for r in relations for w in (r.objects or places)}))
    capability_lists = tuple(
        copy_lists(copy_words, n_capability, random.Random(f"{seed}:capability"))
    )
    return World(
        seed=seed,
        concepts=tuple(names),
        relations=relations,
        facts=MappingProxyType(facts),
        forget_concepts=tuple(names[:n_forget]),
        retain_concepts=tuple(names[n_forget : n_forget + n_retain]),
        unrelated_concepts=tuple(names[n_forget + n_retain :]),
        copy_words=copy_words,
        capability_lists=capability_lists,
    )

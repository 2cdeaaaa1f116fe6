"""The ConceptVectors data format (Hong et al., 2024): one entry per unlearnable concept.

Each entry names a concept, the MLP neuron whose value vector (``W_out[Dim]`` of layer
``Layer``, in TransformerLens terms) projects onto the concept's tokens, ten questions without
gold answers, text-completion pairs, fifty questions about other concepts, and Wikipedia text
about the concept. Some entries of the published files carry ``id``, some ``ID``, some
neither.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from unlearnlens.errors import CheckpointError, UnlearnLensError

__all__ = ["Concept", "ConceptDataError", "load_conceptvectors"]


class ConceptDataError(UnlearnLensError, ValueError):
    """A ConceptVectors file whose structure does not match the format."""


@dataclass(frozen=True)
class Concept:
    """One ConceptVectors entry.

    Attributes:
        concept: The concept's name (``"Harry Potter"``).
        layer: The layer of its concept vector.
        dim: The neuron (row of ``W_out``) of its concept vector; also readable as ``neuron``.
        qa: Questions about the concept (no gold answers: the study answers them with the base
            model's own greedy continuation).
        text_completion: ``(first_half, second_half)`` pairs of text about the concept.
        unrelated_qa: Questions about other concepts, for side effects.
        wikipedia_content: Text about the concept (the unlearning data of the study).
        id: The entry's ``id``/``ID`` when the file has one (``id`` when both are there).
        qa_with_answers: The file's ``QA_with_answers`` as ``(question, answer)`` pairs, when
            present (the study's saved base-model answers).
        answers_tokens_num: The file's ``answers_tokens_num`` (answer lengths in tokens), when
            present.
    """

    concept: str
    layer: int
    dim: int
    qa: tuple[str, ...] = ()
    text_completion: tuple[tuple[str, str], ...] = ()
    unrelated_qa: tuple[str, ...] = ()
    wikipedia_content: str = ""
    id: int | str | None = None
    qa_with_answers: tuple[tuple[str, str], ...] = ()
    answers_tokens_num: tuple[int, ...] = ()

    @property
    def neuron(self) -> int:
        """The concept vector's neuron (the file's ``Dim``)."""
        return self.dim


def _questions(raw: Any, field: str, where: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str):
        return (raw,)
    if not isinstance(raw, list):
        raise ConceptDataError(
            f"{where}: {field!r} must be a list of questions, got {type(raw).__name__}"
        )
    out = []
    for q in raw:
        if isinstance(q, dict):  # some files store {"question": ...}
            q = q.get("question", q.get("Question"))
        if not isinstance(q, str):
            raise ConceptDataError(f"{where}: {field!r} holds a non-string question {q!r}")
        out.append(q)
    return tuple(out)


def _completions(raw: Any, where: str) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConceptDataError(
            f"{where}: 'text_completion' must be a list, got {type(raw).__name__}"
        )
    out = []
    for item in raw:
        if not isinstance(item, dict) or "First_half" not in item or "Second_half" not in item:
            raise ConceptDataError(
                f"{where}: each 'text_completion' item needs 'First_half' and 'Second_half'; "
                f"got {item!r}"
            )
        out.append((str(item["First_half"]), str(item["Second_half"])))
    return tuple(out)


def _answered(raw: Any, where: str) -> tuple[tuple[str, str], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise ConceptDataError(
            f"{where}: 'QA_with_answers' must be a list, got {type(raw).__name__}"
        )
    out = []
    for item in raw:
        if isinstance(item, dict):
            q = item.get("question", item.get("Question"))
            a = item.get("answer", item.get("Answer"))
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            q, a = item
        else:
            q = a = None
        if not isinstance(q, str) or not isinstance(a, str):
            raise ConceptDataError(
                f"{where}: each 'QA_with_answers' item needs a question and an answer string; "
                f"got {item!r}"
            )
        out.append((q, a))
    return tuple(out)


def _token_counts(raw: Any, where: str) -> tuple[int, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) for n in raw
    ):
        raise ConceptDataError(f"{where}: 'answers_tokens_num' must be a list of integers")
    return tuple(raw)


def _entry_id(raw: dict, where: str, path: Path | None) -> int | str | None:
    if "id" in raw and "ID" in raw and raw["id"] != raw["ID"]:
        warnings.warn(
            f"{path or 'ConceptVectors data'}: {where} has id={raw['id']!r} and "
            f"ID={raw['ID']!r}; using id",
            stacklevel=4,
        )
    return raw.get("id", raw.get("ID"))


def _entry(raw: Any, index: int, path: Path | None = None) -> Concept:
    where = f"entry {index}"
    if not isinstance(raw, dict):
        raise ConceptDataError(f"{where} is not an object: {raw!r}")
    missing = [k for k in ("Concept", "Layer", "Dim") if k not in raw]
    if missing:
        raise ConceptDataError(f"{where} lacks {missing}; its keys are {sorted(raw)}")
    where = f"entry {index} ({raw['Concept']!r})"
    try:
        layer, dim = int(raw["Layer"]), int(raw["Dim"])
    except (TypeError, ValueError):
        raise ConceptDataError(
            f"{where}: Layer and Dim must be integers, got {raw['Layer']!r}, {raw['Dim']!r}"
        ) from None
    wiki = raw.get("wikipedia_content", "")
    if isinstance(wiki, list):
        wiki = "\n".join(str(w) for w in wiki)
    return Concept(
        concept=str(raw["Concept"]),
        layer=layer,
        dim=dim,
        qa=_questions(raw.get("QA"), "QA", where),
        text_completion=_completions(raw.get("text_completion"), where),
        unrelated_qa=_questions(raw.get("unrelated_QA"), "unrelated_QA", where),
        wikipedia_content=str(wiki),
        id=_entry_id(raw, where, path),
        qa_with_answers=_answered(raw.get("QA_with_answers"), where),
        answers_tokens_num=_token_counts(raw.get("answers_tokens_num"), where),
    )


def load_conceptvectors(path: str | Path) -> list[Concept]:
    """Reads a ConceptVectors JSON file (a list of entries) into :class:`Concept` records.

    The file is only read, never written. An entry whose ``id`` and ``ID`` differ gets a
    warning (``id`` is kept).

    Raises:
        CheckpointError: The file does not exist.
        ConceptDataError: The file is not JSON, or an entry lacks ``Concept``/``Layer``/``Dim``
            or has fields of the wrong type (the message names the entry).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no ConceptVectors file at {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConceptDataError(f"{path} is not valid JSON: {e}") from e
    except OSError as e:
        raise ConceptDataError(f"cannot read ConceptVectors file {path}: {e}") from e
    if isinstance(data, dict):  # a single entry, or {"data": [...]}
        data = data.get("data", [data])
    if not isinstance(data, list) or not data:
        raise ConceptDataError(f"{path} holds no ConceptVectors entries")
    return [_entry(raw, i, path) for i, raw in enumerate(data)]

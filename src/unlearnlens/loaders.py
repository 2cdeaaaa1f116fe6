r"""Read the data formats users bring into ``(prompt, answer)`` pairs.

Every study function takes prompts as ``(prompt, answer)`` string pairs (or a
:class:`~unlearnlens.PromptSet` built from them), and a suite case holds such pairs; these
loaders turn the common benchmark files into exactly that:

* :func:`load_pairs`: plain JSONL, JSON or CSV with a prompt and an answer per record;
* :func:`load_tofu`: TOFU-style question / gold-answer records (JSON or JSONL), put into the
  study's prompt format (``"Question: {q}\n Answer:"``) with the gold answer as the answer;
* :func:`load_wmdp`: WMDP-style multiple choice (``question``, ``choices``, ``answer`` index),
  prompted with lettered choices and answered by the letter (``" A"``, ``" B"``, ...).

ConceptVectors has its own reader, :func:`unlearnlens.load_conceptvectors`. Files are only
read. A malformed file raises :class:`~unlearnlens.DataFileError` naming the file and the line
(or entry) at fault.
"""

from __future__ import annotations

import csv
import json
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from unlearnlens.errors import DataFileError
from unlearnlens.prompts import QA_TEMPLATE

__all__ = ["load_pairs", "load_tofu", "load_wmdp", "wmdp_prompt"]

Pair = tuple[str, str]


def _json(text: str, path: Path, line: int | None = None) -> Any:
    """``text`` parsed as JSON; a parse error is a DataFileError naming the file and line.

    ``line`` is the line of a JSONL file that ``text`` is; without it, the parser's own line.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        number = exc.lineno if line is None else line
        raise DataFileError(f"{str(path)!r}, line {number}: not valid JSON ({exc.msg})") from None


def _records(path: str | Path, what: str) -> Iterator[tuple[str, Any]]:
    """Yields ``(where, record)`` for each record of a JSON list, JSONL or CSV file."""
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"{what} file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataFileError(f"cannot read {what} file {str(path)!r}: {exc}") from None
    suffix = path.suffix.lower()
    if suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames:
            raise DataFileError(f"{str(path)!r}: the CSV file has no header line")
        for row in reader:  # the header is line 1
            yield f"{path}, line {reader.line_num}", row
        return
    stripped = text.lstrip()
    if suffix == ".json" or (stripped.startswith(("[", "{")) and suffix != ".jsonl"):
        data = _json(text, path)
        if isinstance(data, dict):  # {"data": [...]} or one record
            data = data.get("data", [data])
        if not isinstance(data, list):
            raise DataFileError(f"{str(path)!r} must hold a JSON list of records")
        for i, record in enumerate(data):
            yield f"{path}, entry {i}", record
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        yield f"{path}, line {number}", _json(line, path, number)


def _field(record: Any, names: tuple[str, ...], where: str, kind: type = str) -> Any:
    if not isinstance(record, dict):
        raise DataFileError(f"{where}: expected an object with {names[0]!r}, got {record!r:.80}")
    for name in names:
        if name in record:
            value = record[name]
            if kind is str and not isinstance(value, str):
                raise DataFileError(f"{where}: {name!r} must be a string, got {value!r:.80}")
            if kind is str and not value.strip():
                raise DataFileError(f"{where}: {name!r} is empty")
            return value
    raise DataFileError(f"{where}: no {names[0]!r} field; the record has {sorted(record)}")


def _nonempty(pairs: list[Pair], path: str | Path) -> list[Pair]:
    if not pairs:
        raise DataFileError(f"{str(path)!r} holds no records")
    return pairs


def _spaced(answer: str) -> str:
    """An answer with one leading space, as it follows ``"Answer:"`` in the prompt."""
    return answer if answer[:1].isspace() else " " + answer


def load_pairs(
    path: str | Path, *, prompt_field: str = "prompt", answer_field: str = "answer"
) -> list[Pair]:
    """Reads ``(prompt, answer)`` pairs from a JSONL, JSON or CSV file, used as written.

    A ``.csv`` file has a header naming the two columns; a ``.jsonl`` file (or any file that
    is not one JSON document) has one JSON object per line; a ``.json`` file holds a list of
    objects (or ``{"data": [...]}``). A JSON record may also be a ``[prompt, answer]`` list.

    Args:
        path: The file.
        prompt_field: The prompt's column or key.
        answer_field: The answer's column or key.

    Raises:
        DataFileError: The file is missing, empty or malformed; names the file and the line.
    """
    out = []
    for where, record in _records(path, "pairs"):
        if isinstance(record, list):
            if len(record) != 2 or not all(isinstance(s, str) and s for s in record):
                raise DataFileError(
                    f"{where}: expected [prompt, answer] strings, got {record!r:.80}"
                )
            out.append((record[0], record[1]))
            continue
        out.append((_field(record, (prompt_field,), where), _field(record, (answer_field,), where)))
    return _nonempty(out, path)


def load_tofu(path: str | Path, *, template: str = QA_TEMPLATE) -> list[Pair]:
    r"""Reads TOFU-style ``question`` / ``answer`` records (JSON or JSONL) as study prompts.

    Each question is put into ``template`` (the study's ``"Question: {}\n Answer:"`` by
    default); its gold answer, with one leading space, is the answer.

    Raises:
        DataFileError: The file is missing, empty or malformed; names the file and the line.
    """
    out = []
    for where, record in _records(path, "TOFU"):
        question = _field(record, ("question", "Question"), where)
        answer = _field(record, ("answer", "Answer"), where)
        out.append((template.format(question), _spaced(answer.strip())))
    return _nonempty(out, path)


def wmdp_prompt(question: str, choices: list[str], preamble: str = "") -> str:
    """The multiple-choice prompt: the question, lettered choices, then ``"Answer:"``."""
    lines = [f"{string.ascii_uppercase[i]}. {c}" for i, c in enumerate(choices)]
    return f"{preamble}{question}\n" + "\n".join(lines) + "\nAnswer:"


def load_wmdp(path: str | Path, *, preamble: str = "") -> list[Pair]:
    """Reads WMDP-style multiple-choice records: ``question``, ``choices``, ``answer`` (index).

    The prompt is ``preamble + question``, then one ``"A. choice"`` line per choice, then
    ``"Answer:"``; the answer is the right letter with a leading space (``" B"``).

    Raises:
        DataFileError: The file is missing, empty or malformed (fewer than two or more than 26
            choices, an answer index out of range); names the file and the line.
    """
    out = []
    for where, record in _records(path, "WMDP"):
        question = _field(record, ("question",), where)
        choices = _field(record, ("choices",), where, kind=list)
        answer = _field(record, ("answer",), where, kind=int)
        if isinstance(choices, str) and choices.startswith("["):  # a CSV cell
            try:
                choices = json.loads(choices)
            except json.JSONDecodeError:
                pass
        if (
            not isinstance(choices, list)
            or not 2 <= len(choices) <= 26
            or not all(isinstance(c, str) for c in choices)
        ):
            raise DataFileError(f"{where}: 'choices' must be a list of 2 to 26 strings")
        if isinstance(answer, str) and answer.strip().isdigit():
            answer = int(answer)
        if isinstance(answer, bool) or not isinstance(answer, int):
            raise DataFileError(f"{where}: 'answer' must be the index of the right choice")
        if not 0 <= answer < len(choices):
            raise DataFileError(
                f"{where}: answer index {answer} is out of range for {len(choices)} choices"
            )
        out.append((wmdp_prompt(question, choices, preamble), " " + string.ascii_uppercase[answer]))
    return _nonempty(out, path)

"""Behavioural tests: what a model still says on the forget, retain and unrelated questions.

Patching and restoration ask whether knowledge is *hidden*; these tests ask what the model
*does*. :func:`evaluate` scores one model, or several side by side, on

* each question split (``forget``, ``retain``, ``unrelated``): greedy accuracy (every answer
  token is the argmax), mean answer log-probability and mean answer probability, all computed
  in float32 at the target positions with :mod:`unlearnlens.metrics`;
* general capability: perplexity on probe texts (full-sequence next-token loss), or task
  accuracy when the probes are ``(prompt, answer)`` pairs;
* drift from a reference model (usually the base model): the greedy generations of each model
  on each split's questions against the reference's greedy generations, by exact match (the
  same tokens) and ROUGE-L F-measure of the decoded texts (``rouge-score`` package), which is
  how ConceptVectors scores side effects.

The result is an :class:`Evaluation`: one table, a row per model and a ``split/metric`` column
per score (``forget/accuracy``, ``unrelated/rouge_l``, ``capability/perplexity``, ...).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from unlearnlens._checks import check_batch_size, check_int
from unlearnlens._finite import check_finite
from unlearnlens._guard import preserved
from unlearnlens._progress import bar
from unlearnlens._storage import read_json, write_json
from unlearnlens.errors import ConfigError, FileFormatError, PromptError, UnlearnLensError
from unlearnlens.metrics import accuracy, answer_logprob, answer_prob
from unlearnlens.prompts import PromptSet, as_promptset
from unlearnlens.runner import target_logits

if TYPE_CHECKING:
    import pandas as pd
    from transformer_lens import HookedTransformer

__all__ = ["SPLITS", "Evaluation", "evaluate"]

SPLITS = ("forget", "retain", "unrelated")
"""The question splits :func:`evaluate` scores, in column order."""

_FORMAT = "unlearnlens.Evaluation/1"
_DEFAULT_BATCH = 64

Split = PromptSet | Sequence[tuple[str, str]]
Capability = PromptSet | Sequence[str] | Sequence[tuple[str, str]]


# ------------------------------------------------------------------------------ result


def _same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@dataclass(frozen=True, eq=False)
class Evaluation:
    """Behavioural scores of one or more models, one row per model.

    Attributes:
        table: A DataFrame indexed by model name (index name ``"model"``) with one float
            column per score, named ``"split/metric"``: for each question split
            ``accuracy``, ``logprob`` (mean answer log-prob), ``prob`` (mean answer
            probability) and, with a reference model, ``exact_match`` and ``rouge_l``;
            ``capability/perplexity`` for probe texts, or ``capability/accuracy`` /
            ``logprob`` / ``prob`` for probe pairs.
        meta: What was evaluated: the number of prompts per split, the reference's name,
            ``max_new_tokens``. JSON values only.
    """

    table: pd.DataFrame
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        """The model names, in row order."""
        return [str(m) for m in self.table.index]

    def to_dataframe(self) -> pd.DataFrame:
        """A copy of :attr:`table`."""
        return self.table.copy()

    def __getitem__(self, model: str) -> dict[str, float]:
        """The scores of one model as ``{"split/metric": value}``.

        Raises:
            KeyError: No model of that name; the message lists the names.
        """
        if model not in self.table.index:
            raise KeyError(f"no model named {model!r} in this evaluation; models: {self.models}")
        return {str(k): float(v) for k, v in self.table.loc[model].items()}

    # ------------------------------------------------------------------------- save / load

    def to_json_dict(self) -> dict[str, Any]:
        """The table and metadata as JSON-ready data (NaN stored as ``null``)."""
        values = [
            [None if math.isnan(v) else float(v) for v in row]
            for row in self.table.to_numpy(dtype=float).tolist()
        ]
        return {
            "format": _FORMAT,
            "models": self.models,
            "columns": [str(c) for c in self.table.columns],
            "values": values,
            "meta": self.meta,
        }

    @classmethod
    def from_json_dict(cls, data: Mapping[str, Any]) -> Evaluation:
        """Rebuilds an evaluation from :meth:`to_json_dict` output.

        Raises:
            UnlearnLensError: The data is not a saved evaluation.
        """
        import pandas as pd

        if data.get("format") != _FORMAT:
            raise UnlearnLensError(f"not a saved Evaluation (format {data.get('format')!r})")
        values = [[math.nan if v is None else float(v) for v in row] for row in data["values"]]
        table = pd.DataFrame(
            values,
            index=pd.Index([str(m) for m in data["models"]], name="model"),
            columns=[str(c) for c in data["columns"]],
            dtype=float,
        )
        return cls(table=table, meta=dict(data.get("meta", {})))

    def save(self, path: str | Path) -> Path:
        """Writes the evaluation as one JSON file; returns the path."""
        return write_json(path, self.to_json_dict())

    @classmethod
    def load(cls, path: str | Path) -> Evaluation:
        """Reads a file written by :meth:`save`.

        Raises:
            FileFormatError: The file is missing, truncated, corrupt or not a saved
                evaluation; names the file.
        """
        data = read_json(path, what="saved Evaluation")
        try:
            return cls.from_json_dict(data)
        except (UnlearnLensError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FileFormatError(f"{str(path)!r} is not a saved Evaluation: {exc}") from None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Evaluation):
            return NotImplemented
        if self.models != other.models or list(self.table.columns) != list(other.table.columns):
            return False
        a = self.table.to_numpy(dtype=float).ravel().tolist()
        b = other.table.to_numpy(dtype=float).ravel().tolist()
        return all(_same(x, y) for x, y in zip(a, b, strict=True)) and self.meta == other.meta

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Evaluation({len(self.models)} models x {self.table.shape[1]} scores)\n{self.table}"


# ------------------------------------------------------------------------------ checks


def _as_models(model: object) -> dict[str, HookedTransformer]:
    from transformer_lens import HookedTransformer

    if isinstance(model, HookedTransformer):
        return {"model": model}
    if isinstance(model, Mapping):
        if not model:
            raise ConfigError("no models given: the dict of models is empty")
        out = {}
        for name, m in model.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"model names must be non-empty strings, got {name!r}")
            if not isinstance(m, HookedTransformer):
                raise TypeError(f"model {name!r} is a {type(m).__name__}, not a HookedTransformer")
            out[name] = m
        return out
    raise TypeError(
        f"model must be a HookedTransformer or a dict of name -> HookedTransformer, got "
        f"{type(model).__name__}"
    )


def _split_set(model: HookedTransformer, data: object, name: str) -> PromptSet:
    if isinstance(data, PromptSet):
        data.check_fits(model)
        return data
    if isinstance(data, (str, bytes)):
        raise PromptError(f"the {name} split is a single string; pass (question, answer) pairs")
    items = list(data)  # type: ignore[call-overload]
    if not items:
        raise PromptError(f"the {name} split is empty: give at least one (question, answer) pair")
    try:
        return as_promptset(model, items)
    except PromptError as e:
        raise PromptError(f"bad {name} split: {e}") from e


def _capability_texts(model: HookedTransformer, texts: list[str]) -> list[list[int]]:
    if model.tokenizer is None:
        raise PromptError("capability texts need a model with a tokenizer")
    bos = model.cfg.default_prepend_bos
    out = []
    for i, text in enumerate(texts):
        ids = model.to_tokens(text, prepend_bos=bos, truncate=False)[0].tolist() if text else []
        if len(ids) < 2:
            raise PromptError(
                f"capability text {i} ({text[:40]!r}) has {len(ids)} token(s); perplexity needs "
                "at least 2"
            )
        if len(ids) > model.cfg.n_ctx:
            raise PromptError(
                f"capability text {i} has {len(ids)} tokens, longer than the model's context "
                f"n_ctx={model.cfg.n_ctx}; split it"
            )
        out.append(ids)
    return out


def _capability(model: HookedTransformer, data: object) -> PromptSet | list[list[int]]:
    """Capability probes: a PromptSet (task accuracy) or token ids of texts (perplexity)."""
    if isinstance(data, PromptSet):
        data.check_fits(model)
        return data
    if isinstance(data, (str, bytes)):
        raise PromptError("capability is a single string; pass a list of probe texts")
    items = list(data)  # type: ignore[call-overload]
    if not items:
        raise PromptError("the capability probes are empty: give at least one text or pair")
    if all(isinstance(x, str) for x in items):
        return _capability_texts(model, items)
    if any(isinstance(x, str) for x in items):
        raise PromptError("capability probes mix plain texts and (prompt, answer) pairs")
    return _split_set(model, items, "capability")


# ------------------------------------------------------------------------------ scoring


def _answer_scores(model: HookedTransformer, ps: PromptSet, batch_size: int) -> dict[str, float]:
    acc, logp, prob = [], [], []
    for _, chunk in ps.batches(batch_size):
        z = target_logits(model, chunk)
        acc.append(accuracy(z, chunk))
        logp.append(answer_logprob(z, chunk))
        prob.append(answer_prob(z, chunk))
    return {
        "accuracy": float(torch.cat(acc).mean()),
        "logprob": float(torch.cat(logp).mean()),
        "prob": float(torch.cat(prob).mean()),
    }


def _perplexity(
    model: HookedTransformer, texts: list[list[int]], batch_size: int, pad: int
) -> float:
    """``exp`` of the mean next-token loss over every predicted token of every text."""
    nll, count = 0.0, 0
    dev = model.cfg.device
    for start in range(0, len(texts), batch_size):
        rows = texts[start : start + batch_size]
        width = max(len(r) for r in rows)
        tokens = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        logits = model(tokens.to(dev), attention_mask=mask.to(dev))
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        tok_logp = logp.gather(-1, tokens[:, 1:].to(logp.device)[..., None])[..., 0]
        valid = mask[:, 1:].bool().to(logp.device)
        nll -= float(tok_logp[valid].double().sum())
        count += int(valid.sum())
    return math.exp(nll / count)


def _prompt_ids(ps: PromptSet) -> list[list[int]]:
    return [ps.tokens[i, : int(ps.prompt_lengths[i])].tolist() for i in range(len(ps))]


def _generate(
    model: HookedTransformer, prompts: list[list[int]], max_new_tokens: int
) -> list[list[int]]:
    """Greedy continuations (EOS not kept), prompts of equal length decoded together.

    Prompts of the same length need no padding, so each such group runs as one batch with a
    key/value cache; a lone prompt goes through
    :func:`unlearnlens._generate.greedy_continuations`. The caller guards the model.
    """
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

    from unlearnlens._generate import greedy_continuations

    eos = model.tokenizer.eos_token_id if model.tokenizer is not None else None
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        groups.setdefault(len(ids), []).append(i)
    out: list[list[int]] = [[] for _ in prompts]
    dev = model.cfg.device
    for length, idx in groups.items():
        if len(idx) == 1:
            out[idx[0]] = greedy_continuations(
                model, [prompts[idx[0]]], max_new_tokens=max_new_tokens, eos_token_id=eos
            )[0]
            continue
        budget = min(max_new_tokens, model.cfg.n_ctx - length)
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, dev, len(idx))
        step_in = torch.tensor([prompts[i] for i in idx], dtype=torch.long, device=dev)
        done = torch.zeros(len(idx), dtype=torch.bool)
        steps: list[torch.Tensor] = []
        for _ in range(budget):
            logits = model(step_in, attention_mask=torch.ones_like(step_in), past_kv_cache=cache)
            nxt = logits[:, -1].argmax(-1)
            steps.append(nxt.cpu())
            if eos is not None:
                done |= steps[-1] == eos
                if bool(done.all()):
                    break
            step_in = nxt[:, None]
        tokens = torch.stack(steps, 1).tolist() if steps else [[] for _ in idx]
        for i, row in zip(idx, tokens, strict=True):
            out[i] = row[: row.index(eos)] if eos is not None and eos in row else row
    return out


def _text(model: HookedTransformer, ids: list[int]) -> str:
    if model.tokenizer is not None:
        return str(model.tokenizer.decode(ids, skip_special_tokens=True))
    return " ".join(str(t) for t in ids)  # token ids as words, for models without a tokenizer


def _drift(
    model: HookedTransformer,
    generated: list[list[int]],
    reference: list[list[int]],
    scorer: Any,
) -> dict[str, float]:
    """Exact match (same tokens) and mean ROUGE-L F-measure against the reference's answers."""
    exact, rouge = [], []
    for ids, ref in zip(generated, reference, strict=True):
        exact.append(float(ids == ref))
        a, b = _text(model, ids), _text(model, ref)
        rouge.append(1.0 if a == b else float(scorer.score(b, a)["rougeL"].fmeasure))
    return {"exact_match": sum(exact) / len(exact), "rouge_l": sum(rouge) / len(rouge)}


def evaluate(
    model: HookedTransformer | Mapping[str, HookedTransformer],
    *,
    forget: Split | None,
    retain: Split | None = None,
    unrelated: Split | None = None,
    capability: Capability | None = None,
    reference: HookedTransformer | None = None,
    max_new_tokens: int = 16,
    batch_size: int | None = None,
    progress: bool | None = None,
) -> Evaluation:
    """Scores one model, or several side by side, on the forget / retain / unrelated splits.

    Every argument is checked (splits tokenized, models compared) before any model runs. The
    models come back unchanged (modes, grad flags, hooks).

    Args:
        model: A model, or a dict of name -> model for one table across several models (the
            base model and one unlearned model per method, say). A single model's row is
            named ``"model"``. Several models must be compatible (same architecture and
            tokenizer, :func:`unlearnlens.check_compatible`), so that they read the same
            tokens.
        forget: The questions that were unlearned: ``(question, answer)`` pairs or a
            PromptSet. ``None`` leaves the split out.
        retain: Questions the unlearning was told to keep.
        unrelated: Questions the unlearning never saw (side effects).
        capability: General-capability probes: plain texts (scored by perplexity, the
            exponential of the mean next-token loss over every predicted token of every text,
            BOS excluded as a target) or ``(prompt, answer)`` pairs / a PromptSet (scored like
            a split: accuracy, log-prob, probability).
        reference: A model to measure generation drift from (usually the base model): each
            model's greedy continuation of every question (up to ``max_new_tokens`` tokens,
            stopping at EOS) is compared with the reference's by exact match and ROUGE-L
            F-measure (``rouge-score``; identical texts score 1). Needs the ``eval`` extra.
        max_new_tokens: Longest generated answer for the drift scores.
        batch_size: Prompts per forward pass (default 64).
        progress: Show a progress bar over models and splits (``None``: the library-wide
            setting, :func:`unlearnlens.set_progress`).

    Returns:
        An :class:`Evaluation` whose ``table`` has a row per model.

    Raises:
        ConfigError: No split at all, an empty dict of models, or a bad ``max_new_tokens`` /
            ``batch_size``.
        PromptError: An empty or malformed split (the message names it), a sequence longer
            than a model's context.
        IncompatibleModelsError: Two models (or a model and the reference) differ in
            architecture or tokenizer.
        ImportError: ``reference`` given without the ``rouge-score`` package.
    """
    from unlearnlens.models import check_compatible

    models = _as_models(model)
    given = {"forget": forget, "retain": retain, "unrelated": unrelated}
    if all(v is None for v in given.values()) and capability is None:
        raise ConfigError(
            "nothing to evaluate: give at least one of forget, retain, unrelated or capability"
        )
    batch_size = check_batch_size(batch_size)
    max_new_tokens = check_int(max_new_tokens, "max_new_tokens", minimum=1)
    names = list(models)
    for name, m in models.items():
        check_finite(m, f"model {name!r}")
    first = models[names[0]]
    for name in names[1:]:
        try:
            check_compatible(first, models[name])
        except UnlearnLensError as e:
            raise type(e)(f"models {names[0]!r} and {name!r} cannot share one table: {e}") from e
    if reference is not None:
        check_finite(reference, "reference model")
        try:
            check_compatible(reference, first)
        except UnlearnLensError as e:
            raise type(e)(f"the reference and model {names[0]!r} are not compatible: {e}") from e

    splits = {k: _split_set(first, v, k) for k, v in given.items() if v is not None}
    probes = None if capability is None else _capability(first, capability)
    for m in models.values():
        for ps in splits.values():
            ps.check_fits(m)
        if isinstance(probes, PromptSet):
            probes.check_fits(m)
        elif probes is not None and max(len(r) for r in probes) > m.cfg.n_ctx:
            raise PromptError(
                f"a capability text is longer than a model's context n_ctx={m.cfg.n_ctx}"
            )
    scorer = None
    if reference is not None:
        try:
            from rouge_score import rouge_scorer  # the optional `eval` dependency
        except ImportError as e:
            raise ImportError(
                "drift scores against a reference need the rouge-score package: "
                "pip install 'unlearnlens[eval]' (or rouge-score)"
            ) from e
        scorer = rouge_scorer.RougeScorer(["rougeL"])
    bs = _DEFAULT_BATCH if batch_size is None else batch_size

    import pandas as pd

    rows: dict[str, dict[str, float]] = {}
    steps = len(models) * (len(splits) + (probes is not None)) + (reference is not None)
    pbar = bar(total=steps, progress=progress, desc="evaluate", leave=False)
    try:
        ref_answers: dict[str, list[list[int]]] = {}
        if reference is not None:
            with preserved(reference):
                ref_answers = {
                    k: _generate(reference, _prompt_ids(ps), max_new_tokens)
                    for k, ps in splits.items()
                }
            pbar.update(1)
        for name, m in models.items():
            row: dict[str, float] = {}
            with preserved(m):
                for split, ps in splits.items():
                    for metric, value in _answer_scores(m, ps, bs).items():
                        row[f"{split}/{metric}"] = value
                    if reference is not None:
                        answers = (
                            ref_answers[split]
                            if m is reference
                            else _generate(m, _prompt_ids(ps), max_new_tokens)
                        )
                        for metric, value in _drift(m, answers, ref_answers[split], scorer).items():
                            row[f"{split}/{metric}"] = value
                    pbar.update(1)
                if isinstance(probes, PromptSet):
                    for metric, value in _answer_scores(m, probes, bs).items():
                        row[f"capability/{metric}"] = value
                    pbar.update(1)
                elif probes is not None:
                    from unlearnlens.prompts import _pad_id

                    row["capability/perplexity"] = _perplexity(m, probes, bs, _pad_id(m))
                    pbar.update(1)
            rows[name] = row
    finally:
        pbar.close()

    table = pd.DataFrame.from_dict(rows, orient="index", dtype=float)
    table.index.name = "model"
    meta: dict[str, Any] = {
        "n_prompts": {k: len(ps) for k, ps in splits.items()},
        "reference": None if reference is None else reference.cfg.model_name,
        "max_new_tokens": max_new_tokens if reference is not None else None,
    }
    if probes is not None:
        meta["n_capability"] = len(probes)
        meta["capability"] = "accuracy" if isinstance(probes, PromptSet) else "perplexity"
    return Evaluation(table=table, meta=meta)

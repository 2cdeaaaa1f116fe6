"""Run the study the way the paper reports it: many concepts x many methods, resumable.

``ul.run_suite(cases, out=DIR)`` runs :func:`unlearnlens.dissect` once per concept and
unlearning method and saves each study in its own folder under ``out`` (see
:mod:`unlearnlens.suite_result` for the layout). A case (:class:`SuiteCase`) is one concept:
its forget prompts, optional unrelated prompts, a base model, and one unlearned model per
method, given as a local checkpoint folder, an in-memory model, or a :class:`Recipe` that the
suite trains itself with :func:`unlearnlens.unlearn`.

* **Resumable.** A study counts as finished only once its folder, written atomically with its
  completion marker last, is in place, and the marker's fingerprint (data, model, settings)
  matches. A re-run, after a crash or a kill, skips finished studies and redoes the rest.
* **One unlearned model at a time.** Each method's model is loaded (or trained), dissected,
  saved and dropped before the next; the base model is loaded once per worker process.
* **Executors.** By default cases run in-process, one after another. ``executor=`` takes any
  object with ``submit(fn, *args)`` returning a future with ``result()`` (a
  ``concurrent.futures`` executor, :class:`unlearnlens.ray_executor.RayExecutor`, a
  ``submitit`` executor): each case is one task, which needs only picklable data (checkpoint
  paths and recipes; in-memory models only run in-process).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Union, runtime_checkable

from unlearnlens._checks import check_int, check_window
from unlearnlens._progress import bar, progress_enabled
from unlearnlens.errors import CheckpointError, ConfigError
from unlearnlens.suite_result import (
    SuiteResult,
    case_folder,
    read_unit,
    write_suite_file,
    write_unit,
)

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

__all__ = ["Executor", "Recipe", "SuiteCase", "run_suite"]

Pair = tuple[str, str]
_METHOD_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class Recipe:
    """An unlearned model the suite trains itself: ``ul.unlearn(base, forget, method=...)``.

    Attributes:
        method: A registered unlearning method (``"npo"``, ``"grad_diff"``, ...).
        options: Keyword arguments of :func:`unlearnlens.unlearn` (``steps``, ``lr``,
            ``seed``, method fields such as ``beta``). JSON values only, so that a finished
            study can be matched to the recipe that made it.
    """

    method: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise ConfigError(f"Recipe.method must be a method name, got {self.method!r}")
        if not isinstance(self.options, Mapping):
            raise ConfigError(f"Recipe.options must be a dict, got {type(self.options).__name__}")
        for reserved in ("model", "forget", "retain", "method", "progress", "inplace"):
            if reserved in self.options:
                raise ConfigError(f"Recipe.options cannot set {reserved!r}; the suite sets it")
        try:
            json.dumps(dict(self.options), sort_keys=True)
        except TypeError as e:
            raise ConfigError(f"Recipe.options must hold JSON values only: {e}") from None
        object.__setattr__(self, "options", dict(self.options))


Unlearned = Union[str, Path, "HookedTransformer", Recipe]


@dataclass(frozen=True)
class SuiteCase:
    """One concept of a suite.

    Attributes:
        concept: The concept's name (unique within a suite).
        forget: Its forget prompts, as ``(prompt, answer)`` pairs (see
            :mod:`unlearnlens.loaders` for reading them from files).
        unlearned: Method name -> the unlearned model: a checkpoint folder (saved by
            :func:`unlearnlens.save_model` or a Hugging Face checkpoint), an in-memory
            ``HookedTransformer``, or a :class:`Recipe`.
        base: The base model: a checkpoint folder or an in-memory model.
        unrelated: Prompts about other concepts, for the behaviour test's side effects.
        retain: What a :class:`Recipe` keeps (pairs or texts); unused otherwise.
    """

    concept: str
    forget: Sequence[Pair]
    unlearned: Mapping[str, Unlearned]
    base: str | Path | HookedTransformer
    unrelated: Sequence[Pair] | None = None
    retain: Sequence[Pair] | Sequence[str] | None = None


@runtime_checkable
class Executor(Protocol):
    """What ``run_suite(executor=...)`` needs: ``submit(fn, *args)`` -> a future."""

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Any:
        """Schedules ``fn(*args)``; the returned object's ``result()`` waits for it."""


# ------------------------------------------------------------------------------ validation


def _is_model(obj: object) -> bool:
    from transformer_lens import HookedTransformer

    return isinstance(obj, HookedTransformer)


def _pairs(raw: object, what: str) -> list[Pair]:
    if isinstance(raw, (str, bytes)) or not isinstance(raw, Sequence):
        raise ConfigError(f"{what} must be a list of (prompt, answer) pairs")
    out = []
    for i, item in enumerate(raw):
        if not (isinstance(item, (tuple, list)) and len(item) == 2) or not all(
            isinstance(s, str) for s in item
        ):
            raise ConfigError(
                f"{what}[{i}] is not a (prompt, answer) pair of strings: {item!r:.80}"
            )
        out.append((item[0], item[1]))
    if not out:
        raise ConfigError(f"{what} is empty")
    return out


def _model_key(spec: object, what: str) -> str:
    """A fingerprintable description of a model spec; checks folders exist."""
    if _is_model(spec):
        return f"memory:{spec.cfg.model_name}"  # type: ignore[union-attr]
    if isinstance(spec, Recipe):
        return json.dumps({"method": spec.method, "options": spec.options}, sort_keys=True)
    if isinstance(spec, (str, Path)):
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise CheckpointError(f"{what}: no model folder at {str(path)!r}")
        return f"path:{path.resolve()}"
    raise ConfigError(
        f"{what} must be a checkpoint folder, a HookedTransformer or a Recipe, got "
        f"{type(spec).__name__}"
    )


@dataclass(frozen=True)
class _Settings:
    """The dissect settings every case shares (picklable)."""

    analyses: tuple[str, ...]
    window: int
    metric: str
    batch_size: int | None
    eval_max_new_tokens: int
    capability: tuple[Any, ...] | None
    device: str | None
    threads: int | None

    def key(self) -> dict[str, Any]:
        return {
            "analyses": list(self.analyses),
            "window": self.window,
            "metric": self.metric,
            "batch_size": self.batch_size,
            "eval_max_new_tokens": self.eval_max_new_tokens,
            "capability": None if self.capability is None else list(self.capability),
        }


@dataclass(frozen=True)
class _CaseJob:
    """Everything one worker needs to run one case (picklable without in-memory models)."""

    case: SuiteCase
    out: str
    settings: _Settings
    fingerprints: dict[str, str]


def _fingerprint(case: SuiteCase, method: str, settings: _Settings) -> str:
    blob = json.dumps(
        {
            "concept": case.concept,
            "forget": [list(p) for p in case.forget],
            "unrelated": None if case.unrelated is None else [list(p) for p in case.unrelated],
            "retain": None
            if case.retain is None or not isinstance(case.unlearned[method], Recipe)
            else [list(p) if not isinstance(p, str) else p for p in case.retain],
            "base": _model_key(case.base, "base"),
            "method": method,
            "unlearned": _model_key(case.unlearned[method], method),
            "settings": settings.key(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


def _check_case(case: object, index: int, seen: set[str], in_process: bool) -> SuiteCase:
    if not isinstance(case, SuiteCase):
        raise ConfigError(f"cases[{index}] is a {type(case).__name__}, not a SuiteCase")
    if not isinstance(case.concept, str) or not case.concept.strip():
        raise ConfigError(f"cases[{index}].concept must be a non-empty string")
    if case.concept in seen:
        raise ConfigError(f"concept {case.concept!r} appears in two cases")
    seen.add(case.concept)
    where = f"case {case.concept!r}"
    forget = _pairs(case.forget, f"{where}: forget")
    unrelated = None if case.unrelated is None else _pairs(case.unrelated, f"{where}: unrelated")
    if not isinstance(case.unlearned, Mapping) or not case.unlearned:
        raise ConfigError(f"{where}: unlearned must be a non-empty dict of method -> model")
    from unlearnlens.trainers import get_method

    for method, spec in case.unlearned.items():
        if not isinstance(method, str) or not _METHOD_NAME.match(method) or method == "base":
            raise ConfigError(
                f"{where}: method name {method!r} must be letters, digits, '_', '-' or '.' "
                "(and not 'base')"
            )
        _model_key(spec, f"{where}, method {method!r}")
        if isinstance(spec, Recipe):
            get_method(spec.method)  # an unknown method fails before any work
        if _is_model(spec) and not in_process:
            raise ConfigError(
                f"{where}, method {method!r}: an in-memory model runs only in-process; save it "
                "(ul.save_model or ul.save_hf) and give its folder to run on an executor"
            )
    _model_key(case.base, f"{where}: base")
    if _is_model(case.base) and not in_process:
        raise ConfigError(
            f"{where}: an in-memory base model runs only in-process; save it and give its folder"
        )
    return SuiteCase(
        concept=case.concept,
        forget=forget,
        unlearned=dict(case.unlearned),
        base=case.base,
        unrelated=unrelated,
        retain=None if case.retain is None else list(case.retain),
    )


# ------------------------------------------------------------------------------ the worker

_BASE_CACHE: dict[str, HookedTransformer] = {}


def _load(path: str | Path, device: str | None) -> HookedTransformer:
    from unlearnlens.cli import load_any

    return load_any(path, device=device)


def _base_model(spec: str | Path | HookedTransformer, device: str | None) -> HookedTransformer:
    """The base model; a folder is loaded once per worker process (the last one is kept)."""
    if _is_model(spec):
        return spec  # type: ignore[return-value]
    key = f"{Path(spec).resolve()}|{device}"
    if key not in _BASE_CACHE:
        _BASE_CACHE.clear()
        _BASE_CACHE[key] = _load(spec, device)  # type: ignore[arg-type]
    return _BASE_CACHE[key]


def _run_case(job: _CaseJob) -> list[dict[str, Any]]:
    """Runs (or skips, when finished) every method of one case; returns what it did."""
    import torch

    from unlearnlens.study import dissect
    from unlearnlens.trainers import unlearn

    threads = torch.get_num_threads()
    if job.settings.threads is not None:
        torch.set_num_threads(job.settings.threads)
    try:
        case, s = job.case, job.settings
        done = []
        base = None
        for method, spec in case.unlearned.items():
            folder = case_folder(job.out, case.concept, method)
            unit = read_unit(folder)
            if unit is not None and unit[1].get("fingerprint") == job.fingerprints[method]:
                done.append({"concept": case.concept, "method": method, "skipped": True})
                continue
            if unit is not None:
                warnings.warn(
                    f"{folder} holds a study made with other data, models or settings; "
                    "running it again",
                    stacklevel=2,
                )
            started = time.perf_counter()
            if base is None:
                base = _base_model(case.base, s.device)
            if isinstance(spec, Recipe):
                model = unlearn(
                    base,
                    list(case.forget),
                    retain=None if case.retain is None else list(case.retain),
                    method=spec.method,
                    progress=False,
                    **spec.options,
                ).model
            elif _is_model(spec):
                model = spec
            else:
                model = _load(spec, s.device)
            study = dissect(
                base,
                {method: model},
                list(case.forget),
                unrelated=None if case.unrelated is None else list(case.unrelated),
                capability=None if s.capability is None else list(s.capability),
                window=s.window,
                analyses=s.analyses,
                metric=s.metric,
                eval_max_new_tokens=s.eval_max_new_tokens,
                batch_size=s.batch_size,
                progress=False,
            )
            del model
            seconds = time.perf_counter() - started
            marker = {
                "concept": case.concept,
                "method": method,
                "fingerprint": job.fingerprints[method],
                "seconds": seconds,
            }
            write_unit(folder, study, marker)
            done.append(
                {"concept": case.concept, "method": method, "skipped": False, "seconds": seconds}
            )
        return done
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------------------ run_suite


def run_suite(
    cases: Sequence[SuiteCase],
    *,
    out: str | Path,
    analyses: Sequence[str] | str | None = None,
    window: int = 5,
    metric: str = "krs",
    capability: Sequence[str] | Sequence[Pair] | None = None,
    eval_max_new_tokens: int = 16,
    batch_size: int | None = None,
    device: str | None = None,
    threads: int | None = None,
    executor: Executor | None = None,
    progress: bool | None = None,
) -> SuiteResult:
    """Runs :func:`unlearnlens.dissect` for every concept and method; resumable.

    Every case is checked (prompts, method names, that every folder exists, recipes name
    registered methods) before any work. Each (concept, method) study is saved under ``out``
    as soon as it finishes; a re-run with the same ``out`` skips the finished ones. A study
    saved with different data, models or settings is run again (with a warning).

    Args:
        cases: The concepts, each with its base and unlearned models.
        out: The suite folder (created if missing).
        analyses: Names from :data:`unlearnlens.ANALYSES` to run (default all).
        window: Layers patched or restored together (a positive odd number; the paper's 5).
        metric: The sweeps' metric, by name (``"krs"``).
        capability: Probe texts or pairs for the behaviour test, shared by every case.
        eval_max_new_tokens: Longest generation of the behaviour test's drift scores.
        batch_size: Most rows per forward pass.
        device: Where checkpoint folders are loaded (default: where they were saved, else
            the CPU / TransformerLens's default).
        threads: torch threads in each worker while it runs a case (default: unchanged).
        executor: Runs cases in parallel: any ``concurrent.futures.Executor``-like object
            (``submit(fn, *args)`` -> future with ``result()``), e.g.
            :class:`unlearnlens.ray_executor.RayExecutor` or a ``submitit`` executor. Cases
            then hold only checkpoint folders and recipes. Default: in-process, in order.
        progress: Show a progress bar over the cases (None: the library-wide switch).

    Returns:
        The :class:`~unlearnlens.SuiteResult`, read back from ``out``.

    Raises:
        ConfigError: A malformed case, a duplicate concept, an unknown analysis or method,
            an in-memory model with an executor.
        CheckpointError: A model folder that does not exist.
        LayerError: A bad window.
    """
    from unlearnlens.metrics import resolve_metric
    from unlearnlens.study import check_analyses

    chosen = check_analyses(analyses)
    window = check_window(window)
    if not isinstance(metric, str):
        raise ConfigError(f"metric must be a metric name for a suite, got {type(metric).__name__}")
    resolve_metric(metric)
    check_int(eval_max_new_tokens, "eval_max_new_tokens", minimum=1)
    if batch_size is not None:
        check_int(batch_size, "batch_size", minimum=1)
    if threads is not None:
        check_int(threads, "threads", minimum=1)
    if executor is not None and not callable(getattr(executor, "submit", None)):
        raise ConfigError("executor must have a submit(fn, *args) method returning a future")
    if isinstance(cases, SuiteCase) or not isinstance(cases, Sequence) or not cases:
        raise ConfigError("cases must be a non-empty list of SuiteCase")
    seen: set[str] = set()
    checked = [_check_case(c, i, seen, executor is None) for i, c in enumerate(cases)]
    settings = _Settings(
        analyses=chosen,
        window=window,
        metric=metric,
        batch_size=batch_size,
        eval_max_new_tokens=eval_max_new_tokens,
        capability=None if capability is None else tuple(capability),
        device=None if device is None else str(device),
        threads=threads,
    )
    out = Path(out)
    meta = {**settings.key(), "n_cases": len(checked)}
    write_suite_file(
        out, meta, [{"concept": c.concept, "methods": list(c.unlearned)} for c in checked]
    )
    jobs = [
        _CaseJob(
            case=c,
            out=str(out),
            settings=settings,
            fingerprints={m: _fingerprint(c, m, settings) for m in c.unlearned},
        )
        for c in checked
    ]
    shown = progress_enabled(progress)
    with bar(total=len(jobs), desc="suite", unit="case", progress=shown) as pbar:
        if executor is None:
            try:
                for job in jobs:
                    pbar.set_postfix_str(job.case.concept)
                    _run_case(job)
                    pbar.update(1)
            finally:  # in-process, the caller's memory: keep no base model around
                _BASE_CACHE.clear()
        else:
            futures = [executor.submit(_run_case, job) for job in jobs]
            for future in futures:
                future.result()
                pbar.update(1)
    return SuiteResult.load(out)

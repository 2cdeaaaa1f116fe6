"""The ``unlearnlens`` command: ``demo``, ``dissect``, ``unlearn`` and ``suite``.

* ``unlearnlens demo [--out DIR] [--quick] [--threads N] [--no-progress]`` runs the whole
  study on the embedded toy world: trains (or loads from the cache) the base model, unlearns
  one concept with ``grad_diff``, ``npo``, ``dpo`` and ``rmu`` (each with its defaults),
  dissects the four unlearned models (window of 3 layers on the 6-layer toy model), writes
  the report and prints the summary. It runs torch on one thread by default. It then runs
  a small suite (``--suite-concepts N``, default 2, none with ``--quick``): the forget
  concept with the same four models, and ``N - 1`` more concepts unlearned the same way,
  averaged over concepts and reported in ``OUT/suite/report/``. The full toy suite
  (8 concepts) is ``unlearnlens suite``.
* ``unlearnlens dissect --base DIR --unlearned NAME=DIR [NAME=DIR ...] --concepts FILE.json
  [--concept NAME] --out DIR`` runs the study on local checkpoints and one ConceptVectors
  concept: its questions in the study's format, answered by the base model's greedy
  continuation, and its ``unrelated_QA`` questions for side effects. ``--pairs FILE
  [--pairs-format pairs|tofu|wmdp]`` instead of ``--concepts`` takes the prompts and answers
  from a file (:mod:`unlearnlens.loaders`), used as given.
* ``unlearnlens suite --out DIR`` runs many concepts x methods, resumably (see
  :mod:`unlearnlens._cli_suite`): the toy suite by default, or ``--cases FILE.json``.
* ``unlearnlens unlearn --model DIR --forget FILE [--retain FILE] --method NAME --out DIR
  [--format auto|hf|unlearnlens]`` unlearns with a registered method and saves the model as a
  Hugging Face checkpoint (:func:`unlearnlens.save_hf`) when it fits a supported class exactly,
  else with :func:`unlearnlens.save_model`.
* ``unlearnlens audit --base DIR --unlearned NAME=DIR [...] (--forget FILE | --toy) --out
  FILE.json`` runs :func:`unlearnlens.audit` (recovery attacks and memorisation metrics),
  prints the table and saves the :class:`~unlearnlens.AuditResult`. ``--toy`` takes the
  forget, retain, holdout, paraphrase and wrong-answer sets of the demo's toy world.

A model directory is either one written by :func:`unlearnlens.save_model` (it holds
``unlearnlens_config.json``) or a Hugging Face checkpoint (``config.json`` + weights), loaded
with :func:`unlearnlens.load_hf`. Nothing is downloaded.

Bad input ends the command with exit status 2 and one line on stderr,
``unlearnlens: error: ...``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from unlearnlens._checks import check_batch_size, check_device, check_float, check_int
from unlearnlens._storage import check_writable, read_json
from unlearnlens.errors import CheckpointError, ConfigError, FileFormatError, UnlearnLensError

if TYPE_CHECKING:
    import pandas as pd
    from transformer_lens import HookedTransformer

__all__ = ["DEMO_METHODS", "load_any", "main", "read_train_file"]

DEMO_METHODS = ("grad_diff", "npo", "dpo", "rmu")
"""The unlearning methods the demo compares, each with its own defaults."""

_DTYPES = ("float32", "bfloat16", "float16")


class _UsageError(Exception):
    """A command-line usage error, reported as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _UsageError(message)


# ------------------------------------------------------------------------------ inputs


def load_any(
    directory: str | Path, *, device: str | None = None, dtype: str | None = None
) -> HookedTransformer:
    """Loads a model saved by :func:`unlearnlens.save_model` or a Hugging Face checkpoint.

    Args:
        directory: The model's folder.
        device: Where to put it (default: where it was saved, else the CPU for saved
            unlearnlens models; TransformerLens's default for Hugging Face checkpoints).
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; ``None`` keeps a saved model's
            dtype and loads Hugging Face checkpoints in float32.

    Raises:
        CheckpointError: The folder does not exist or holds no model.
    """
    import torch

    from unlearnlens.errors import CheckpointError
    from unlearnlens.models import load_hf, load_model

    path = Path(directory)
    if not path.is_dir():
        raise CheckpointError(f"no model directory at {str(path)!r}")
    torch_dtype = None if dtype is None else getattr(torch, dtype)
    if (path / "unlearnlens_config.json").is_file():
        model = load_model(path, device=device)
        if torch_dtype is not None and model.cfg.dtype != torch_dtype:
            model = model.to(torch_dtype, print_details=False)
        return model
    if not (path / "config.json").is_file():
        raise CheckpointError(
            f"{str(path)!r} holds neither a model saved by unlearnlens (unlearnlens_config.json) "
            "nor a Hugging Face checkpoint (config.json)"
        )
    return load_hf(path, device=device, dtype=torch_dtype or torch.float32)


def read_train_file(path: str | Path) -> list[Any]:
    """Reads a forget or retain file for ``unlearnlens unlearn``.

    A ``.json`` file holds a list of ``[question, answer]`` pairs or a list of texts. Any
    other file is plain text: paragraphs separated by blank lines are one text each; a file
    without blank lines has one text per line.

    Raises:
        FileFormatError: The file does not exist, is not UTF-8 text, or is not valid JSON.
        ConfigError: The file holds nothing, or JSON of another shape.
    """
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"training file {str(path)!r} does not exist")
    if path.suffix.lower() == ".json":
        data = read_json(path, what="training file")
        if not isinstance(data, list) or not data:
            raise ConfigError(
                f"{path} must hold a non-empty JSON list of [question, answer] pairs or texts"
            )
        if all(isinstance(x, str) for x in data):
            return list(data)
        pairs = []
        for i, item in enumerate(data):
            if not (
                isinstance(item, list) and len(item) == 2 and all(isinstance(s, str) for s in item)
            ):
                raise ConfigError(
                    f"{path}: item {i} is not a [question, answer] pair of strings: "
                    f"{repr(item)[:80]}"
                )
            pairs.append((item[0], item[1]))
        return pairs
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise FileFormatError(f"cannot read training file {str(path)!r}: {exc}") from None
    if any(not line.strip() for line in text.strip().splitlines()):
        chunks = [" ".join(p.split("\n")).strip() for p in text.split("\n\n")]
    else:
        chunks = [line.strip() for line in text.splitlines()]
    texts = [c for c in chunks if c]
    if not texts:
        raise ConfigError(f"{path} holds no text")
    return texts


def _parse_unlearned(items: list[str]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for item in items:
        name, sep, directory = item.partition("=")
        if not sep or not name.strip() or not directory.strip():
            raise ConfigError(f"--unlearned takes NAME=DIR, got {item!r}")
        name = name.strip()
        if name in out:
            raise ConfigError(f"--unlearned names {name!r} twice")
        out[name] = Path(directory.strip())
    return out


# ------------------------------------------------------------------------------ printing


def format_summary(summary: pd.DataFrame) -> str:
    """The study summary as a terminal table: sweeps as rows, methods as columns.

    Each cell is ``peak (Lk)``: the highest score over layers and the layer where it is
    reached.
    """
    if summary.empty:
        return "(no sweeps ran)"
    cells = summary.apply(lambda r: f"{r['peak']:.3f} (L{int(r['peak_layer'])})", axis=1)
    table = cells.unstack("method")
    order = [a for a in dict.fromkeys(summary.index.get_level_values("analysis"))]
    methods = list(dict.fromkeys(summary.index.get_level_values("method")))
    return table.loc[order, methods].to_string()


def _print_study(study: Any, index: Path, started: float) -> None:
    print()
    print("Peak KRS by sweep (layer of the peak); 0 = unlearned model, 1 = base model recovered:")
    print(format_summary(study.summary()))
    if study.evaluation is not None:
        cols = [
            c
            for c in study.evaluation.table.columns
            if c.endswith(("/accuracy", "/rouge_l", "/perplexity"))
        ]
        print()
        print("Behaviour:")
        print(study.evaluation.table[cols].to_string(float_format=lambda v: f"{v:.3f}"))
    print()
    print(f"finished in {time.perf_counter() - started:.1f} s")
    print(f"report: {index}")


# ------------------------------------------------------------------------------ commands


def _demo(args: argparse.Namespace) -> int:
    import torch

    check_int(args.threads, "--threads", minimum=1)
    check_writable(args.out, what="--out")
    if args.suite_concepts is None:
        # two concepts (about 45 s more on two cores) keep the demo within its budget; the
        # full toy suite is `unlearnlens suite` (8 concepts)
        args.suite_concepts = 0 if args.quick else 2
    check_int(args.suite_concepts, "--suite-concepts", minimum=0)
    # The toy models are small (width 128): extra intra-op threads barely speed them up, and on
    # a busy machine they slow every small operation down many times over.
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run_demo(args)
    finally:
        torch.set_num_threads(threads)


def quick_base(world: Any, progress: bool) -> HookedTransformer:
    """The ``--quick`` toy base model: two narrow layers trained for 40 steps.

    ``demo --quick`` and ``suite --quick`` share it so both finish in seconds on a CPU.
    """
    from unlearnlens.toy import train_base

    return train_base(
        world,
        steps=40,
        n_layers=2,
        d_model=32,
        d_head=8,
        n_heads=4,
        n_key_value_heads=2,
        d_mlp=64,
        progress=progress,
    )


def _run_demo(args: argparse.Namespace) -> int:
    import torch

    from unlearnlens.study import dissect
    from unlearnlens.toy import make_world, train_base
    from unlearnlens.trainers import unlearn

    started = time.perf_counter()
    progress = not args.no_progress
    torch.manual_seed(0)
    if args.quick:
        world = make_world(0, n_concepts=6, n_relations=2, n_capability=8)
        base = quick_base(world, progress)
        steps: int | None = 2
        analyses: tuple[str, ...] | None = (
            "behaviour",
            "patch_mlp",
            "restore_w_out",
            "coefficients",
            "logit_lens",
        )
        unrelated, capability, window = world.unrelated[:8], world.capability_pairs[:4], 1
    else:
        world = make_world(0)
        base = train_base(world, progress=progress)
        steps, analyses, window = None, None, 3
        unrelated, capability = world.unrelated[::6], world.capability_pairs
    models = {}
    for method in DEMO_METHODS:
        print(f"unlearning {', '.join(world.forget_concepts)} with {method} ...", file=sys.stderr)
        run = unlearn(
            base, world.forget, retain=world.retain, method=method, steps=steps, progress=progress
        )
        models[method] = run.model
    study = dissect(
        base,
        models,
        world.forget,
        unrelated=unrelated,
        capability=capability,
        window=window,
        analyses=analyses,
        eval_max_new_tokens=8,
        progress=progress,
    )
    index = study.report(args.out)
    if args.suite_concepts:
        _demo_suite(args, world, base, models, steps, window, progress)
    _print_study(study, index, started)
    return 0


def _demo_suite(
    args: argparse.Namespace,
    world: Any,
    base: HookedTransformer,
    models: dict[str, HookedTransformer],
    steps: int | None,
    window: int,
    progress: bool,
) -> None:
    """The demo's suite: its own unlearned models for the forget concept, plus more concepts.

    The first case reuses the models the demo just dissected; every further concept is
    unlearned by the suite with the same methods (see :func:`unlearnlens.toy.toy_suite`).
    """
    import dataclasses

    from unlearnlens._cli_suite import print_curves
    from unlearnlens.suite import run_suite
    from unlearnlens.toy import toy_suite

    cases = toy_suite(
        world,
        base,
        n_concepts=args.suite_concepts,
        methods=list(models),
        options={} if steps is None else {"steps": steps},
    )
    cases[0] = dataclasses.replace(cases[0], unlearned=dict(models))
    print(f"suite: {len(cases)} concepts x {len(models)} methods ...", file=sys.stderr)
    suite = run_suite(
        cases,
        out=Path(args.out) / "suite",
        analyses=("patch_mlp", "patch_attn", "patch_mlp_attn", "restore_w_out"),
        window=window,
        progress=progress,
    )
    suite_index = suite.report(Path(args.out) / "suite" / "report")
    print()
    print_curves(suite)
    print(f"suite report: {suite_index}")


def _dissect(args: argparse.Namespace) -> int:
    from unlearnlens._checks import check_window
    from unlearnlens.study import check_analyses, dissect

    started = time.perf_counter()
    analyses = check_analyses(args.analyses)
    check_window(args.window)
    check_int(args.max_new_tokens, "--max-new-tokens", minimum=1)
    check_batch_size(args.batch_size, "--batch-size")
    check_device(args.device, "--device")
    check_device(args.base_device, "--base-device")
    paths = _parse_unlearned(args.unlearned)
    for label, p in [
        ("--base", Path(args.base)),
        *[(f"--unlearned {n}", p) for n, p in paths.items()],
    ]:
        if not p.is_dir():
            raise CheckpointError(f"{label}: no model directory at {str(p)!r}")
    for name, p in paths.items():
        if Path(p).resolve() == Path(args.base).resolve():
            raise ConfigError(
                f"--unlearned {name}={p} is the --base folder itself; pass the unlearned model"
            )
    check_writable(args.out, what="--out")
    if (args.concepts is None) == (args.pairs is None):
        raise ConfigError("give exactly one of --concepts (ConceptVectors) and --pairs FILE")
    if args.pairs is not None:
        pairs = read_prompt_file(args.pairs, args.pairs_format)
        print(f"prompts: {len(pairs)} pairs from {args.pairs}", file=sys.stderr)
        base, models = _load_models(args, paths)
        prompts, unrelated = pairs, None
    else:
        concept = _chosen_concept(args)
        base, models = _load_models(args, paths)
        prompts, unrelated = _concept_prompts(base, concept, args.max_new_tokens, analyses)
    study = dissect(
        base,
        models,
        prompts,
        unrelated=unrelated,
        window=args.window,
        analyses=analyses,
        batch_size=args.batch_size,
        progress=not args.no_progress,
    )
    index = study.report(args.out)
    _print_study(study, index, started)
    return 0


def _load_models(
    args: argparse.Namespace, paths: dict[str, Path]
) -> tuple[HookedTransformer, dict[str, HookedTransformer]]:
    """The ``--base`` model (on ``--base-device`` if given) and the ``--unlearned`` ones."""
    base = load_any(args.base, device=args.base_device or args.device, dtype=args.dtype)
    models = {n: load_any(p, device=args.device, dtype=args.dtype) for n, p in paths.items()}
    return base, models


def _chosen_concept(args: argparse.Namespace) -> Any:
    """The ``--concept`` entry of the ``--concepts`` file (default its first), with questions."""
    from unlearnlens.conceptvectors import load_conceptvectors

    concepts = load_conceptvectors(args.concepts)
    if args.concept is None:
        concept = concepts[0]
    else:
        matches = [c for c in concepts if c.concept.lower() == args.concept.lower()]
        if not matches:
            names = ", ".join(repr(c.concept) for c in concepts[:10])
            raise ConfigError(f"no concept {args.concept!r} in {args.concepts}; it has {names}")
        concept = matches[0]
    if not concept.qa:
        raise ConfigError(f"concept {concept.concept!r} has no QA questions")
    print(f"concept: {concept.concept} ({len(concept.qa)} questions)", file=sys.stderr)
    return concept


def _concept_prompts(
    base: HookedTransformer, concept: Any, max_new_tokens: int, analyses: tuple[str, ...]
) -> tuple[Any, Any]:
    """The concept's questions and (for ``behaviour``) its unrelated ones, answered by ``base``."""
    from unlearnlens.prompts import PromptSet, format_question

    prompts = PromptSet.from_model_answers(
        base, [format_question(q) for q in concept.qa], max_new_tokens=max_new_tokens
    )
    unrelated = None
    if concept.unrelated_qa and "behaviour" in analyses:
        unrelated = PromptSet.from_model_answers(
            base,
            [format_question(q) for q in concept.unrelated_qa],
            max_new_tokens=max_new_tokens,
        )
    return prompts, unrelated


def read_prompt_file(path: str | Path, fmt: str) -> list[tuple[str, str]]:
    """Reads ``(prompt, answer)`` pairs in one of the :mod:`unlearnlens.loaders` formats."""
    from unlearnlens.loaders import load_pairs, load_tofu, load_wmdp

    readers = {"pairs": load_pairs, "tofu": load_tofu, "wmdp": load_wmdp}
    if fmt not in readers:
        raise ConfigError(f"unknown prompt file format {fmt!r}; use one of {sorted(readers)}")
    return readers[fmt](path)


def _save_unlearned(model: HookedTransformer, out: str, fmt: str) -> Path:
    """Saves as a Hugging Face checkpoint (``hf``), an unlearnlens folder, or ``auto``.

    ``auto`` writes the Hugging Face format when the model fits a supported class exactly and
    the unlearnlens format otherwise (saying why on stderr).
    """
    from unlearnlens.errors import UnsupportedArchitectureError
    from unlearnlens.export import save_hf
    from unlearnlens.models import save_model

    if fmt == "unlearnlens":
        return save_model(model, out)
    try:
        return save_hf(model, out)
    except UnsupportedArchitectureError as e:
        if fmt == "hf":
            raise
        print(
            f"not a Hugging Face checkpoint ({e}); saving in the unlearnlens format",
            file=sys.stderr,
        )
        return save_model(model, out)


def _unlearn(args: argparse.Namespace) -> int:
    from unlearnlens.export import hf_trainable
    from unlearnlens.trainers import get_method, unlearn

    get_method(args.method)  # an unknown method fails before anything loads
    if args.steps is not None:
        check_int(args.steps, "--steps", minimum=1)
    if args.lr is not None:
        check_float(args.lr, "--lr", positive=True)
    check_device(args.device, "--device")
    check_writable(args.out, what="--out")
    forget = read_train_file(args.forget)
    retain = None if args.retain is None else read_train_file(args.retain)
    model = load_any(args.model, device=args.device, dtype=args.dtype)
    params = None
    if args.format != "unlearnlens":
        # a model that fits a Hugging Face class keeps fitting it: parameters the class lacks
        # (TransformerLens's extra biases, zero after load_hf) are not trained
        params = hf_trainable(model, required=args.format == "hf")
    run = unlearn(
        model,
        forget,
        retain=retain,
        method=args.method,
        steps=args.steps,
        lr=args.lr,
        params=params,
        progress=not args.no_progress,
    )
    out = _save_unlearned(run.model, args.out, args.format)
    final = ", ".join(f"{k} {v:.3f}" for k, v in run.final.items())
    print(f"{args.method}: {run.config.steps} steps; {final}")
    print(f"saved: {out}")
    return 0


def _audit(args: argparse.Namespace) -> int:
    from unlearnlens.audit import audit, get_probe

    probes = None
    if args.probes is not None:
        probes = [p.strip() for p in args.probes.split(",") if p.strip()]
        for p in probes:
            get_probe(p)  # an unknown probe fails before anything loads
    if (args.forget is None) == (not args.toy):
        raise ConfigError("give exactly one of --forget FILE and --toy")
    paths = _parse_unlearned(args.unlearned)
    if args.toy:
        from unlearnlens.audit.toy import toy_audit_sets
        from unlearnlens.toy import make_world

        sets = toy_audit_sets(make_world(0))
    else:
        sets = {"forget": _pairs_file(args.forget, "--forget")}
    for key in ("retain", "holdout", "paraphrases"):
        path = getattr(args, key)
        if path is not None:
            sets[key] = _pairs_file(path, f"--{key}")
    base = load_any(args.base, device=args.device, dtype=args.dtype)
    models = {n: load_any(p, device=args.device, dtype=args.dtype) for n, p in paths.items()}
    result = audit(
        base,
        models,
        probes=probes,
        metric=args.metric,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        **sets,
    )
    out = result.save(args.out)
    frame = result.to_dataframe().drop(columns="metric")
    print(frame.to_string(float_format=lambda v: f"{v:.3f}"))
    if result.meta.get("skipped"):
        print("skipped: " + ", ".join(f"{k} ({v})" for k, v in result.meta["skipped"].items()))
    print(f"saved: {out}")
    return 0


def _pairs_file(path: str, flag: str) -> list[tuple[str, str]]:
    data = read_train_file(path)
    if not all(isinstance(x, tuple) for x in data):
        raise ConfigError(f"{flag} {path} must hold a JSON list of [question, answer] pairs")
    return data


# ------------------------------------------------------------------------------ parser


def _parser() -> _Parser:
    parser = _Parser(
        prog="unlearnlens",
        description="Has an unlearned language model forgotten, or does it only hide what it "
        "knows?",
    )
    sub = parser.add_subparsers(
        dest="command", metavar="{demo,dissect,unlearn,suite,audit}", parser_class=_Parser
    )

    demo = sub.add_parser("demo", help="run the whole study on the embedded toy world")
    demo.add_argument("--out", default="reports/demo", help="report folder (default reports/demo)")
    demo.add_argument(
        "--quick", action="store_true", help="a tiny world and model, few steps (for tests)"
    )
    demo.add_argument(
        "--threads", type=int, default=1, help="torch threads for the toy models (default 1)"
    )
    demo.add_argument(
        "--suite-concepts",
        type=int,
        help="concepts in the demo's suite (the forget concept first, with the demo's own models; "
        "0: no suite; default 2, with --quick 0)",
    )
    demo.add_argument("--no-progress", action="store_true", help="hide progress bars")

    dis = sub.add_parser(
        "dissect", help="run the study on local checkpoints and a ConceptVectors concept"
    )
    dis.add_argument("--base", required=True, help="base model folder")
    dis.add_argument(
        "--unlearned", required=True, nargs="+", metavar="NAME=DIR", help="unlearned model folders"
    )
    dis.add_argument("--concepts", help="ConceptVectors JSON file (or give --pairs)")
    dis.add_argument("--pairs", help="a file of (prompt, answer) pairs, used as given")
    dis.add_argument(
        "--pairs-format",
        choices=("pairs", "tofu", "wmdp"),
        default="pairs",
        help="format of --pairs: JSONL/JSON/CSV pairs (default), TOFU, WMDP",
    )
    dis.add_argument("--concept", help="concept name (default: the file's first entry)")
    dis.add_argument("--out", required=True, help="report folder")
    dis.add_argument("--device", help="cpu, cuda, cuda:1, ...")
    dis.add_argument(
        "--base-device",
        help="where the base model lives (default: --device); cpu keeps one model on the GPU: "
        "the sweeps run the base block by block there",
    )
    dis.add_argument(
        "--dtype", choices=_DTYPES, help="parameter dtype (default float32 for HF checkpoints)"
    )
    dis.add_argument(
        "--window", type=int, default=5, help="layers patched/restored together (default 5)"
    )
    dis.add_argument("--analyses", help="comma-separated subset of the analyses (default all)")
    dis.add_argument(
        "--max-new-tokens", type=int, default=30, help="longest greedy answer (default 30)"
    )
    dis.add_argument("--batch-size", type=int, help="most rows per forward pass")
    dis.add_argument("--no-progress", action="store_true", help="hide progress bars")

    unl = sub.add_parser("unlearn", help="unlearn with a registered method and save the model")
    unl.add_argument("--model", required=True, help="model folder")
    unl.add_argument(
        "--forget",
        required=True,
        help="JSON list of [question, answer] pairs or texts, or a text file",
    )
    unl.add_argument("--retain", help="same formats as --forget")
    unl.add_argument(
        "--method",
        required=True,
        help="ga, grad_diff, npo, npo_kl, npo_rt, simnpo, dpo, dpo_retain, rmu, idk, ...",
    )
    unl.add_argument("--out", required=True, help="folder for the unlearned model")
    unl.add_argument(
        "--format",
        choices=("auto", "hf", "unlearnlens"),
        default="auto",
        help="hf: a Hugging Face checkpoint (for lm-eval, open-unlearning); unlearnlens: "
        "save_model's format; auto (default): hf when the model fits a Hugging Face class "
        "exactly, else unlearnlens",
    )
    unl.add_argument("--steps", type=int, help="optimizer steps (default: the method's)")
    unl.add_argument("--lr", type=float, help="learning rate (default: the method's)")
    unl.add_argument("--device", help="cpu, cuda, ...")
    unl.add_argument("--dtype", choices=_DTYPES, help="parameter dtype")
    unl.add_argument("--no-progress", action="store_true", help="hide progress bars")
    from unlearnlens._cli_suite import add_suite_parser

    add_suite_parser(sub)

    aud = sub.add_parser("audit", help="recovery attacks and memorisation metrics side by side")
    aud.add_argument("--base", required=True, help="base model folder")
    aud.add_argument(
        "--unlearned", required=True, nargs="+", metavar="NAME=DIR", help="unlearned model folders"
    )
    aud.add_argument("--forget", help="JSON list of [question, answer] pairs to audit")
    aud.add_argument(
        "--toy",
        action="store_true",
        help="the demo's toy world sets (forget, retain, holdout, ...)",
    )
    aud.add_argument("--retain", help="JSON pairs: facts to keep (in-context shots, relearning)")
    aud.add_argument("--holdout", help="JSON pairs neither model was trained on (membership AUCs)")
    aud.add_argument("--paraphrases", help="JSON pairs: the forget facts asked in other words")
    aud.add_argument("--probes", help="comma-separated probe names (default: all that can run)")
    aud.add_argument(
        "--metric",
        default="accuracy",
        choices=("accuracy", "answer_logprob", "answer_prob"),
        help="how attack probes score knowledge (default accuracy)",
    )
    aud.add_argument("--out", required=True, help="JSON file for the AuditResult")
    aud.add_argument("--device", help="cpu, cuda, ...")
    aud.add_argument("--dtype", choices=_DTYPES, help="parameter dtype")
    aud.add_argument("--batch-size", type=int, help="most prompts per forward pass")
    aud.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return parser


def _suite(args: argparse.Namespace) -> int:
    from unlearnlens._cli_suite import run_suite_command

    return run_suite_command(args)


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit status (0 on success, 2 on bad input)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        run = {
            "demo": _demo,
            "dissect": _dissect,
            "unlearn": _unlearn,
            "suite": _suite,
            "audit": _audit,
        }[args.command]
        return run(args)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except (_UsageError, UnlearnLensError, ValueError, OSError, ImportError) as e:
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"unlearnlens: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unlearnlens: interrupted", file=sys.stderr)
        return 130

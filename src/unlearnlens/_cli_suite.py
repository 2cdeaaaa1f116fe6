"""``unlearnlens suite``: many concepts x methods, on the toy world or on your checkpoints.

* ``unlearnlens suite --out DIR`` runs the toy suite: ``--concepts N`` concepts of the toy
  world (default 8), each unlearned from the cached toy base model with every ``--methods``
  method (default the demo's), dissected, saved under ``DIR``, then averaged and reported
  (``DIR/report/index.html``). ``--quick`` uses a tiny world and model.
* ``unlearnlens suite --cases FILE.json --out DIR`` runs your cases: a JSON list of
  ``{"concept": NAME, "pairs": FILE, "format": "pairs"|"tofu"|"wmdp", "base": DIR,
  "unlearned": {METHOD: DIR, ...}, "unrelated": FILE}`` (``base`` may instead be given once
  as ``--base DIR``; relative paths are relative to the cases file).

Both resume: a second run with the same ``--out`` skips finished studies. ``--executor ray``
runs the cases as Ray tasks (``--ray-address`` to join a cluster).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from unlearnlens._checks import check_batch_size, check_device, check_int, check_window
from unlearnlens.errors import ConfigError

__all__ = ["add_suite_parser", "run_suite_command"]

_PAPER_SWEEPS = "patch_mlp,patch_attn,patch_mlp_attn,restore_w_out"


def add_suite_parser(sub: Any) -> None:
    """Adds the ``suite`` subcommand to the CLI's subparsers."""
    p = sub.add_parser("suite", help="many concepts x methods, resumable, averaged")
    p.add_argument("--out", required=True, help="suite folder (re-runs resume there)")
    p.add_argument("--cases", help="JSON list of cases (default: the toy suite)")
    p.add_argument("--base", help="base model folder for cases that name none")
    p.add_argument("--concepts", type=int, default=8, help="toy suite: concepts (default 8)")
    p.add_argument("--methods", help="toy suite: comma-separated methods (default the demo's)")
    p.add_argument("--steps", type=int, help="toy suite: unlearning steps (default the method's)")
    p.add_argument("--quick", action="store_true", help="toy suite: tiny world and model")
    p.add_argument("--analyses", default=_PAPER_SWEEPS, help=f"default {_PAPER_SWEEPS}")
    p.add_argument("--window", type=int, help="layers patched together (toy 3, else 5)")
    p.add_argument("--batch-size", type=int, help="most rows per forward pass")
    p.add_argument("--device", help="cpu, cuda, ...")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--executor", choices=("inprocess", "ray"), default="inprocess")
    p.add_argument("--ray-address", help="Ray cluster address (default: a local Ray)")
    p.add_argument("--num-cpus", type=float, default=1, help="CPUs per Ray task (default 1)")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per Ray task (default 0)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _toy_cases(args: argparse.Namespace, executor: bool) -> tuple[list[Any], int]:
    from unlearnlens.cli import quick_base
    from unlearnlens.models import save_model
    from unlearnlens.toy import make_world, toy_suite, train_base

    progress = not args.no_progress
    if args.quick:
        world = make_world(0, n_concepts=10, n_relations=2, n_capability=8)
        base = quick_base(world, progress)
    else:
        world = make_world(0)
        base = train_base(world, progress=progress)
    if executor:  # workers load the base model from a folder
        base = save_model(base, Path(args.out) / "base")
    methods = None if args.methods is None else [m.strip() for m in args.methods.split(",")]
    options = {} if args.steps is None else {"steps": args.steps}
    cases = toy_suite(world, base, n_concepts=args.concepts, methods=methods, options=options)
    return cases, 1 if args.quick else 3


def _file_cases(args: argparse.Namespace) -> list[Any]:
    from unlearnlens._storage import read_json
    from unlearnlens.cli import read_prompt_file
    from unlearnlens.suite import SuiteCase

    path = Path(args.cases)
    data = read_json(path, what="cases file")
    if not isinstance(data, list) or not data:
        raise ConfigError(f"{path}: the cases file must hold a non-empty JSON list")
    here = path.parent

    def rel(p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else here / q

    cases = []
    for i, raw in enumerate(data):
        where = f"{path}, case {i}"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected an object")
        missing = [k for k in ("concept", "pairs", "unlearned") if k not in raw]
        if missing:
            raise ConfigError(f"{where}: missing {missing}")
        base = raw.get("base", args.base)
        if base is None:
            raise ConfigError(f"{where}: no base model (give 'base' or --base)")
        fmt = raw.get("format", "pairs")
        unlearned = raw["unlearned"]
        if not isinstance(unlearned, dict) or not all(
            isinstance(v, str) for v in unlearned.values()
        ):
            raise ConfigError(f"{where}: 'unlearned' must map method names to folders")
        cases.append(
            SuiteCase(
                concept=str(raw["concept"]),
                forget=read_prompt_file(rel(raw["pairs"]), fmt),
                unlearned={m: rel(d) for m, d in unlearned.items()},
                base=rel(base) if isinstance(base, str) else base,
                unrelated=None
                if raw.get("unrelated") is None
                else read_prompt_file(rel(raw["unrelated"]), fmt),
            )
        )
    return cases


def print_curves(result: Any) -> None:
    """Prints each method's and sweep's peak mean score over concepts, with its interval."""
    curves = result.curves()
    if curves.empty:
        return
    peaks = curves.loc[curves.groupby(["analysis", "method"], sort=False)["mean"].idxmax()]
    print("Peak of the mean score over concepts (layer) [95% bootstrap interval]:")
    for row in peaks.itertuples():
        print(
            f"  {row.analysis:<15} {row.method:<10} {row.mean:.3f} (L{row.layer}) "
            f"[{row.low:.3f}, {row.high:.3f}]  n={row.n_concepts}"
        )


def run_suite_command(args: argparse.Namespace) -> int:
    """Runs ``unlearnlens suite``; returns the exit status."""
    from unlearnlens.study import check_analyses
    from unlearnlens.suite import run_suite

    started = time.perf_counter()
    analyses = check_analyses(args.analyses)
    # before the toy base model is trained or Ray starts
    if args.window is not None:
        check_window(args.window)
    check_batch_size(args.batch_size, "--batch-size")
    check_int(args.threads, "--threads", minimum=1)
    check_device(args.device, "--device")
    if args.cases is None:
        check_int(args.concepts, "--concepts", minimum=1)
        if args.steps is not None:
            check_int(args.steps, "--steps", minimum=1)
        if args.methods is not None:
            from unlearnlens.trainers import get_method

            for method in args.methods.split(","):
                get_method(method.strip())
    executor = None
    if args.executor == "ray":
        from unlearnlens.ray_executor import RayExecutor

        init = {} if args.ray_address is None else {"address": args.ray_address}
        executor = RayExecutor(num_cpus=args.num_cpus, num_gpus=args.num_gpus, init=init)
    if args.cases is None:
        cases, window = _toy_cases(args, executor is not None)
    else:
        cases, window = _file_cases(args), 5
    if args.window is not None:
        window = args.window
    print(f"suite: {len(cases)} cases -> {args.out}", file=sys.stderr)
    try:
        result = run_suite(
            cases,
            out=args.out,
            analyses=analyses,
            window=window,
            batch_size=args.batch_size,
            device=args.device,
            threads=args.threads,
            executor=executor,
            progress=not args.no_progress,
        )
    finally:
        if executor is not None:
            executor.shutdown()
    index = result.report(Path(args.out) / "report")
    print_curves(result)
    total = sum(s for per in result.seconds.values() for s in per.values())
    n = sum(len(per) for per in result.seconds.values())
    if n:
        print(f"{n} studies, {total / n:.1f} s each on average (unlearning included)")
    print(f"finished in {time.perf_counter() - started:.1f} s")
    print(f"report: {index}")
    return 0

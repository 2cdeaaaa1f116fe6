"""The audit of the demo's unlearning methods on the toy world.

Builds the demo's models the way ``unlearnlens demo`` does (toy world seed 0, the cached base
model, each method of ``DEMO_METHODS`` with its defaults), runs :func:`unlearnlens.audit` with
the toy world's audit sets, prints the table and saves it::

    python benchmarks/audit_toy.py [--out reports/audit_toy] [--metrics accuracy,answer_logprob]

One table per knowledge metric, saved as ``{out}_{metric}.json``.
"""

from __future__ import annotations

import argparse
import time

import pandas as pd
import torch

from unlearnlens.audit import audit
from unlearnlens.audit.toy import toy_audit_sets
from unlearnlens.cli import DEMO_METHODS
from unlearnlens.toy import make_world, train_base
from unlearnlens.trainers import unlearn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/audit_toy")
    parser.add_argument("--metrics", default="accuracy,answer_logprob")
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    torch.manual_seed(0)
    world = make_world(0)
    base = train_base(world, progress=False)
    models = {}
    for method in DEMO_METHODS:
        run = unlearn(base, world.forget, retain=world.retain, method=method, progress=False)
        models[method] = run.model
    pd.set_option("display.width", 200)
    for metric in args.metrics.split(","):
        result = audit(base, models, metric=metric, progress=False, **toy_audit_sets(world))
        path = result.save(f"{args.out}_{metric}.json")
        frame = result.to_dataframe().drop(columns="metric")
        print(f"== knowledge metric: {metric}")
        print(frame.to_string(float_format=lambda v: f"{v:.3f}"))
        recovered = frame["recovered"].unstack("method")[list(models)]
        print("\nrecovered fraction (attacks):")
        print(recovered.dropna(how="all").to_string(float_format=lambda v: f"{v:.2f}"))
        print(f"saved {path}\n")
    print(f"finished in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

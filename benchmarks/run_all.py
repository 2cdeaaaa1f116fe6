"""Runs every benchmark in this folder and prints their ratios against the TransformerLens way.

Usage: ``python benchmarks/run_all.py [--threads N]`` (``make bench``). Each benchmark measures
unlearnlens and the reference approach in the same run, so the ratios hold on any machine; the
absolute times do not.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import bench_offload
import bench_patching
import bench_restoration
import bench_unlearn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}\n")
    for name, module in [
        ("patching", bench_patching),
        ("restoration", bench_restoration),
        ("unlearn", bench_unlearn),
        ("offload", bench_offload),
    ]:
        print(f"== {name}")
        sys.argv = [module.__file__]  # each benchmark's own defaults
        module.main()
        print()


if __name__ == "__main__":
    main()

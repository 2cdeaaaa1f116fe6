"""Seeding and deterministic runs: the same seed gives bit-identical results.

:func:`seed_everything` seeds Python's, NumPy's and PyTorch's (CPU and every CUDA device)
global generators; with ``deterministic=True`` it also makes PyTorch use deterministic
kernels (``torch.use_deterministic_algorithms``, cuDNN's deterministic mode, no cuDNN
autotuning, and ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` when unset, which cuBLAS needs for
reproducible matrix products on CUDA). :func:`deterministic_run` does the same for one block
only and puts every generator and setting back afterwards; ``unlearn(deterministic=True)``
runs inside it.

What stays outside: results are bit-identical for the same seed, the same hardware, the same
library versions and the same number of threads (``torch.get_num_threads()``); a different
thread count may change the order of floating-point reductions.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

from unlearnlens._checks import check_bool, check_int

__all__ = ["deterministic_run", "seed_everything"]

_CUBLAS = "CUBLAS_WORKSPACE_CONFIG"


def seed_everything(seed: int, *, deterministic: bool = False) -> None:
    """Seeds Python's ``random``, NumPy and PyTorch (CPU and CUDA) from ``seed``.

    Args:
        seed: A non-negative integer.
        deterministic: Also turn on PyTorch's deterministic algorithms for the rest of the
            process (operations without a deterministic kernel then raise).

    Raises:
        ConfigError: ``seed`` is not a non-negative integer, or ``deterministic`` not a bool.
    """
    seed = check_int(seed, "seed", minimum=0)
    deterministic = check_bool(deterministic, "deterministic")
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002  (the legacy global state is what is seeded)
    torch.manual_seed(seed)  # every CUDA device too
    if deterministic:
        os.environ.setdefault(_CUBLAS, ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


@contextmanager
def deterministic_run(seed: int) -> Iterator[None]:
    """Runs a block seeded from ``seed`` with deterministic algorithms, then restores all.

    On exit (also after an exception) the global generators are back in the state they had
    on entry, and the deterministic-algorithm, cuDNN and ``CUBLAS_WORKSPACE_CONFIG`` settings
    are as they were: the caller's own random streams are not consumed.
    """
    seed = check_int(seed, "seed", minimum=0)
    py_state = random.getstate()
    np_state = np.random.get_state()  # noqa: NPY002
    algorithms = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    cublas = os.environ.get(_CUBLAS)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    try:
        with torch.random.fork_rng(devices=devices):
            seed_everything(seed, deterministic=True)
            yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)  # noqa: NPY002
        torch.use_deterministic_algorithms(algorithms, warn_only=warn_only)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn
        if cublas is None:
            os.environ.pop(_CUBLAS, None)
        else:
            os.environ[_CUBLAS] = cublas

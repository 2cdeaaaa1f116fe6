"""Run a suite's cases on Ray: :class:`RayExecutor`, an executor for ``run_suite``.

``run_suite(cases, out=DIR, executor=RayExecutor(num_gpus=1))`` sends each case to a Ray task
that asks for the given resources, so a cluster runs the same suite across GPUs and nodes
(``out`` must then be a folder every node sees, such as a shared file system). Ray is an
optional dependency: ``pip install 'unlearnlens[ray]'``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from unlearnlens._checks import check_float, check_int

__all__ = ["RayExecutor"]


class RayExecutor:
    """A ``concurrent.futures``-style executor whose tasks are Ray remote functions.

    ``submit(fn, *args)`` runs ``fn(*args)`` as a Ray task and returns a
    ``concurrent.futures.Future`` of its result. Ray is started (``ray.init``) on first use
    unless it is already running; :meth:`shutdown` (or leaving a ``with`` block) stops it only
    if this executor started it.

    Args:
        num_cpus: CPUs each task asks for.
        num_gpus: GPUs each task asks for (fractions share a GPU).
        max_retries: Times Ray reruns a task whose worker died; a rerun case resumes from
            its finished studies.
        init: Keyword arguments of ``ray.init`` (``{"address": "auto"}`` to join a cluster,
            ``{"num_cpus": 8}`` for a local one, ``runtime_env``).

    Raises:
        ImportError: Ray is not installed (the ``ray`` extra).
        ConfigError: A negative resource count.
    """

    def __init__(
        self,
        *,
        num_cpus: float | int = 1,
        num_gpus: float | int = 0,
        max_retries: int = 0,
        init: Mapping[str, Any] | None = None,
    ) -> None:
        try:
            import ray  # noqa: F401
        except ImportError as e:
            raise ImportError("RayExecutor needs Ray: pip install 'unlearnlens[ray]'") from e
        for name, value in (("num_cpus", num_cpus), ("num_gpus", num_gpus)):
            check_float(value, name, minimum=0.0)
        max_retries = check_int(max_retries, "max_retries", minimum=0)
        self.options = {"num_cpus": num_cpus, "num_gpus": num_gpus, "max_retries": max_retries}
        self.init = dict(init or {})
        self._started = False

    def _ensure(self) -> Any:
        import ray

        if not ray.is_initialized():
            ray.init(**self.init)
            self._started = True
        return ray

    def submit(self, fn: Callable[..., Any], /, *args: Any) -> Any:
        """Runs ``fn(*args)`` as a Ray task; returns a ``concurrent.futures.Future``."""
        ray = self._ensure()
        task = ray.remote(fn).options(**self.options)
        return task.remote(*args).future()

    def shutdown(self, wait: bool = True) -> None:
        """Stops Ray if this executor started it."""
        import ray

        if self._started and ray.is_initialized():
            ray.shutdown()
        self._started = False

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

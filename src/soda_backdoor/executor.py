"""Run many independent tasks (one model each) on worker processes, one thread per worker.

Parallel CPU work in PyTorch runs best as one thread per process: two 2-thread trainings on 2
cores are several times slower than the same trainings in sequence. Each worker is a process
started once (``spawn``) that keeps whatever it loaded (a dataset) for the next task. A task
that raises gives an error outcome and the rest go on; a worker that dies (killed, out of
memory) fails the tasks it held, and a new pool takes the rest.

The same tasks run on a Ray cluster with ``backend="ray"`` (``pip install 'soda-backdoor[ray]'``):
one Ray task per task, ``threads_per_job`` CPUs (and ``gpus_per_job`` GPUs) each, no retries,
an object shared by every task put once in the object store.
"""

from __future__ import annotations

import logging
import multiprocessing
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

logger = logging.getLogger(__name__)

BACKENDS = ("local", "ray")
RAY_INSTALL = "pip install 'soda-backdoor[ray]'"
WORKER_DIED = "worker process died (killed, or out of memory)"

# ``shared`` in this worker process: sent once with its start (key "local"), or fetched once
# from Ray's object store (key: the object's id).
_SHARED: dict[str, Any] = {}


@dataclass(frozen=True)
class TaskOutcome:
    """What one task gave: its result, or an error message."""

    task: Any
    result: Any = None
    error: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.error


def describe_error(exc: BaseException) -> str:
    """One line for an error row: the message of a user error, else type and message."""
    from .errors import UserInputError

    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text if isinstance(exc, UserInputError) else f"{type(exc).__name__}: {text}"[:500]


def _init_worker(threads: int, shared: Any = None) -> None:
    _SHARED["local"] = shared
    _set_threads(threads)
    _exit_with_parent()


def _exit_with_parent() -> None:
    """End this worker when the process that started it ends.

    A parent killed by a signal (SIGTERM, SIGKILL) runs no clean-up, and its pool's workers
    would go on training for nobody. A daemon thread waits on the parent's sentinel instead.
    """
    import os
    import threading
    from multiprocessing.connection import wait as wait_for

    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        wait_for([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="soda-parent-watch", daemon=True).start()


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already set in this process
        pass


def _call(fn: Callable[..., Any], task: Any, shared: Any) -> Any:
    return fn(task) if shared is None else fn(task, shared)


def _timed(fn: Callable[..., Any], task: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    return _call(fn, task, _SHARED.get("local")), time.perf_counter() - start


def _timed_outcome(fn: Callable[..., Any], task: Any) -> tuple[Any, str, float]:
    """In a worker: ``(result, "", seconds)``, or ``(None, error, seconds)`` when ``fn`` raised."""
    start = time.perf_counter()
    try:
        return _call(fn, task, _SHARED.get("local")), "", time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - reported as the task's outcome
        logger.debug("task failed", exc_info=True)
        return None, describe_error(exc), time.perf_counter() - start


def run_tasks(fn: Callable[..., Any], tasks: Iterable[Any], jobs: int = 1, threads_per_job: int = 1,
              backend: str = "local", ray_address: str | None = None, shared: Any = None,
              gpus_per_job: float = 0.0) -> Iterator[TaskOutcome]:
    """Run ``fn(task)`` (``fn(task, shared)`` when ``shared`` is given) for every task.

    Outcomes are yielded as tasks finish, in no fixed order.

    Args:
        fn: a module-level function (it is sent to worker processes).
        tasks: picklable task descriptions.
        jobs: worker processes; 1 runs the tasks in this process, one after the other. With
            Ray and no address: the CPUs of the local Ray instance started for the run.
        threads_per_job: torch threads (Ray: CPUs) of each worker.
        backend: ``local`` (a process pool on this machine) or ``ray``.
        ray_address: Ray cluster to join (``auto``: the one this machine belongs to); ``None``
            starts a local Ray instance for the run.
        shared: an object every task needs (a dataset): sent once to each local worker, or put
            once in Ray's object store.
        gpus_per_job: GPUs a Ray task requests (0: none).

    Raises:
        UserInputError: an unknown backend, or ``ray`` without Ray installed.
    """
    from .errors import UserInputError

    if backend not in BACKENDS:
        raise UserInputError(f"unknown backend {backend!r}; valid: {', '.join(BACKENDS)}")
    pending = list(tasks)
    if backend == "ray":
        yield from _run_ray(fn, pending, jobs, threads_per_job, ray_address, shared, gpus_per_job)
        return
    if jobs <= 1:
        _SHARED["local"] = shared
        try:
            for task in pending:
                start = time.perf_counter()
                try:
                    result, secs = _timed(fn, task)
                    yield TaskOutcome(task, result, "", secs)
                except Exception as exc:  # noqa: BLE001 - one failed task must not stop the others
                    logger.debug("task failed", exc_info=True)
                    yield TaskOutcome(task, None, describe_error(exc), time.perf_counter() - start)
        finally:
            _SHARED.pop("local", None)
        return
    ctx = multiprocessing.get_context("spawn")
    while pending:
        broken = []
        with ProcessPoolExecutor(max_workers=min(jobs, len(pending)), mp_context=ctx, initializer=_init_worker,
                                 initargs=(threads_per_job, shared)) as pool:
            futures = {pool.submit(_timed_outcome, fn, t): t for t in pending}
            pending = []
            started = time.perf_counter()
            while futures:
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                for fut in done:
                    task = futures.pop(fut)
                    try:
                        yield TaskOutcome(task, *fut.result())
                    except BrokenProcessPool:
                        broken.append(task)
                    except Exception as exc:  # noqa: BLE001
                        yield TaskOutcome(task, None, describe_error(exc), time.perf_counter() - started)
        if broken:
            # The pool cannot tell which task killed its worker: retry each alone once.
            for task in broken:
                yield from _run_alone(fn, task, threads_per_job, ctx, shared)


def _run_alone(fn: Callable[..., Any], task: Any, threads: int, ctx, shared: Any) -> Iterator[TaskOutcome]:
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_init_worker,
                             initargs=(threads, shared)) as pool:
        try:
            yield TaskOutcome(task, *pool.submit(_timed_outcome, fn, task).result())
        except BrokenProcessPool:
            yield TaskOutcome(task, None, WORKER_DIED, time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001
            yield TaskOutcome(task, None, describe_error(exc), time.perf_counter() - start)


# ----------------------------------------------------------------------------- Ray

def import_ray():
    """The ``ray`` module, or a one-line error with the install command."""
    from .errors import UserInputError

    try:
        import ray
    except ImportError as exc:
        raise UserInputError(f"the ray backend needs Ray: {RAY_INSTALL}") from exc
    return ray


def _ray_call(fn: Callable[..., Any], task: Any, shared_box: list | None, threads: int) -> tuple[Any, str, float]:
    """A Ray task: set the threads, fetch ``shared`` once per worker process, run ``fn``."""
    _set_threads(threads)
    shared = None
    if shared_box is not None:  # a list: Ray passes the reference unresolved, fetched once below
        import ray

        ref = shared_box[0]
        key = ref.hex()
        if key not in _SHARED:
            _SHARED.clear()  # one run's object at a time
            _SHARED[key] = ray.get(ref)
        shared = _SHARED[key]
    start = time.perf_counter()
    try:
        return _call(fn, task, shared), "", time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - reported as the task's outcome
        return None, describe_error(exc), time.perf_counter() - start


def _run_ray(fn: Callable[..., Any], tasks: list[Any], jobs: int, threads: int, address: str | None,
             shared: Any, gpus: float) -> Iterator[TaskOutcome]:
    ray = import_ray()
    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        else:
            ray.init(num_cpus=max(1, jobs) * threads, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=False)
        started = True
    try:
        box = [ray.put(shared)] if shared is not None else None
        remote = ray.remote(_ray_call).options(num_cpus=threads, num_gpus=gpus, max_retries=0)
        submitted = time.perf_counter()
        pending = {remote.remote(fn, task, box, threads): task for task in tasks}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                task = pending.pop(ref)
                try:
                    yield TaskOutcome(task, *ray.get(ref))
                except ray.exceptions.RayTaskError as exc:  # fn raised: report its own error
                    cause = getattr(exc, "cause", None)
                    yield TaskOutcome(task, None, describe_error(cause if isinstance(cause, BaseException) else exc),
                                      time.perf_counter() - submitted)
                except ray.exceptions.RayError as exc:  # the worker died (killed, out of memory, node lost)
                    logger.debug("ray task failed", exc_info=True)
                    yield TaskOutcome(task, None, f"{WORKER_DIED}: {type(exc).__name__}",
                                      time.perf_counter() - submitted)
    finally:
        if started:
            ray.shutdown()

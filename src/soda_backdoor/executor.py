"""Run many independent tasks (one model each) on worker processes, one thread per worker.

Parallel CPU work in PyTorch runs best as one thread per process: two 2-thread trainings on 2
cores are several times slower than the same trainings in sequence. Each worker is a process
started once (``spawn``) that keeps whatever it loaded (a dataset) for the next task. A task
that raises gives an error outcome and the rest go on; a worker that dies (killed, out of
memory) fails the tasks it held, and a new pool takes the rest.
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


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:  # already set in this process
        pass


def _timed(fn: Callable[[Any], Any], task: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    return fn(task), time.perf_counter() - start


def run_tasks(fn: Callable[[Any], Any], tasks: Iterable[Any], jobs: int = 1,
              threads_per_job: int = 1) -> Iterator[TaskOutcome]:
    """Run ``fn(task)`` for every task; yield each outcome as it finishes.

    Args:
        fn: a module-level function (it is sent to worker processes).
        tasks: picklable task descriptions.
        jobs: worker processes; 1 runs the tasks in this process, one after the other.
        threads_per_job: torch threads of each worker process.
    """
    pending = list(tasks)
    if jobs <= 1:
        for task in pending:
            start = time.perf_counter()
            try:
                result, secs = _timed(fn, task)
                yield TaskOutcome(task, result, "", secs)
            except Exception as exc:  # noqa: BLE001 - one failed task must not stop the others
                logger.debug("task failed", exc_info=True)
                yield TaskOutcome(task, None, describe_error(exc), time.perf_counter() - start)
        return
    ctx = multiprocessing.get_context("spawn")
    while pending:
        broken = []
        with ProcessPoolExecutor(max_workers=min(jobs, len(pending)), mp_context=ctx, initializer=_init_worker,
                                 initargs=(threads_per_job,)) as pool:
            futures = {pool.submit(_timed, fn, t): t for t in pending}
            pending = []
            started = time.perf_counter()
            while futures:
                done, _ = wait(futures, return_when=FIRST_COMPLETED)
                for fut in done:
                    task = futures.pop(fut)
                    try:
                        result, secs = fut.result()
                        yield TaskOutcome(task, result, "", secs)
                    except BrokenProcessPool:
                        broken.append(task)
                    except Exception as exc:  # noqa: BLE001
                        yield TaskOutcome(task, None, describe_error(exc), time.perf_counter() - started)
        if broken:
            # The pool cannot tell which task killed its worker: retry each alone once.
            for task in broken:
                yield from _run_alone(fn, task, threads_per_job, ctx)


def _run_alone(fn: Callable[[Any], Any], task: Any, threads: int, ctx) -> Iterator[TaskOutcome]:
    start = time.perf_counter()
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_init_worker, initargs=(threads,)) as pool:
        try:
            result, secs = pool.submit(_timed, fn, task).result()
            yield TaskOutcome(task, result, "", secs)
        except BrokenProcessPool:
            yield TaskOutcome(task, None, "worker process died (killed, or out of memory)",
                              time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001
            yield TaskOutcome(task, None, describe_error(exc), time.perf_counter() - start)

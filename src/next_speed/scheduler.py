"""Continuous batching for the server: concurrent generations share each decoder batch.

Every request is a `SentenceGenerator.steps()` generation, which yields one sentence step at a
time. One worker thread loops: admit waiting requests, render the pending step of every active
request in one engine call (`render_jobs`), advance each request to its next step (planner,
rerank: per request, cheap), hand back finished results. A request joins the batch at its next
sentence step, not when the current batch ends (Orca's iteration-level scheduling, Yu et al.
2022, at sentence granularity). The queue is bounded: a request over `max_queue` is refused at
once (`QueueFull`), never left to wait without end.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from .errors import NextSpeedError

log = logging.getLogger(__name__)


class QueueFull(NextSpeedError):
    """The server has `max_queue` requests in flight; the client should retry later."""


class ShuttingDown(NextSpeedError):
    """The scheduler stopped (the server is shutting down)."""


class WorkerError(RuntimeError):
    """The scheduler's worker failed (a bug, not the request's fault: the server answers 500)."""


def _settle(fut: Future, result: Any = None, exc: BaseException | None = None) -> None:
    """Hand a result or an error to a request's future, unless it is already done (a client that
    went away cancels its future; that must never stop the worker)."""
    if fut.done():
        return
    try:
        if exc is not None:
            fut.set_exception(exc)
        else:
            fut.set_result(result)
    except InvalidStateError:  # cancelled in between
        pass


@dataclass(eq=False)  # requests compare by identity
class _Request:
    kw: dict  # SentenceGenerator.steps() keywords, checked by prepare()
    future: Future
    on_step: Any = None
    submitted: float = field(default_factory=time.perf_counter)
    started: float | None = None
    steps: Any = None
    job: Any = None


class BatchScheduler:
    """Runs generations of a SentenceGenerator on one worker thread, their sentence steps batched.

    `submit()` validates at once (ConfigError for bad parameters or prompts), then returns a
    Future of the GenerationResult; its timings gain `queued` (seconds before its first step).
    """

    def __init__(self, gen, max_queue: int = 32, max_batch_rows: int = 64):
        self.gen, self.max_queue, self.max_batch_rows = gen, max_queue, max_batch_rows
        self._waiting: list[_Request] = []
        self._active: list[_Request] = []
        self._cv = threading.Condition()
        self._stop = False
        self.batches = 0  # engine calls so far
        self.rows = 0  # candidate rows rendered so far (rows / batches = mean batch size)
        self._thread = threading.Thread(target=self._loop, name="next-speed-scheduler", daemon=True)
        self._thread.start()

    def load(self) -> int:
        """Requests in flight (waiting or being generated)."""
        with self._cv:
            return len(self._waiting) + len(self._active)

    def submit(self, prompt: str, max_sentences: int | None = None, *, on_step=None, **kwargs: Any) -> Future:
        """Queue one generation (`kwargs` as for `SentenceGenerator.run`: plan, max_tokens, stop and
        parameter overrides). `on_step(step)` is called on the worker thread with each sentence
        step once decided (the server streams from it)."""
        kw = self.gen.prepare(prompt, max_sentences, **kwargs)
        fut: Future = Future()
        with self._cv:
            if self._stop:
                raise ShuttingDown("the server is shutting down; retry shortly")
            if len(self._waiting) + len(self._active) >= self.max_queue:
                raise QueueFull(f"the server is busy: {self.max_queue} requests in flight (MAX_QUEUE); retry shortly")
            self._waiting.append(_Request(kw, fut, on_step))
            self._cv.notify()
        return fut

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ the worker
    def _advance(self, r: _Request, first: bool = False) -> bool:
        """Move a request to its next sentence step; False when it is done (result or error set)."""
        try:
            jobs = next(r.steps) if first else r.steps.send(None)
            r.job = jobs[0]
            return True
        except StopIteration as done:
            res = done.value
            res.timings["queued"] = round(r.started - r.submitted, 4)
            _settle(r.future, res)
        except Exception as e:  # noqa: BLE001 - handed to the request's caller
            _settle(r.future, exc=e)
        return False

    def _render(self, batch: list[_Request]) -> list[_Request]:
        """Render the batch's steps; returns the requests that failed. When a batch fails, each
        request is tried alone (its prompt cache reset), so one bad request fails only itself."""
        try:
            self.gen.render_jobs([r.job for r in batch])
            return []
        except Exception as e:  # noqa: BLE001 - a bug or an out-of-memory: logged, handed to the requests
            if len(batch) == 1:
                log.error("rendering a sentence step failed", exc_info=e)
                _settle(batch[0].future, exc=e)
                return batch
        failed = []
        for r in batch:
            if r.job.cache is not None:  # a failed forward may have left it half-extended
                r.job.cache.kv, r.job.cache.ids, r.job.cache.clean = None, [], 0
            try:
                self.gen.render_jobs([r.job])
            except Exception as e:  # noqa: BLE001
                log.error("rendering a sentence step failed", exc_info=e)
                _settle(r.future, exc=e)
                failed.append(r)
        return failed

    def _loop(self) -> None:
        while True:
            try:
                if not self._round():
                    return
            except BaseException as e:  # noqa: BLE001 - never leave requests waiting on a dead worker
                log.error("the scheduler's worker failed; failing the requests in flight", exc_info=e)
                with self._cv:
                    lost, self._waiting, self._active = self._waiting + self._active, [], []
                for r in lost:
                    _settle(r.future, exc=WorkerError(f"internal error ({type(e).__name__}); the server log has the details"))

    def _round(self) -> bool:
        """Admit, render one batch, advance; False once stopped."""
        gen = self.gen
        with self._cv:
            while not self._stop and not self._waiting and not self._active:
                self._cv.wait()
            if self._stop:
                for r in self._waiting + self._active:
                    _settle(r.future, exc=ShuttingDown("the server is shutting down; retry shortly"))
                self._waiting, self._active = [], []
                return False
            new, self._waiting = self._waiting, []
            # a client that went away cancelled its future: its request leaves
            self._active = [r for r in self._active if not r.future.cancelled()]
            new = [r for r in new if not r.future.cancelled()]
            self._active.extend(new)  # counted as in flight from here on
        with gen._lock:
            failed = []
            for r in new:
                r.started = time.perf_counter()
                r.steps = gen.steps(**r.kw, on_step=r.on_step)
                if not self._advance(r, first=True):
                    failed.append(r)
            with self._cv:
                self._active = [r for r in self._active if r not in failed]
                active = list(self._active)
            batch, rows = [], 0
            for r in active:  # oldest first, as many rows as allowed (at least one request)
                if batch and rows + r.job.n > self.max_batch_rows:
                    break
                batch.append(r)
                rows += r.job.n
            if not batch:
                return True
            failed = self._render(batch)
            self.batches += 1
            self.rows += rows
            done = failed + [r for r in batch if r not in failed and not self._advance(r)]
            with self._cv:
                # finished requests leave; the ones served go behind those that waited
                self._active = [r for r in self._active if r not in batch] + [r for r in batch if r not in done]
        return True

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
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from .errors import NextSpeedError

log = logging.getLogger(__name__)


class QueueFull(NextSpeedError):
    """The server has `max_queue` requests in flight; the client should retry later."""


@dataclass(eq=False)  # requests compare by identity
class _Request:
    prompt: str
    params: Any
    future: Future
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

    def submit(self, prompt: str, max_sentences: int | None = None, **overrides: Any) -> Future:
        from .generate import check_prompt, update_params

        p = update_params(self.gen.params, {**({"gen_steps": max_sentences} if max_sentences is not None else {}), **overrides})
        check_prompt(prompt)
        fut: Future = Future()
        with self._cv:
            if self._stop:
                raise NextSpeedError("the scheduler is stopped")
            if len(self._waiting) + len(self._active) >= self.max_queue:
                raise QueueFull(f"the server is busy: {self.max_queue} requests in flight (MAX_QUEUE); retry shortly")
            self._waiting.append(_Request(prompt, p, fut))
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
            r.future.set_result(res)
        except Exception as e:  # noqa: BLE001 - handed to the request's caller
            r.future.set_exception(e)
        return False

    def _loop(self) -> None:
        gen = self.gen
        while True:
            with self._cv:
                while not self._stop and not self._waiting and not self._active:
                    self._cv.wait()
                if self._stop:
                    for r in self._waiting + self._active:
                        r.future.set_exception(NextSpeedError("the server is shutting down"))
                    return
                new, self._waiting = self._waiting, []
                self._active.extend(new)  # counted as in flight from here on
            with gen._lock:
                failed = []
                for r in new:
                    r.started = time.perf_counter()
                    r.steps = gen.steps(r.prompt, r.params)
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
                    continue
                try:
                    gen.render_jobs([r.job for r in batch])
                    self.batches += 1
                    self.rows += rows
                    done = [r for r in batch if not self._advance(r)]
                except Exception as e:  # noqa: BLE001 - a bug in rendering: fail this batch, keep serving
                    log.error("rendering a batch of %d requests failed", len(batch), exc_info=e)
                    for r in batch:
                        r.future.set_exception(e)
                    done = batch
                with self._cv:
                    # finished requests leave; the ones served go behind those that waited
                    self._active = [r for r in self._active if r not in batch] + [r for r in batch if r not in done]

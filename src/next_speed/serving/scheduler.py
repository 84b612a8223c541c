"""Continuous batching for the server: concurrent generations share each decoder forward.

Every request is a `SentenceGenerator.steps()` generation, which yields one sentence step at a
time. One worker thread loops, one decoder token per round: admit waiting requests, let the
pending sentence steps join the open `DecodeBatch` (their prompts prefilled) as far as
`max_batch_rows` allows, sample one token for every row and run one forward; a step whose
candidates have all ended leaves the batch at once and its request advances (rerank, planner:
per request, cheap) to its next step, which joins at the next round. Iteration-level scheduling
(Orca, Yu et al. 2022): a request never waits for the longest sentence of another. A pipelined
request (PARALLEL > 1) advances as soon as any of its jobs ends, and its new drafts join the
next round. The queue is
bounded: a request over `max_queue` is refused at once (`QueueFull`), never left to wait
without end.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from next_speed.core.errors import NextSpeedError
from next_speed.generation.generate import Some

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
    jobs: list = field(default_factory=list)  # its SentenceJobs in flight (a sentence step's: one per plan)
    pending: list = field(default_factory=list)  # those of them not in the batch yet
    some: bool = False  # a pipeline (PARALLEL > 1): resumed as soon as any job ends, not once all have

    @property
    def rows(self) -> int:
        return sum(j.n for j in self.pending)

    @property
    def rendered(self) -> bool:
        """Whether the generation can move on: any job ended (a pipeline), or all of them."""
        done = [j.out is not None for j in self.jobs]
        return bool(done) and (any(done) if self.some else all(done))

    def unfinished(self) -> list:
        return [j for j in self.jobs if j.out is None and j.engine != "base"]


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
        self.batches = 0  # decoder rounds so far (one token for every row of the open batch)
        self.rows = 0  # rows over those rounds (rows / batches = mean batch size)
        self._batch = None  # the open DecodeBatch (worker thread only)
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
            new = next(r.steps) if first else r.steps.send(None)
            r.some = isinstance(new, Some)
            r.jobs = [j for j in r.jobs if j.out is None] + list(new)
            r.pending += list(new)  # those that did not fit the batch yet (MAX_BATCH_ROWS) stay pending
            return True
        except StopIteration as done:
            res = done.value
            res.timings["queued"] = round(r.started - r.submitted, 4)
            _settle(r.future, res)
        except Exception as e:  # noqa: BLE001 - handed to the request's caller
            _settle(r.future, exc=e)
        return False

    def _recover(self, reqs: list[_Request], err: BaseException) -> list[_Request]:
        """A decoder forward failed (a bug or an out-of-memory): the open batch is dropped and
        each affected request's step is rendered alone from a fresh prompt cache (its seed gives
        the same text), so one bad request fails only itself. Returns the requests rendered."""
        log.warning(
            "a batched decoder step failed (%s: %s); rendering its requests one by one", type(err).__name__, err
        )
        self._batch = None
        ok = []
        for r in reqs:
            jobs = [j for j in r.jobs if j.out is None]
            for j in jobs:
                if j.cache is not None:  # a failed forward may have left it half-extended
                    j.cache.kv, j.cache.ids, j.cache.clean = None, [], 0
            r.pending = []
            try:
                self.gen.render_jobs(jobs)
                ok.append(r)
            except Exception as e:  # noqa: BLE001
                log.error("rendering a sentence step failed", exc_info=e)
                _settle(r.future, exc=e)
        return ok

    def _loop(self) -> None:
        while True:
            try:
                if not self._round():
                    return
            except BaseException as e:  # noqa: BLE001 - never leave requests waiting on a dead worker
                log.error("the scheduler's worker failed; failing the requests in flight", exc_info=e)
                with self._cv:
                    lost, self._waiting, self._active = self._waiting + self._active, [], []
                self._batch = None  # its rows belonged to the requests just failed
                for r in lost:
                    _settle(
                        r.future,
                        exc=WorkerError(f"internal error ({type(e).__name__}); the server log has the details"),
                    )

    def _round(self) -> bool:
        """Admit, let pending steps join the batch, decode one token, advance the requests whose
        step ended; False once stopped."""
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
            # a client that went away cancelled its future: its request leaves (its rows too)
            gone = [r for r in self._active + new if r.future.cancelled()]
            self._active = [r for r in self._active if not r.future.cancelled()]
            new = [r for r in new if not r.future.cancelled()]
            self._active.extend(new)  # counted as in flight from here on
        with gen._lock:
            if self._batch is None or not self._batch.rows:
                self._batch = gen.decode_batch()  # fresh: ENGINE may have changed
            batch = self._batch
            failed = []
            for r in new:
                r.started = time.perf_counter()
                r.steps = gen.steps(**r.kw, on_step=r.on_step)
                if not self._advance(r, first=True):
                    failed.append(r)
            with self._cv:
                self._active = [r for r in self._active if r not in failed]
                active = list(self._active)
            owner = {id(j): r for r in active for j in r.jobs}
            join, rows = [], batch.rows
            for r in active:  # oldest first, as many rows as allowed (at least one request)
                if not r.pending:
                    continue  # its jobs are in the batch already (the jobs of one yield join together)
                if rows and rows + r.rows > self.max_batch_rows:
                    break
                join.append(r)
                rows += r.rows
            if not rows:
                return True
            try:
                batch.remove([j for r in gone for j in r.unfinished()])
                # the base model's unplanned candidates (UNPLANNED) are rendered at once, in a batch
                # of their own; the decoder's rows join the open batch
                base = [j for r in join for j in r.pending if j.engine == "base"]
                if base:
                    gen.render_jobs(base)
                batch.add([j for r in join for j in r.pending if j.engine != "base"])
                for r in join:
                    r.pending = []
                rows = batch.rows
                # a request's step ends once all of its jobs have
                ended = list(
                    {id(r): r for r in (owner[id(j)] for j in batch.step() if id(j) in owner) if r.rendered}.values()
                )
                self.batches += 1
                self.rows += rows
            except Exception as e:  # noqa: BLE001 - a bug or an out-of-memory: logged, handed to the requests
                involved = list({id(r): r for r in (owner[id(j)] for j in batch.jobs if id(j) in owner)}.values())
                involved += [r for r in join if r not in involved]
                # steps that finished in the failed round already left the batch with their text
                finished = [r for r in active if r not in involved and r.rendered]
                ended = self._recover(involved, e)
                failed = [r for r in involved if r not in ended]
                ended += finished
            done = failed + [r for r in ended if not self._advance(r)]
            # a pipeline that ended (its sentences written, a stop string) leaves drafts in flight
            leftover = [j for r in done for j in r.unfinished()]
            if leftover and self._batch is not None:
                self._batch.remove(leftover)
            with self._cv:
                # finished requests leave; the ones that move on go behind the others (round robin
                # at sentence granularity when the batch is full, as MAX_BATCH_ROWS=1 shows)
                self._active = [r for r in self._active if r not in ended and r not in done] + [
                    r for r in ended if r not in done
                ]
        return True

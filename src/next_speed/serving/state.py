"""What the server's routes share: the generator (loaded in the background), its scheduler, the
metrics and the server's knobs; and readiness as a FastAPI dependency."""

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from fastapi import Request

from next_speed.serving.errors import ApiError
from next_speed.serving.scheduler import BatchScheduler

log = logging.getLogger(__name__)


class ServerState:
    """The generator and its scheduler once loaded, or the error that stopped the load."""

    def __init__(self, scfg, metrics):
        self.scfg, self.metrics = scfg, metrics
        self.gen: Any = None
        self.sched: BatchScheduler | None = None
        self.error: str | None = None
        self.started = int(time.time())

    def load(self, build: Callable[[], Any], background: bool) -> None:
        """Build the generator (`build()`), in a daemon thread when `background`."""
        if background:
            threading.Thread(target=self._load, args=(build,), daemon=True).start()
        else:
            self._load(build)

    def _load(self, build: Callable[[], Any]) -> None:
        try:
            gen = build()
            if gen is not None:
                self.sched = BatchScheduler(gen, self.scfg.max_queue, self.scfg.max_batch_rows)
            self.gen = gen
        except Exception as e:  # noqa: BLE001 - reported by /health and every generation route
            self.error = str(e)
            log.error("could not load the generator: %s", e)

    def not_ready(self) -> str:
        return f"models failed to load: {self.error}" if self.error else "models are still loading"

    def queue_length(self) -> int:
        return self.sched.load() if self.sched is not None else 0

    def close(self) -> None:
        if self.sched is not None:
            self.sched.close()


def server_state(request: Request) -> ServerState:
    return request.app.state.server


def ready(request: Request):
    """Dependency of every route that needs the models: the generator, or a 503 with Retry-After."""
    state = server_state(request)
    if state.gen is None:
        raise ApiError(503, state.not_ready(), headers={"Retry-After": str(state.scfg.retry_after)})
    return state.gen

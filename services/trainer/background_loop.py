"""One asyncio event loop on a daemon thread, for calls made from synchronous torch code.

Torch autograd is synchronous (``Function.forward``/``backward`` must return tensors), while
the gRPC clients are ``grpc.aio``. Every remote call of the library therefore goes through a
single loop owned here: channels are created and used on that loop only (``grpc.aio`` objects
are bound to the loop that made them), and the calling thread blocks on the result. One loop
for all layers means one channel per server, shared by every layer and by forward and backward.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class BackgroundLoop:
    """An event loop running forever on its own daemon thread until :meth:`close`."""

    def __init__(self, name: str = "dmoe-trainer-loop") -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self._ready.wait()
        self._closed = False

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(self._ready.set)
        self._loop.run_forever()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; the caller gets a thread-safe future."""
        if self._closed:
            coro.close()
            raise RuntimeError("background loop is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and block until it finishes (or ``timeout`` s pass).

        Calling this from the loop's own thread would deadlock, so it raises instead.
        """
        if self.in_loop_thread():
            coro.close()
            raise RuntimeError("BackgroundLoop.run called from the loop thread; await instead")
        future = self.submit(coro)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"background call did not finish within {timeout} s") from None

    def close(self, timeout: float = 5.0) -> None:
        """Cancel what is still running, stop the loop and join the thread."""
        if self._closed:
            return
        self._closed = True

        async def _cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if not self.in_loop_thread():
            try:
                asyncio.run_coroutine_threadsafe(_cancel_all(), self._loop).result(timeout)
            except Exception:  # closing is best effort
                log.debug("cancelling background tasks failed", exc_info=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self._loop.close()

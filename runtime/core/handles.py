"""What a submitted request hands back: a handle to wait on, stream from (threads or asyncio), or cancel."""
from __future__ import annotations

import asyncio
import queue
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future, InvalidStateError

from runtime.api import acancel_on_exit, cancel_on_exit
from runtime.outputs import RequestOutput, StreamChunk


class RequestHandle:
    """Filled by the engine thread; read from any thread (``result``), iterated (``for`` with ``stream=True``,
    ``async for`` when submitted with an event ``loop``), or cancelled."""

    def __init__(self, request_id: str, cancel: Callable[[str], None], streaming: bool,
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.request_id = request_id
        self.future: Future[RequestOutput] = Future()
        self.streaming = streaming or loop is not None
        self._loop = loop
        self._chunks: queue.SimpleQueue[StreamChunk | BaseException] = queue.SimpleQueue()
        self._achunks: asyncio.Queue[StreamChunk | BaseException] | None = asyncio.Queue() if loop else None
        self._cancel = cancel
        self.future.add_done_callback(lambda f: f.cancelled() and cancel(request_id))    # asyncio cancel

    # ---- engine side ---------------------------------------------------------------------------
    def push(self, chunk: StreamChunk) -> None:
        if self.streaming:
            self._deliver(chunk)
        if chunk.finished:
            try:
                self.future.set_result(chunk.output)
            except InvalidStateError:          # cancelled by its awaiting asyncio task meanwhile
                pass

    def fail(self, error: BaseException) -> None:
        try:
            self.future.set_exception(error)
        except InvalidStateError:
            return
        if self.streaming:
            self._deliver(error)

    def _deliver(self, item: StreamChunk | BaseException) -> None:
        if self._achunks is None:
            self._chunks.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._achunks.put_nowait, item)
        except RuntimeError:                   # the event loop is closed: nobody is listening any more
            self.cancel()

    # ---- user side -----------------------------------------------------------------------------
    def result(self, timeout: float | None = None) -> RequestOutput:
        return self.future.result(timeout)

    def __iter__(self) -> Iterator[StreamChunk]:
        """Chunks as tokens arrive; leaving the loop early cancels the request."""
        if not self.streaming or self._achunks is not None:
            raise RuntimeError("iterate a request submitted with stream=True (async for: with an event loop)")
        return cancel_on_exit(self._get(), self.cancel)

    def __aiter__(self) -> AsyncIterator[StreamChunk]:
        if self._achunks is None:
            raise RuntimeError("async for needs a request submitted with an event loop")
        return acancel_on_exit(self._aget(), self.cancel)

    def _get(self) -> Iterator[StreamChunk]:
        while True:
            item = self._chunks.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finished:
                return

    async def _aget(self) -> AsyncIterator[StreamChunk]:
        while True:
            item = await self._achunks.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finished:
                return

    def cancel(self) -> None:
        """Stop generating for this request (its result then has finish_reason "abort")."""
        if not self.future.done():
            self._cancel(self.request_id)

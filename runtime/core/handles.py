"""What a submitted request hands back: a handle to wait on, stream from, or cancel."""
from __future__ import annotations

import queue
from collections.abc import Callable, Iterator
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass

from runtime.outputs import RequestOutput


@dataclass(slots=True)
class StreamChunk:
    """New text of one request since its previous chunk; the last one has ``finished`` and the whole output."""

    request_id: str
    text: str                          # text delta (a possible stop string's prefix is held back until decided)
    token_ids: list[int]               # tokens sampled since the previous chunk
    finished: bool = False
    output: RequestOutput | None = None


class RequestHandle:
    """Filled by the engine loop thread; read from any thread (``result``), iterated (``stream``), or cancelled."""

    def __init__(self, request_id: str, cancel: Callable[[str], None], streaming: bool) -> None:
        self.request_id = request_id
        self.future: Future[RequestOutput] = Future()
        self.streaming = streaming
        self._chunks: queue.SimpleQueue[StreamChunk | BaseException] = queue.SimpleQueue()
        self._cancel = cancel
        self.future.add_done_callback(lambda f: f.cancelled() and cancel(request_id))    # asyncio cancel

    # ---- engine side ---------------------------------------------------------------------------
    def push(self, chunk: StreamChunk) -> None:
        if self.streaming:
            self._chunks.put(chunk)
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
            self._chunks.put(error)

    # ---- user side -----------------------------------------------------------------------------
    def result(self, timeout: float | None = None) -> RequestOutput:
        return self.future.result(timeout)

    def __iter__(self) -> Iterator[StreamChunk]:
        """Chunks as tokens arrive; leaving the loop early cancels the request."""
        if not self.streaming:
            raise RuntimeError("this request was submitted without stream=True")
        finished = False
        try:
            while True:
                item = self._chunks.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.cancel()

    def cancel(self) -> None:
        """Stop generating for this request (its result then has finish_reason "abort")."""
        if not self.future.done():
            self._cancel(self.request_id)

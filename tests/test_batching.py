"""Continuous batching: requests join and leave between steps, concurrent callers get their own answers,
streams carry exactly the final text, cancelling affects only its own request."""
from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from runtime import LLM, SamplingParams
from runtime.errors import InvalidRequestError
from scheduler.batching import BatchScheduler

PROMPTS = ["abc", "hello world", "x = 1\n", "def f(", "zz", "The quick brown fox", "0123", "q"]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


class Req:
    def __init__(self, rid: str) -> None:
        self.request_id, self.slot = rid, -1


def test_scheduler_admits_first_come_first_served_into_free_slots() -> None:
    b: BatchScheduler[Req] = BatchScheduler(2)
    reqs = [Req(f"r{i}") for i in range(4)]
    for r in reqs:
        b.add(r)
    assert b.admit() == reqs[:2] and [r.slot for r in reqs[:2]] == [0, 1]
    assert b.admit() == [] and len(b) == 4
    b.finish(reqs[0])                                   # leaves between steps; its slot goes to the next in line
    assert b.admit() == [reqs[2]] and reqs[2].slot == 0
    assert b.remove("r3") is reqs[3] and b.remove("r3") is None
    assert b.remove("r1") is reqs[1] and b.admit() == [] and b.running == [reqs[2]]
    assert list(b.drain()) == [reqs[2]] and len(b) == 0
    with pytest.raises(ValueError):
        BatchScheduler(0)


@pytest.fixture(scope="module")
def llm(tiny_model_dir: Path) -> LLM:
    llm = LLM(str(tiny_model_dir), max_batch_size=4)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def solo(llm: LLM) -> dict[str, list[int]]:
    """Each prompt generated alone: the reference every batched answer must equal."""
    return {p: llm.generate(p, GREEDY)[0].token_ids for p in PROMPTS}


def test_concurrent_callers_get_their_own_answers(llm: LLM, solo: dict) -> None:
    got: dict[str, list[int]] = {}

    def call(p: str) -> None:
        got[p] = llm.generate(p, GREEDY)[0].token_ids

    threads = [threading.Thread(target=call, args=(p,)) for p in PROMPTS]     # 8 callers, 4 slots
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == solo


def test_requests_join_and_leave_a_running_batch(llm: LLM, solo: dict) -> None:
    long_params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    stream = llm.stream(PROMPTS[0], long_params)
    first = next(stream)                                 # the long request is running
    short = llm.generate(PROMPTS[1:3], GREEDY)           # these join it, finish and leave
    assert [o.token_ids for o in short] == [solo[p] for p in PROMPTS[1:3]]
    rest = list(stream)
    assert rest and rest[-1].finished                    # the long one was still running meanwhile
    out = rest[-1].output
    assert out.finish_reason == "length" and len(out.token_ids) == 200
    assert out.token_ids[:12] == solo[PROMPTS[0]]
    assert first.token_ids + [t for c in rest for t in c.token_ids] == out.token_ids
    assert out.metrics["decode_s"] > short[0].metrics["decode_s"]


def test_stream_text_adds_up_and_never_shows_the_stop_string(llm: LLM) -> None:
    full = llm.generate("abc", SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))[0]
    stop = full.text[10:13]
    chunks = list(llm.stream("abc", SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop=[stop])))
    out = chunks[-1].output
    assert chunks[-1].finished and all(not c.finished for c in chunks[:-1])
    assert "".join(c.text for c in chunks) == out.text == full.text[:full.text.index(stop)]
    assert [t for c in chunks for t in c.token_ids] == out.token_ids and out.stop_reason == stop


def test_leaving_a_stream_early_cancels_only_that_request(llm: LLM, solo: dict) -> None:
    stream = llm.stream(PROMPTS[0], SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
    other = threading.Thread(target=lambda: got.append(llm.generate(PROMPTS[1], GREEDY)[0].token_ids))
    got: list[list[int]] = []
    handle_id = next(stream).request_id
    other.start()
    stream.close()                                       # the client went away
    other.join(timeout=60)
    assert got == [solo[PROMPTS[1]]]
    assert llm.generate(PROMPTS[2], GREEDY)[0].token_ids == solo[PROMPTS[2]]
    assert _num_requests(llm) == 0                                   # nothing left behind
    assert handle_id.startswith("req-")


def test_agenerate_runs_many_at_once_and_cancellation_aborts(llm: LLM, solo: dict) -> None:
    async def main() -> list[list[int]]:
        outs = await asyncio.gather(*(llm.agenerate(p, GREEDY) for p in PROMPTS))
        task = asyncio.ensure_future(llm.agenerate("abc", SamplingParams(max_tokens=200, ignore_eos=True)))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return [o.token_ids for o in outs]

    assert asyncio.run(main()) == [solo[p] for p in PROMPTS]
    assert _num_requests(llm) == 0


def test_kv_cache_grows_for_a_longer_request_while_others_run(llm: LLM, solo: dict) -> None:
    with ThreadPoolExecutor(2) as pool:
        short = pool.submit(llm.generate, PROMPTS[3], GREEDY)
        long_ = pool.submit(llm.generate, PROMPTS[4], SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
        assert short.result(60)[0].token_ids == solo[PROMPTS[3]]
        assert long_.result(120)[0].token_ids[:12] == solo[PROMPTS[4]]
    assert llm.stats().kv_cache_tokens == 0                           # idle: the cache is given back


def test_scheduler_admits_only_what_fits_lowest_slot_first() -> None:
    b: BatchScheduler[Req] = BatchScheduler(4)
    reqs = [Req(f"r{i}") for i in range(4)]
    for r in reqs:
        b.add(r)
    assert b.admit(lambda r, slot: slot < 2) == reqs[:2]             # r2 does not fit: it and r3 behind it wait
    b.finish(reqs[0])
    assert b.admit(lambda r, slot: r is not reqs[3]) == [reqs[2]] and reqs[2].slot == 0
    assert b.admit() == [reqs[3]] and reqs[3].slot == 2


def test_kv_cache_budget_refuses_what_never_fits_and_queues_what_fits_later(tiny_model_dir: Path) -> None:
    llm = LLM(str(tiny_model_dir), max_batch_size=4, kv_cache_tokens=160)
    try:
        with pytest.raises(InvalidRequestError, match="KV-cache budget of 160"):
            llm.generate("abc", SamplingParams(max_tokens=200))
        params = SamplingParams(max_tokens=90, temperature=0.0, ignore_eos=True)    # two of them need 2 x 93 > 160
        alone = [llm.generate(p, params)[0].token_ids for p in ("abc", "zz")]
        first = llm.stream("abc", params)
        first_ids = list(next(first).token_ids)                       # running, holding 128 positions
        with ThreadPoolExecutor(1) as pool:
            later = pool.submit(llm.generate, "zz", params)
            _wait_for(lambda: llm.stats().num_waiting == 1)
            stats = llm.stats()
            assert (stats.num_running, stats.num_waiting) == (1, 1) and stats.kv_cache_tokens <= 160
            first_ids += [i for chunk in first for i in chunk.token_ids]
            assert later.result(60)[0].token_ids == alone[1]          # admitted once the first one left
        assert first_ids == alone[0] and llm.stats().kv_cache_tokens == 0
    finally:
        llm.shutdown()


def test_a_long_aborted_request_gives_its_memory_back() -> None:
    llm = LLM("smollm2-135m", max_batch_size=4)                      # 46 KB of keys and values per position
    try:
        llm.generate("def f():", SamplingParams(max_tokens=4))         # warm: the engine thread, the kernels
        before = _rss_mb()
        chunks = llm.stream("def f():", SamplingParams(max_tokens=8000, ignore_eos=True))
        next(chunks)
        held = llm.stats().kv_cache_tokens
        chunks.close()                                                # abort
        _wait_for(lambda: llm.stats().kv_cache_tokens == 0)
        assert held >= 8000                                           # it did reserve ~370 MB ...
        assert _rss_mb() - before < 100                               # ... and gave them back
    finally:
        llm.shutdown()


def _rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024


def _wait_for(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.01)


def _num_requests(llm: LLM) -> int:
    stats = llm.stats()
    return stats.num_waiting + stats.num_running

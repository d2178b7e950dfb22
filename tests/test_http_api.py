"""The OpenAI-compatible HTTP API, driven by the official ``openai`` client against an in-process engine:
answers equal ``LLM.generate``, user errors are 4xx JSON, and a bounded load test (32 concurrent streams on
loopback, one cancelled by its client) leaves no request, thread or socket behind."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import urllib.error
import urllib.request

import openai
import pytest

from runtime import LLM, SamplingParams
from runtime.hybrid.cluster import RAY_ENV
from runtime.serving.http_api import BackgroundHttpServer, HttpServer

MODEL = "smollm2-135m"
PROMPT = "def fib(n):"
LOAD_PROMPTS = ["def fib(n):", "The capital of France is", "import os\n", "class Stack:"]
NUM_STREAMS, LOAD_TOKENS = 32, 6


def greedy(max_tokens: int = 12, stop: list[str] | None = None) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop or [])


@pytest.fixture(scope="module")
def llm() -> Iterator[LLM]:
    llm = LLM(MODEL)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def server(llm: LLM) -> Iterator[BackgroundHttpServer]:
    with BackgroundHttpServer(llm) as srv:                   # 127.0.0.1, a free port
        yield srv


@pytest.fixture
def client(server: BackgroundHttpServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120) as c:
        yield c


def http(url: str, body: bytes | None = None, method: str = "POST") -> tuple[int, dict]:
    """(status, decoded JSON body) of one plain HTTP request."""
    return http_reply(url, body, method)[:2]


def http_reply(url: str, body: bytes | None = None, method: str = "POST",
               headers: dict[str, str] | None = None) -> tuple[int, dict, dict[str, str]]:
    """(status, decoded JSON body, response headers) of one plain HTTP request."""
    request = urllib.request.Request(url, data=body, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read()), dict(e.headers)


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_models_lists_the_served_model(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion_equals_generate(client: openai.OpenAI, llm: LLM) -> None:
    want = llm.generate(PROMPT, greedy())[0]
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0)
    assert got.choices[0].text == want.text and got.choices[0].finish_reason == want.finish_reason == "length"
    assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(want.prompt_token_ids), len(want.token_ids))
    stop = want.text.strip().split()[1]                       # a word from the middle: ends it early
    cut = llm.generate(PROMPT, greedy(stop=[stop]))[0]
    got = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stop=stop)
    assert got.choices[0].text == cut.text and got.choices[0].finish_reason == "stop"


def test_chat_completion_equals_generating_from_the_template(client: openai.OpenAI, llm: LLM) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    want = llm.generate(llm.tokenizer.apply_chat_template(messages), greedy())[0]
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0, seed=1)
    assert got.choices[0].message.role == "assistant" and got.choices[0].message.content == want.text
    assert got.choices[0].finish_reason == want.finish_reason and got.usage.total_tokens == \
        len(want.prompt_token_ids) + len(want.token_ids)


def test_streamed_deltas_concatenate_to_the_whole_answer(client: openai.OpenAI, llm: LLM) -> None:
    want = llm.generate(PROMPT, greedy())[0]
    events = list(client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(e.choices[0].text for e in events if e.choices) == want.text
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == "length"
    assert events[-1].usage.completion_tokens == len(want.token_ids)          # the usage chunk comes last
    messages = [{"role": "user", "content": "Say hi."}]
    chat = llm.generate(llm.tokenizer.apply_chat_template(messages), greedy())[0]
    events = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0,
                                                 stream=True))
    assert events[0].choices[0].delta.role == "assistant"
    assert "".join(e.choices[0].delta.content or "" for e in events) == chat.text
    assert events[-1].choices[0].finish_reason == chat.finish_reason


BAD_REQUESTS = [   # (path, body, status, param)
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 3]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 1.5}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "stop": 3}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "seed": -2}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "seed": 2**70}, 400, "seed"),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400, "temperature"),
    ("/v1/completions", b"[" * 200_000, 400, None),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "x", "logprobs": 5}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hello " * 9000, "max_tokens": 4}, 400, None),
    ("/v1/completions", {"prompt": "hello " * 9000, "max_tokens": 4, "stream": True}, 400, None),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 7}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n"),
    ("/v1/nowhere", {}, 404, None),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": ' + b"9" * 5000 + b"}", 400, None),   # 4300+ digits
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**100}, 400, None),
    ("/v1/completions", b'{"prompt": "a \\ud800 b"}', 400, "prompt"),                       # a lone surrogate
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400, "messages"),
    ("/v1/completions", {"prompt": "x", "stop": [f"s{i}" for i in range(17)]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": ["z" * 1001]}, 400, "stop"),
]


def test_user_errors_are_4xx_json_and_the_server_keeps_serving(server: BackgroundHttpServer,
                                                                 client: openai.OpenAI) -> None:
    for path, body, status, param in BAD_REQUESTS:
        got, reply = http(server.url + path, body if isinstance(body, bytes) else json.dumps(body).encode())
        assert got == status, (body, reply)
        error = reply["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], body
        assert error["type"] == "invalid_request_error" and error["param"] == param, (body, error)
    assert http(server.url + "/v1/completions", method="GET")[0] == 405
    assert http(server.url + "/v1/models", method="GET")[0] == 200
    with pytest.raises(openai.BadRequestError, match="context"):        # the client surfaces them as such
        client.completions.create(model=MODEL, prompt="hello " * 9000, max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0).choices[0].text
    tiny = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=1e-40).choices[0].text
    assert tiny == client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0).choices[0].text


async def _stream_text(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, str | None]:
    text, finish = "", None
    async for event in await client.completions.create(model=MODEL, prompt=prompt, max_tokens=LOAD_TOKENS,
                                                       temperature=0, stream=True):
        text += event.choices[0].text
        finish = event.choices[0].finish_reason or finish
    return text, finish


async def _stream_then_hang_up(url: str, prompt: str, num_events: int = 2, model: str = MODEL) -> int:
    """Read ``num_events`` events of a long stream, then close the connection; returns how many were read."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 100, "temperature": 0, "stream": True})
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
    seen = 0
    while seen < num_events:
        line = await reader.readline()
        assert line, "the server closed the stream early"
        seen += line.startswith(b"data: {")
    writer.close()
    await writer.wait_closed()
    return seen


def test_32_concurrent_streams_one_hung_up_leave_nothing_behind(server: BackgroundHttpServer, llm: LLM) -> None:
    want = {p: llm.generate(p, greedy(LOAD_TOKENS))[0].text for p in LOAD_PROMPTS}      # each alone
    aborted_before = llm.stats().num_aborted

    def client() -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    async def warm() -> None:                           # the connection path and the server's tokenizing thread
        async with client() as c:
            await _stream_text(c, PROMPT)

    async def run() -> tuple[list[tuple[str, str | None]], int]:
        async with client() as client_:
            prompts = [LOAD_PROMPTS[i % len(LOAD_PROMPTS)] for i in range(NUM_STREAMS - 1)]
            hang_up = _stream_then_hang_up(server.url, "Once upon a time")
            *results, seen = await asyncio.gather(*(_stream_text(client_, p) for p in prompts), hang_up)
            return list(zip(prompts, results)), seen

    asyncio.run(warm())
    threads, fds = threading.active_count(), len(os.listdir("/proc/self/fd"))
    t0 = time.perf_counter()
    results, seen = asyncio.run(run())
    elapsed = time.perf_counter() - t0
    assert seen == 2 and len(results) == NUM_STREAMS - 1
    for prompt, (text, finish) in results:
        assert text == want[prompt] and finish in ("stop", "length"), prompt
    # the hung-up stream, and only it, was aborted:
    assert wait_until(lambda: (s := llm.stats()).num_waiting + s.num_running == 0), "a request is still in the engine"
    assert llm.stats().num_aborted - aborted_before == 1
    assert wait_until(lambda: server.server.api.num_active == 0), "a handler is still running"
    assert wait_until(lambda: threading.active_count() <= threads), threading.enumerate()
    assert wait_until(lambda: len(os.listdir("/proc/self/fd")) <= fds), "a socket or file was left open"
    print(f"{NUM_STREAMS} streams x {LOAD_TOKENS} tokens in {elapsed:.1f}s")


def test_requests_beyond_the_in_flight_limit_get_503_with_retry_after(llm: LLM) -> None:
    from http.client import HTTPConnection

    with BackgroundHttpServer(llm, max_in_flight=1) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        first = HTTPConnection(host, int(port), timeout=60)      # a long stream holds the one place
        first.request("POST", "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 200, "stream": True,
                                                             "ignore_eos": True}), {"Content-Type": "application/json"})
        response = first.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
        request = urllib.request.Request(srv.url + "/v1/completions", method="POST",
                                         data=json.dumps({"prompt": PROMPT, "max_tokens": 2}).encode(),
                                         headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(request, timeout=60)
        with e.value:
            assert e.value.code == 503 and e.value.headers["Retry-After"] == "1"
            assert json.loads(e.value.read())["error"]["code"] == "overloaded"
        first.close()                                                        # hang up: the place frees
        assert wait_until(lambda: srv.server.api.num_active == 0)
        assert http(srv.url + "/v1/completions", json.dumps({"prompt": PROMPT, "max_tokens": 2}).encode())[0] == 200


KEY = "sk-test-0123456789abcdef"


def test_an_api_key_guards_every_request(llm: LLM) -> None:
    with BackgroundHttpServer(llm, api_key=KEY) as srv:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                        {"Authorization": KEY}, {"Authorization": f"Bearer {KEY}x"}):
            for method, path, body in (("GET", "/v1/models", None), ("GET", "/v1/nowhere", None),
                                       ("POST", "/v1/completions", json.dumps({"prompt": PROMPT}).encode())):
                status, reply, got = http_reply(srv.url + path, body, method, headers)
                assert status == 401 and got["WWW-Authenticate"] == "Bearer", (headers, path)
                assert reply["error"]["type"] == "authentication_error" and reply["error"]["code"] == "invalid_api_key"
        assert http_reply(srv.url + "/v1/models", None, "GET", {"Authorization": f"bearer {KEY}"})[0] == 200
        with openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=60) as c:
            assert c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2, temperature=0).choices[0].text
            assert "".join(e.choices[0].text for e in c.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2,
                                                                         temperature=0, stream=True))
        with openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0, timeout=60) as c, \
                pytest.raises(openai.AuthenticationError):
            c.models.list()


def test_only_loopback_is_served_without_a_key_unless_opted_out(llm: LLM, caplog: pytest.LogCaptureFixture) -> None:
    for host in ("0.0.0.0", "::", "192.168.1.7", "example.com", ""):
        with pytest.raises(ValueError, match="--api-key.*PINFER_API_KEY.*--no-auth"):
            HttpServer(llm, host)
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        HttpServer(llm, host)
    for bad_key in ("", "two words", "naïve"):
        with pytest.raises(ValueError, match="API key must be"):
            HttpServer(llm, api_key=bad_key)
    with caplog.at_level(logging.WARNING, logger="runtime.serving.http_api"), \
            BackgroundHttpServer(llm, host="0.0.0.0", allow_unauthenticated=True) as srv:
        assert http(srv.url.replace("0.0.0.0", "127.0.0.1") + "/v1/models", method="GET")[0] == 200
    assert "0.0.0.0 without authentication" in caplog.text
    with BackgroundHttpServer(llm, host="0.0.0.0", api_key=KEY) as srv:
        assert http(srv.url.replace("0.0.0.0", "127.0.0.1") + "/v1/models", method="GET")[0] == 401


def test_pinfer_serve_checks_http_access_before_loading_a_model() -> None:
    def serve(*flags: str, key: str | None = None) -> subprocess.Popen:
        env = {k: v for k, v in os.environ.items() if k != "PINFER_API_KEY"} | ({"PINFER_API_KEY": key} if key else {})
        return subprocess.Popen([sys.executable, "-m", "runtime.cli", "serve", "--http", "--local", "--model",
                                 "no-such-model", *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    runs = [serve("--host", "0.0.0.0"), serve("--host", "0.0.0.0", key=KEY),
            serve("--host", "0.0.0.0", "--no-auth", key=KEY)]
    (open_, _), (keyed, _), (contradiction, _) = [(p.communicate(timeout=120)[1], p.returncode) for p in runs]
    assert "refusing to serve" in open_ and "--api-key" in open_ and "unknown model" not in open_
    assert "unknown model" in keyed                         # PINFER_API_KEY counted: on to loading the model
    assert "--no-auth serves without an API key" in contradiction


def test_connections_beyond_the_cap_get_a_canned_503(llm: LLM) -> None:
    fds = len(os.listdir("/proc/self/fd"))
    with BackgroundHttpServer(llm, max_connections=4) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        idle = [socket.create_connection((host, int(port)), timeout=10) for _ in range(4)]
        try:
            assert wait_until(lambda: srv.server.num_connections == 4)
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(srv.url + "/v1/models", timeout=10)
            with e.value:
                assert e.value.code == 503 and e.value.headers["Retry-After"] == "1"
                assert e.value.headers["Connection"] == "close"
                assert json.loads(e.value.read())["error"]["code"] == "overloaded"
            assert srv.server.num_connections == 4                   # the refused one never reached aiohttp
        finally:
            for sock in idle:
                sock.close()
        assert wait_until(lambda: srv.server.num_connections == 0)
        assert http(srv.url + "/v1/models", method="GET")[0] == 200
    assert wait_until(lambda: len(os.listdir("/proc/self/fd")) <= fds), "a socket was left open"


def test_stalled_request_heads_are_cut_off_and_stalled_bodies_get_408(llm: LLM) -> None:
    from http.client import HTTPResponse

    def hung_up(sock: socket.socket, t0: float) -> float:
        """Seconds since ``t0`` until the server hangs up without answering."""
        assert sock.recv(1024) == b""
        return time.monotonic() - t0

    with BackgroundHttpServer(llm, header_timeout_s=0.5, body_timeout_s=1.0) as srv:
        host, port = srv.url.removeprefix("http://").split(":")
        t0 = time.monotonic()
        with socket.create_connection((host, int(port)), timeout=10) as sock:          # half a head, then nothing
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
            assert 0.45 < hung_up(sock, t0) < 5                                        # keep-alive alone: 15 s
        with socket.create_connection((host, int(port)), timeout=10) as sock:          # a fresh deadline per answer
            t0 = time.monotonic()
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            response = HTTPResponse(sock)
            response.begin()
            assert response.status == 200 and json.loads(response.read())["data"]
            sock.sendall(b"GET /v1/mo")
            assert 0.45 < hung_up(sock, t0) < 5
        with socket.create_connection((host, int(port)), timeout=10) as sock:          # a body that stalls
            t0 = time.monotonic()
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100\r\n\r\n{\"prompt\": ")
            response = HTTPResponse(sock)
            response.begin()
            assert 0.9 < time.monotonic() - t0 < 5             # the body's 1 s, not the head's 0.5 s
            assert response.status == 408 and response.getheader("Connection") == "close"
            assert "did not arrive within 1 s" in json.loads(response.read())["error"]["message"]
        assert http(srv.url + "/v1/models", method="GET")[0] == 200


def test_pinfer_serve_http_through_a_ray_served_engine(tiny_model_dir: Path, tmp_path: Path) -> None:
    """``pinfer serve --http``: the hybrid engine as a Ray actor (embedded cluster) behind the API, reached
    through ``Client.agenerate`` / ``Client.astream``; SIGINT stops the server and the engine."""
    env = dict(os.environ, **RAY_ENV)
    env.pop("RAY_ADDRESS", None)
    log = tmp_path / "serve.log"
    with open(log, "w") as err:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "pinfer"), "serve", "--http", "--port", "0",
                                 "--model", str(tiny_model_dir), "--hot-fraction", "0.5", "--name", "pinfer-http-test",
                                 "--weights", "fp32"],          # fp32: hybrid and in-process tokens equal bit for bit
                                env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    watchdog = threading.Timer(240, proc.kill)                  # a hung start must not hang the suite
    watchdog.start()
    try:
        url = next((m[0] for line in proc.stdout if (m := re.search(r"http://\S+/v1", line))), None)
        assert url, log.read_text()[-3000:]
        local = LLM(str(tiny_model_dir), weights="fp32")
        want = local.generate("abc", greedy(10))[0]
        local.shutdown()
        with openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120) as client:
            assert [m.id for m in client.models.list().data] == [str(tiny_model_dir)]
            got = client.completions.create(model=str(tiny_model_dir), prompt="abc", max_tokens=10, temperature=0)
            assert got.choices[0].text == want.text and got.usage.completion_tokens == len(want.token_ids)
            events = client.completions.create(prompt="abc", model=str(tiny_model_dir), max_tokens=10, temperature=0,
                                               stream=True)
            assert "".join(e.choices[0].text for e in events) == want.text
            assert asyncio.run(_stream_then_hang_up(url.removesuffix("/v1"), "xyz", model=str(tiny_model_dir))) == 2
            with pytest.raises(openai.BadRequestError, match=r"^Error code: 400 - prompt \(3 tokens\)"):
                client.completions.create(model=str(tiny_model_dir), prompt="abc", max_tokens=1000, stream=True)
            chat = client.chat.completions.create(model=str(tiny_model_dir), max_tokens=4,
                                                  messages=[{"role": "user", "content": "hi"}])
            assert chat.choices[0].finish_reason in ("stop", "length")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
        assert "engine 'pinfer-http-test' stopped" in proc.stdout.read()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)

"""The server against the real `openai` and `anthropic` clients, on the tiny model (its text is gibberish: nothing
checks content): both APIs streaming and not, usage and cached tokens on a resent history, tool calls from a
scripted model (streamed deltas, an agent loop with tool results and preserved thinking), images, errors in each
API's shape, the API key, cancellation on disconnect, and concurrent clients on loopback."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import anthropic
import openai
import pytest
from media_fixture import encode_video
from scripted import Scripted

from mlx_qwen36 import load, load_model
from mlx_qwen36.engine import Engine
from mlx_qwen36.server import Server

MODEL = "tiny"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]


@contextmanager
def serving(model, processor, engine_options=None, **options):
    """A server on a free loopback port, in a thread; yields its base URL and engine."""
    import uvicorn

    engine = Engine(model, processor, **(engine_options or {}))
    server = Server(engine, MODEL, **options)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(server.app, log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", engine
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        engine.close()


@pytest.fixture(scope="module")
def chat(chat_dir):
    return load(chat_dir)


@pytest.fixture(scope="module")
def base(chat):
    with serving(*chat) as (url, engine):
        yield url, engine


def raw(url, method, path, body=None, headers=None, read=True):
    """A plain HTTP request (no client library): (status, parsed JSON body)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    data = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else None)
    conn.request(method, path, body=data, headers={"content-type": "application/json", **(headers or {})})
    response = conn.getresponse()
    if not read:
        return conn, response
    payload = response.read()
    conn.close()
    return response.status, json.loads(payload)


def oai(url, **kw):
    return openai.OpenAI(base_url=f"{url}/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


def ant(url, **kw):
    return anthropic.Anthropic(base_url=url, api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


# --- OpenAI Chat Completions ----------------------------------------------------------------------------------


def test_chat_completion_and_its_stream_agree(base):
    url, _ = base
    client = oai(url)
    messages = [{"role": "user", "content": "Hello there."}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "length" and r.usage.completion_tokens == 10
    assert r.usage.total_tokens == r.usage.prompt_tokens + 10
    text = (choice.message.reasoning_content or "") + (choice.message.content or "")
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed = "".join((getattr(d, "reasoning_content", None) or "") + (d.content or "") for d in deltas)
    assert streamed == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_resent_history_reuses_the_cache(base):
    url, _ = base
    client = oai(url)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "First question?"}]
    r1 = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
    m = r1.choices[0].message
    messages += [{"role": "assistant", "content": m.content or "", "reasoning_content": m.reasoning_content},
                 {"role": "user", "content": "And a second one?"}]
    r2 = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                        extra_body={"chat_template_kwargs": {"preserve_thinking": True}})
    cached = r2.usage.prompt_tokens_details.cached_tokens
    assert r1.usage.prompt_tokens <= cached < r2.usage.prompt_tokens  # the whole first turn, not the new one


def test_legacy_completions(base):
    url, _ = base
    client = oai(url)
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0, stream=True))
    assert streamed == r.choices[0].text


def test_models_and_health(base):
    url, _ = base
    assert [m.id for m in oai(url).models.list()] == [MODEL]
    assert raw(url, "GET", "/health")[1]["status"] == "ok"


# --- Anthropic Messages ---------------------------------------------------------------------------------------


def test_messages_and_their_stream_agree(base):
    url, _ = base
    client = ant(url)
    kw = {"model": MODEL, "max_tokens": 10, "system": "Be brief.", "extra_body": {"temperature": 0.0},
          "messages": [{"role": "user", "content": "Hello there."}]}
    m = client.messages.create(**kw)
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 10
    with client.messages.stream(**kw) as stream:
        events = [e.type for e in stream]
        final = stream.get_final_message()
    assert events[0] == "message_start" and events[-1] == "message_stop" and "content_block_delta" in events
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in m.content]
    off = client.messages.create(**kw, thinking={"type": "disabled"})
    assert all(b.type != "thinking" for b in off.content)
    count = client.messages.count_tokens(model=MODEL, messages=kw["messages"], system=kw["system"])
    assert count.input_tokens == m.usage.input_tokens + m.usage.cache_read_input_tokens


# --- tools: a scripted model ----------------------------------------------------------------------------------


def scripted_server(chat, processor_text: list[str]):
    model, processor = chat
    end = processor.token_id("<|im_end|>")
    script = [t for text in processor_text for t in processor.encode(text) + [end]]
    return serving(Scripted(model, script), processor)


CALL = ("Checking the weather.</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
        "</parameter>\n<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>")
ANSWER = "The tool answered.</think>\n\nIt is 18 degrees in Paris."


def test_openai_agent_loop_with_tools(chat):
    with scripted_server(chat, [CALL, ANSWER, CALL]) as (url, _):
        client = oai(url)
        messages = [{"role": "user", "content": "Weather in Paris?"}]
        r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=200,
                                           temperature=0)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        call = choice.message.tool_calls[0]
        assert call.id and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}  # typed by the schema
        assert choice.message.reasoning_content == "Checking the weather."
        messages += [{"role": "assistant", "content": None, "reasoning_content": choice.message.reasoning_content,
                      "tool_calls": [call.model_dump()]},
                     {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18}'}]
        r2 = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS, max_tokens=200,
                                            temperature=0,
                                            extra_body={"chat_template_kwargs": {"preserve_thinking": True}})
        assert r2.choices[0].finish_reason == "stop" and "18 degrees" in r2.choices[0].message.content
        assert r2.usage.prompt_tokens_details.cached_tokens >= r.usage.prompt_tokens
        stream = client.chat.completions.create(model=MODEL, messages=messages[:1], tools=TOOLS, max_tokens=200,
                                                temperature=0, stream=True)
        deltas = [c.choices[0].delta for c in stream if c.choices]
        calls = [tc for d in deltas for tc in (d.tool_calls or [])]
        assert [tc.index for tc in calls] == [0] and calls[0].function.name == "get_weather"
        assert json.loads("".join(tc.function.arguments for tc in calls)) == {"city": "Paris", "days": 3}


def test_anthropic_agent_loop_with_tools(chat):
    tools = [{"name": "get_weather", "description": "Weather in a city",
              "input_schema": TOOLS[0]["function"]["parameters"]}]
    with scripted_server(chat, [CALL, ANSWER, CALL]) as (url, _):
        client = ant(url)
        messages = [{"role": "user", "content": "Weather in Paris?"}]
        m = client.messages.create(model=MODEL, max_tokens=200, tools=tools, messages=messages)
        assert m.stop_reason == "tool_use"
        kinds = [b.type for b in m.content]
        assert kinds == ["thinking", "tool_use"]
        use = m.content[1]
        assert use.name == "get_weather" and use.input == {"city": "Paris", "days": 3}
        messages += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in m.content]},
                     {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                   "content": '{"temperature": 18}'}]}]
        m2 = client.messages.create(model=MODEL, max_tokens=200, tools=tools, messages=messages)
        assert m2.stop_reason == "end_turn" and "18 degrees" in m2.content[-1].text
        assert m2.usage.cache_read_input_tokens > 0
        with client.messages.stream(model=MODEL, max_tokens=200, tools=tools, messages=messages[:1]) as stream:
            raw = [e for e in stream]
            final = stream.get_final_message()
        assert any(e.type == "content_block_delta" and e.delta.type == "input_json_delta" for e in raw)
        assert final.stop_reason == "tool_use" and final.content[-1].input == {"city": "Paris", "days": 3}


def test_stop_sequences_are_reported(chat):
    with scripted_server(chat, ["Done.</think>\n\nalpha beta STOP gamma"]) as (url, _):
        m = ant(url).messages.create(model=MODEL, max_tokens=50, stop_sequences=["STOP"],
                                     messages=[{"role": "user", "content": "go"}])
        assert m.stop_reason == "stop_sequence" and m.stop_sequence == "STOP"
        assert m.content[-1].text.strip() == "alpha beta"


# --- images ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vl(chat, vl_checkpoint):
    folder, picture = vl_checkpoint
    return load_model(folder), chat[1], picture


def test_images_by_data_url_and_allowed_files(vl, tmp_path):
    model, processor, picture = vl
    data = base64.b64encode(picture.read_bytes()).decode()
    with serving(model, processor, allowed_media=picture.parent) as (url, _):
        client = oai(url)
        text_only = client.chat.completions.create(model=MODEL, max_tokens=2, messages=[
            {"role": "user", "content": "What is this?"}])
        for image in (f"data:image/png;base64,{data}", str(picture), f"file://{picture}"):
            r = client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": "What is this?"}]}])
            assert r.usage.prompt_tokens > text_only.usage.prompt_tokens + 3  # the image's tokens
        av = pytest.importorskip("av", reason="PyAV is not installed")
        clip = encode_video(av, picture.parent / "clip.mp4", frames=8, fps=4, height=64, width=64)
        v = client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": str(clip)}}, {"type": "text", "text": "What happens?"}]}])
        assert v.usage.prompt_tokens > text_only.usage.prompt_tokens + 3
        m = ant(url).messages.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}},
            {"type": "text", "text": "What is this?"}]}])
        assert m.usage.input_tokens + m.usage.cache_read_input_tokens == r.usage.prompt_tokens
        outside = tmp_path / "elsewhere.png"
        outside.write_bytes(picture.read_bytes())
        with pytest.raises(openai.PermissionDeniedError, match="outside --allowed-local-media"):
            client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": str(outside)}}]}])
        with pytest.raises(openai.BadRequestError, match="not fetched"):
            client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]}])


def test_local_files_are_refused_by_default(base):
    url, _ = base
    status, body = raw(url, "POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]})
    assert status == 400 and "--allowed-local-media" in body["error"]["message"]


# --- errors, the API key ------------------------------------------------------------------------------------


def test_errors_in_each_apis_shape(base):
    url, _ = base
    hi = [{"role": "user", "content": "hi"}]
    status, body = raw(url, "POST", "/v1/chat/completions", b"{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    status, body = raw(url, "POST", "/v1/chat/completions", {"model": "gpt-9", "messages": hi})
    assert status == 404 and body["error"]["type"] == "not_found_error"
    status, body = raw(url, "POST", "/v1/chat/completions", {"model": MODEL, "messages": hi, "temperature": "hot"})
    assert status == 400 and body["error"]["param"] == "temperature"
    status, body = raw(url, "POST", "/v1/chat/completions", {"model": MODEL, "messages": hi, "temperature": -1})
    assert status == 400 and "temperature" in body["error"]["message"]
    status, body = raw(url, "POST", "/v1/chat/completions", {"model": MODEL, "messages": []})
    assert status == 400 and body["error"]["param"] == "messages"
    status, body = raw(url, "POST", "/v1/chat/completions", {"model": MODEL, "messages": hi, "n": 3})
    assert status == 400 and body["error"]["param"] == "n"
    status, body = raw(url, "POST", "/v1/messages", {"model": MODEL, "messages": hi})
    assert status == 400 and body == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "'max_tokens' is required"}}
    status, body = raw(url, "POST", "/v1/chat/completions", b"x" * (65 << 20))
    assert status == 413 and "over" in body["error"]["message"]
    assert raw(url, "GET", "/health")[0] == 200  # and the server goes on


def test_api_key_on_every_route_but_health(chat):
    with serving(*chat, api_key="s3cret") as (url, _):
        with pytest.raises(openai.AuthenticationError):
            oai(url, api_key="wrong").models.list()
        with pytest.raises(anthropic.AuthenticationError):
            ant(url, api_key="wrong").messages.create(model=MODEL, max_tokens=2,
                                                      messages=[{"role": "user", "content": "hi"}])
        assert [m.id for m in oai(url, api_key="s3cret").models.list()] == [MODEL]  # Bearer
        assert ant(url, api_key="s3cret").messages.create(  # x-api-key
            model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}]).usage.output_tokens == 2
        assert raw(url, "GET", "/health")[0] == 200
        assert raw(url, "GET", "/v1/models")[0] == 401


# --- robustness -----------------------------------------------------------------------------------------------


def test_a_client_that_disconnects_cancels_its_generation(base):
    url, engine = base
    conn, response = raw(url, "POST", "/v1/chat/completions", {
        "model": MODEL, "stream": True, "max_tokens": 4000, "temperature": 0,
        "messages": [{"role": "user", "content": "Go on for a long time."}]}, read=False)
    assert response.status == 200 and response.readline().startswith(b"data: ")
    conn.close()  # the client goes away
    r = oai(url).chat.completions.create(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "hi"}])
    assert r.usage.completion_tokens == 3
    long_job = next(j for j in reversed(engine.finished) if j.kwargs["max_tokens"] == 4000)
    assert long_job.cancelled.is_set() and long_job.produced < 1000  # stopped, not run to its 4000 tokens
    for _, pc in engine.caches:
        assert all(c.offset == len(pc.tokens) for c in pc.cache)


def test_concurrent_clients_are_all_answered(base):
    url, engine = base
    n = 6

    def ask(i):
        client = oai(url, timeout=120)
        stream = client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0, stream=True,
                                                messages=[{"role": "user", "content": f"Client {i} asks."}])
        return [c.choices[0].finish_reason for c in stream if c.choices][-1]

    served = engine.served
    started = time.monotonic()
    with ThreadPoolExecutor(n) as pool:
        finishes = list(pool.map(ask, range(n)))
    assert finishes == ["length"] * n
    assert time.monotonic() - started < 120
    assert engine.served - served == n and all(j.produced == 5 for j in list(engine.finished)[-n:])  # 4 + the end


def test_conversations_get_their_own_caches_within_the_budget(chat):
    def talk(client, who):
        messages = [{"role": "user", "content": f"I am {who}, and this is my long first question for you."}]
        first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
        messages += [{"role": "assistant", "content": first.choices[0].message.content or ""},
                     {"role": "user", "content": "Go on."}]
        return client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)

    with serving(*chat, engine_options={"max_caches": 2}) as (url, engine):
        client = oai(url)
        talk(client, "Ann")
        talk(client, "Bob")
        again = talk(client, "Ann")  # Ann's cache was kept beside Bob's
        assert again.usage.prompt_tokens_details.cached_tokens > 10 and len(engine.caches) == 2
    with serving(*chat, engine_options={"max_caches": 4, "max_cache_bytes": 1}) as (url, engine):
        client = oai(url)
        talk(client, "Ann")
        talk(client, "Bob")
        assert len(engine.caches) == 1  # over the budget: only the latest is kept
        assert raw(url, "GET", "/health")[1]["prompt_caches"] == 1


def test_the_command_line_serves(chat_dir):
    """`python -m mlx_qwen36.server` as a user starts it: bound to localhost, answering on the port it names."""
    import re
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "mlx_qwen36.server", "--model", str(chat_dir), "--port", "0",
                             "--model-name", MODEL], stderr=subprocess.PIPE, text=True)
    try:
        port = None
        deadline = time.monotonic() + 120
        while port is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "the server exited"
            if m := re.search(r"running on http://127\.0\.0\.1:(\d+)", line):
                port = int(m.group(1))
        assert port, "the server did not say where it listens"
        url = f"http://127.0.0.1:{port}"
        assert raw(url, "GET", "/health")[1]["model"] == MODEL
        r = oai(url).chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
        assert r.usage.completion_tokens == 2
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    bad = subprocess.run([sys.executable, "-m", "mlx_qwen36.server", "--model", str(chat_dir / "missing")],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("error:")


def test_the_engine_keeps_its_caches_quantized_when_asked(chat):
    from mlx_qwen36.cache import QuantizedKVCache

    with serving(*chat, engine_options={"kv_bits": 8, "kv_group_size": 32}) as (url, engine):
        r = oai(url).chat.completions.create(model=MODEL, max_tokens=3, messages=[{"role": "user", "content": "hi"}])
        assert r.usage.completion_tokens == 3
        assert any(isinstance(c, QuantizedKVCache) for _, pc in engine.caches for c in pc.cache)

"""`tunelite serve`: the tiny model behind an OpenAI-compatible server on 127.0.0.1, talked to with
the `openai` client: replies equal `tunelite generate`'s, bad requests get 4xx with a message."""

import http.client
import json
import signal
import subprocess
import sys
import threading

import openai
import pytest

from tunelite.cli.main import main
from tunelite.cli.serve import build_server
from tunelite.generation import StopStrings

PROMPT = "Give three tips for staying healthy."


@pytest.fixture(scope="module")
def server():
    server = build_server("tiny/generation", [], "127.0.0.1", 0, name="tiny")
    server.quiet = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    host, port = server.server_address[:2]
    return openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="unused", max_retries=0)


def generate_reply(capsys, *overrides: str, prompt: str = PROMPT) -> str:
    """What `tunelite generate --prompt` prints as the reply (its last line is the speed report)."""
    capsys.readouterr()
    assert main(["generate", "--config", "tiny/generation", "--prompt", prompt, *overrides]) == 0
    return capsys.readouterr().out.rstrip("\n").rsplit("\n", 1)[0]


def test_greedy_chat_whole_and_streamed_equals_tunelite_generate(client, capsys):
    expected = generate_reply(capsys, "max_new_tokens=12")
    assert expected.strip()
    messages = [{"role": "user", "content": PROMPT}]

    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0)
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].message.role == "assistant"
    assert whole.usage.completion_tokens <= 12 and whole.usage.prompt_tokens > 5

    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=12, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_text_completion_equals_tunelite_generate_without_chat_layout(client, capsys):
    expected = generate_reply(capsys, "max_new_tokens=8", "chat=False", prompt="Once upon a time")
    whole = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert whole.choices[0].text == expected
    streamed = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == expected


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == ["tiny"]


def test_stop_string_ends_the_reply_before_it_whole_or_streamed(client, capsys):
    full = generate_reply(capsys, "max_new_tokens=16")
    stop = full[len(full) // 2:len(full) // 2 + 3]
    expected = full[:full.index(stop)]
    messages = [{"role": "user", "content": PROMPT}]
    whole = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0, stop=[stop])
    assert (whole.choices[0].message.content, whole.choices[0].finish_reason) == (expected, "stop")
    streamed = client.chat.completions.create(model="tiny", messages=messages, max_tokens=16, temperature=0,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected


def test_stop_strings_hold_back_text_that_may_start_one():
    cut = StopStrings(["###", "END"])
    assert [cut.push(p) for p in ["Hello E", "N", "ough #", "# x #", "#", "# tail"]] == [
        "Hello ", "", "ENough ", "## x ", "", ""]
    assert cut.stopped and cut.push("more") == "" and cut.flush() == ""
    open_ended = StopStrings(["END"])
    assert open_ended.push("the EN") == "the " and open_ended.flush() == "EN"


def test_a_seed_makes_sampling_repeatable(client):
    def sample(seed: int) -> str:
        reply = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=10, temperature=1.0, top_p=0.95, seed=seed)
        return reply.choices[0].message.content

    assert sample(3) == sample(3)
    assert len({sample(seed) for seed in range(4)}) > 1


def test_concurrent_requests_generate_one_at_a_time(server, client, monkeypatch):
    served = server.served
    lock_entries = []
    real_lock = served._lock

    class RecordingLock:
        def __enter__(self):
            real_lock.acquire()
            lock_entries.append("enter")

        def __exit__(self, *exc):
            lock_entries.append("exit")
            real_lock.release()

    monkeypatch.setattr(served, "_lock", RecordingLock())
    replies = []

    def ask() -> None:
        replies.append(client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}],
                                                      max_tokens=12, temperature=0).choices[0].message.content)

    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert lock_entries == ["enter", "exit"] * 3
    assert len(replies) == 3 and len(set(replies)) == 1


def test_bad_json_unknown_model_and_too_long_prompt_get_4xx_with_a_message(server, client):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port)
    conn.request("POST", "/v1/chat/completions", body=b'{"model": "tiny", "messages": [', headers={
        "Content-Type": "application/json"})
    response = conn.getresponse()
    error = json.loads(response.read())["error"]
    assert response.status == 400 and "not valid JSON" in error["message"]
    assert error["type"] == "invalid_request_error"

    with pytest.raises(openai.NotFoundError, match="'gpt-4' does not exist here; this server serves 'tiny'"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "Hi"}])

    too_long = "many words " * 2000
    with pytest.raises(openai.BadRequestError, match="maximum context length is 2048 tokens") as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": too_long}])
    assert info.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="lower max_tokens"):
        client.completions.create(model="tiny", prompt="Hello", max_tokens=5000)


@pytest.mark.parametrize("params, param", [
    ({"temperature": 3}, "temperature"), ({"top_p": 0}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
    ({"n": 2}, "n"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"seed": "x"}, "seed"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
])
def test_bad_parameter_values_are_named(client, params, param):
    request = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], **params}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**request)
    assert info.value.param == param and info.value.status_code == 400


def test_serve_command_answers_then_stops_cleanly_on_sigterm():
    process = subprocess.Popen([sys.executable, "-m", "tunelite.cli.main", "serve", "--config", "tiny/generation",
                                "--port", "0", "--served-model-name", "tiny"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = process.stdout.readline()
        assert banner.startswith("Serving 'tiny' on http://127.0.0.1:"), banner + process.stderr.read()
        port = int(banner.split("http://127.0.0.1:")[1].split("/")[0])
        conn = http.client.HTTPConnection("127.0.0.1", port)
        conn.request("GET", "/v1/models")
        assert json.loads(conn.getresponse().read())["data"][0]["id"] == "tiny"
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0
    assert "Stopped." in out

"""LLM backend against a fake OpenAI-compatible server on 127.0.0.1 started by each test."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from degla_fast.cli import main as cli_main
from degla_fast.errors import ConfigError
from degla_fast.negatives import cache as cache_module
from degla_fast.negatives.io import Caption
from degla_fast.negatives.llm import ChatClient, build_messages, generate_llm, load_prompts, parse_candidates

TYPES = ("swap_nouns", "replace_adjective")
CAPTIONS = [
    Caption("0", "A black dog next to a white cat.", image="0.jpg"),
    Caption("1", "A red bus behind a small car.", image="1.jpg"),
    Caption("2", "An old man holding a cup.", image="2.jpg"),
]
# What a well-behaved model answers, per (caption, type); a few bad lines to be rejected.
ANSWERS = {
    (CAPTIONS[0].caption, "swap_nouns"): "1. A black cat next to a white dog.\n2. A black cat next to a white dog.",
    (CAPTIONS[0].caption, "replace_adjective"): "A brown dog next to a white cat.",
    (CAPTIONS[1].caption, "swap_nouns"): "A red car behind a small bus.",
    (CAPTIONS[1].caption, "replace_adjective"): "A red bus behind a small car.\nA red bus behind a large car.",
    (CAPTIONS[2].caption, "swap_nouns"): "- A man holding a cup.",  # not a swap: a word was dropped
    (CAPTIONS[2].caption, "replace_adjective"): "A young man holding a cup.",
}
EXPECTED = {
    "0": ["A black cat next to a white dog.", "A brown dog next to a white cat."],
    "1": ["A red car behind a small bus.", "A red bus behind a large car."],
    "2": ["A young man holding a cup."],
}


class FakeServer:
    """Chat-completions server; ``script`` is a list of behaviours used by successive
    requests ("ok", "500", "429", "malformed", "slow", "401", "400"); then "ok" forever."""

    def __init__(self, script=(), delay=0.0):
        self.script, self.delay = list(script), delay
        self.requests, self.headers = [], []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    server.headers.append(dict(self.headers))
                    behaviour = server.script.pop(0) if server.script else "ok"
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    server.respond(self, body, behaviour)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on a slow reply
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    def respond(self, handler, body, behaviour):
        time.sleep(self.delay)
        if behaviour == "slow":
            time.sleep(0.6)
        if behaviour in ("500", "429", "401", "400"):
            return self._send(handler, int(behaviour), b'{"error": "scripted"}')
        if behaviour.startswith("redirect"):  # "redirect CODE URL"
            _, code, location = behaviour.split(" ", 2)
            handler.send_response(int(code))
            handler.send_header("Location", location)
            handler.send_header("Content-Length", "0")
            return handler.end_headers()
        if behaviour in ("echo401", "echo400"):  # a server that echoes the request headers, key included
            echoed = json.dumps({"error": "bad key", "headers": dict(handler.headers)}).encode()
            return self._send(handler, int(behaviour[4:]), echoed)
        if behaviour.startswith("cut"):  # "cut401 N": the header echoed so that byte 300 cuts N chars into the key
            status, inside = behaviour[3:].split()
            fixed = len(b'{"error": "invalid key", "pad": "", "received": "Bearer ')
            pad = b"x" * (300 - int(inside) - fixed)
            echoed = b'{"error": "invalid key", "pad": "%s", "received": "%s"}' % (
                pad, handler.headers["Authorization"].encode())
            return self._send(handler, int(status), echoed)
        if behaviour == "echo200":  # a reply quoting the key, as a model asked to repeat its input might
            header = handler.headers["Authorization"]
            key = header.removeprefix("Bearer ")
            content = (f"A black cat next to a white dog.\nAuthorization: {header}\nbearer%20{key}\n"
                       f"the key starts {key[:30]} and ends {key[-30:]}")
            reply = {"choices": [{"message": {"role": "assistant", "content": content}}]}
            return self._send(handler, 200, json.dumps(reply).encode())
        if behaviour == "malformed":
            return self._send(handler, 200, b'{"choices": [{"message": ')
        neg_type = body["messages"][0]["content"]  # the test prompts put the type in "system"
        caption = body["messages"][-1]["content"].split("Caption: ", 1)[1]
        reply = {"choices": [{"message": {"role": "assistant", "content": ANSWERS[(caption, neg_type)]}}]}
        self._send(handler, 200, json.dumps(reply).encode())

    @staticmethod
    def _send(handler, status, payload):
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def prompts(tmp_path):
    folder = tmp_path / "prompts"
    folder.mkdir()
    for neg_type in TYPES:
        (folder / f"{neg_type}.yaml").write_text(yaml.safe_dump({
            "system": neg_type,
            "instruction": "Give {n} rewrite(s).\nCaption: {caption}",
            "examples": [{"caption": "A cat on a mat.", "negatives": ["A mat on a cat."]}],
        }))
    return folder


def _client(server, **overrides):
    settings = dict(url=server.url, model="fake", timeout=0.3, max_retries=2, backoff=0.001)
    settings.update(overrides)
    return ChatClient(**settings)


def _run(server, prompts, tmp_path, captions=CAPTIONS, concurrency=2, **overrides):
    return generate_llm(
        captions, TYPES, client=_client(server, **overrides), prompts=load_prompts(prompts, TYPES),
        cache_path=tmp_path / "cache.jsonl", concurrency=concurrency, progress=False,
    )


def _cache_lines(tmp_path):
    return [json.loads(line) for line in (tmp_path / "cache.jsonl").read_text().splitlines()]


def test_success_keeps_valid_answers_and_counts_rejects(prompts, tmp_path):
    with FakeServer() as server:
        negatives, summary = _run(server, prompts, tmp_path)
    assert negatives == EXPECTED
    assert len(server.requests) == 6
    assert summary.kept == {"swap_nouns": 2, "replace_adjective": 3}
    # duplicate line (caption 0), not a swap (caption 2), identical to the caption (caption 1)
    assert summary.rejected == {"swap_nouns": 2, "replace_adjective": 1}
    assert summary.reasons == {"duplicate": 1, "not_a_swap": 1, "identical": 1}
    assert +summary.missing == {"swap_nouns": 1} and summary.records == 3
    assert {(e["id"], e["type"]) for e in _cache_lines(tmp_path)} == {(c.id, t) for c in CAPTIONS for t in TYPES}
    request = server.requests[0]
    assert request["model"] == "fake" and request["messages"][1]["content"].endswith("Caption: A cat on a mat.")
    assert request["messages"][2] == {"role": "assistant", "content": "A mat on a cat."}


def test_server_error_then_success_is_retried(prompts, tmp_path):
    with FakeServer(script=["500", "429"]) as server:
        negatives, summary = _run(server, prompts, tmp_path)
    assert negatives == EXPECTED
    assert len(server.requests) == 8 and sum(summary.failed.values()) == 0


def test_malformed_json_is_retried_then_counted_as_failed(prompts, tmp_path):
    with FakeServer(script=["malformed"]) as server:
        negatives, _ = _run(server, prompts, tmp_path)
    assert negatives == EXPECTED and len(server.requests) == 7
    # Always malformed: the pair gives up after 1 + max_retries attempts and is not cached as done.
    one = [CAPTIONS[0]]
    with FakeServer(script=["malformed"] * 3) as server:
        negatives, summary = _run(server, prompts, tmp_path / "b", captions=one, concurrency=1, max_retries=2)
    assert len(server.requests) == 3 + 1
    assert sum(summary.failed.values()) == 1 and "failed: malformed response" in summary.reasons
    failed = [e for e in _cache_lines(tmp_path / "b") if e["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["reason"].startswith("malformed response after 3 attempts")
    assert len(negatives["0"]) == 1  # only the type that answered
    # The next run asks again for the failed pair only.
    with FakeServer() as server:
        negatives, summary = _run(server, prompts, tmp_path / "b", captions=one)
    assert len(server.requests) == 1 and negatives == {"0": EXPECTED["0"]}


def test_timeout_is_retried(prompts, tmp_path):
    with FakeServer(script=["slow"]) as server:
        negatives, summary = _run(server, prompts, tmp_path, timeout=0.2)
    assert negatives == EXPECTED and len(server.requests) == 7 and sum(summary.failed.values()) == 0


def test_resume_after_interruption_never_asks_twice(prompts, tmp_path, monkeypatch):
    original_append = cache_module.NegativeCache.append
    calls = []

    def dying_append(self, entry):
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user pressed Ctrl-C after two results
        calls.append(entry)
        original_append(self, entry)

    monkeypatch.setattr(cache_module.NegativeCache, "append", dying_append)
    with FakeServer() as server, pytest.raises(KeyboardInterrupt):
        _run(server, prompts, tmp_path, concurrency=1)
    monkeypatch.setattr(cache_module.NegativeCache, "append", original_append)
    done_first = {(e["id"], e["type"]) for e in _cache_lines(tmp_path)}
    assert len(done_first) == 2
    with (tmp_path / "cache.jsonl").open("a") as handle:
        handle.write('{"id": "2", "type": "swap_')  # a line cut short by a kill
    with FakeServer() as server:
        negatives, _ = _run(server, prompts, tmp_path)
    asked = {(c.id, t) for c in CAPTIONS for t in TYPES
             if any(r["messages"][-1]["content"].endswith(c.caption) and r["messages"][0]["content"] == t
                    for r in server.requests)}
    assert len(server.requests) == 4 and asked.isdisjoint(done_first)
    assert negatives == EXPECTED
    with FakeServer() as server:  # a third run has nothing left to ask
        assert _run(server, prompts, tmp_path)[0] == EXPECTED and server.requests == []


def test_changed_caption_is_asked_again(prompts, tmp_path):
    with FakeServer() as server:
        _run(server, prompts, tmp_path)
    edited = [CAPTIONS[0], CAPTIONS[1], Caption("2", CAPTIONS[0].caption, image="2.jpg")]
    with FakeServer() as server:
        negatives, _ = _run(server, prompts, tmp_path, captions=edited)
    assert len(server.requests) == 2 and negatives["2"] == EXPECTED["0"]


def test_auth_errors_stop_the_run_and_bad_requests_are_not_retried(prompts, tmp_path):
    with FakeServer(script=["401"]) as server, pytest.raises(ConfigError, match="HTTP 401 for model 'fake'"):
        _run(server, prompts, tmp_path, max_retries=3)
    with FakeServer(script=["400"]) as server:
        _, summary = _run(server, prompts, tmp_path / "b", max_retries=3)
    assert len(server.requests) == 6 and sum(summary.failed.values()) == 1


def test_key_header_and_concurrency_limit(prompts, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_KEY", "secret")
    with FakeServer(delay=0.05) as server:
        _run(server, prompts, tmp_path, key_env="MY_KEY")
    assert all(h.get("Authorization") == "Bearer secret" for h in server.headers)
    assert 1 <= server.max_in_flight <= 2


def test_messages_and_reply_parsing(prompts):
    prompt = load_prompts(prompts, TYPES)["swap_nouns"]
    messages = build_messages(prompt, "A dog on a bed.", 2)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[-1]["content"] == "Give 2 rewrite(s).\nCaption: A dog on a bed."
    assert parse_candidates('1. "A bed on a dog."\n\n- A dog on a bed\n(3) x') == ["A bed on a dog.", "A dog on a bed", "x"]


def test_shipped_prompts_load_and_their_examples_pass_validation():
    from degla_fast.negatives import NEGATIVE_TYPES
    from degla_fast.negatives.llm import DEFAULT_PROMPTS
    from degla_fast.negatives.validate import check_negative

    loaded = load_prompts(DEFAULT_PROMPTS, NEGATIVE_TYPES)
    for neg_type, prompt in loaded.items():
        assert len(prompt.examples) >= 3
        for caption, negatives in prompt.examples:
            assert all(check_negative(caption, n, neg_type) is None for n in negatives), (neg_type, caption)


def test_cli_llm_end_to_end_and_resume(prompts, tmp_path, capsys):
    coco = tmp_path / "captions.json"
    coco.write_text(json.dumps({"annotations": [
        {"image_id": 100 + i, "id": i, "caption": c.caption} for i, c in enumerate(CAPTIONS)
    ]}))
    out = tmp_path / "neg.json"
    argv = ["negatives", "--input", str(coco), "--output", str(out), "--method", "llm", "--types", *TYPES,
            "--llm-model", "fake", "--prompts", str(prompts), "--timeout", "0.5", "--no-progress"]
    with FakeServer() as server:
        assert cli_main(argv + ["--llm-url", server.url + "/chat/completions"]) == 0
    records = json.loads(out.read_text())
    assert records == [{"image_id": 100 + int(k), "original": CAPTIONS[int(k)].caption, "enhanced": v}
                       for k, v in EXPECTED.items()]
    assert (tmp_path / "neg.json.cache.jsonl").exists()
    err = capsys.readouterr().err
    assert "swap_nouns" in err and "records written: 3 of 3" in err
    with FakeServer() as server:
        assert cli_main(argv + ["--llm-url", server.url]) == 0
    assert server.requests == [] and json.loads(out.read_text()) == records


# ---------------------------------------------------------------- the key, the URL, failures, the output

KEY = "sk-proj-Q7vR2mXk9LpT4wZs8YhN3cBf6GdJ1aUe5KoWi0ErPtx4"  # 52 characters, the length of a real key


def _longest_piece(text: str, key: str = KEY) -> int:
    """The length of the longest stretch of ``key`` that ``text`` holds (0: none)."""
    longest = 0
    for start in range(len(key)):
        while start + longest < len(key) and key[start:start + longest + 1] in text:
            longest += 1
    return longest


assert len(KEY) == 52


def _free_port():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cli_argv(prompts, tmp_path, url, *extra, out=None):
    listed = tmp_path / "captions.json"
    listed.write_text(json.dumps([{"image": c.image, "caption": c.caption} for c in CAPTIONS]))
    return ["negatives", "--input", str(listed), "--output", str(out or tmp_path / "neg.json"), "--method", "llm",
            "--types", *TYPES, "--llm-model", "fake", "--prompts", str(prompts), "--timeout", "0.5",
            "--max-retries", "1", "--backoff", "0.001", "--llm-key-env", "MY_KEY", "--no-progress",
            "--llm-url", url, *extra]


@pytest.mark.parametrize("code", ["301", "302", "303", "307", "308"])
def test_a_redirect_to_another_port_never_receives_the_key(code, prompts, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MY_KEY", KEY)
    with FakeServer() as other, FakeServer(script=[f"redirect {code} {other.url}/chat/completions"] * 10) as server:
        status = cli_main(_cli_argv(prompts, tmp_path, server.url))
    assert server.headers[0].get("Authorization") == f"Bearer {KEY}"  # the address the user gave
    assert other.requests == [] and all("Authorization" not in h for h in other.headers)
    assert status == 2
    err = capsys.readouterr().err
    assert KEY not in err and f"HTTP {code} redirect to {other.url}" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "neg.json").exists()


def test_redact_leaves_no_piece_of_the_key_and_no_bearer_value():
    from degla_fast.negatives.llm import KEY_FRAGMENT, redact

    for start in range(len(KEY)):  # every prefix, suffix and middle piece of 8 or more characters
        for end in range(start + KEY_FRAGMENT, len(KEY) + 1):
            text = f'{{"got": "x{KEY[start:end]}y", "again": "{KEY[start:end]}"}}'
            assert _longest_piece(redact(text, KEY)) < KEY_FRAGMENT, (start, end)
    for form in ("Bearer {}", "bearer {}", "BEARER\t{}", "Bearer%20{}", "bearer+{}", "Bearer \\/{}", "Bearer   {}"):
        other = "tok.en-_~+/9="  # not the key: any Bearer value goes
        assert other not in redact(form.format(other), KEY) and "[redacted]" in redact(form.format(other), None)
    assert redact("bearer\\u0020abcdef123", None) == "bearer\\u0020[redacted]"
    # Ordinary text, short pieces of the key and a short key's neighbours stay; redacting twice changes nothing.
    text = f"A black cat next to a white dog; {KEY[:7]} and {KEY[-7:]}."
    assert redact(text, KEY) == text
    once = redact(f"{KEY} and {KEY[3:40]} / Bearer {KEY}", KEY)
    assert once == "[redacted] and [redacted] / Bearer [redacted]" and redact(once, KEY) == once
    assert redact("the key is abcd!", "abcd") == "the key is [redacted]!"


# 401/400 bodies that echo the header whole, or cut at byte 300 after 8, 20 or 51 of the key's 52
# characters; a 200 reply that quotes it (kept and rejected candidates).
ECHOES = ["echo401", "echo400", "cut401 8", "cut401 20", "cut401 51", "cut400 8", "cut400 20", "cut400 51", "echo200"]


@pytest.mark.parametrize("behaviour", ECHOES)
def test_an_echoed_key_is_never_printed_nor_cached(behaviour, prompts, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MY_KEY", KEY)
    with FakeServer(script=[behaviour] * 20) as server:
        status = cli_main(_cli_argv(prompts, tmp_path, server.url))
    assert server.requests and server.headers[0]["Authorization"] == f"Bearer {KEY}"
    assert status == (2 if "401" in behaviour else 1 if "400" in behaviour else 0)
    err = capsys.readouterr().err
    written = {p.name: p.read_text() for p in tmp_path.glob("neg*")}  # the cache, the output or the partial output
    assert _longest_piece(err) < 8 and all(_longest_piece(text) < 8 for text in written.values()), (err, written)
    if "401" in behaviour:
        assert "HTTP 401" in err and "[redacted]" in err
    if behaviour == "echo200":
        cache = written["neg.json.cache.jsonl"]
        assert "Authorization: Bearer [redacted]" in cache and "bearer%20[redacted]" in cache
        assert "the key starts [redacted] and ends [redacted]" in cache


@pytest.mark.parametrize("url", ["notaurl", "ftp://host/v1", "http://", "localhost:8000/v1", "http://h:99999/v1",
                                 "http://host/v1 x", ""])
def test_llm_url_is_validated_before_anything_runs(url, prompts, tmp_path, capsys):
    status = cli_main(_cli_argv(prompts, tmp_path, url))
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and "--llm-url" in err, err
    assert not (tmp_path / "neg.json").exists() and not (tmp_path / "neg.json.cache.jsonl").exists()
    with pytest.raises(ConfigError, match="--llm-url"):
        ChatClient(url=url, model="m")


def test_every_request_failing_exits_non_zero_and_keeps_the_old_output(prompts, tmp_path, capsys):
    out = tmp_path / "neg.json"
    good = [{"image": "0.jpg", "original": "x", "enhanced": ["y"]}] * 3
    out.write_text(json.dumps(good))
    before = out.read_bytes()
    status = cli_main(_cli_argv(prompts, tmp_path, f"http://127.0.0.1:{_free_port()}/v1"))
    err = capsys.readouterr().err
    assert status == 1 and out.read_bytes() == before
    assert "failed requests: 6 of 6" in err and "6 of 6 LLM requests failed (connection" in err
    assert "no records written" in err and not (tmp_path / "neg.partial.json").exists()
    assert "Traceback" not in err


def test_some_requests_failing_write_the_records_beside_the_output(prompts, tmp_path, capsys):
    out = tmp_path / "neg.json"
    with FakeServer(script=["400"]) as server:  # one request is refused, not retried
        status = cli_main(_cli_argv(prompts, tmp_path, server.url))
    err = capsys.readouterr().err
    assert status == 1 and not out.exists() and "1 of 6 LLM requests failed (HTTP 400" in err
    partial = json.loads((tmp_path / "neg.partial.json").read_text())
    assert 1 <= len(partial) <= 3
    with FakeServer() as server:  # the rerun asks for the failed one only and completes
        assert cli_main(_cli_argv(prompts, tmp_path, server.url)) == 0
    assert len(server.requests) == 1 and len(json.loads(out.read_text())) == 3


def test_a_smaller_result_never_replaces_a_bigger_output_without_overwrite(prompts, tmp_path, capsys):
    out = tmp_path / "neg.json"
    with FakeServer() as server:
        assert cli_main(_cli_argv(prompts, tmp_path, server.url)) == 0
    before = out.read_bytes()
    argv = _cli_argv(prompts, tmp_path, "http://127.0.0.1:1/v1")
    one = tmp_path / "one.json"
    one.write_text(json.dumps([{"image": "0.jpg", "caption": CAPTIONS[0].caption}]))
    argv[argv.index("--input") + 1] = str(one)
    with FakeServer() as server:
        argv[-1] = server.url
        assert cli_main(argv) == 1
        assert out.read_bytes() == before and len(json.loads((tmp_path / "neg.new.json").read_text())) == 1
        assert "pass --overwrite" in capsys.readouterr().err
        assert cli_main(argv + ["--overwrite"]) == 0
    assert len(json.loads(out.read_text())) == 1
    # a file that is not ours is never replaced without --overwrite, and the input never
    foreign = tmp_path / "notes.json"
    foreign.write_text('{"mine": true}')
    assert cli_main(_cli_argv(prompts, tmp_path, server.url, out=foreign)) == 2
    assert foreign.read_text() == '{"mine": true}'
    assert cli_main(_cli_argv(prompts, tmp_path, server.url, out=tmp_path / "captions.json")) == 2
    assert "is the --input file" in capsys.readouterr().err


def test_unusable_cache_lines_are_skipped_and_counted(prompts, tmp_path, capsys):
    with FakeServer() as server:
        _run(server, prompts, tmp_path)
    lines = (tmp_path / "cache.jsonl").read_bytes().splitlines(keepends=True)
    no_id = json.loads(lines[1])
    del no_id["id"]
    broken = [lines[0],
              json.dumps(no_id).encode() + b"\n",
              b'{"id": "x", "type": "swap_nouns", "caption": "caf\xe9"}\n',  # Latin-1, not UTF-8
              b'["a list"]\n', b'{"id": "1", "type": "swap_nouns", "status": "ok", "kept": 3}\n',
              *lines[2:], b'{"id": "2", "type": "swa']  # torn by a kill
    (tmp_path / "cache.jsonl").write_bytes(b"".join(broken))
    with FakeServer() as server:
        negatives, summary = _run(server, prompts, tmp_path)
    assert negatives == EXPECTED and summary.cache_skipped == 5
    assert len(server.requests) == 1  # only the pair whose line lost its id is asked again
    assert "cache lines skipped (torn, not UTF-8, not JSON or without id): 5" in summary.format()

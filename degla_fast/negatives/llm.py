"""LLM backend: hard negatives from any OpenAI-compatible chat-completions server.

Works with vLLM, SGLang, TGI or a hosted API. One prompt per type (``configs/negatives/
<type>.yaml``) with in-context examples; requests run in a thread pool under a concurrency
limit, retry with exponential backoff and jitter on 429, 5xx, timeouts, connection errors
and malformed bodies; every candidate is validated (:func:`validate.check_negative`) and
each finished request is appended to the JSONL cache, so a rerun skips what is done.
"""
from __future__ import annotations

import functools
import http.client
import json
import os
import random
import re
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError
from ..io import read_config_mapping
from .cache import NegativeCache
from .summary import Summary
from .tagger import words_of
from .validate import check_negative

# The repository's configs/negatives/ (editable installs, where users edit them), else the
# copy a regular install carries inside the package.
_REPO_PROMPTS = Path(__file__).resolve().parents[2] / "configs" / "negatives"
DEFAULT_PROMPTS = _REPO_PROMPTS if _REPO_PROMPTS.is_dir() else Path(__file__).resolve().parent / "prompts"
_RETRY_STATUS = frozenset({408, 409, 425, 429}) | frozenset(range(500, 600))
_FATAL_STATUS = frozenset({401, 403, 404})
_BULLET_RE = re.compile(r"^\s*(?:[-*\u2022]|\d+[.):]|\(\d+\))\s*")


@dataclass(frozen=True)
class Prompt:
    """One type's prompt: ``system`` text, ``instruction`` template with ``{caption}`` and
    ``{n}``, and ``examples`` as (caption, negatives) pairs shown before the real caption."""

    system: str
    instruction: str
    examples: tuple[tuple[str, tuple[str, ...]], ...]


def load_prompts(directory: str | os.PathLike, types: tuple[str, ...]) -> dict[str, Prompt]:
    """Read ``<directory>/<type>.yaml`` for every type -> {type: Prompt}; ConfigError names
    the file and field when one is missing or malformed."""
    prompts = {}
    for neg_type in types:
        path = Path(directory) / f"{neg_type}.yaml"
        if not path.is_file():
            raise ConfigError(f"{path}: prompt file missing for type {neg_type!r} (set --prompts DIR)")
        data = read_config_mapping(path, "--prompts")
        for key in ("system", "instruction"):
            if not isinstance(data.get(key), str) or not data[key].strip():
                raise ConfigError(f"{path}: field {key!r} must be a non-empty string")
        if "{caption}" not in data["instruction"]:
            raise ConfigError(f"{path}: field 'instruction' must contain {{caption}}")
        examples = []
        for index, example in enumerate(data.get("examples") or []):
            ok = isinstance(example, dict) and isinstance(example.get("caption"), str)
            negatives = example.get("negatives") if ok else None
            if not ok or not isinstance(negatives, list) or not negatives or not all(isinstance(n, str) for n in negatives):
                raise ConfigError(f"{path}: examples[{index}] needs 'caption' (string) and 'negatives' (list of strings)")
            examples.append((example["caption"], tuple(negatives)))
        prompts[neg_type] = Prompt(data["system"].strip(), data["instruction"].strip(), tuple(examples))
    return prompts


def _instruction(prompt: Prompt, caption: str, n: int) -> str:
    return prompt.instruction.replace("{caption}", caption).replace("{n}", str(n))


def build_messages(prompt: Prompt, caption: str, n: int = 1) -> list[dict]:
    """Chat messages asking for ``n`` negatives of ``caption``: system, one user/assistant
    pair per example, then the caption."""
    messages = [{"role": "system", "content": prompt.system}]
    for example, negatives in prompt.examples:
        messages.append({"role": "user", "content": _instruction(prompt, example, len(negatives))})
        messages.append({"role": "assistant", "content": "\n".join(negatives)})
    messages.append({"role": "user", "content": _instruction(prompt, caption, n)})
    return messages


def parse_candidates(text: str) -> list[str]:
    """Candidate captions from a reply: one per non-empty line, list markers and quotes removed."""
    out = []
    for line in text.splitlines():
        line = _BULLET_RE.sub("", line).strip().strip("\"'\u201c\u201d`").strip()
        if line:
            out.append(line)
    return out


def check_url(url: str, flag: str = "--llm-url") -> str:
    """``url`` if it is an absolute http(s) address with a host, else a one-line ConfigError."""
    if not isinstance(url, str) or not url.strip() or any(c.isspace() for c in url):
        raise ConfigError(f"{flag}: {url!r} is not a URL (expected e.g. http://localhost:8000/v1)")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in 0-65535
    except ValueError as err:
        raise ConfigError(f"{flag}: {url!r} is not a valid URL ({err})") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{flag}: {url!r} is not an http(s) URL with a host (expected e.g. http://localhost:8000/v1)")
    return url


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Never follow a redirect: urllib would copy the Authorization header to the new address
    (another host or port), and a chat-completions POST turned into a GET cannot succeed anyway.
    The 3xx answer reaches :meth:`ChatClient.complete` as an HTTPError."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_OPENER = urllib.request.build_opener(_NoRedirects)


REDACTED = "[redacted]"
# A stretch of the key this long or longer is a secret wherever it appears: servers echo the
# Authorization header in errors and replies, cut anywhere (a length limit, a wrapped line), and
# a prefix, a suffix or a middle piece of 8 characters is too much of a key to show.
KEY_FRAGMENT = 8
_BEARER_RE = re.compile(r"(?i)(bearer(?:\s|%20|\+|\\[tn]|\\u0020)+)(?:[A-Za-z0-9._~+/=-]|\\/)+")
ERROR_BODY_BYTES = 64 * 1024  # read of an error body: redacted whole, then cut to ERROR_DETAIL_CHARS
ERROR_DETAIL_CHARS = 300


@functools.lru_cache(maxsize=4)
def _fragments(secret: str) -> re.Pattern:
    # Each start of a KEY_FRAGMENT-long piece of the key, found with overlaps (a lookahead), so
    # that runs of them cover every stretch of KEY_FRAGMENT or more characters the key holds.
    pieces = sorted({secret[i:i + KEY_FRAGMENT] for i in range(len(secret) - KEY_FRAGMENT + 1)})
    return re.compile("(?=(" + "|".join(map(re.escape, pieces)) + "))")


def redact(text: str, secret: str | None) -> str:
    """``text`` without the API key ``secret``: the value of every ``Bearer`` token (any case,
    any separator: a space, ``%20``, ``+``, an escaped tab), the whole key, and every stretch of
    :data:`KEY_FRAGMENT` or more characters that also occurs in the key (a prefix, a suffix or a
    middle piece: the key cut anywhere) become ``[redacted]``. The one filter of everything the
    LLM client lets out (replies, error messages); see :meth:`ChatClient.complete`."""
    text = _BEARER_RE.sub(lambda match: match.group(1) + REDACTED, text)
    if not secret or len(secret) < 4:
        return text
    text = text.replace(secret, REDACTED)
    if len(secret) < KEY_FRAGMENT:
        return text
    spans: list[list[int]] = []  # merged [start, end) of the pieces found
    for match in _fragments(secret).finditer(text):
        start = match.start()
        if spans and start <= spans[-1][1]:
            spans[-1][1] = start + KEY_FRAGMENT
        else:
            spans.append([start, start + KEY_FRAGMENT])
    for start, end in reversed(spans):
        text = text[:start] + REDACTED + text[end:]
    return text


def _cut(text: str, limit: int = ERROR_DETAIL_CHARS) -> str:
    """``text``'s first ``limit`` characters, or up to the end of a ``[redacted]`` that the limit cuts."""
    marker = text.find(REDACTED, max(0, limit - len(REDACTED) + 1), limit + len(REDACTED) - 1)
    return text[:limit] if marker < 0 or marker >= limit else text[:marker + len(REDACTED)]


class RequestFailed(Exception):
    """A request that gave up: non-retryable status, or retries exhausted. ``args[0]`` is the reason."""


@dataclass(frozen=True)
class ChatClient:
    """Client of ``url`` (a base such as ``http://host:8000/v1`` or the full
    ``.../chat/completions`` address) for ``model``; the API key is read from the
    environment variable ``key_env`` (no Authorization header when unset)."""

    url: str
    model: str
    key_env: str = "OPENAI_API_KEY"
    timeout: float = 60.0
    max_retries: int = 5
    backoff: float = 1.0
    max_backoff: float = 60.0
    temperature: float = 0.7
    max_tokens: int = 256

    def __post_init__(self):
        check_url(self.url)

    @property
    def endpoint(self) -> str:
        """The chat-completions address requests go to."""
        url = self.url.rstrip("/")
        return url if url.endswith("/chat/completions") else url + "/chat/completions"

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        delay = min(self.max_backoff, self.backoff * 2**attempt) * random.uniform(0.5, 1.5)
        if retry_after:
            try:
                delay = max(delay, min(self.max_backoff, float(retry_after)))
            except ValueError:
                pass  # an HTTP date: keep our own delay
        return delay

    def _send(self, body: bytes, key: str | None) -> str:
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        with _OPENER.open(request, timeout=self.timeout) as response:
            payload = response.read()
        try:
            content = json.loads(payload)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise ValueError("malformed response") from None
        if not isinstance(content, str):
            raise ValueError("malformed response")
        return content

    def complete(self, messages: list[dict]) -> str:
        """The assistant reply to ``messages``. Retries 429/5xx, timeouts, connection errors
        and malformed bodies; raises ConfigError on 401/403/404 (bad key, URL or model) and
        RequestFailed when it gives up.

        Nothing of the API key leaves here: the reply and every message pass through
        :func:`redact` (servers echo the Authorization header in error bodies and in replies),
        so that the cache, the output and what is printed never hold it."""
        key = os.environ.get(self.key_env)
        try:
            return redact(self._complete(messages, key), key)
        except (ConfigError, RequestFailed) as err:
            raise type(err)(redact(str(err), key)) from None

    def _complete(self, messages: list[dict], key: str | None) -> str:
        body = json.dumps(
            {"model": self.model, "messages": messages, "temperature": self.temperature, "max_tokens": self.max_tokens}
        ).encode()
        reason = "no attempt"
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                return self._send(body, key)
            except urllib.error.HTTPError as err:
                # Redacted whole, then cut: a key cut by the limit would escape a redaction after it.
                detail = _cut(redact(" ".join(err.read(ERROR_BODY_BYTES).decode("utf-8", "replace").split()), key))
                if 300 <= err.code < 400:
                    location = (err.headers.get("Location") if err.headers else None) or "?"
                    raise ConfigError(
                        f"{self.endpoint}: HTTP {err.code} redirect to {location}; redirects are not followed "
                        "(the API key must not be sent to another address): give the final URL as --llm-url"
                    ) from None
                if err.code in _FATAL_STATUS:
                    raise ConfigError(
                        f"{self.endpoint}: HTTP {err.code} for model {self.model!r} "
                        f"(check --llm-url, --llm-model and ${self.key_env}): {detail}"
                    ) from None
                reason = f"HTTP {err.code}"
                if err.code not in _RETRY_STATUS:
                    raise RequestFailed(f"{reason}: {detail}") from None
                retry_after = err.headers.get("Retry-After") if err.headers else None
            except (TimeoutError, socket.timeout):
                reason = "timeout"
            except urllib.error.URLError as err:
                timed_out = isinstance(err.reason, (TimeoutError, socket.timeout))
                reason = "timeout" if timed_out else f"connection: {err.reason}"
            except (ConnectionError, http.client.HTTPException) as err:
                reason = f"connection: {type(err).__name__}"
            except ValueError as err:  # a malformed body, or http.client refusing a header (the key's text)
                reason = str(err)
            if attempt < self.max_retries:
                time.sleep(self._delay(attempt, retry_after))
        raise RequestFailed(f"{reason} after {self.max_retries + 1} attempts")


def _request(client: ChatClient, prompt: Prompt, caption, neg_type: str, n: int) -> dict:
    """One (caption, type) request -> its cache entry (status "ok" or "failed")."""
    entry = {"id": caption.id, "type": neg_type, "caption": caption.caption}
    try:
        reply = client.complete(build_messages(prompt, caption.caption, n))
    except RequestFailed as err:
        return {**entry, "status": "failed", "reason": str(err)}
    kept, rejected, seen = [], [], set()
    for candidate in parse_candidates(reply) or [""]:
        reason = check_negative(caption.caption, candidate, neg_type)
        key = " ".join(words_of(candidate))
        if reason is None and key in seen:
            reason = "duplicate"
        if reason is None and len(kept) == n:
            reason = "surplus"
        if reason:
            rejected.append([candidate, reason])
        else:
            seen.add(key)
            kept.append(candidate)
    return {**entry, "status": "ok", "kept": kept, "rejected": rejected}


def generate_llm(
    captions: list,
    types: tuple[str, ...],
    *,
    client: ChatClient,
    prompts: dict[str, Prompt],
    cache_path: str | os.PathLike,
    per_type: int = 1,
    concurrency: int = 8,
    progress: bool = True,
) -> tuple[dict[str, list[str]], Summary]:
    """LLM negatives for every caption (``list[io.Caption]``) and type.

    Requests whose (caption id, type) already has an "ok" cache entry for the same caption
    text are not sent again. Returns (caption id -> negatives in ``types`` order; summary),
    built from the cache so that a resumed run returns the same as an uninterrupted one.
    """
    from ..console import progress_bar

    if concurrency < 1:
        raise ConfigError(f"--concurrency must be >= 1, got {concurrency}")
    cache = NegativeCache(cache_path)
    done = cache.load()
    pending = [
        (caption, neg_type)
        for caption in captions
        for neg_type in types
        if done.get((caption.id, neg_type), {}).get("caption") != caption.caption
    ]
    failed: list[dict] = []
    bar = progress_bar(len(pending), desc="negatives", unit="req", enabled=progress)
    jobs = iter(pending)
    pool = ThreadPoolExecutor(max_workers=concurrency)
    finished_cleanly = False
    with cache:
        in_flight: set = set()
        try:
            while True:
                # Keep a bounded queue: millions of captions must not become millions of futures.
                for caption, neg_type in jobs:
                    in_flight.add(pool.submit(_request, client, prompts[neg_type], caption, neg_type, per_type))
                    if len(in_flight) >= 2 * concurrency:
                        break
                if not in_flight:
                    break
                finished, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in finished:
                    entry = future.result()
                    cache.append(entry)
                    if entry["status"] == "ok":
                        done[(entry["id"], entry["type"])] = entry
                    else:
                        failed.append(entry)
                    bar.update(1)
            finished_cleanly = True
        finally:
            # On Ctrl-C or a fatal error, do not sit through the retries of requests in flight.
            pool.shutdown(wait=finished_cleanly, cancel_futures=True)
            bar.close()
    negatives, summary = _assemble(captions, types, done, failed)
    summary.requests = len(pending)
    summary.cache_skipped = cache.skipped
    return negatives, summary


def _assemble(captions, types, done: dict, failed: list[dict]) -> tuple[dict[str, list[str]], Summary]:
    summary = Summary(types, captions=len(captions))
    for entry in failed:
        summary.failed[entry["type"]] += 1
        summary.reasons[f"failed: {entry['reason'].split(' after ')[0]}"] += 1
    negatives: dict[str, list[str]] = {}
    for caption in captions:
        produced, seen = [], set()
        for neg_type in types:
            entry = done.get((caption.id, neg_type))
            if entry is None or entry.get("caption") != caption.caption:
                summary.missing[neg_type] += 1
                continue
            for _, reason in entry["rejected"]:
                summary.reject(neg_type, reason)
            kept = 0
            for text in entry["kept"]:
                key = " ".join(words_of(text))
                if key in seen:
                    summary.reject(neg_type, "duplicate")  # same text as another type's negative
                    continue
                seen.add(key)
                produced.append(text)
                kept += 1
            summary.kept[neg_type] += kept
            summary.missing[neg_type] += not kept
        if produced:
            negatives[caption.id] = produced
    summary.records = len(negatives)
    return negatives, summary

"""`edge-runtime openai-bridge`: OpenAI's HTTP API for the tools that speak it (editor plugins,
the `openai` Python package, curl scripts), answered by a daemon over MQTT.

It runs beside those tools (a workstation, or the device itself), listens on loopback unless
told otherwise, and turns each HTTP request into one protocol request through `EdgeClient`:

    POST /v1/completions        prompt -> "complete"; prompt + suffix -> "infill"
    POST /v1/chat/completions   messages -> "chat"
    GET  /v1/models             the device, as one model

With ``"stream": true`` the answer comes as server-sent events in OpenAI's shape, ending with
``data: [DONE]``. A client that goes away cancels its request on the device. Nothing is
generated here: the bridge holds no model, only an MQTT connection (README: "OpenAI's API").
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import sys
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .client import EdgeClient, Generation, RemoteError
from .errors import BadRequest, EdgeRuntimeError

log = logging.getLogger("edge_runtime.openai_bridge")

MAX_BODY_BYTES = 4 * 2**20  # a request body; the daemon's own [limits] max_payload_bytes applies after

# OpenAI's sampling fields and the extensions llama.cpp's and Ollama's servers take under the
# same names, passed to the protocol's fields of these names
SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "seed", "presence_penalty", "frequency_penalty",
                   "top_k", "min_p", "repeat_penalty", "repeat_last_n")
# Fields whose value this bridge cannot honour unless it is the value that changes nothing
_HONOURED_ONLY_AS = {"n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None, False),
                     "top_logprobs": (None, 0), "logit_bias": (None, {}), "tools": (None, []),
                     "functions": (None, [])}
# OpenAI's finish reasons for the protocol's: a policy stop rule is OpenAI's content filter
FINISH_REASONS = {"stop": "stop", "length": "length", "cancelled": "stop", "policy": "content_filter"}
# HTTP statuses for the protocol's error codes (docs/protocol.md, Errors), and OpenAI's error type
ERROR_STATUS = {
    "bad_request": (HTTPStatus.BAD_REQUEST, "invalid_request_error"),
    "unsupported_mode": (HTTPStatus.BAD_REQUEST, "invalid_request_error"),
    "context_length_exceeded": (HTTPStatus.BAD_REQUEST, "invalid_request_error"),
    "unsafe_prompt": (HTTPStatus.BAD_REQUEST, "invalid_request_error"),
    "policy_violation": (HTTPStatus.BAD_REQUEST, "invalid_request_error"),
    "rate_limited": (HTTPStatus.TOO_MANY_REQUESTS, "rate_limit_error"),
    "busy": (HTTPStatus.SERVICE_UNAVAILABLE, "server_error"),
    "deadline_exceeded": (HTTPStatus.GATEWAY_TIMEOUT, "server_error"),
    "timeout": (HTTPStatus.GATEWAY_TIMEOUT, "server_error"),
    "connection": (HTTPStatus.BAD_GATEWAY, "server_error"),
    "unauthorized": (HTTPStatus.UNAUTHORIZED, "invalid_request_error"),
    "not_found": (HTTPStatus.NOT_FOUND, "invalid_request_error"),
}


class BridgeError(Exception):
    """An error answered as OpenAI answers one: an HTTP status and ``{"error": {...}}``."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param

    @property
    def status(self) -> HTTPStatus:
        return ERROR_STATUS.get(self.code, (HTTPStatus.INTERNAL_SERVER_ERROR, "server_error"))[0]

    def body(self) -> dict[str, Any]:
        kind = ERROR_STATUS.get(self.code, (HTTPStatus.INTERNAL_SERVER_ERROR, "server_error"))[1]
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------ OpenAI request -> protocol request
def _common(body: dict[str, Any]) -> dict[str, Any]:
    """The protocol fields every endpoint shares: sampling, stop, stream (values are checked by
    the daemon, which names the field)."""
    for name, allowed in _HONOURED_ONLY_AS.items():
        if body.get(name) not in allowed:
            raise BridgeError("bad_request", f"{name} = {json.dumps(body[name])[:60]} is not supported by "
                                             f"edge-runtime's OpenAI bridge (leave it out)", name)
    fields = {name: body[name] for name in SAMPLING_FIELDS if body.get(name) is not None}
    stop = body.get("stop")
    if stop is not None:
        fields["stop"] = stop
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BridgeError("bad_request", "stream must be true or false", "stream")
    fields["stream"] = stream
    return fields


def completion_request(body: dict[str, Any], suffix_first: bool | None = None) -> dict[str, Any]:
    """`EdgeClient.generate` keywords for a /v1/completions body: `prompt` (a string, or a
    list of one string) is a completion; with `suffix` (not null) the prompt is the code before
    the hole and the request an infill, in the order the body's `suffix_first` (the protocol's
    field) or else `suffix_first` names (None: the device's default, PSM)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise BridgeError("bad_request", "prompt must be a string (or a list of one string; token ids are not "
                                         "taken)", "prompt")
    fields = _common(body)
    suffix = body.get("suffix")
    if suffix is None:
        return {"mode": "complete", "prompt": prompt, **fields}
    if not isinstance(suffix, str):
        raise BridgeError("bad_request", "suffix must be a string", "suffix")
    order = body.get("suffix_first", suffix_first)
    return {"mode": "infill", "prefix": prompt, "suffix": suffix, "suffix_first": order, **fields}


def _message_text(i: int, content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: text only
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise BridgeError("bad_request", f"messages[{i}].content: only text parts are taken",
                                  f"messages[{i}].content")
            texts.append(part["text"])
        return "".join(texts)
    raise BridgeError("bad_request", f"messages[{i}].content must be a string or a list of text parts",
                      f"messages[{i}].content")


def chat_request(body: dict[str, Any]) -> dict[str, Any]:
    """`EdgeClient.generate` keywords for a /v1/chat/completions body. A `developer` message is
    the system prompt (OpenAI's newer name for it); `max_completion_tokens` is `max_tokens`."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BridgeError("bad_request", "messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BridgeError("bad_request", f"messages[{i}] must be an object", f"messages[{i}]")
        role = "system" if m.get("role") == "developer" else m.get("role")
        out.append({"role": role, "content": _message_text(i, m.get("content"))})
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is not None:
        body = {**body, "max_tokens": body["max_completion_tokens"]}
    return {"mode": "chat", "messages": out, **_common(body)}


# ------------------------------------------------------------------ protocol replies -> OpenAI replies
def usage_of(final: dict[str, Any]) -> dict[str, Any]:
    usage = final.get("usage") or {}
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(final: dict[str, Any]) -> str:
    return FINISH_REASONS.get(final.get("finish_reason"), "stop")


@dataclass(frozen=True)
class Reply:
    """The shape of one endpoint's answers (a whole one, and a streamed chunk)."""

    chat: bool
    id: str
    created: int
    model: str

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, final: dict[str, Any]) -> dict[str, Any]:
        text = final.get("text", "")
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "logprobs": None, "finish_reason": finish_reason(final)}
            return {**self._head("chat.completion"), "choices": [choice], "usage": usage_of(final)}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(final)}
        return {**self._head("text_completion"), "choices": [choice], "usage": usage_of(final)}

    def chunk(self, delta: str | None, finish: str | None = None, *, first: bool = False) -> dict[str, Any]:
        if self.chat:
            d: dict[str, Any] = {} if delta is None else {"content": delta}
            if first:
                d = {"role": "assistant", **d}
            choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, final: dict[str, Any]) -> dict[str, Any]:
        """`stream_options.include_usage`: one last chunk with no choices and the usage."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage_of(final)}


# ------------------------------------------------------------------ the HTTP server
@dataclass(frozen=True)
class BridgeSettings:
    device_id: str
    api_key: str | None = None  # None: no Authorization needed (loopback use)
    timeout_s: float = 60.0  # EdgeClient's: seconds without a reply from the device
    deadline_ms: int | None = None  # every request's deadline_ms (None: the daemon's default)
    cache_prompt: bool | None = None  # False: no request reuses or leaves its prompt's keys and values
    suffix_first: bool | None = None  # infills in SPM order unless a body says otherwise (editors: README)


class BridgeServer(ThreadingHTTPServer):
    """One HTTP server, one MQTT connection shared by its request threads (EdgeClient is
    thread-safe)."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], client: EdgeClient, settings: BridgeSettings) -> None:
        self.client = client
        self.settings = settings
        super().__init__(address, BridgeHandler)


class BridgeHandler(BaseHTTPRequestHandler):
    server: BridgeServer
    protocol_version = "HTTP/1.1"
    server_version = "edge-runtime-openai-bridge"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - BaseHTTPRequestHandler's name
        log.info("%s %s", self.address_string(), format % args)

    # -- plumbing
    def _send_json(self, status: int, obj: dict[str, Any]) -> None:
        data = json.dumps(obj, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, exc: BridgeError) -> None:
        self._send_json(exc.status, exc.body())

    def _authorized(self) -> bool:
        key = self.server.settings.api_key
        if key is None:
            return True
        given = self.headers.get("Authorization", "")
        return given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), key.encode())

    def _body(self) -> dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            raise BridgeError("bad_request", "a request body with a Content-Length is needed") from None
        if not 0 <= length <= MAX_BODY_BYTES:
            self.close_connection = True  # its body is left unread
            raise BridgeError("bad_request", f"the request body may hold at most {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(self.rfile.read(length))
        except (ValueError, UnicodeDecodeError) as exc:
            raise BridgeError("bad_request", f"the request body is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise BridgeError("bad_request", "the request body must be a JSON object")
        return body

    # -- endpoints
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if not self._authorized():
            return self._send_error(BridgeError("unauthorized", "a valid Authorization: Bearer key is needed"))
        if self.path.rstrip("/") in ("/v1/models", "/models"):
            model = {"id": self.server.settings.device_id, "object": "model", "created": 0,
                     "owned_by": "edge-runtime"}
            return self._send_json(HTTPStatus.OK, {"object": "list", "data": [model]})
        return self._send_error(BridgeError("not_found", f"no such endpoint: GET {self.path}"))

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        path = self.path.rstrip("/")
        chat = path in ("/v1/chat/completions", "/chat/completions")
        try:
            body = self._body()  # read first, whatever the answer: the connection's next request follows it
            if not chat and path not in ("/v1/completions", "/completions"):
                raise BridgeError("not_found", f"no such endpoint: POST {self.path}")
            if not self._authorized():
                raise BridgeError("unauthorized", "a valid Authorization: Bearer key is needed")
            request = chat_request(body) if chat else completion_request(body, self.server.settings.suffix_first)
        except BridgeError as exc:
            return self._send_error(exc)
        include_usage = isinstance(body.get("stream_options"), dict) and body["stream_options"].get("include_usage")
        request_id = uuid.uuid4().hex
        reply = Reply(chat=chat, id=("chatcmpl-" if chat else "cmpl-") + request_id, created=int(time.time()),
                      model=body["model"] if isinstance(body.get("model"), str) else self.server.settings.device_id)
        try:
            settings = self.server.settings
            gen = self.server.client.generate(request_id=request_id, timeout=settings.timeout_s,
                                              deadline_ms=settings.deadline_ms, cache_prompt=settings.cache_prompt,
                                              **request)
        except (BadRequest, ValueError, TypeError) as exc:  # refused before anything was sent (a NaN)
            return self._send_error(BridgeError("bad_request", str(exc)))
        if request["stream"]:
            self._stream(gen, reply, bool(include_usage))
        else:
            self._whole(gen, reply)

    def _whole(self, gen: Generation, reply: Reply) -> None:
        try:
            final = gen.result()
        except RemoteError as exc:
            return self._send_error(BridgeError(exc.code, exc.message))
        except TimeoutError as exc:
            return self._send_error(BridgeError("timeout", str(exc)))
        except (ConnectionError, OSError) as exc:
            return self._send_error(BridgeError("connection", str(exc)))
        self._send_json(HTTPStatus.OK, reply.whole(final))

    def _stream(self, gen: Generation, reply: Reply, include_usage: bool) -> None:
        """Server-sent events. The status line waits for the device's first reply, so a request
        the device refuses gets its error status as a plain JSON answer; after that, an error is
        one last event ``data: {"error": ...}``, as OpenAI sends one."""
        items = iter(gen)
        started = False
        try:
            try:
                for chunk in items:
                    if not started:
                        self._start_events()
                        started = True
                        self._event(reply.chunk(chunk.get("delta", ""), first=True))
                    else:
                        self._event(reply.chunk(chunk.get("delta", "")))
            except (RemoteError, TimeoutError, ConnectionError) as exc:
                code = exc.code if isinstance(exc, RemoteError) else \
                    "timeout" if isinstance(exc, TimeoutError) else "connection"
                message = exc.message if isinstance(exc, RemoteError) else str(exc)
                error = BridgeError(code, message)
                if not started:
                    return self._send_error(error)
                self._event(error.body())
                return self._done()
            final = gen.final or {}
            if not started:  # nothing streamed (an empty answer)
                self._start_events()
                self._event(reply.chunk("", first=True))
            self._event(reply.chunk(None, finish_reason(final)))
            if include_usage:
                self._event(reply.usage_chunk(final))
            self._done()
        except (BrokenPipeError, ConnectionResetError):  # the client went away: the device stops
            items.close()  # the Generation cancels an abandoned request
            log.info("client of request %s went away; cancelled", gen.id)

    def _start_events(self) -> None:
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the end of the stream is the end of the connection
        self.end_headers()
        self.close_connection = True

    def _event(self, obj: dict[str, Any]) -> None:
        self.wfile.write(b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n")
        self.wfile.flush()

    def _done(self) -> None:
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen_address(text: str) -> tuple[str, int]:
    """("127.0.0.1", 8080) of "127.0.0.1:8080" (and of ":8080"; "[::1]:8080" for IPv6)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen {text!r}: HOST:PORT expected, e.g. 127.0.0.1:8080")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


def run_bridge(args: Any) -> int:
    """`edge-runtime openai-bridge`: connect to the broker, then serve HTTP until interrupted."""
    from .ask_command import client_from_args
    from .mqtt_connection import read_password_file

    try:
        host, port = listen_address(args.listen)
        api_key = read_password_file(args.api_key_file) if args.api_key_file else None
        if not is_loopback(host) and api_key is None:
            raise ValueError(f"--listen {args.listen} accepts requests from other machines, which would use this "
                             "bridge's broker login: give --api-key-file (clients then send Authorization: Bearer "
                             "KEY), or listen on 127.0.0.1")
        client = client_from_args(args)
    except (ValueError, OSError) as exc:
        raise EdgeRuntimeError(str(exc)) from None
    settings = BridgeSettings(device_id=args.device_id, api_key=api_key, timeout_s=args.timeout,
                              deadline_ms=args.deadline_ms, cache_prompt=args.cache_prompt,
                              suffix_first=True if args.suffix_first else None)
    try:
        server = BridgeServer((host, port), client, settings)
    except OSError as exc:
        raise EdgeRuntimeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    with server, client:
        bound = server.server_address
        print(f"OpenAI API for device {args.device_id} on http://{bound[0]}:{bound[1]}/v1 (Ctrl-C stops)",
              file=sys.stderr, flush=True)
        server.serve_forever()
    return 0

"""`streamer serve`'s HTTP side: a standard-library ThreadingHTTPServer, auth, routing and SSE.

Handler threads parse and tokenize requests, then hand a ``Job`` to the one generation thread
(``server_worker``) and relay its events; nothing here builds an MLX graph. Every refusal is the
API's own error JSON with a 4xx status (Anthropic's shape under /v1/messages, OpenAI's elsewhere).
Streams use chunked transfer encoding, so connections stay open for the next request (HTTP/1.0 clients,
which cannot read chunks, get a body that ends when the connection closes). HEAD answers like GET without
the body. With ``--cors ORIGIN`` browsers on that origin may call the API: responses carry
Access-Control-Allow-Origin and OPTIONS preflights get a 204; without it there are no CORS headers at all.
"""

from __future__ import annotations

import hmac
import json
import logging
import select
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from streamer.errors import ConfigError
from streamer.generation.constrained import Vocabulary
from streamer.generation.prefix_cache import PrefixCache
from streamer.generation.sampling import model_max_tokens, model_thinks_by_default
from streamer.serve import anthropic_api as api_anthropic
from streamer.serve import openai_api as api_openai
from streamer.serve import responses_api as api_responses
from streamer.serve.api import ApiContext, ApiError, EventStream, JsonResponse, ReasoningMemory, ServeSettings
from streamer.serve.worker import BatchSettings, GenerationWorker, ScriptedModel

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 << 20
_AUTH_HINT = "missing or wrong API key (send Authorization: Bearer KEY or x-api-key: KEY)"


@dataclass
class ServeConfig:
    """`streamer serve` flags, 1:1."""

    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    model_names: tuple[str, ...] = ()  # names requests may use; the first is the listed id
    accept_any_model: bool = False
    thinking: bool | None = None  # None: the model's own default (generation_config.json)
    default_max_tokens: int | None = None  # None: the model's max_new_tokens, else 4096
    context_length: int | None = None  # None: the model's max_position_embeddings
    sampling_overrides: dict = field(default_factory=dict)
    prefix_cache_bytes: int = 2 * 10**9
    prefix_cache_entries: int = 32
    cors_origins: tuple[str, ...] = ()  # browser origins allowed to call the API; "*" for any
    batch: BatchSettings = field(default_factory=BatchSettings)  # --max-batch, --prefill-chunk, ...


CORS_ALLOW_HEADERS = (
    "Authorization, Content-Type, x-api-key, anthropic-version, anthropic-beta, "
    "anthropic-dangerous-direct-browser-access, OpenAI-Organization, OpenAI-Project, OpenAI-Beta, "
    "X-Stainless-Arch, X-Stainless-Lang, X-Stainless-OS, X-Stainless-Package-Version, X-Stainless-Runtime, "
    "X-Stainless-Runtime-Version, X-Stainless-Retry-Count, X-Stainless-Timeout, X-Stainless-Helper-Method"
)
CORS_ALLOW_METHODS = "GET, POST, HEAD, OPTIONS"


def _routes() -> dict[tuple[str, str], Callable]:
    return {
        ("GET", "/health"): lambda app, body, ctx: JsonResponse(
            {"status": "ok", "model": app.settings.model_id}
        ),
        ("GET", "/v1/models"): lambda app, body, ctx: api_openai.list_models(ctx, app.started),
        ("GET", "/v1/stats"): lambda app, body, ctx: JsonResponse(app.worker.stats()),
        ("POST", "/v1/chat/completions"): lambda app, body, ctx: api_openai.chat_completions(body, ctx),
        ("POST", "/v1/completions"): lambda app, body, ctx: api_openai.completions(body, ctx),
        ("POST", "/v1/responses"): lambda app, body, ctx: api_responses.create(body, ctx),
        ("POST", "/v1/messages"): lambda app, body, ctx: api_anthropic.messages(body, ctx),
        ("POST", "/v1/messages/count_tokens"): lambda app, body, ctx: api_anthropic.count_tokens(body, ctx),
    }


class App:
    """Routes requests to the API modules; shared by every handler thread."""

    def __init__(
        self, settings: ServeSettings, tokenizer, worker: GenerationWorker, cors_origins: tuple[str, ...] = ()
    ):
        self.settings, self.tokenizer, self.worker = settings, tokenizer, worker
        self.cors_origins = tuple(cors_origins)
        self.routes = _routes()
        self.started = int(time.time())
        self.memory = ReasoningMemory()
        self._vocabulary: Vocabulary | None = None
        self._vocabulary_lock = threading.Lock()

    def vocabulary(self) -> Vocabulary:
        """The tokenizer as the grammar library sees it, built by the first constrained request."""
        with self._vocabulary_lock:
            if self._vocabulary is None:
                # The engine's tokenizer was read from this file (packed copies carry it along).
                path = self.worker.engine.path / "tokenizer.json"
                self._vocabulary = Vocabulary.from_file(path, self.tokenizer.eos_token_ids)
            return self._vocabulary

    def authorized(self, headers) -> bool:
        key = self.settings.api_key
        if key is None:
            return True
        bearer = headers.get("Authorization", "")
        offered = bearer[7:].strip() if bearer[:7].lower() == "bearer " else headers.get("x-api-key", "")
        return hmac.compare_digest(offered.encode(), key.encode())

    def cors_origin(self, origin: str | None) -> str | None:
        """The Access-Control-Allow-Origin value for a request from ``origin``; None: no CORS headers."""
        if not origin or not self.cors_origins:
            return None
        if "*" in self.cors_origins:
            return "*"
        return origin if origin.rstrip("/") in (o.rstrip("/") for o in self.cors_origins) else None

    def route(self, method: str, path: str, body, ctx: ApiContext):
        handler = self.routes.get((method, path))
        if handler is None and path.startswith("/v1/models/") and method == "GET":
            return self._model(path.removeprefix("/v1/models/"), ctx)
        if handler is None:
            if any(p == path for _, p in self.routes):
                raise ApiError(405, f"{method} is not allowed on {path}")
            raise ApiError(404, f"no such endpoint: {method} {path}", kind="not_found_error")
        return handler(self, body, ctx)

    def _model(self, name: str, ctx: ApiContext) -> JsonResponse:
        listed = api_openai.list_models(ctx, self.started).body["data"]
        for model in listed:
            if model["id"] == name:
                return JsonResponse(model)
        raise ApiError(404, f"model {name!r} is not served here", kind="not_found_error", param="model")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "streamer"
    timeout = 600  # seconds an idle keep-alive connection may hold its thread

    def do_GET(self) -> None:
        self._handle("GET")

    def do_HEAD(self) -> None:
        self._handle("HEAD")

    def do_OPTIONS(self) -> None:
        app: App = self.server.app
        allowed = app.cors_origin(self.headers.get("Origin"))
        if allowed is None or not self.headers.get("Access-Control-Request-Method"):
            self._refuse()  # not a CORS preflight this server accepts: a JSON 404/405 as for other methods
            return
        requested = self.headers.get("Access-Control-Request-Headers")
        self.send_response(204)
        self.send_header("Access-Control-Allow-Methods", CORS_ALLOW_METHODS)
        # Echoing what the browser asks for lets through every client library's own headers too.
        self.send_header("Access-Control-Allow-Headers", requested or CORS_ALLOW_HEADERS)
        self.send_header("Access-Control-Max-Age", "86400")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_POST(self) -> None:
        self._handle("POST")

    def _refuse(self) -> None:
        # Other methods get a JSON 404/405, not http.server's HTML 501; their body is never read.
        self.close_connection = True
        self._handle(self.command)

    do_PUT = do_DELETE = do_PATCH = _refuse

    def end_headers(self) -> None:
        headers = getattr(self, "headers", None)  # absent when the request line itself was bad
        allowed = self.server.app.cors_origin(headers.get("Origin")) if headers else None
        if allowed is not None:
            self.send_header("Access-Control-Allow-Origin", allowed)
            if allowed != "*":
                self.send_header("Vary", "Origin")
        super().end_headers()

    def log_message(self, fmt: str, *args) -> None:
        log.info("%s %s", self.address_string(), fmt % args)

    def _handle(self, method: str) -> None:
        app: App = self.server.app
        path = urlsplit(self.path).path.rstrip("/") or "/"
        anthropic = path.startswith("/v1/messages")
        try:
            body = self._read_json() if method == "POST" else None
            if path != "/health" and not app.authorized(self.headers):
                raise ApiError(401, _AUTH_HINT, kind="authentication_error")
            ctx = ApiContext(
                app.settings, app.tokenizer, app.worker, self._client_gone, app.memory, app.vocabulary
            )
            result = app.route("GET" if method == "HEAD" else method, path, body, ctx)
        except ApiError as e:
            self._send_error(e, anthropic)
            return
        except Exception as e:  # a bug: still an answer in the API's format, never a dropped connection
            log.exception("request %s %s failed", method, path)
            self._send_error(
                ApiError(500, f"internal error: {type(e).__name__}: {e}", kind="server_error"), anthropic
            )
            return
        if isinstance(result, EventStream):
            self._send_stream(result)
        elif isinstance(result, JsonResponse):
            self._send_json(result.status, result.body, head=method == "HEAD")
        else:  # the client left before its answer was ready
            self.close_connection = True

    def _read_json(self):
        length = self.headers.get("Content-Length")
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raw = self._read_chunked()
        else:
            try:
                size = int(length) if length is not None else 0
                if size < 0:
                    raise ValueError
            except ValueError:
                self.close_connection = True
                raise ApiError(400, f"bad Content-Length {length!r}") from None
            if size > MAX_BODY_BYTES:
                self.close_connection = True
                raise ApiError(413, f"request body too large ({size} bytes; at most {MAX_BODY_BYTES})")
            raw = self.rfile.read(size)
        if not raw:
            raise ApiError(400, "the request needs a JSON body")
        try:
            return json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None

    def _read_chunked(self) -> bytes:
        parts, total = [], 0
        while True:
            line = self.rfile.readline(1024).split(b";")[0].strip()
            try:
                size = int(line, 16)
            except ValueError:
                self.close_connection = True
                raise ApiError(400, "malformed chunked request body") from None
            if size == 0:
                while self.rfile.readline(1024) not in (b"\r\n", b"\n", b""):
                    pass
                return b"".join(parts)
            total += size
            if total > MAX_BODY_BYTES:
                self.close_connection = True
                raise ApiError(413, f"request body too large (at most {MAX_BODY_BYTES} bytes)")
            parts.append(self.rfile.read(size))
            self.rfile.readline(1024)

    def _send_error(self, e: ApiError, anthropic: bool) -> None:
        body = api_anthropic.error_body(e) if anthropic else api_openai.error_body(e)
        self._send_json(e.status, body, head=self.command == "HEAD")

    def _send_json(self, status: int, body: dict, head: bool = False) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if not head:
                self.wfile.write(data)
        except OSError:
            self.close_connection = True

    def _send_stream(self, stream: EventStream) -> None:
        events = stream.events
        # An HTTP/1.0 client cannot read chunks: its body is the raw stream, ended by closing.
        self._chunked = self.request_version != "HTTP/1.0"
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            if self._chunked:
                self.send_header("Transfer-Encoding", "chunked")
            else:
                self.close_connection = True
                self.send_header("Connection", "close")
            self.end_headers()
            for name, data in events:
                if data is None:  # a keep-alive comment while nothing happens (queued, long prefill)
                    self._write_chunk(b": keep-alive\n\n")
                    continue
                text = (f"event: {name}\n" if name else "") + f"data: {data}\n\n"
                self._write_chunk(text.encode())
            self._write_chunk(b"")
        except OSError:  # the client went away: closing the events cancels its generation
            log.info("client %s disconnected mid-stream", self.address_string())
            self.close_connection = True
        except Exception:  # a bug after the headers went out: end the connection, the stream is cut
            log.exception("stream to %s failed", self.address_string())
            self.close_connection = True
        finally:
            events.close()

    def _write_chunk(self, data: bytes) -> None:
        if not self._chunked:
            if data:
                self.wfile.write(data)
                self.wfile.flush()
            return
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _client_gone(self) -> bool:
        """True when the peer closed its end (readable with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # listen backlog: many clients may connect at once and queue

    def __init__(self, address, app: App):
        self.app = app
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind also resolves the host's FQDN, which can stall for seconds.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class Server:
    """The HTTP server and the generation worker, started and stopped together."""

    def __init__(self, httpd: _HTTPServer, worker: GenerationWorker):
        self.httpd, self.worker = httpd, worker
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    @property
    def url(self) -> str:
        host = self.httpd.server_address[0]
        return f"http://{f'[{host}]' if ':' in host else host}:{self.port}"

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def start_background(self) -> Server:
        self._thread = threading.Thread(target=self.serve_forever, name="streamer-http", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
        self.httpd.server_close()
        self.worker.close()


def start_server(load: Callable, config: ServeConfig, scripted: ScriptedModel | None = None) -> Server:
    """Loads the engine (on the generation thread), then binds the HTTP server.

    Args:
        load: returns the Engine; runs on the generation thread.
        config: the serve flags.
        scripted: a test seam: the worker answers with these text pieces instead of the model's.
    """
    worker = GenerationWorker(
        load, PrefixCache(config.prefix_cache_bytes, config.prefix_cache_entries), scripted, config.batch
    )
    worker.start()
    engine = worker.engine
    try:
        settings = _settings(config, engine)
        app = App(settings, engine.tokenizer, worker, config.cors_origins)
        httpd = _HTTPServer((config.host, config.port), app)
    except OSError as e:
        worker.close()
        raise ConfigError(
            f"cannot listen on {config.host}:{config.port}: {e.strerror or e}; pick another --port or --host"
        ) from None
    except BaseException:
        worker.close()
        raise
    return Server(httpd, worker)


def _settings(config: ServeConfig, engine) -> ServeSettings:
    generation_config = engine.tokenizer.generation_config
    model_limit = engine.args.max_position_embeddings
    names = tuple(dict.fromkeys([*config.model_names, engine.path.name]))
    return ServeSettings(
        model_names=names,
        context_length=min(config.context_length or model_limit, model_limit),
        accept_any_model=config.accept_any_model,
        default_max_tokens=config.default_max_tokens or model_max_tokens(generation_config, 4096),
        thinking=model_thinks_by_default(generation_config) if config.thinking is None else config.thinking,
        sampling_overrides=dict(config.sampling_overrides),
        api_key=config.api_key,
        generation_config=generation_config,
    )

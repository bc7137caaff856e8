"""A local stand-in for an API Gateway HTTP API (payload format 2.0) in front of the function.

Each request becomes the event API Gateway would build, the handler runs with a fresh Lambda context,
and its answer is written back the way API Gateway maps a 2.0 Lambda response. Only the routes the
template's ``HttpApi`` events declare exist; anything else gets API Gateway's 404.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from email.utils import formatdate
from http.server import ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

from devtools.cfn_yaml import load_template
from devtools.lambda_context import DEFAULT_ACCOUNT, new_context
from devtools.loopback import LoopbackHandler, LoopbackService
from devtools.resources import FUNCTION_RESOURCE, function_timeout, http_routes

Handler = Callable[[dict[str, Any], Any], Any]

MAX_PAYLOAD_BYTES = 10 * 1024 * 1024  # API Gateway HTTP API request payload limit
API_ID = "localapi01"
TEXT_TYPES = ("text/", "application/json", "application/xml", "application/javascript", "application/x-javascript")

logger = logging.getLogger("devtools.gateway")


def new_request_id() -> str:
    """A request id shaped like API Gateway's (e.g. ``JKJaXmPLvHcESHA=``)."""
    return base64.b64encode(secrets.token_bytes(10)).decode("ascii").replace("/", "_").replace("+", "-")


def is_text_content(content_type: str | None) -> bool:
    """Whether API Gateway would pass a body of this type as text (else it base64-encodes it)."""
    if not content_type:
        return False
    ctype = content_type.split(";", 1)[0].strip().lower()
    return ctype.startswith(TEXT_TYPES) or ctype.endswith(("+json", "+xml"))


def match_route(routes: set[tuple[str, str]], method: str, path: str) -> str | None:
    """The routeKey API Gateway would select, or None (404)."""
    for candidate in ((method, path), ("ANY", path)):
        if candidate in routes:
            return f"{candidate[0]} {candidate[1]}"
    if ("ANY", "$default") in routes:
        return "$default"
    return None


def build_event(
    *,
    method: str,
    raw_path: str,
    raw_query: str,
    headers: list[tuple[str, str]],
    body: bytes,
    route_key: str,
    source_ip: str,
    protocol: str = "HTTP/1.1",
    api_id: str = API_ID,
    request_id: str | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """Build an HTTP API payload 2.0 event exactly as API Gateway does for a Lambda proxy integration."""
    now = time.time() if now is None else now
    merged: dict[str, str] = {}
    cookies: list[str] = []
    for name, value in headers:
        key = name.lower()
        if key == "cookie":
            cookies.extend(c.strip() for c in value.split(";") if c.strip())
            continue
        merged[key] = f"{merged[key]},{value}" if key in merged else value
    host = merged.get("host", f"{api_id}.execute-api.us-east-1.amazonaws.com")
    domain = host.rsplit(":", 1)[0] if not host.startswith("[") else host
    query: dict[str, str] = {}
    for key, value in parse_qsl(raw_query, keep_blank_values=True):
        query[key] = f"{query[key]},{value}" if key in query else value
    request_id = request_id or new_request_id()
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": route_key,
        "rawPath": raw_path,
        "rawQueryString": raw_query,
    }
    if cookies:
        event["cookies"] = cookies
    event["headers"] = merged
    if query:
        event["queryStringParameters"] = query
    event["requestContext"] = {
        "accountId": DEFAULT_ACCOUNT,
        "apiId": api_id,
        "domainName": domain,
        "domainPrefix": domain.split(".", 1)[0],
        "http": {
            "method": method,
            "path": raw_path,
            "protocol": protocol,
            "sourceIp": source_ip,
            "userAgent": merged.get("user-agent", ""),
        },
        "requestId": request_id,
        "routeKey": route_key,
        "stage": "$default",
        "time": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
        "timeEpoch": int(now * 1000),
    }
    if body:
        if is_text_content(merged.get("content-type")):
            event["body"] = body.decode("utf-8", errors="replace")
            event["isBase64Encoded"] = False
        else:
            event["body"] = base64.b64encode(body).decode("ascii")
            event["isBase64Encoded"] = True
    else:
        event["isBase64Encoded"] = False
    return event


class _Response:
    def __init__(self, status: int, headers: Mapping[str, str], cookies: list[str], body: bytes) -> None:
        self.status = status
        self.headers = dict(headers)
        self.cookies = cookies
        self.body = body


def _json_response(status: int, message: str) -> _Response:
    return _Response(status, {"content-type": "application/json"}, [], json.dumps({"message": message}).encode())


def map_result(result: Any) -> _Response:
    """Map a Lambda result to an HTTP response the way HTTP API payload 2.0 does."""
    if isinstance(result, dict) and "statusCode" in result:
        status = int(result["statusCode"])
        if not 100 <= status <= 599:
            raise ValueError(f"invalid statusCode {status}")
        headers = {str(k).lower(): str(v) for k, v in (result.get("headers") or {}).items()}
        for name, values in (result.get("multiValueHeaders") or {}).items():
            headers[str(name).lower()] = ",".join(str(v) for v in values)
        raw = result.get("body")
        if raw is None:
            body = b""
        elif result.get("isBase64Encoded"):
            body = base64.b64decode(raw)
        else:
            body = str(raw).encode("utf-8")
        return _Response(status, headers, [str(c) for c in result.get("cookies") or []], body)
    # Any other value: API Gateway infers a 200 JSON response.
    text = result if isinstance(result, str) else json.dumps(result)
    return _Response(200, {"content-type": "application/json"}, [], text.encode("utf-8"))


class LocalGateway(LoopbackService):
    """An HTTP API gateway on 127.0.0.1 that invokes ``handler(event, context)`` per request.

    Parameters
    ----------
    handler:
        The Lambda handler (any callable ``(event, context)``).
    template:
        The loaded SAM template; routes and the function timeout come from it.
    serialize:
        Run one invocation at a time (deterministic tests); by default requests are served concurrently,
        like concurrent Lambda execution environments, but the relay's handler (one runtime, not one per
        environment) takes its webhooks one at a time.
    """

    def __init__(
        self,
        handler: Handler,
        template: Mapping[str, Any] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        serialize: bool = False,
        function: str = FUNCTION_RESOURCE,
        function_timeout_s: float | None = None,
        max_payload_bytes: int = MAX_PAYLOAD_BYTES,
    ) -> None:
        tpl = load_template() if template is None else template
        self.handler = handler
        self.routes = http_routes(tpl, function)
        self.function_timeout = (
            function_timeout_s if function_timeout_s is not None else function_timeout(tpl, function)
        )
        self.max_payload_bytes = max_payload_bytes
        self.host = host
        self.port = port
        self._lock: threading.Lock | None = threading.Lock() if serialize else None
        self.invocations = 0

    thread_name = "local-gateway"
    poll_interval = 0.05

    def _make_server(self) -> ThreadingHTTPServer:
        gateway = self

        class RequestHandler(_GatewayRequestHandler):
            gw = gateway

        server = ThreadingHTTPServer((self.host, self.port), RequestHandler)
        logger.info(
            "gateway listening on %s routes=%s", f"http://{self.host}:{server.server_address[1]}", sorted(self.routes)
        )
        return server

    def invoke(self, event: dict[str, Any]) -> _Response:
        context = new_context(self.function_timeout)
        started = time.monotonic()
        try:
            if self._lock is not None:
                with self._lock:
                    result = self.handler(event, context)
            else:
                result = self.handler(event, context)
            self.invocations += 1
            elapsed = time.monotonic() - started
            if elapsed > self.function_timeout:
                # Lambda would have stopped the function: API Gateway sees an integration failure.
                logger.error("invocation exceeded the function timeout (%.1fs)", elapsed)
                return _json_response(500, "Internal Server Error")
            return map_result(result)
        except Exception:
            logger.exception("handler failed request_id=%s", event["requestContext"]["requestId"])
            return _json_response(500, "Internal Server Error")


class _GatewayRequestHandler(LoopbackHandler):
    server_version = "LocalHttpApi"
    sys_version = ""
    gw: LocalGateway

    def log_message(self, format: str, *args: Any) -> None:
        logger.info("%s %s", self.address_string(), format % args)

    def _read_body(self) -> bytes | None:
        """The request body, or None when over the payload limit (the caller answers 413)."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks: list[bytes] = []
            total = 0
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                total += size
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
                if total > self.gw.max_payload_bytes:
                    self.close_connection = True
                    return None
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > self.gw.max_payload_bytes:
            self.close_connection = True
            return None
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        raw_path, _, raw_query = self.path.partition("?")
        request_id = new_request_id()
        route_key = match_route(self.gw.routes, self.command, raw_path)
        body = self._read_body()
        if body is None:
            response = _json_response(413, "Request Entity Too Large")
        elif route_key is None:
            response = _json_response(404, "Not Found")
        else:
            event = build_event(
                method=self.command,
                raw_path=raw_path,
                raw_query=raw_query,
                headers=[*self.headers.items(), *self._forwarded_headers()],
                body=body,
                route_key=route_key,
                source_ip=self.client_address[0],
                protocol=self.request_version,
                request_id=request_id,
            )
            response = self.gw.invoke(event)
        self._write(response, request_id)

    def _forwarded_headers(self) -> list[tuple[str, str]]:
        trace = f"Root=1-{int(time.time()):08x}-{secrets.token_hex(12)}"
        return [
            ("X-Amzn-Trace-Id", trace),
            ("X-Forwarded-For", self.client_address[0]),
            ("X-Forwarded-Port", str(self.connection.getsockname()[1])),
            ("X-Forwarded-Proto", "http"),
        ]

    def _write(self, response: _Response, request_id: str) -> None:
        self.send_response(response.status)
        headers = {k: v for k, v in response.headers.items() if k not in ("content-length", "connection", "date")}
        headers.setdefault("content-type", "application/json")
        for name, value in headers.items():
            self.send_header(name, value)
        for cookie in response.cookies:
            self.send_header("set-cookie", cookie)
        self.send_header("apigw-requestid", request_id)
        self.send_header("date", formatdate(usegmt=True))
        self.send_header("content-length", str(len(response.body)))
        if self.close_connection:
            self.send_header("connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(response.body)

    def send_response(self, code: int, message: str | None = None) -> None:
        # BaseHTTPRequestHandler adds its own Server and Date headers; API Gateway sends only Date.
        self.log_request(code)
        self.send_response_only(code, message)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle

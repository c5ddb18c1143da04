"""A stateful fake of the WhatsApp Cloud API messages endpoint, answering as Meta documents.

`POST {graph}/{version}/{phone_number_id}/messages`:

- the bearer token is checked: a wrong or revoked one answers 401 with error 190
  (`OAuthException`), as Meta does for an expired or invalid token;
- the body is checked as the Cloud API reference describes it (`messaging_product`
  "whatsapp", `recipient_type` "individual", `to` or `recipient`, `type` "text",
  `text.body` of at most 4,096 characters, `context.message_id`,
  `biz_opaque_callback_data` of at most 512 bytes); anything else is 400 with error 100;
- success is 200 `{"messaging_product", "contacts": [{"input", "wa_id" | "user_id"}],
  "messages": [{"id": "wamid..."}]}` and the message is kept in `sent`;
- errors are Graph API error bodies `{"error": {"message", "type", "code", "error_data":
  {"messaging_product", "details"}, "error_subcode", "fbtrace_id"}}` with the HTTP status
  Meta's error-code table gives: 131047 re-engagement (400), 131026 undeliverable (400),
  131056 pair rate limit (400), 130429 throughput (400), 131000 (500), 131016 (503), 190 (401);
  they are staged per recipient (`window_closed`, `undeliverable`) or for the next requests
  (`fail_next`), and a transport failure can be staged too (`drop_next`).

`status_payload` builds the webhook Meta sends for a message's status, with the message's
`biz_opaque_callback_data` as Meta returns it. The same fake serves `responses` (in-process,
`register`) and a real HTTP port (`serve_http`, for `waconsent serve` in a subprocess).
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from itertools import count
from typing import Any

import requests
import responses

GRAPH = "https://graph.facebook.test"
VERSION = "v27.0"
PHONE_NUMBER_ID = "106540352242922"
TOKEN = "EAAG-fake-system-user-token"
METADATA = {"display_phone_number": "4930123456", "phone_number_id": PHONE_NUMBER_ID}

# code -> (HTTP status, title, details), from Meta's error code reference
ERRORS: dict[int, tuple[int, str, str]] = {
    190: (
        401,
        "Invalid OAuth access token - Cannot parse access token",
        "Error validating access token",
    ),
    100: (400, "Invalid parameter", "Invalid parameter"),
    131047: (
        400,
        "Re-engagement message",
        "More than 24 hours have passed since the recipient last replied to the sender number.",
    ),
    131026: (400, "Message Undeliverable", "Unable to deliver message."),
    131056: (
        400,
        "(Business Account, Consumer Account) pair rate limit hit",
        "Too many "
        "messages sent from the sender phone number to the same recipient phone number "
        "in a short period of time.",
    ),
    130429: (
        400,
        "Rate limit hit",
        "Message failed to send because there were too many "
        "messages sent from this phone number in a short period of time",
    ),
    131000: (500, "Something went wrong", "Message failed to send due to an unknown error."),
    131016: (503, "Service unavailable", "A service is temporarily unavailable."),
}

Answer = tuple[int, dict[str, str], str]


@dataclass(frozen=True)
class SentMessage:
    id: str
    to: str | None
    recipient: str | None
    body: str
    reply_to: str | None
    callback_data: str | None

    @property
    def user(self) -> str:
        return self.to or self.recipient or ""


def error_body(code: int, trace: str = "AbCdEf123") -> str:
    _status, title, details = ERRORS[code]
    return json.dumps(
        {
            "error": {
                "message": f"(#{code}) {title}",
                "type": "OAuthException",
                "code": code,
                "error_data": {"messaging_product": "whatsapp", "details": details},
                "error_subcode": 2494010,
                "fbtrace_id": trace,
            }
        }
    )


class FakeCloudApi:
    def __init__(
        self,
        *,
        token: str = TOKEN,
        graph: str = GRAPH,
        version: str = VERSION,
        phone_number_id: str = PHONE_NUMBER_ID,
    ) -> None:
        self.token = token
        self.path = f"/{version}/{phone_number_id}/messages"
        self.url = f"{graph}{self.path}"
        self.sent: list[SentMessage] = []
        self.calls = 0
        self.window_closed: set[str] = set()
        self.undeliverable: set[str] = set()
        self._next: deque[Answer | Exception] = deque()
        self._ids = count(1)
        self._lock = threading.Lock()

    # ---- staging ----------------------------------------------------------------------------

    def fail_next(self, code: int, times: int = 1, retry_after: str | None = None) -> None:
        status = ERRORS[code][0]
        headers = {"Content-Type": "application/json"}
        if retry_after is not None:
            headers["Retry-After"] = retry_after
        self._next.extend([(status, headers, error_body(code))] * times)

    def answer_next(self, status: int, body: str = "<html>Bad Gateway</html>") -> None:
        """An answer not from Meta's application (a proxy's page)."""
        self._next.append((status, {"Content-Type": "text/html"}, body))

    def drop_next(self, error: Exception) -> None:
        """A transport failure instead of the next answer (`responses` only)."""
        self._next.append(error)

    def revoke_token(self) -> None:
        self.token = "revoked"

    # ---- the endpoint -----------------------------------------------------------------------

    def handle(self, authorization: str | None, raw: bytes) -> Answer:
        with self._lock:
            self.calls += 1
            if self._next:
                staged = self._next.popleft()
                if isinstance(staged, Exception):
                    raise staged
                return staged
            if authorization != f"Bearer {self.token}":
                return self._error(190)
            try:
                body = json.loads(raw)
            except ValueError:
                return self._error(100)
            problem = _invalid(body)
            if problem:
                return self._error(100)
            to, recipient = body.get("to"), body.get("recipient")
            user = to or recipient
            if user in self.window_closed:
                return self._error(131047)
            if user in self.undeliverable:
                return self._error(131026)
            message = SentMessage(
                id=f"wamid.FAKE{next(self._ids):08d}",
                to=to,
                recipient=None if to else recipient,
                body=body["text"]["body"],
                reply_to=(body.get("context") or {}).get("message_id"),
                callback_data=body.get("biz_opaque_callback_data"),
            )
            self.sent.append(message)
            contact = (
                {"input": to, "wa_id": to} if to else {"input": recipient, "user_id": recipient}
            )
            return (
                200,
                {"Content-Type": "application/json"},
                json.dumps(
                    {
                        "messaging_product": "whatsapp",
                        "contacts": [contact],
                        "messages": [{"id": message.id}],
                    }
                ),
            )

    def _error(self, code: int) -> Answer:
        return ERRORS[code][0], {"Content-Type": "application/json"}, error_body(code)

    def register(self, mock: responses.RequestsMock) -> None:
        def callback(request: requests.PreparedRequest) -> Answer:
            raw = (
                request.body
                if isinstance(request.body, bytes)
                else str(request.body or "").encode()
            )
            return self.handle(request.headers.get("Authorization"), raw)

        mock.add_callback(responses.POST, self.url, callback=callback)

    # ---- what Meta sends back by webhook ------------------------------------------------------

    def status_payload(
        self,
        message: SentMessage,
        status: str,
        at: datetime,
        errors: tuple[int, ...] = (),
        with_callback: bool = True,
    ) -> dict[str, Any]:
        item: dict[str, Any] = {
            "id": message.id,
            "status": status,
            "timestamp": str(int(at.timestamp())),
        }
        if message.to:
            item["recipient_id"] = message.to
        else:
            item["recipient_user_id"] = message.recipient
        if with_callback and message.callback_data:
            item["biz_opaque_callback_data"] = message.callback_data
        if status == "sent":
            item["pricing"] = {
                "billable": True,
                "pricing_model": "PMP",
                "category": "service",
                "type": "regular",
            }
        if errors:
            item["errors"] = [
                {
                    "code": code,
                    "title": ERRORS.get(code, (0, "error", ""))[1],
                    "message": ERRORS.get(code, (0, "error", ""))[1],
                    "error_data": {"details": "error"},
                }
                for code in errors
            ]
        return {
            "object": "whatsapp_business_account",
            "entry": [
                {
                    "id": "102290129340398",
                    "changes": [
                        {
                            "field": "messages",
                            "value": {
                                "messaging_product": "whatsapp",
                                "metadata": METADATA,
                                "statuses": [item],
                            },
                        }
                    ],
                }
            ],
        }

    # ---- a real port, for a subprocess --------------------------------------------------------

    @contextmanager
    def serve_http(self) -> Iterator[str]:
        """Serve the endpoint on a loopback port; yields the graph URL to configure."""
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path != fake.path:
                    status, headers, body = 404, {}, "{}"
                else:
                    status, headers, body = fake.handle(self.headers.get("Authorization"), raw)
                data = body.encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()
            server.server_close()


def _invalid(body: Any) -> str | None:
    """Why Meta would refuse the request body with error 100 (None: it would not)."""
    if not isinstance(body, dict):
        return "not an object"
    if body.get("messaging_product") != "whatsapp":
        return "messaging_product"
    if body.get("recipient_type", "individual") != "individual":
        return "recipient_type"
    if not (body.get("to") or body.get("recipient")):
        return "no recipient"
    if body.get("type") != "text" or not isinstance(body.get("text"), dict):
        return "type"
    text = body["text"].get("body")
    if not isinstance(text, str) or not text or len(text) > 4096:
        return "text.body"
    context = body.get("context")
    if context is not None and not isinstance((context or {}).get("message_id"), str):
        return "context.message_id"
    callback = body.get("biz_opaque_callback_data")
    if callback is not None and (not isinstance(callback, str) or len(callback.encode()) > 512):
        return "biz_opaque_callback_data"
    return None

"""Sending a text reply through the WhatsApp Cloud API (`POST /{phone_number_id}/messages`).

The request, as Meta documents it: `messaging_product: "whatsapp"`, `recipient_type:
"individual"`, the user's number in `to` or, for a user known only by a business-scoped
user id, the id in `recipient` (Meta: `to` wins when both are given, and a number keeps
the number in the webhooks, so the number is used whenever it is known), `context.
message_id` to quote the message answered, and `biz_opaque_callback_data`, which Meta
hands back on every status of the message.

The answer is read from one table of Meta's error codes (`META_ERRORS`), never from its
message text; a code the table lacks falls back to the HTTP status (`http.classify`).
Retries go through the project's one `RetryPolicy`. The Cloud API has no idempotency key,
so a request that may have reached Meta is never repeated: only answers that say nothing
was sent (a refusal with an error body, a connection that was never made) are retried; a
timeout or a connection dropped after the request left is `NO_ANSWER`, for the reply's
own statuses to settle.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import requests
from urllib3.exceptions import ConnectTimeoutError, MaxRetryError, NewConnectionError

from waconsent.connectors.http import Outcome, RetryPolicy, classify, retry_after_seconds
from waconsent.errors import ConnectionFailed, RateLimited, RetryableError


class Sent(enum.Enum):
    ACCEPTED = "accepted"  # Meta took it and named it (`messages[0].id`)
    REFUSED = "refused"  # nothing was sent and sending again will not help
    RETRY_LATER = "retry_later"  # nothing was sent; the retry policy gave up for now
    CREDENTIALS_REJECTED = "credentials_rejected"  # nothing was sent; no reply can be, until fixed
    NO_ANSWER = "no_answer"  # perhaps sent: never repeat; the statuses will tell


class _Do(enum.Enum):
    RETRY = "retry"
    FAIL = "fail"
    CREDENTIALS = "credentials"


#: Meta's error codes (https://developers.facebook.com/documentation/business-messaging/
#: whatsapp/support/error-codes) -> what to do, and why in our words
META_ERRORS: Mapping[int, tuple[_Do, str]] = {
    0: (_Do.CREDENTIALS, "the access token could not be authenticated"),
    190: (_Do.CREDENTIALS, "the access token has expired or is invalid"),
    10: (
        _Do.CREDENTIALS,
        "permission denied: the token lacks whatsapp_business_messaging or "
        "access to this phone number",
    ),
    4: (_Do.RETRY, "the app reached its API call rate limit"),
    80007: (_Do.RETRY, "the WhatsApp Business Account reached its rate limit"),
    130429: (_Do.RETRY, "Cloud API throughput reached"),
    131056: (_Do.RETRY, "pair rate limit: too many messages to this user in a short time"),
    131000: (_Do.RETRY, "something went wrong at Meta"),
    131016: (_Do.RETRY, "the service is temporarily unavailable"),
    2: (_Do.RETRY, "Meta's service is down or overloaded"),
    131047: (
        _Do.FAIL,
        "more than 24 hours since the user's last message: the service window is closed",
    ),
    131026: (
        _Do.FAIL,
        "undeliverable: not a WhatsApp number, terms not accepted, or an old WhatsApp version",
    ),
    131048: (_Do.FAIL, "spam rate limit: the number's messages were blocked or flagged"),
    131062: (_Do.FAIL, "business-scoped user id recipients are not supported for this message"),
    131051: (_Do.FAIL, "unsupported message type"),
    100: (_Do.FAIL, "invalid parameter"),
    33: (_Do.FAIL, "the business phone number id is wrong or deleted"),
}
# Permission errors 200-299 mean the token may not do this, like 10.
_PERMISSION_CODES = range(200, 300)
#: Meta allows one message every 6 seconds to the same user (131056)
PAIR_RATE_SECONDS = 6.0
CREDENTIALS_FIX = (
    "create a system user token with the whatsapp_business_messaging permission for "
    "this phone number's WhatsApp Business Account (Meta Business Suite > Business "
    "settings > Users > System users > Generate new token), put it in "
    "WHATSAPP_ACCESS_TOKEN and restart; queued replies are kept and sent then"
)


@dataclass(frozen=True, slots=True)
class SendResult:
    outcome: Sent
    reply_id: str | None = None
    code: str | None = None  # Meta's error code, else "http:<status>" or an exception type
    reason: str = ""  # our words, never Meta's message (it may quote the request)
    trace: str | None = None  # Meta's fbtrace_id, for Meta's support


def request_body(
    *, wa_id: str | None, user_id: str | None, text: str, reply_to: str, callback_data: str
) -> dict[str, Any]:
    """The JSON of one text reply (see the module docstring for each field)."""
    body: dict[str, Any] = {"messaging_product": "whatsapp", "recipient_type": "individual"}
    if wa_id:
        body["to"] = wa_id
    elif user_id:
        body["recipient"] = user_id
    else:
        raise ValueError("a reply needs a wa_id or a business-scoped user id")
    body.update(
        context={"message_id": reply_to},
        type="text",
        text={"preview_url": False, "body": text},
        biz_opaque_callback_data=callback_data,
    )
    return body


class _Retry(RetryableError):
    """A refusal that says nothing was sent and that may heal: the policy retries it."""

    def __init__(self, result: SendResult, status: int, retry_after: float | None) -> None:
        self.result = result
        super().__init__(result.reason, status=status, retry_after=retry_after)


class _RateLimited(_Retry, RateLimited):
    pass


class CloudApiSender:
    """One session and one retry policy for the life of the sender."""

    def __init__(
        self,
        *,
        graph_url: str,
        api_version: str,
        phone_number_id: str,
        access_token: str,
        policy: RetryPolicy | None = None,
        session: requests.Session | None = None,
        timeout: tuple[float, float] = (5.0, 20.0),
    ) -> None:
        self.url = f"{graph_url.rstrip('/')}/{api_version}/{phone_number_id}/messages"
        self._headers = {
            "Authorization": f"Bearer {access_token}",
            "Content-Type": "application/json",
        }
        # a short budget: a reply is worth sending within seconds, and a row refused for
        # longer goes back to the queue for a later round instead of blocking the others
        self.policy = policy or RetryPolicy(
            attempts=4, base_delay=1.0, max_delay=15.0, max_retry_after=60.0, max_total_delay=60.0
        )
        self.session = session or requests.Session()
        self.timeout = timeout

    def close(self) -> None:
        self.session.close()

    def send_text(
        self,
        *,
        wa_id: str | None,
        user_id: str | None,
        text: str,
        reply_to: str,
        callback_data: str,
    ) -> SendResult:
        """Send one reply: the result says whether it went, and if not, what may be done."""
        data = json.dumps(
            request_body(
                wa_id=wa_id,
                user_id=user_id,
                text=text,
                reply_to=reply_to,
                callback_data=callback_data,
            ),
            ensure_ascii=False,
        ).encode("utf-8")
        last: list[SendResult] = []

        def attempt() -> SendResult:
            try:
                response = self.session.post(
                    self.url, data=data, headers=self._headers, timeout=self.timeout
                )
            except (requests.ConnectionError, requests.Timeout) as exc:
                if _never_connected(exc):
                    raise  # nothing left this machine: the policy may try again
                return SendResult(
                    Sent.NO_ANSWER,
                    code=type(exc).__name__,
                    reason=f"no answer from Meta ({type(exc).__name__}) after "
                    "the request left: perhaps sent, so not repeated",
                )
            try:
                return _answer(response)
            except _Retry as retry:
                last[:] = [retry.result]
                raise

        try:
            return self.policy.run(attempt, what="sending a WhatsApp reply")
        except ConnectionFailed as exc:
            earlier = last[0] if last else None
            return SendResult(
                Sent.RETRY_LATER,
                code=earlier.code if earlier else "connect",
                reason=str(exc),
                trace=earlier.trace if earlier else None,
            )


def _never_connected(exc: Exception) -> bool:
    """Whether the request certainly never reached Meta: the connection (or its TLS
    handshake, or the proxy) failed. A read timeout or a connection dropped while waiting
    for the answer may come after Meta took the message."""
    if isinstance(
        exc, (requests.ConnectTimeout, requests.exceptions.SSLError, requests.exceptions.ProxyError)
    ):
        return True
    reason = exc.args[0] if exc.args else None
    if isinstance(reason, MaxRetryError):
        return isinstance(reason.reason, (NewConnectionError, ConnectTimeoutError))
    return isinstance(reason, (NewConnectionError, ConnectTimeoutError))


def _answer(response: requests.Response) -> SendResult:
    """What an HTTP answer means; raises `_Retry` for a refusal worth repeating."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if 200 <= response.status_code < 300:
        reply_id = _message_id(body)
        if reply_id is None:
            return SendResult(
                Sent.NO_ANSWER,
                code=f"http:{response.status_code}",
                reason="Meta accepted the request but named no message",
            )
        return SendResult(Sent.ACCEPTED, reply_id=reply_id)
    error = body.get("error") if isinstance(body, Mapping) else None
    error = error if isinstance(error, Mapping) else None
    code = error.get("code") if error else None
    trace = str(error.get("fbtrace_id"))[:100] if error and error.get("fbtrace_id") else None
    do, why = _meaning(
        code if isinstance(code, int) and not isinstance(code, bool) else None,
        response.status_code,
        error is not None,
    )
    result = SendResult(
        Sent.REFUSED,
        code=str(code) if code is not None else f"http:{response.status_code}",
        reason=why,
        trace=trace,
    )
    if do is _Do.CREDENTIALS:
        return SendResult(Sent.CREDENTIALS_REJECTED, code=result.code, reason=why, trace=trace)
    if do is _Do.RETRY:
        wait = retry_after_seconds(response.headers)
        if code == 131056:
            wait = max(wait or 0.0, PAIR_RATE_SECONDS)
        kind = (
            _RateLimited
            if response.status_code == 429 or code in (4, 80007, 130429, 131056)
            else _Retry
        )
        raise kind(result, response.status_code, wait)
    if do is None:
        return SendResult(
            Sent.NO_ANSWER,
            code=result.code,
            trace=trace,
            reason=f"HTTP {response.status_code} without Meta's error body (a "
            "proxy's answer): perhaps sent, so not repeated",
        )
    return result


def _meaning(code: int | None, status: int, meta_answered: bool) -> tuple[_Do | None, str]:
    """From Meta's code when it gave one, else from the HTTP status. None: the answer came
    from something in front of Meta and does not say whether Meta took the message."""
    if code is not None:
        if code in META_ERRORS:
            return META_ERRORS[code]
        if code in _PERMISSION_CODES:
            return _Do.CREDENTIALS, f"permission denied (error {code}): the token may not send"
    outcome = classify(status)
    if outcome is Outcome.RENEW_SESSION:  # a system user token cannot be renewed
        return _Do.CREDENTIALS, "the access token was refused (HTTP 401)"
    if outcome is Outcome.RETRY:
        if meta_answered or status in (429, 503):
            return _Do.RETRY, f"HTTP {status}: Meta asks to try again later"
        return None, ""
    suffix = f" (error {code})" if code is not None else ""
    return _Do.FAIL, f"refused with HTTP {status}{suffix}"


def _message_id(body: Any) -> str | None:
    messages = body.get("messages") if isinstance(body, Mapping) else None
    if isinstance(messages, list) and messages and isinstance(messages[0], Mapping):
        reply_id = messages[0].get("id")
        return str(reply_id) if reply_id else None
    return None

"""What the website opt-in shows (issue 15): the page, the answer page and the QR code.

Self-contained by design: no script, no external asset, one inline style block allowed by
its hash in a strict Content-Security-Policy, the QR code an `<img>` of the same origin.
Every value is HTML-escaped where it is written; nothing here touches the store.
"""

from __future__ import annotations

import base64
import hashlib
import io
from collections.abc import Sequence
from html import escape

import segno

STYLE = """
body{font-family:system-ui,sans-serif;margin:0;padding:1.5rem;color:#1b1b1b;background:#fafafa}
main{max-width:32rem;margin:0 auto;background:#fff;padding:1.5rem;border-radius:.5rem;
border:1px solid #ddd}
h1{font-size:1.4rem;margin-top:0}
label{display:block;margin:.75rem 0 .25rem}
.consent{display:flex;gap:.5rem;align-items:flex-start}
.consent label{margin:0}
input[type=tel]{font-size:1rem;padding:.5rem;width:100%;box-sizing:border-box}
.button,button{display:inline-block;font-size:1.05rem;padding:.7rem 1.2rem;margin-top:1rem;
border:0;border-radius:.4rem;background:#0b6e4f;color:#fff;text-decoration:none;cursor:pointer}
.button:focus,button:focus,input:focus{outline:3px solid #f5a623;outline-offset:2px}
img{display:block;margin:1rem 0;width:12rem;height:12rem}
.small{font-size:.9rem;color:#444}
"""
STYLE_HASH = base64.b64encode(hashlib.sha256(STYLE.encode()).digest()).decode()


def security_headers(frame_origins: Sequence[str] = ()) -> dict[str, str]:
    """The page's headers: nothing may load but its own style and same-origin images."""
    ancestors = " ".join(frame_origins) or "'none'"
    policy = (
        f"default-src 'none'; style-src 'sha256-{STYLE_HASH}'; img-src 'self'; "
        f"form-action 'self'; base-uri 'none'; frame-ancestors {ancestors}"
    )
    return {
        "Content-Security-Policy": policy,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "same-origin",
        "Cache-Control": "no-store",
    }


def _document(title: str, body: str) -> str:
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{STYLE}</style></head>"
        f"<body><main>{body}</main></body></html>\n"
    )


def form_page(*, action: str, business: str, wording: str, form_id: str) -> str:
    """GET <path>: the wording, a box to tick, an optional number, the button."""
    return _document(
        f"WhatsApp messages from {business}",
        (
            f"<h1>WhatsApp messages from {escape(business)}</h1>"
            f'<form method="post" action="{escape(action)}">'
            f'<input type="hidden" name="form" value="{escape(form_id)}">'
            f'<div class="consent"><input type="checkbox" id="agree" name="agree" value="yes" '
            f'required><label for="agree" id="wording">{escape(wording)}</label></div>'
            f'<label for="phone">Your WhatsApp number (optional)</label>'
            f'<input type="tel" id="phone" name="phone" autocomplete="tel" maxlength="40">'
            f'<button type="submit" id="submit">Continue in WhatsApp</button>'
            f'<p class="small">Next you send one prefilled message from your own WhatsApp; that '
            f"message confirms your number. Nothing is sent to you before.</p></form>"
        ),
    )


def answer_page(*, business: str, keyword: str, link: str, qr_url: str, expires_at: str) -> str:
    """The answer to the page's own form: the link as a button, and its QR code."""
    return _document(
        f"Confirm in WhatsApp: {business}",
        (
            "<h1>One step left: send the message</h1>"
            f"<p>Tap the button: WhatsApp opens with the message <strong>{escape(keyword)} "
            f"…</strong> ready. Send it to confirm that {escape(business)} may write to you.</p>"
            f'<p><a class="button" id="whatsapp-link" href="{escape(link)}">Open WhatsApp</a></p>'
            "<p>On a computer? Scan this code with your phone's camera:</p>"
            f'<img id="qr" src="{escape(qr_url)}" width="192" height="192" '
            'alt="QR code that opens WhatsApp with the confirmation message">'
            f'<p class="small">The link works until {escape(expires_at)} (UTC) and only once.</p>'
        ),
    )


def qr_svg(link: str) -> bytes:
    """The link as a QR code (segno), SVG with its own size, error correction M."""
    buffer = io.BytesIO()
    segno.make(link, error="m", micro=False).save(
        buffer, kind="svg", scale=6, border=4, title="WhatsApp confirmation link"
    )
    return buffer.getvalue()

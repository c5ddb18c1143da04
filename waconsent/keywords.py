"""Keywords: how a user's words are normalized and what they mean for consent.

The bottom floor beside `domain`: the configuration validates keywords with it, the
parser classifies replies with it, and nothing here knows a payload's shape.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from waconsent.domain import Signal

# Meta's marketing opt-out quick reply, as its payload arrives when not localized.
STOP_BUTTON_PAYLOADS = frozenset({"stop promotions"})

# Issue 15: what a website opt-in token looks like once normalized (case-folded): letters and
# digits only, so punctuation stripping cannot change it. Real tokens are 32 base32
# characters; a little either way is still read as a (mistyped, hence unknown) token.
TOKEN_SHAPE = re.compile(r"[a-z0-9]{16,64}")

# Variation selectors (VS1-16, VS17-256, Mongolian free variation selectors) are
# combining marks, not format characters, yet just as invisible: "STOP\ufe0f" shows as STOP.
_VARIATION_SELECTORS = frozenset(
    [
        *map(chr, range(0xFE00, 0xFE10)),
        *map(chr, range(0xE0100, 0xE01F0)),
        *map(chr, range(0x180B, 0x1810)),
    ]
)


def _dropped(ch: str) -> bool:
    """Punctuation, and what displays as nothing: format characters (category Cf: the
    zero-width space and joiners, direction marks, the soft hyphen, the BOM) and variation
    selectors. A STOP with any of them around or inside it still reads STOP to the user."""
    category = unicodedata.category(ch)
    return category[0] == "P" or category == "Cf" or ch in _VARIATION_SELECTORS


def normalize_text(text: str) -> str:
    """SPEC 5.3: trimmed, case-folded, punctuation stripped (inner spaces folded to one).

    NFKC first, so full-width or compatibility forms of a keyword match too; invisible
    characters are dropped with the punctuation (see `_dropped`).
    """
    folded = unicodedata.normalize("NFKC", text)
    kept = "".join(ch for ch in folded if not _dropped(ch))
    return " ".join(kept.casefold().split())


@dataclass(frozen=True)
class KeywordRules:
    """The configured keywords, pre-normalized; maps normalized text back to the keyword.

    `opt_in_payloads` are button ids / payloads (chosen by the business, never seen by the
    user) that the business declared as opt-ins; they are compared exactly, not normalized.
    """

    opt_in: Mapping[str, str]
    opt_out: Mapping[str, str]
    stop_labels: frozenset[str]
    opt_in_payloads: frozenset[str] = frozenset()

    @classmethod
    def build(
        cls,
        opt_in: Iterable[str],
        opt_out: Iterable[str],
        stop_labels: Iterable[str],
        opt_in_payloads: Iterable[str] = (),
    ) -> KeywordRules:
        return cls(
            opt_in={normalize_text(k): k.strip().upper() for k in opt_in},
            opt_out={normalize_text(k): k.strip().upper() for k in opt_out},
            stop_labels=frozenset(normalize_text(s) for s in stop_labels) | STOP_BUTTON_PAYLOADS,
            opt_in_payloads=frozenset(p.strip() for p in opt_in_payloads if p.strip()),
        )

    def classify(self, reply: Reply) -> tuple[Signal, str | None]:
        """The reply's consent signal and the keyword behind it. Opt-out wins over opt-in
        when one reply somehow carries both.

        Opt-outs are read generously (typed text, visible title, id, payload, any Stop
        promotions label); opt-ins only from what the user said, or from a payload the
        business declared as an opt-in (GDPR Art. 7(1): consent must be demonstrable, and a
        button id proves only what the business put there).
        """
        said = [normalize_text(t) for t in reply.said]
        everything = [*said, *(normalize_text(t) for t in reply.chosen)]
        for text in everything:
            if text in self.opt_out:
                return Signal.OPT_OUT, self.opt_out[text]
        if reply.tapped and any(text in self.stop_labels for text in everything):
            return Signal.OPT_OUT, "STOP_PROMOTIONS"
        for text in said:
            if text in self.opt_in:
                return Signal.OPT_IN, self.opt_in[text]
        for text in said:
            found = self._keyword_with_token(text)
            if found is not None:
                return Signal.OPT_IN, found[0]
        for payload in reply.chosen:
            if payload in self.opt_in_payloads:
                return Signal.OPT_IN, payload
        return Signal.NONE, None

    def optin_token(self, reply: Reply) -> str | None:
        """Issue 15: the website opt-in token in `<keyword> <token>` (any case, extra spaces,
        the token anywhere after the keyword), as typed; None for anything else."""
        for text in reply.said:
            found = self._keyword_with_token(normalize_text(text))
            if found is not None:
                return found[1]
        return None

    def _keyword_with_token(self, text: str) -> tuple[str, str] | None:
        """(keyword, token) when `text` opens with an opt-in keyword and a later word has a
        token's shape. Other words after the keyword grant nothing (rule 5.2): "start the
        engine" is no opt-in, "start <token>" is the prefilled confirmation."""
        for normalized, keyword in self.opt_in.items():
            if text.startswith(normalized + " "):
                rest = text[len(normalized) + 1 :].split()
                token = next((word for word in rest if TOKEN_SHAPE.fullmatch(word)), None)
                if token is not None:
                    return keyword, token
        return None


DEFAULT_KEYWORDS = KeywordRules.build(["START"], ["STOP", "UNSUBSCRIBE"], ["Stop promotions"])


@dataclass(frozen=True, slots=True)
class Reply:
    """What one user message could say about consent.

    `said` is what the user typed or the visible title / text of what they tapped; `chosen`
    is the button id or payload the business chose when it sent the message; `tapped` tells
    a button or list reply from typed text. Only `said` can opt in (unless a payload is
    declared in `whatsapp.opt_in_button_payloads`); both can opt out, because a missed STOP
    is the worse error.
    """

    said: tuple[str, ...] = ()
    chosen: tuple[str, ...] = ()
    tapped: bool = False

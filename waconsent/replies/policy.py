"""The reply policy of a configuration: texts with their placeholders filled in."""

from __future__ import annotations

from datetime import timedelta

from waconsent.config.replies import fill, placeholder_values
from waconsent.config.schema import Settings
from waconsent.keywords import normalize_text
from waconsent.replies.rules import ReplyPolicy


def reply_policy(settings: Settings) -> ReplyPolicy | None:
    """None while `[replies] enabled` is false: nothing is queued then."""
    replies = settings.replies
    if not replies.enabled:
        return None
    values = placeholder_values(settings)
    return ReplyPolicy(
        opt_in=fill(replies.opt_in, values),
        opt_out=fill(replies.opt_out, values),
        by_keyword={
            normalize_text(key): fill(text, values) for key, text in replies.keywords.items()
        },
        max_age=timedelta(minutes=replies.max_age_minutes),
    )

"""The `waconsent` command. `base` holds the group, the exit codes and the one error
mapping; each module beside it adds the commands of one kind; `--config` is accepted
after every command word once they are all registered."""

from waconsent.cli import (  # replies: issue 14, optin: issue 15, audience: issue 16
    audience,
    data,
    optin,
    replies,
    reports,
    running,
    services,
    setup,
)
from waconsent.cli.base import accept_config_everywhere, main

accept_config_everywhere(main)

__all__ = [
    "audience",
    "data",
    "main",
    "optin",
    "replies",
    "reports",
    "running",
    "services",
    "setup",
]

"""How far a run has got, told as it goes: for `waconsent sync`'s progress bar on a terminal.

The run calls a `Progress` (the no-op `SILENT` unless the caller passes one); what to draw,
and whether to draw at all, is the caller's business (`waconsent.cli.progress`). The calls
come from the run's thread, except `total`, which may come from the read-ahead thread.

    total(n, estimated)   the records this run will read, once known: from the CRM after its
                          first page (Salesforce's totalSize, the ledger's count), or
                          `estimated` from the ledger's last full run when the CRM does not
                          tell (Dataverse beyond one page); None when nobody knows
    decided(n)            n more records were read and decided
    sending(n)            a pass over the outbox begins with n writes waiting
    sent(ok, failed)      the CRM answered for that many writes
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    #: whether anyone is watching: a run asks the CRM for its total only then (the ledger's
    #: count is a query of its own)
    active: bool

    def total(self, records: int | None, *, estimated: bool = False) -> None: ...

    def decided(self, records: int) -> None: ...

    def sending(self, backlog: int) -> None: ...

    def sent(self, ok: int, failed: int) -> None: ...


class _Silent:
    """The default: nobody is watching."""

    active = False

    def total(self, records: int | None, *, estimated: bool = False) -> None:
        pass

    def decided(self, records: int) -> None:
        pass

    def sending(self, backlog: int) -> None:
        pass

    def sent(self, ok: int, failed: int) -> None:
        pass


SILENT: Progress = _Silent()

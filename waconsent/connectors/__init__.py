"""Connectors translate outside systems into plain data; they never import `sync`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from waconsent.connectors.base import CrmConnector

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from waconsent.config import LoadedConfig

__all__ = ["CrmConnector", "open_crm"]


def open_crm(config: LoadedConfig, engine: Engine) -> CrmConnector:
    """The connector for `crm.kind`; vendor modules load only when used."""
    kind = config.settings.crm.kind
    if kind == "salesforce":
        from waconsent.connectors.salesforce import SalesforceConnector

        return SalesforceConnector.from_config(config)
    if kind == "dynamics":
        from waconsent.connectors.dynamics import DynamicsConnector

        return DynamicsConnector.from_config(config)
    from waconsent.connectors.ledger import LedgerCrm

    return LedgerCrm.from_config(config, engine=engine)

"""waconsent keeps WhatsApp consent in the CRM true and provable."""

__version__ = "0.1.0"

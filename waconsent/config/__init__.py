"""Configuration: the TOML file plus environment secrets, validated and frozen."""

from waconsent.config.loading import LoadedConfig, Secrets, load, parse
from waconsent.config.schema import Settings

__all__ = ["LoadedConfig", "Secrets", "Settings", "load", "parse"]

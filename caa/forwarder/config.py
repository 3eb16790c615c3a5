"""Loading apf.json, the forwarder's configuration written by caa-process-user-data (spec-podvm §1.2).

The format is `caa.podvm_api.apf.APFConfig` (shared with the adaptor, which writes it); this module reads
the file and words its errors as upstream's forwarder does (`failed to open`, `failed to decode`).
"""

from __future__ import annotations

from typing import Any

from caa.podvm_api.apf import APFConfig, APFError

__all__ = ["ConfigError", "ForwarderConfig", "load_config", "parse_config"]

#: The forwarder's name for the apf.json value (the daemon and its tap import it from here).
ForwarderConfig = APFConfig


class ConfigError(Exception):
    """apf.json could not be read or parsed; the message names the file and the cause."""


def parse_config(doc: Any) -> APFConfig:
    """The decoded JSON document -> APFConfig; raises ConfigError."""
    try:
        return APFConfig.from_dict(doc)
    except APFError as e:
        raise ConfigError(str(e)) from None


def load_config(path: str) -> APFConfig:
    """Read and parse apf.json; errors carry upstream's wording (`failed to open`, `failed to decode`)."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise ConfigError(f"failed to open {path}: {e.strerror or e}") from e
    try:
        return APFConfig.from_json(text)
    except APFError as e:
        raise ConfigError(f"failed to decode a Agent Protocol Forwarder config file file: {path}: {e}") from None

"""
Secrets out of logs and error texts: a `Redactor` knows the secret values (from a provider's `secretOptions`)
and replaces each with `**********` in any text; `RedactingObserver` wraps a twisted.logger observer so no event
it passes on carries a secret, whether in its format fields, its formatted text or its failure's traceback.

Why values and not names: a secret leaks by value (an error message quoting a request, a URL, a traceback
line), so the filter looks for the values wherever they appear. Values shorter than `MIN_SECRET_LENGTH` are
ignored, so a one-character "secret" cannot blank out every log line.

Wiring: `RedactingObserver(observer, redactor)` wraps an observer you own. Under twistd, whose observer is not
ours, add a `ScrubbingObserver` to the global publisher in `makeService` (before twistd begins logging, so it is
the first observer): it masks each event in place, so the observers after it (twistd's log file, the buffered
start-up events replayed to it) never see a secret::

    globalLogPublisher.addObserver(ScrubbingObserver(Redactor.from_options(options.provider_options)))
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import attrs
from twisted.logger import ILogObserver, LogEvent, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

MASK = "**********"


def masked_fields(config: Any, secret_fields: Iterable[str]) -> dict[str, Any]:
    """An attrs config's fields for logging, the set ones among `secret_fields` replaced by MASK."""
    fields: dict[str, Any] = {a.name: getattr(config, a.name) for a in attrs.fields(type(config))}
    for name in secret_fields:
        if fields[name]:
            fields[name] = MASK
    return fields
MIN_SECRET_LENGTH = 4


class Redactor:
    """Replaces known secret values in texts; `add` more at any time (e.g. a token fetched later)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: set[str] = set()
        for secret in secrets:
            self.add(secret)

    @classmethod
    def from_options(cls, *options: Any) -> Redactor:
        """The secrets of `ProviderOptions` instances (their `secretOptions` that have a value); None is skipped."""
        return cls(str(o[name]) for o in options if o is not None
                   for name in getattr(o, "secretOptions", ()) if o[name])

    def add(self, secret: str) -> None:
        if len(secret) >= MIN_SECRET_LENGTH:
            self._secrets.add(secret)

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def redact(self, text: str) -> str:
        # Longest first, so a secret containing another one is masked whole.
        for secret in sorted(self._secrets, key=len, reverse=True):
            if secret in text:
                text = text.replace(secret, MASK)
        return text

    def contains_secret(self, text: str) -> bool:
        return any(secret in text for secret in self._secrets)

    def redact_value(self, value: Any) -> Any:
        """A copy of a log field with secrets masked: strings, bytes, and the items of lists, tuples, dicts."""
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, bytes):
            text = value.decode("utf-8", "replace")
            return self.redact(text).encode() if self.contains_secret(text) else value
        if isinstance(value, Mapping):
            return {key: self.redact_value(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.redact_value(item) for item in value)
        if value is None or isinstance(value, (int, float, bool)):
            return value
        text = repr(value)
        return self.redact(text) if self.contains_secret(text) else value


@implementer(ILogObserver)
class RedactingObserver:
    """Passes each event to `observer` with every secret masked (fields, text and failure traceback)."""

    def __init__(self, observer: ILogObserver, redactor: Redactor) -> None:
        self._observer = observer
        self._redactor = redactor

    def __call__(self, event: LogEvent) -> None:
        if not self._redactor:
            self._observer(event)
            return
        self._observer(redact_event(event, self._redactor))


def redact_event(event: LogEvent, redactor: Redactor) -> LogEvent:
    """A copy of `event` without secrets: in its fields, in its formatted text, in its failure's traceback."""
    clean: dict[str, Any] = {}
    for key, value in event.items():
        if key.startswith("log_") and key not in ("log_format", "log_text"):
            clean[key] = value  # logger, level, namespace, time, source: not user text
        else:
            clean[key] = redactor.redact_value(value)
    text = formatEvent(event)
    if redactor.contains_secret(text):
        # A field hid the secret from the per-field pass (an object's str()): keep only the masked text.
        clean = {key: value for key, value in clean.items() if key.startswith("log_")}
        clean["log_format"] = "{log_redacted}"
        clean["log_redacted"] = redactor.redact(text)
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        traceback = failure.getTraceback()
        if redactor.contains_secret(traceback):
            del clean["log_failure"]
            clean["log_format"] = clean.get("log_format", "") + "\n{log_redacted_traceback}"
            clean["log_redacted_traceback"] = redactor.redact(traceback)
    return clean


@implementer(ILogObserver)
class ScrubbingObserver:
    """Masks secrets in each event in place (see the module docstring: add it first to a publisher)."""

    def __init__(self, redactor: Redactor) -> None:
        self._redactor = redactor

    def __call__(self, event: LogEvent) -> None:
        if not self._redactor:
            return
        clean = redact_event(event, self._redactor)
        event.clear()
        event.update(clean)

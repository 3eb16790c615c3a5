"""What a ttrpc handler learns about the call it serves."""

from __future__ import annotations

import attrs
from twisted.internet.interfaces import IReactorTime


@attrs.define
class CallContext:
    clock: IReactorTime
    service: str
    method: str
    stream_id: int
    metadata: list[tuple[str, str]] = attrs.field(factory=list)
    deadline: float | None = None
    peer: object = None

    def remaining(self) -> float | None:
        """Seconds left before the caller's deadline, or None when the call has none."""
        if self.deadline is None:
            return None
        return self.deadline - self.clock.seconds()

    def metadata_value(self, key: str) -> str | None:
        for k, v in self.metadata:
            if k == key:
                return v
        return None

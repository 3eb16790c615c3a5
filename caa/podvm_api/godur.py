"""Go durations (`time.ParseDuration` / `Duration.String`): `PROXY_TIMEOUT=5m`, `CAA_DISK_DETECT_RETRY_DELAY=2s`.

Upstream's settings are Go durations, so both daemons parse them with Go's grammar, exactly:
`[-+]?([0-9]*(\\.[0-9]*)?unit)+` or `0`, units ns, us, µs, μs, ms, s, m, h, to whole nanoseconds within
int64. `format_duration` is `Duration.String()` (`1h30m0s`, `1.5s`, `250ms`, `0s`).
"""

from __future__ import annotations

__all__ = ["MAX_NS", "format_duration", "parse_duration", "parse_duration_ns"]

NANOSECOND = 1
MICROSECOND = 1000 * NANOSECOND
MILLISECOND = 1000 * MICROSECOND
SECOND = 1000 * MILLISECOND
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE

_UNITS = {"ns": NANOSECOND, "us": MICROSECOND, "\u00b5s": MICROSECOND, "\u03bcs": MICROSECOND,
          "ms": MILLISECOND, "s": SECOND, "m": MINUTE, "h": HOUR}
_DIGITS = "0123456789"
MAX_NS = (1 << 63) - 1


def _error(text: str, why: str) -> ValueError:
    return ValueError(f"{text!r} is not a duration such as 300s, 5m or 1h30m ({why})")


def parse_duration_ns(text: str) -> int:
    """A Go duration -> integer nanoseconds (Go's `time.ParseDuration`); ValueError when malformed."""
    s = text
    negative = False
    if s[:1] in ("-", "+"):
        negative = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0
    if not s:
        raise _error(text, "empty")
    total = 0
    while s:
        if s[0] != "." and s[0] not in _DIGITS:
            raise _error(text, "expected a number")
        i = 0
        while i < len(s) and s[i] in _DIGITS:
            i += 1
        whole = int(s[:i]) if i else 0
        if whole > 1 << 63:
            raise _error(text, "overflow")
        had_whole, s = i > 0, s[i:]
        frac, scale, had_frac = 0, 1, False
        if s[:1] == ".":
            s = s[1:]
            i, overflow = 0, False
            while i < len(s) and s[i] in _DIGITS:
                # Go keeps the leading digits that fit in int64 and ignores the rest (all below 1 ns).
                overflow = overflow or frac > MAX_NS // 10 or frac * 10 + int(s[i]) > 1 << 63
                if not overflow:
                    frac, scale = frac * 10 + int(s[i]), scale * 10
                i += 1
            had_frac, s = i > 0, s[i:]
        if not had_whole and not had_frac:
            raise _error(text, "expected a number")
        i = 0
        while i < len(s) and s[i] != "." and s[i] not in _DIGITS:
            i += 1
        if i == 0:
            raise _error(text, "missing unit")
        unit = _UNITS.get(s[:i])
        if unit is None:
            raise _error(text, f"unknown unit {s[:i]!r}")
        s = s[i:]
        if whole > (1 << 63) // unit:
            raise _error(text, "overflow")
        value = whole * unit
        if frac:
            # Go computes the fraction in float64 (exact to the nanosecond for every unit up to hours).
            value += int(float(frac) * (float(unit) / float(scale)))
            if value > 1 << 63:
                raise _error(text, "overflow")
        total += value
        if total > 1 << 63:
            raise _error(text, "overflow")
    if negative:
        return -total
    if total > MAX_NS:
        raise _error(text, "overflow")
    return total


def parse_duration(text: str) -> float:
    """A Go duration in seconds (`"1m30s"` -> 90.0); ValueError when malformed."""
    return parse_duration_ns(text) / SECOND


def _frac(value: int, precision: int) -> tuple[str, int]:
    """Go's fmtFrac: the `precision` low decimal digits of `value` as ".ddd" without trailing zeros."""
    digits = ""
    printed = False
    for _ in range(precision):
        digit = value % 10
        printed = printed or digit != 0
        if printed:
            digits = str(digit) + digits
        value //= 10
    return ("." + digits if printed else ""), value


def format_duration(ns: int) -> str:
    """Go's `Duration.String()` of `ns` nanoseconds (an int64)."""
    if not -(MAX_NS + 1) <= ns <= MAX_NS:
        raise ValueError(f"{ns} ns does not fit in a Go duration")
    sign = "-" if ns < 0 else ""
    u = abs(ns)
    if u == 0:
        return "0s"
    if u < SECOND:
        if u < MICROSECOND:
            unit, precision = "ns", 0
        elif u < MILLISECOND:
            unit, precision = "\u00b5s", 3
        else:
            unit, precision = "ms", 6
        frac, whole = _frac(u, precision)
        return f"{sign}{whole}{frac}{unit}"
    frac, seconds = _frac(u, 9)
    text = f"{seconds % 60}{frac}s"
    minutes = seconds // 60
    if minutes:
        text = f"{minutes % 60}m{text}"
        hours = minutes // 60
        if hours:
            text = f"{hours}h{text}"
    return sign + text

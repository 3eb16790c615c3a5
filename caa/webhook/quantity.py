"""Kubernetes resource quantities (`k8s.io/apimachinery/pkg/api/resource.Quantity`), exactly.

The webhook's annotations are ceilings of sums, so one float rounding error is one vCPU or one MiB too
many or too few: values are `Fraction`s. `kubernetes.utils.parse_quantity` does the suffix arithmetic
(in a decimal context wide enough to be exact), after a check of Go's grammar, because that helper is
more lenient than Go (`1K`, `1_000`, ` 1`, `NaN`, `1e3k` pass it) and its default 28-digit context
rounds long numbers. Then Go's rules that the helper lacks: values rounded away from zero to 1e-9,
SI-suffixed values beyond int64 capped (as `ParseQuantity`'s slow path does), and a format
(DecimalSI / BinarySI / DecimalExponent) that decides how a sum prints (`Quantity.String()`).
"""

from __future__ import annotations

import decimal
import enum
import math
import re
from fractions import Fraction

import attrs
from kubernetes.utils import parse_quantity as _k8s_parse_quantity

__all__ = ["Format", "Quantity", "QuantityError", "ZERO", "parse_quantity", "value_ceil", "round_up_mib"]


class QuantityError(ValueError):
    """Not a Kubernetes quantity (Go's `ParseQuantity` would fail too)."""


class Format(enum.Enum):
    DECIMAL_SI = "DecimalSI"
    BINARY_SI = "BinarySI"
    DECIMAL_EXPONENT = "DecimalExponent"


@attrs.frozen
class Quantity:
    value: Fraction
    format: Format

    def __add__(self, other: Quantity) -> Quantity:
        # Go's Quantity.Add: a zero accumulator takes the format of what is added to it.
        fmt = other.format if self.value == 0 else self.format
        return Quantity(self.value + other.value, fmt)

    def __str__(self) -> str:
        return canonical(self)


ZERO = Quantity(Fraction(0), Format.DECIMAL_SI)

# Go's parseQuantityString: sign, digits, optional "." and digits, then suffix letters, sign, digits.
_GRAMMAR = re.compile(r"([+-]?)([0-9]*)(?:\.([0-9]*))?([eEinumkKMGTP]*[+-]?[0-9]*)\Z")
_DECIMAL_SUFFIXES = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_BINARY_SUFFIXES = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}
_EXPONENT = re.compile(r"[eE]([+-]?[0-9]+)\Z")
#: Go accepts any int32 exponent; 10**1000000 would take this process down, and no resource is that large.
_MAX_EXPONENT = 1000
_MAX_INT64 = 2**63 - 1
_NANO = 10**9
# Exact for every accepted number: digits of the mantissa plus a suffix factor of at most 2**60 or 10**18.
_CONTEXT = decimal.Context(prec=4200, Emax=decimal.MAX_EMAX, Emin=decimal.MIN_EMIN,
                           traps=[decimal.Inexact, decimal.InvalidOperation, decimal.Overflow])


def _interpret(suffix: str) -> tuple[str, Format, int]:
    """The helper-ready suffix, the format and the power of ten/two of a Go quantity suffix."""
    if suffix in _DECIMAL_SUFFIXES:
        return suffix, Format.DECIMAL_SI, _DECIMAL_SUFFIXES[suffix]
    if suffix in _BINARY_SUFFIXES:
        return suffix, Format.BINARY_SI, _BINARY_SUFFIXES[suffix]
    match = _EXPONENT.match(suffix)
    if match is None:
        raise QuantityError(f"unknown quantity suffix {suffix!r}")
    exponent = int(match.group(1))
    if abs(exponent) > _MAX_EXPONENT:
        raise QuantityError(f"quantity exponent {exponent} is out of range")
    return f"e{exponent}", Format.DECIMAL_EXPONENT, exponent


def _fast_path(num: str, denom: str, fmt: Format, exponent: int) -> bool:
    """Whether Go's ParseQuantity takes its int64 fast path (no cap there, exact at nano scale)."""
    if fmt is Format.BINARY_SI:
        if denom:
            return False
        precision = 15 - len(num) - int(exponent * 3 / 10) - 1
        return precision >= 0 and int(num) << exponent <= _MAX_INT64
    return 18 - (len(num) + len(denom)) >= 0 and exponent - len(denom) >= -9


def parse_quantity(text: str) -> Quantity:
    """Parse like Go's `resource.ParseQuantity`; raises `QuantityError`."""
    if text == "0":
        return ZERO
    match = _GRAMMAR.match(text)
    if not text or match is None:
        raise QuantityError(f"quantities must match the regular expression "
                            f"'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$': {text!r}")
    sign, whole, frac, suffix = match.groups()
    frac = frac or ""
    num = whole.lstrip("0") or "0"
    helper_suffix, fmt, exponent = _interpret(suffix)
    number = f"{num}.{frac}" if frac else num
    # kubernetes' helper knows "Ki".."Ei" and "n".."E"; Go's exponent suffix is plain Decimal syntax to it.
    with decimal.localcontext(_CONTEXT):
        try:
            amount = Fraction(_k8s_parse_quantity(number + helper_suffix))
        except (ValueError, ArithmeticError) as e:
            raise QuantityError(f"invalid quantity {text!r}: {e}") from None
    if not _fast_path(num, frac, fmt, exponent):
        # Go rounds a non-zero amount away from zero to the nano scale ("if you want some, you get some")...
        amount = Fraction(math.ceil(amount * _NANO), _NANO)
        # ...and caps SI-suffixed amounts at int64 (not exponent forms).
        if fmt is not Format.DECIMAL_EXPONENT and amount > _MAX_INT64:
            amount = Fraction(_MAX_INT64)
    return Quantity(-amount if sign == "-" else amount, fmt)


def parse_json_quantity(value: object) -> Quantity:
    """A quantity as it appears in a decoded JSON object: a string, a JSON number or null (Go's
    `UnmarshalJSON`: quotes dropped, spaces trimmed, null = zero)."""
    if value is None:
        return ZERO
    if isinstance(value, bool) or not isinstance(value, str | int | decimal.Decimal | float):
        raise QuantityError(f"a quantity must be a string or a number, not {type(value).__name__}")
    if isinstance(value, float):
        # Only reached by callers that decoded with floats; repr is the shortest exact round trip.
        value = repr(value)
    elif isinstance(value, decimal.Decimal):
        value = format(value, "f") if value.as_tuple().exponent == 0 else str(value).replace("E", "e")
    return parse_quantity(str(value).strip())


def value_ceil(q: Quantity) -> int:
    """Go's `Quantity.Value()`: the value rounded up to an integer away from zero."""
    v = q.value
    return math.ceil(v) if v >= 0 else -math.ceil(-v)


def round_up_mib(q: Quantity) -> int:
    """`helpers.RoundUpToMiB`: Value() in bytes, divided by 2**20 and rounded up (Go integer division)."""
    b = value_ceil(q)
    mib = 2**20
    quotient = b // mib if b >= 0 else -((-b) // mib)
    return quotient + 1 if b > 0 and b % mib else quotient


def _decimal_parts(v: Fraction) -> tuple[int, int]:
    """v = mantissa * 10**exponent with the exponent a multiple of 3, as large as possible."""
    exponent = 0
    while v.denominator != 1:
        v *= 1000
        exponent -= 3
    mantissa = v.numerator
    while mantissa and mantissa % 1000 == 0:
        mantissa //= 1000
        exponent += 3
    return mantissa, exponent


def canonical(q: Quantity) -> str:
    """Go's `Quantity.String()` (CanonicalizeBytes) for a value on the nano grid.

    Where Go has no suffix for the exponent (DecimalSI >= 1e21, BinarySI >= 2**70) it prints a wrong
    number without a suffix; we print the DecimalExponent form instead.
    """
    v = q.value
    if v == 0:
        return "0"
    fmt = q.format
    if fmt is Format.BINARY_SI and (-1024 < v < 1024 or v.denominator != 1):
        fmt = Format.DECIMAL_SI
    if fmt is Format.BINARY_SI:
        mantissa, power = v.numerator, 0
        while mantissa % 1024 == 0:
            mantissa //= 1024
            power += 10
        for suffix, exp in _BINARY_SUFFIXES.items():
            if exp == power:
                return f"{mantissa}{suffix}"
        if power == 0:
            return str(mantissa)
        fmt = Format.DECIMAL_SI
    mantissa, exponent = _decimal_parts(v)
    if fmt is Format.DECIMAL_SI:
        for suffix, exp in _DECIMAL_SUFFIXES.items():
            if exp == exponent:
                return f"{mantissa}{suffix}"
    return f"{mantissa}e{exponent}" if exponent else str(mantissa)

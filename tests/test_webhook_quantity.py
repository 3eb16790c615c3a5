"""caa.webhook.quantity: Kubernetes quantities parsed, summed and printed as Go's resource.Quantity does."""

from __future__ import annotations

import decimal
from fractions import Fraction

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from kubernetes.utils import parse_quantity as k8s_parse_quantity
from twisted.trial.unittest import SynchronousTestCase

from caa.webhook.quantity import (
    ZERO,
    Format,
    Quantity,
    QuantityError,
    canonical,
    parse_json_quantity,
    parse_quantity,
    round_up_mib,
    value_ceil,
)

FAST = settings(max_examples=300, deadline=None)

DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
BINARY = {"Ki": 10, "Mi": 20, "Gi": 30, "Ti": 40, "Pi": 50, "Ei": 60}


class ParseTests(SynchronousTestCase):
    def test_values_and_formats(self) -> None:
        """Values Go's ParseQuantity gives (apimachinery's quantity_test.go table), exact."""
        cases = {
            "2": (Fraction(2), Format.DECIMAL_SI),
            "200m": (Fraction(1, 5), Format.DECIMAL_SI),
            "0.7": (Fraction(7, 10), Format.DECIMAL_SI),
            "4Gi": (Fraction(4 * 2**30), Format.BINARY_SI),
            "1.5Ki": (Fraction(1536), Format.BINARY_SI),
            "1e3": (Fraction(1000), Format.DECIMAL_EXPONENT),
            "1E3": (Fraction(1000), Format.DECIMAL_EXPONENT),
            "1.5e-3": (Fraction(3, 2000), Format.DECIMAL_EXPONENT),
            "5n": (Fraction(5, 10**9), Format.DECIMAL_SI),
            "7u": (Fraction(7, 10**6), Format.DECIMAL_SI),
            "1Ei": (Fraction(2**60), Format.BINARY_SI),
            "-3k": (Fraction(-3000), Format.DECIMAL_SI),
            "+12M": (Fraction(12 * 10**6), Format.DECIMAL_SI),
            ".5": (Fraction(1, 2), Format.DECIMAL_SI),
            "1.": (Fraction(1), Format.DECIMAL_SI),
            "0": (Fraction(0), Format.DECIMAL_SI),
            "0Ki": (Fraction(0), Format.BINARY_SI),
            "000123": (Fraction(123), Format.DECIMAL_SI),
        }
        for text, (value, fmt) in cases.items():
            with self.subTest(text=text):
                q = parse_quantity(text)
                self.assertEqual((q.value, q.format), (value, fmt))

    def test_nano_rounding(self) -> None:
        """Below 1n, values round away from zero to the next nano (Go: "if you want some, you get some")."""
        self.assertEqual(parse_quantity("1.0000000001").value, Fraction(1_000_000_001, 10**9))
        self.assertEqual(parse_quantity("-1.0000000001").value, -Fraction(1_000_000_001, 10**9))
        self.assertEqual(parse_quantity("1e-12").value, Fraction(1, 10**9))
        self.assertEqual(parse_quantity("0.1n").value, Fraction(1, 10**9))

    def test_int64_cap(self) -> None:
        """SI amounts beyond int64 on Go's slow path are capped; exponent forms and the fast path are not."""
        self.assertEqual(parse_quantity("10000000000000000000").value, 2**63 - 1)
        self.assertEqual(parse_quantity("100Ei").value, 2**63 - 1)
        self.assertEqual(parse_quantity("10E").value, 10**19)
        self.assertEqual(parse_quantity("1e30").value, 10**30)

    def test_long_numbers_exact(self) -> None:
        """More digits than Decimal's default 28-digit context: still exact."""
        text = "1.234567890123456789012345678901234567"
        self.assertEqual(parse_quantity(text + "e40").value, Fraction(1234567890123456789012345678901234567)
                         * 10**4)

    def test_rejected(self) -> None:
        """What Go's grammar refuses, including what kubernetes' Python helper lets through."""
        for text in ["", "1K", "1ki", "1Mb", "1_000", " 1", "1 ", "NaN", "inf", "1e3k", "1e", "1e+", "abc",
                     "1.2.3", "--1", "1Gi3", "1e99999", "0x10"]:
            with self.subTest(text=text), self.assertRaises(QuantityError):
                parse_quantity(text)
        self.assertEqual(k8s_parse_quantity("1K"), 1000)  # the helper's leniency this module guards against

    def test_json_values(self) -> None:
        """JSON numbers (decoded as int or Decimal), null and padded strings, like Go's UnmarshalJSON."""
        self.assertEqual(parse_json_quantity(3).value, 3)
        self.assertEqual(parse_json_quantity(decimal.Decimal("2.5")).value, Fraction(5, 2))
        self.assertEqual(parse_json_quantity(decimal.Decimal("1E+3")).value, 1000)
        self.assertEqual(parse_json_quantity(None), ZERO)
        self.assertEqual(parse_json_quantity(" 2Gi ").value, 2 * 2**30)
        for bad in [True, [1], {"a": 1}]:
            with self.assertRaises(QuantityError):
                parse_json_quantity(bad)


class CanonicalTests(SynchronousTestCase):
    def test_go_strings(self) -> None:
        """Go's Quantity.String() for parsed values (apimachinery's canonical forms)."""
        cases = {
            "1": "1", "1000": "1k", "1500": "1500", "0.5": "500m", "0.7": "700m", "1500m": "1500m",
            "2000m": "2", "1024": "1024", "1024Ki": "1Mi", "1536Ki": "1536Ki", "1.5Ki": "1536",
            "0.1Ki": "102400m", "100": "100", "1e3": "1e3", "1.5e3": "1500", "12e6": "12e6",
            "1e-12": "1e-9", "5n": "5n", "1000n": "1u", "1Mi": "1Mi", "512": "512", "2Gi": "2Gi",
            "-1Ki": "-1Ki", "-0.5": "-500m", "0Ki": "0",
        }
        for text, expected in cases.items():
            with self.subTest(text=text):
                self.assertEqual(canonical(parse_quantity(text)), expected)

    def test_sum_format(self) -> None:
        """A zero accumulator takes the format of the addend (Go's Quantity.Add)."""
        total = ZERO + parse_quantity("1Ki") + parse_quantity("1Ki")
        self.assertEqual(str(total), "2Ki")
        total = ZERO + parse_quantity("1") + parse_quantity("1Ki")
        self.assertEqual(str(total), "1025")
        total = ZERO + parse_quantity("1Ki") + parse_quantity("-1Ki") + parse_quantity("2k")
        self.assertEqual(total.format, Format.DECIMAL_SI)

    def test_ceilings(self) -> None:
        self.assertEqual(value_ceil(parse_quantity("200m")), 1)
        self.assertEqual(value_ceil(parse_quantity("-200m")), -1)
        self.assertEqual(value_ceil(parse_quantity("3")), 3)
        self.assertEqual(round_up_mib(parse_quantity("5Gi")), 5120)
        self.assertEqual(round_up_mib(parse_quantity("1")), 1)
        self.assertEqual(round_up_mib(parse_quantity("1Mi")), 1)
        self.assertEqual(round_up_mib(parse_quantity("1048577")), 2)
        self.assertEqual(round_up_mib(parse_quantity("-1Mi")), -1)
        self.assertEqual(round_up_mib(parse_quantity("-1")), 0)


@st.composite
def notations(draw: st.DrawFn) -> tuple[str, Fraction]:
    """A quantity string in any notation and its exact value, built independently of the parser."""
    whole = draw(st.integers(0, 10**7))
    frac = draw(st.sampled_from(["", "0", "5", "25", "125", "000001", "999999999"]))
    kind = draw(st.sampled_from(["dec", "bin", "exp"]))
    mantissa = Fraction(int(f"{whole}{frac}"), 10 ** len(frac))
    number = f"{whole}.{frac}" if frac else str(whole)
    if kind == "dec":
        suffix = draw(st.sampled_from(sorted(DECIMAL)))
        value = mantissa * Fraction(10) ** DECIMAL[suffix]
    elif kind == "bin":
        suffix = draw(st.sampled_from(sorted(BINARY)))
        value = mantissa * 2 ** BINARY[suffix]
    else:
        exponent = draw(st.integers(-12, 12))
        suffix = draw(st.sampled_from(["e", "E"])) + (f"+{exponent}" if exponent >= 0 and draw(st.booleans())
                                                      else str(exponent))
        value = mantissa * Fraction(10) ** exponent
    return number + suffix, value


class PropertyTests(SynchronousTestCase):
    @FAST
    @given(notations(), st.booleans())
    def test_parse_exact(self, case: tuple[str, Fraction], negative: bool) -> None:
        """Every notation parses to its exact value, rounded up to 1n and capped at int64 as Go does."""
        text, value = case
        if negative:
            text, value = "-" + text, -value
        magnitude = Fraction(-(-abs(value) * 10**9 // 1), 10**9)
        assume(magnitude <= 2**63 - 1)  # the cap has its own test
        self.assertEqual(parse_quantity(text).value, magnitude if value >= 0 else -magnitude)

    @FAST
    @given(notations())
    def test_canonical_round_trip(self, case: tuple[str, Fraction]) -> None:
        """The printed form parses back to the same value (on the nano grid, below the cap)."""
        q = parse_quantity(case[0])
        self.assertEqual(parse_quantity(canonical(q)).value, q.value)

    @FAST
    @given(st.text(alphabet="0123456789.+-eEinumkKMGTP _x", max_size=12))
    def test_never_crashes(self, text: str) -> None:
        """Random text: a Quantity or a QuantityError, nothing else."""
        try:
            q = parse_quantity(text)
        except QuantityError:
            return
        self.assertIsInstance(q, Quantity)

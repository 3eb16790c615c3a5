"""caa.podvm_api.godur against Go's time.ParseDuration / Duration.String (values from Go's time_test.go)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from caa.podvm_api.godur import MAX_NS, format_duration, parse_duration, parse_duration_ns

# (text, nanoseconds), from Go's parseDurationTests
PARSE = [
    ("0", 0), ("5s", 5_000_000_000), ("30s", 30_000_000_000), ("1478s", 1478_000_000_000),
    ("-5s", -5_000_000_000), ("+5s", 5_000_000_000), ("-0", 0), ("+0", 0),
    ("5.0s", 5_000_000_000), ("5.6s", 5_600_000_000), ("5.s", 5_000_000_000), (".5s", 500_000_000),
    ("1.0s", 1_000_000_000), ("1.00s", 1_000_000_000), ("1.004s", 1_004_000_000), ("100.00100s", 100_001_000_000),
    ("10ns", 10), ("11us", 11_000), ("12µs", 12_000), ("12μs", 12_000), ("13ms", 13_000_000),
    ("14s", 14_000_000_000), ("15m", 900_000_000_000), ("16h", 57_600_000_000_000),
    ("3h30m", 12_600_000_000_000), ("10.5s4m", 250_500_000_000), ("-2m3.4s", -123_400_000_000),
    ("1h2m3s4ms5us6ns", 3_723_004_005_006), ("39h9m14.425s", 140_954_425_000_000),
    ("52763797000ns", 52_763_797_000), ("0.3333333333333333333h", 1_200_000_000_000),
    ("9007199254740993ns", 9_007_199_254_740_993), ("9223372036854775807ns", MAX_NS),
    ("9223372036854775.807us", MAX_NS), ("9223372036s854ms775us807ns", MAX_NS),
    ("-9223372036854775808ns", -MAX_NS - 1), ("-9223372036854775.808us", -MAX_NS - 1),
    ("0.100000000000000000000h", 360_000_000_000), ("0.830103483285477580700h", 2_988_372_539_827),
]
BAD = ["", "3", "-", "s", ".", "-.", ".s", "+.s", "1d", "\x85\x85", "\xffff", "hello \xffff world",
       "9223372036854775808ns", "9223372036854775.808us", "-9223372036854775809ns", "1s ", " 1s", "1 s"]
# (nanoseconds, text), from Go's durationTests
FORMAT = [
    (0, "0s"), (1, "1ns"), (1100, "1.1µs"), (2_200_000, "2.2ms"), (3_300_000_000, "3.3s"),
    (4 * 60_000_000_000 + 5_000_000_000, "4m5s"), (4 * 60_000_000_000 + 5_001_000_000, "4m5.001s"),
    (5 * 3_600_000_000_000 + 6 * 60_000_000_000 + 7_001_000_000, "5h6m7.001s"),
    (8 * 60_000_000_000 + 1, "8m0.000000001s"), (MAX_NS, "2562047h47m16.854775807s"),
    (-MAX_NS - 1, "-2562047h47m16.854775808s"), (-1_500_000, "-1.5ms"),
]


class GoDurationTests(SynchronousTestCase):
    def test_parse(self) -> None:
        for text, ns in PARSE:
            self.assertEqual(parse_duration_ns(text), ns, text)
        self.assertEqual(parse_duration("1h30m"), 5400.0)
        self.assertEqual(parse_duration("500ms"), 0.5)

    def test_errors(self) -> None:
        for text in BAD:
            self.assertRaises(ValueError, parse_duration_ns, text)
        with self.assertRaises(ValueError) as cm:
            parse_duration("5")
        self.assertIn("'5' is not a duration", str(cm.exception))  # the flag error text users see

    def test_format(self) -> None:
        for ns, text in FORMAT:
            self.assertEqual(format_duration(ns), text, ns)
        self.assertRaises(ValueError, format_duration, MAX_NS + 1)

    @given(st.integers(min_value=-MAX_NS - 1, max_value=MAX_NS))
    def test_roundtrip(self, ns: int) -> None:
        self.assertEqual(parse_duration_ns(format_duration(ns)), ns)

    @given(st.lists(st.tuples(st.integers(min_value=0, max_value=10**6), st.integers(min_value=0, max_value=999),
                              st.sampled_from(["ns", "us", "µs", "ms", "s", "m", "h"])), min_size=1, max_size=4),
           st.sampled_from(["", "-", "+"]))
    def test_parts_add_up(self, parts: list[tuple[int, int, str]], sign: str) -> None:
        """A duration is the sum of its parts (whole and millis of each unit), as a canonical string again."""
        unit = {"ns": 1, "us": 10**3, "µs": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}
        text = sign + "".join(f"{w}.{f:03d}{u}" for w, f, u in parts)
        total = sum(w * unit[u] + int(float(f) * (float(unit[u]) / 1000.0)) for w, f, u in parts)
        ns = parse_duration_ns(text)
        self.assertEqual(ns, -total if sign == "-" else total)
        self.assertEqual(parse_duration_ns(format_duration(ns)), ns)

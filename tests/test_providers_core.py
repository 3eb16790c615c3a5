"""Unit tests of the provider framework: values, errors, options, registry, instance types.

Naming is tested in test_podvm_api_naming."""

from __future__ import annotations

from importlib.metadata import EntryPoint

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from caa.providers.instancetypes import InstanceTypeInfo, best_fit, select_instance_type
from caa.providers.interfaces import (
    ErrorKind,
    Instance,
    InstanceSpec,
    InvalidConfig,
    IProvider,
    IProviderFactory,
    ProviderError,
    TransientError,
)
from caa.providers.options import ProviderOptions, parse_bool, parse_duration
from caa.providers.registry import ProviderRegistry, UnknownProvider
from caa.reactors import INodeReactor


class ValueTests(SynchronousTestCase):
    def test_frozen(self) -> None:
        spec = InstanceSpec(vcpus=2, volumes=["a"])
        self.assertEqual(spec.volumes, ("a",))
        with self.assertRaises(AttributeError):
            spec.vcpus = 3  # type: ignore[misc]
        self.assertEqual(Instance("i", "n", ["1.2.3.4"]).ips, ("1.2.3.4",))

    def test_errors(self) -> None:
        self.assertTrue(TransientError("busy").retryable)
        error = InvalidConfig("bad", instance_id="x")
        self.assertIsInstance(error, ProviderError)
        self.assertIs(error.kind, ErrorKind.INVALID_CONFIG)
        self.assertFalse(error.retryable)
        self.assertEqual(str(error), "bad")
        self.assertEqual(error.instance_id, "x")


class _Options(ProviderOptions):
    optParameters = [
        ["uri", None, "qemu:///system", "URI"],
        ["cpu", None, 2, "vCPUs", int],
        ["disable-cvm", None, True, "no CVM", parse_bool],
        ["secret", None, "", "a secret"],
    ]
    envVars = {"uri": "T_URI", "cpu": "T_CPU", "disable-cvm": "DISABLECVM", "secret": "T_SECRET"}
    secretOptions = frozenset({"secret"})


class OptionsTests(SynchronousTestCase):
    def test_default(self) -> None:
        options = _Options(environ={})
        options.parseOptions([])
        self.assertEqual((options["uri"], options["cpu"], options["disable-cvm"]), ("qemu:///system", 2, True))
        self.assertEqual(options.sources["cpu"], "default")

    def test_env_beats_default_and_empty_env_ignored(self) -> None:
        options = _Options(environ={"T_URI": "test:///default", "T_CPU": "4", "DISABLECVM": "false", "X": ""})
        options.parseOptions([])
        self.assertEqual((options["uri"], options["cpu"], options["disable-cvm"]), ("test:///default", 4, False))
        self.assertEqual(options.sources["cpu"], "env")
        options = _Options(environ={"T_URI": ""})
        options.parseOptions([])
        self.assertEqual(options["uri"], "qemu:///system")

    def test_flag_beats_env(self) -> None:
        options = _Options(environ={"T_CPU": "4"})
        options.parseOptions(["--cpu", "8", "--disable-cvm=false"])
        self.assertEqual(options["cpu"], 8)
        self.assertIs(options["disable-cvm"], False)
        self.assertEqual(options.sources["cpu"], "flag")

    def test_bad_env_is_an_error_unless_overridden(self) -> None:
        options = _Options(environ={"T_CPU": "many"})
        error = self.assertRaises(usage.UsageError, options.parseOptions, [])
        self.assertIn("T_CPU", str(error))
        options = _Options(environ={"T_CPU": "many"})
        options.parseOptions(["--cpu=3"])
        self.assertEqual(options["cpu"], 3)

    def test_bad_flag(self) -> None:
        self.assertRaises(usage.UsageError, _Options(environ={}).parseOptions, ["--cpu=x"])

    def test_redacted(self) -> None:
        options = _Options(environ={"T_SECRET": "hunter2"})
        options.parseOptions([])
        self.assertEqual(options.redacted()["secret"], "**********")
        self.assertNotIn("hunter2", repr(options.redacted()))
        table = {row["flag"]: row for row in options.optionTable()}
        self.assertEqual(table["--cpu"]["env"], "T_CPU")
        self.assertTrue(table["--secret"]["secret"])

    def test_bad_flag_names_the_flag_in_one_line(self) -> None:
        error = self.assertRaises(usage.UsageError, _Options(environ={}).parseOptions, ["--cpu", "x"])
        self.assertEqual(str(error), "--cpu: invalid literal for int() with base 10: 'x'")
        error = self.assertRaises(usage.UsageError, _Options(environ={}).parseOptions, ["--nope"])
        self.assertEqual(str(error), "option --nope not recognized")

    def test_sources_follow_getopt_prefixes_and_repeats(self) -> None:
        options = _Options(environ={"T_URI": "test:///default"})
        options.parseOptions(["--disable=false", "--cpu", "3", "--cpu", "5"])
        self.assertEqual((options["disable-cvm"], options["cpu"], options["uri"]), (False, 5, "test:///default"))
        self.assertEqual((options.sources["disable-cvm"], options.sources["cpu"], options.sources["uri"]),
                         ("flag", "flag", "env"))

    def test_flags_read_env_as_booleans(self) -> None:
        class WithFlag(_Options):
            optFlags = [["debug", None, "Debug."]]
            envVars = {**_Options.envVars, "debug": "T_DEBUG"}

        self.assertIs(WithFlag(environ={"T_DEBUG": "true"})["debug"], True)
        options = WithFlag(environ={})
        options.parseOptions([])
        self.assertIs(options["debug"], False)
        options = WithFlag(environ={"T_DEBUG": "0"})
        options.parseOptions(["--debug"])
        self.assertIs(options["debug"], True)
        self.assertEqual(options.sources["debug"], "flag")
        self.assertRaises(usage.UsageError, WithFlag(environ={"T_DEBUG": "maybe"}).parseOptions, [])

    def test_help_names_env_vars(self) -> None:
        options = _Options(environ={})
        self.assertIn("(env T_CPU)", options.getUsage(width=200))
        rows = {row["long"]: row for row in options.usage_rows()}
        self.assertNotIn("help", rows)
        self.assertEqual((rows["cpu"]["default"], rows["cpu"]["optType"]), (2, "parameter"))
        self.assertIn("(env T_CPU)", rows["cpu"]["doc"])

    def test_config_type_checked_at_parse_time(self) -> None:
        class Config:
            def __init__(self, cpu: int) -> None:
                self.cpu = cpu

            @classmethod
            def from_options(cls, options: usage.Options) -> Config:
                return cls(options["cpu"])

            def check(self) -> None:
                if self.cpu > 64:
                    raise InvalidConfig(f"test: --cpu {self.cpu} is more than 64")

        class Checked(_Options):
            config_type = Config

        error = self.assertRaises(usage.UsageError, Checked(environ={"T_CPU": "65"}).parseOptions, [])
        self.assertEqual(str(error), "test: --cpu 65 is more than 64")
        options = Checked(environ={"T_CPU": "65"})
        options.parseOptions(["--cpu", "64"])
        self.assertEqual(options["cpu"], 64)

    def test_parsers(self) -> None:
        self.assertEqual(parse_duration("1h30m"), 5400.0)
        self.assertEqual(parse_duration("150s"), 150.0)
        self.assertEqual(parse_duration("500ms"), 0.5)
        self.assertRaises(ValueError, parse_duration, "5")
        self.assertRaises(ValueError, parse_bool, "yes")
        self.assertTrue(parse_bool("TRUE"))


@implementer(IProviderFactory)
class _ThirdPartyFactory:
    name = "thirdparty"
    description = "a cloud from another package"

    def options(self) -> usage.Options:
        return _Options(environ={})

    def create(self, reactor: INodeReactor, options: usage.Options) -> IProvider:
        raise NotImplementedError


thirdparty_factory = _ThirdPartyFactory()


class RegistryTests(SynchronousTestCase):
    def test_builtins_installed(self) -> None:
        registry = ProviderRegistry()
        self.assertIn("libvirt", registry.names())
        self.assertIn("local", registry.names())
        for name in ("libvirt", "local"):
            factory = registry.get(name)
            verifyObject(IProviderFactory, factory)
            self.assertEqual(factory.name, name)
            self.assertIsInstance(factory.options(), ProviderOptions)

    def test_third_party_entry_point(self) -> None:
        entry = EntryPoint("thirdparty", f"{__name__}:thirdparty_factory", "caa.providers")
        registry = ProviderRegistry(entry_points_=[entry], builtins={})
        self.assertEqual(registry.names(), ["thirdparty"])
        self.assertIs(registry.get("thirdparty"), thirdparty_factory)
        rows = registry.subcommands()
        self.assertEqual(rows[0][0], "thirdparty")

    def test_unknown(self) -> None:
        registry = ProviderRegistry(entry_points_=[], builtins={})
        error = self.assertRaises(UnknownProvider, registry.get, "nope")
        self.assertIn("Unsupported cloud provider", str(error))

    def test_register(self) -> None:
        registry = ProviderRegistry(entry_points_=[], builtins={})
        registry.register(thirdparty_factory)
        self.assertIs(registry.get("thirdparty"), thirdparty_factory)


_TYPES = [
    InstanceTypeInfo("t2.small", 2, 6),
    InstanceTypeInfo("t2.medium", 4, 8),
    InstanceTypeInfo("t2.large", 8, 16),
]
_GPU = InstanceTypeInfo("p2.medium", 4, 8, gpus=2)
_ALLOWED = ["t2.small", "t2.medium", "t2.large", "p2.medium"]


class InstanceTypeTests(SynchronousTestCase):
    def test_best_fit_table(self) -> None:
        # (types, vcpus, memory, gpus, expected name or None)
        cases: list[tuple[list[InstanceTypeInfo], int, int, int, str | None]] = [
            (_TYPES, 2, 6, 0, "t2.small"),
            (_TYPES, 4, 8, 0, "t2.medium"),
            (_TYPES, 4, 16, 0, "t2.large"),
            (_TYPES, 1, 1, 0, "t2.small"),
            (_TYPES, 16, 16, 0, None),
            (_TYPES + [_GPU], 4, 8, 0, "t2.medium"),
            (_TYPES + [_GPU], 4, 8, 1, "p2.medium"),
            (_TYPES + [_GPU], 4, 8, 4, None),
            # upstream's binary search misses this one
            ([InstanceTypeInfo("a", 4, 8192), InstanceTypeInfo("b", 2, 16384)], 4, 8192, 0, "a"),
            # unsorted input still gives the smallest fit
            (list(reversed(_TYPES)), 3, 7, 0, "t2.medium"),
        ]
        for types, vcpus, memory, gpus, expected in cases:
            found = best_fit(types, vcpus, memory, gpus)
            self.assertEqual(found.name if found else None, expected, (vcpus, memory, gpus))

    def test_select_table(self) -> None:
        types = _TYPES + [_GPU]
        cases: list[tuple[InstanceSpec, list[str], str, str | None]] = [
            (InstanceSpec(), _ALLOWED, "t2.small", "t2.small"),
            (InstanceSpec(), [], "t2.small", "t2.small"),
            (InstanceSpec(instance_type="t2.large"), _ALLOWED, "t2.small", "t2.large"),
            (InstanceSpec(vcpus=4, memory_mib=8), _ALLOWED, "t2.small", "t2.medium"),
            (InstanceSpec(vcpus=4), _ALLOWED, "t2.small", "t2.small"),  # only one of the two -> default
            (InstanceSpec(memory_mib=8), _ALLOWED, "t2.small", "t2.small"),
            (InstanceSpec(gpus=1), _ALLOWED, "t2.small", "p2.medium"),
            (InstanceSpec(instance_type="x9.huge"), _ALLOWED, "t2.small", None),
            (InstanceSpec(instance_type="t2.large"), [], "t2.small", None),
            (InstanceSpec(instance_type="t2.small"), [], "t2.small", "t2.small"),
            (InstanceSpec(vcpus=64, memory_mib=8), _ALLOWED, "t2.small", None),
            (InstanceSpec(gpus=8), _ALLOWED, "t2.small", None),
        ]
        for spec, allowed, default, expected in cases:
            if expected is None:
                error = self.assertRaises(InvalidConfig, select_instance_type, spec, types, allowed, default)
                self.assertIs(error.kind, ErrorKind.INVALID_CONFIG)
            else:
                self.assertEqual(select_instance_type(spec, types, allowed, default), expected, spec)

    def test_messages(self) -> None:
        error = self.assertRaises(
            InvalidConfig, select_instance_type, InstanceSpec(instance_type="bx2-2x4"), _TYPES, ["t2.small"], "t2.small"
        )
        self.assertIn('requested instance type ("bx2-2x4") is not part of supported instance types list', str(error))
        spec = InstanceSpec(vcpus=99, memory_mib=1)
        error = self.assertRaises(InvalidConfig, select_instance_type, spec, _TYPES, [], "d")
        self.assertIn("no instance type found for the given vcpus (99) and memory (1)", str(error))



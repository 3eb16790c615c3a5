"""`twistd caa-forwarder`: options and service (plugin in twisted/plugins/caa_plugins.py).

Flags follow upstream's agent-protocol-forwarder (spec-podvm §1.1) with `--` spelling; `--pod-netns` (alias
`--pod-namespace`) takes a netns name or path so several forwarders can share one development host.
apf.json and the TLS material are checked here, before anything is touched: a bad file is one line and
exit 1. With `--provision-user-data` the forwarder first writes apf.json and the other /run/peerpod files from
the user data itself (what `caa-process-user-data provision-files` does, in this process: one Python start in
the guest), so those checks run once the files exist, and a failure there ends the process with one line.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from caa.reactors import INodeReactor

if TYPE_CHECKING:
    from caa.forwarder.daemon import ForwarderService

T = TypeVar("T")

__all__ = ["Options", "makeService", "build_service", "build_forwarder", "load_apf", "report_fatal",
           "DEFAULT_CONFIG", "DEFAULT_LISTEN", "DEFAULT_AGENT_SOCKET", "DEFAULT_POD_NETNS"]

DEFAULT_CONFIG = "/run/peerpod/apf.json"
DEFAULT_LISTEN = "0.0.0.0:15150"
DEFAULT_AGENT_SOCKET = "/run/kata-containers/agent.sock"
DEFAULT_POD_NETNS = "/run/netns/podns"
#: How long the pod network set-up waits for the VM's default route (DHCP) before it fails.
ROUTE_WAIT = 120.0


def netns_path(value: str) -> str:
    """A netns name (`podns`) or path (`/run/netns/podns`) -> the path."""
    return value if "/" in value else f"/run/netns/{value}"


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise usage.UsageError(f"--listen: expected host:port, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _go_flags(argv: list[str], names: set[str]) -> list[str]:
    out: list[str] = []
    for arg in argv:
        if arg.startswith("-") and not arg.startswith("--") and len(arg) > 2:
            name, eq, value = arg[1:].partition("=")
            if name in names:
                if eq and value.lower() in ("true", "false"):  # Go boolean syntax -flag=true
                    if value.lower() == "true":
                        out.append(f"--{name}")
                    continue
                arg = f"--{arg[1:]}"
        out.append(arg)
    return out


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = ("Pod VM daemon: builds the pod network from apf.json and relays the adaptor's ttrpc calls "
                "(TCP, mutual TLS by default) to kata-agent's unix socket.")
    optParameters = [
        ["config", None, DEFAULT_CONFIG, "apf.json written by caa-process-user-data."],
        ["listen", None, DEFAULT_LISTEN, "host:port to listen on (the adaptor's --forwarder-port)."],
        ["kata-agent-socket", None, DEFAULT_AGENT_SOCKET, "kata-agent's unix socket."],
        ["pod-netns", None, DEFAULT_POD_NETNS, "Pod network namespace (name or path)."],
        ["host-interface", None, "", "VM interface for tunnel traffic (default: the primary one)."],
        ["host-netns", None, "", "The VM's underlay netns (name or path; default: the forwarder's own). "
         "For several development forwarders on one host."],
        ["ca-cert-file", None, "", "PEM trust anchors for client certificates (default: apf.json tls-client-ca)."],
        ["cert-file", None, "", "PEM server certificate (default: apf.json tls-server-cert)."],
        ["cert-key", None, "", "PEM server key (default: apf.json tls-server-key)."],
        ["cdh-socket", None, "/run/confidential-containers/cdh.sock",
         "confidential-data-hub's socket (SecureMount of encrypted cloud volumes)."],
        ["agent-wait", None, 150.0, "Seconds a call waits for the agent socket.", float],
        ["user-data-file", None, "", "With --provision-user-data: read the user data from this file instead of "
         "the cidata volume or the cloud's metadata service."],
        # these two default to caa.forwarder.userdata's (/media/cidata, 180 s), read only when provisioning
        ["cidata-dir", None, None, "With --provision-user-data: mount point of the NoCloud cidata volume "
         "(default: caa-process-user-data's)."],
        ["user-data-fetch-timeout", None, None,
         "With --provision-user-data: seconds to get the user data (default: caa-process-user-data's).", float],
    ]
    optFlags = [
        ["provision-user-data", None, "First write the files of the user data into --config's directory, as "
         "`caa-process-user-data provision-files` does, then the empty file 'provisioned' there, then start."],
        ["disable-tls", None, "Plain TCP (the adaptor must use --disable-tls too)."],
        ["tls-skip-verify", None, "Testing only: do not verify client certificates (refused with a CA)."],
        ["version", None, "Print the version and exit."],
    ]

    def parseOptions(self, options: Any = None) -> None:
        """Also accept upstream's Go-style single-dash flags (`-cert-file x`, `-disable-tls=true`), so an
        upstream `/etc/default/agent-protocol-forwarder` TLS_OPTIONS line keeps working."""
        argv = sys.argv[1:] if options is None else list(options)
        super().parseOptions(_go_flags(argv, self._long_names()))

    def _long_names(self) -> set[str]:
        params: list[Any] = [*self.optParameters, *self.optFlags]
        return {str(p[0]) for p in params} | {"pod-namespace", "help"}

    def opt_pod_namespace(self, value: str) -> None:
        """Alias of --pod-netns (upstream's name)."""
        self["pod-netns"] = value

    def opt_version(self) -> None:
        from caa import __version__

        print(f"caa-forwarder version {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        self["listen-address"] = parse_listen(self["listen"])
        if self["agent-wait"] <= 0:
            raise usage.UsageError("--agent-wait must be positive")
        self["apf"] = self["tls"] = None
        if not self["provision-user-data"]:
            for name in ("user-data-file", "cidata-dir", "user-data-fetch-timeout"):
                if self[name]:
                    raise usage.UsageError(f"--{name} needs --provision-user-data")
            load_apf(self)
            return
        if os.path.basename(self["config"]) != "apf.json":
            raise usage.UsageError(f"--provision-user-data writes apf.json: --config must name a file apf.json, "
                                   f"not {self['config']!r}")
        if self["user-data-fetch-timeout"] is not None and self["user-data-fetch-timeout"] <= 0:
            raise usage.UsageError("--user-data-fetch-timeout must be positive")


def load_apf(options: Options) -> None:
    """Read apf.json and build the server TLS options into `options` ("apf", "tls"); UsageError when either
    is unusable. At option parsing, or after --provision-user-data wrote the file."""
    from caa.forwarder.config import ConfigError, load_config
    from caa.forwarder.daemon import StartupError, TLSSettings, build_server_tls

    try:
        options["apf"] = load_config(options["config"])
    except ConfigError as e:
        raise usage.UsageError(str(e)) from None
    options["tls"] = None
    if not options["disable-tls"]:
        settings = TLSSettings(options["cert-file"], options["cert-key"], options["ca-cert-file"],
                               bool(options["tls-skip-verify"]))
        try:
            options["tls"] = build_server_tls(settings, options["apf"])
        except StartupError as e:
            raise usage.UsageError(str(e)) from None


def build_service(reactor: INodeReactor, options: Options, threads: ThreadPool,
                  on_fatal: Callable[[str], None]) -> IService:
    """The daemon for parsed options: the forwarder, after the user data's files with --provision-user-data.
    `on_fatal(message)` ends the process when start-up fails."""
    if not options["provision-user-data"]:
        return build_forwarder(reactor, options, threads, on_fatal)
    # caa.forwarder.daemon is imported only after the marker (ProvisioningService)
    from caa.forwarder import userdata
    from caa.forwarder.provision import ProvisioningService, StartError

    output_dir = os.path.dirname(os.path.abspath(options["config"]))

    def provision() -> Deferred[list[str]]:
        return Deferred.fromCoroutine(userdata.provision_files(
            reactor, output_dir, options["user-data-file"] or None, options["cidata-dir"] or userdata.CIDATA_DIR,
            timeout=options["user-data-fetch-timeout"] or userdata.DEFAULT_TIMEOUT))

    def forwarder() -> ForwarderService:
        try:
            load_apf(options)
        except usage.UsageError as e:
            raise StartError(str(e)) from None
        return build_forwarder(reactor, options, threads, on_fatal)

    return ProvisioningService(provision, output_dir, forwarder, on_fatal, reactor)


def build_forwarder(reactor: INodeReactor, options: Options, threads: ThreadPool,
                    on_fatal: Callable[[str], None]) -> ForwarderService:
    """The forwarder for parsed options whose apf.json is loaded (`load_apf`)."""
    from twisted.internet.endpoints import TCP4ServerEndpoint, UNIXClientEndpoint
    from twisted.internet.threads import deferToThreadPool

    from caa.forwarder.daemon import ForwarderService

    host, port = options["listen-address"]
    config = options["apf"]
    pod_netns = netns_path(options["pod-netns"])
    from caa.podvm_api.claim import is_bootstrap

    pod_network = None
    if config.pod_network is not None or is_bootstrap(config):  # a pool VM gets its pod network at the claim
        from caa.network.podvm import PodNetwork

        host_netns = netns_path(options["host-netns"]) if options["host-netns"] else None
        # The tiny init starts us while DHCP may still run (our start-up overlaps the lease): wait for the route.
        pod_network = PodNetwork(reactor, threads, host_netns=host_netns, host_interface=options["host-interface"],
                                 route_wait=ROUTE_WAIT)

    def run_blocking(f: Callable[..., T], *args: Any) -> Deferred[T]:
        return deferToThreadPool(reactor, threads, f, *args)

    tls_options = options["tls"]
    service = ForwarderService(
        reactor,
        config,
        TCP4ServerEndpoint(reactor, port, backlog=128, interface=host),
        UNIXClientEndpoint(reactor, options["kata-agent-socket"], timeout=5),
        pod_netns,
        tls_options=(lambda: tls_options) if tls_options is not None else None,
        pod_network=pod_network,
        run_blocking=run_blocking,
        on_fatal=on_fatal,
        cdh_endpoint=lambda: UNIXClientEndpoint(reactor, options["cdh-socket"], timeout=5),
        peerpod_dir=os.path.dirname(os.path.abspath(options["config"])),  # auth.json, initdata.digest
    )
    service.agent.wait_timeout = options["agent-wait"]
    return service


def report_fatal(message: str) -> None:
    """The one line a failed start prints (stderr: systemd's journal, or the terminal)."""
    sys.stderr.write(f"caa-forwarder: {message}\n")


def makeService(options: Options) -> IService:
    from twisted.internet import reactor as global_reactor
    from twisted.internet.interfaces import IReactorThreads

    from caa.process import fail_process
    from caa.reactors import as_node_reactor

    reactor = as_node_reactor(global_reactor)

    def fatal(message: str) -> None:
        report_fatal(message)
        fail_process(reactor)

    return build_service(reactor, options, IReactorThreads(global_reactor).getThreadPool(), fatal)

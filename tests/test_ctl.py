"""caactl: usage errors exit 2; `list` asks the adaptor's caa.adaptor.v1.Admin service over a real unix socket
(or reads a journal directory with --pods-dir); the console script runs on `task.react` with its exit codes.
Hypervisor calls against the real daemon are in test_adaptor_process."""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile

from twisted.internet import reactor as _reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from caa import ctl
from caa.adaptor.admin import list_sandboxes_response, register_admin, sandbox_message
from caa.adaptor.interfaces import SandboxRecord, SandboxState
from caa.adaptor.store import SandboxStore
from caa.reactors import as_node_reactor
from caa.ttrpc import Server
from caa.ttrpc.endpoints import unix_server_endpoint

reactor = as_node_reactor(_reactor)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _record(sid: str = "a" * 64, pod: str = "web", state: SandboxState = SandboxState.RUNNING,
            created: float = 1000.0, **changes: object) -> SandboxRecord:
    fields: dict[str, object] = dict(sandbox_id=sid, pod_name=pod, pod_namespace="default", netns="/n",
                                     socket_path="/s", server_name=f"podvm-{pod}-aaaaaaaa", state=state,
                                     created=created, instance_id="i-1", ips=("10.0.0.5", "10.0.0.6"))
    fields.update(changes)
    return SandboxRecord(**fields)  # type: ignore[arg-type]


def _rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.splitlines()]


class UsageTests(SynchronousTestCase):
    def test_usage_exit_2(self) -> None:
        self.patch(sys, "stderr", io.StringIO())
        for argv in ([], ["bogus"], ["create", "--id", "x"], ["agent", "check"], ["list", "--pods-dir"]):
            e = self.assertRaises(SystemExit, ctl.main, argv)
            self.assertEqual(e.code, 2)

    def test_list_help_says_where_the_list_comes_from(self) -> None:
        out = io.StringIO()
        self.patch(sys, "stdout", out)
        self.assertRaises(SystemExit, ctl.main, ["list", "--help"])
        text = " ".join(out.getvalue().split())
        self.assertIn("caa.adaptor.v1.Admin/ListSandboxes", text)
        self.assertIn("--pods-dir", text)


class TableTests(SynchronousTestCase):
    def test_message_fields(self) -> None:
        m = sandbox_message(_record(created=1234.5, error="boom"))
        self.assertEqual((m.id, m.pod_name, m.pod_namespace, m.instance_id, list(m.vm_ips), m.state, m.error),
                         ("a" * 64, "web", "default", "i-1", ["10.0.0.5", "10.0.0.6"], "running", "boom"))
        self.assertEqual((m.created.seconds, m.created.nanos), (1234, 500_000_000))

    def test_oldest_first_and_table(self) -> None:
        records = [_record("b" * 64, "late", created=2000.0), _record("c" * 64, "new", SandboxState.CREATED,
                                                                      created=2000.0, instance_id="", ips=()),
                   _record(created=100.0, error="dial failed")]
        listed = list_sandboxes_response(records).sandboxes
        self.assertEqual([s.pod_name for s in listed], ["web", "late", "new"])
        out = io.StringIO()
        ctl.write_table(listed, 2000.0 + 3 * 3600, out)
        rows = _rows(out.getvalue())
        self.assertEqual(rows[0], ["SANDBOX", "POD", "INSTANCE", "VM", "IP", "STATE", "AGE"])
        self.assertEqual(rows[1], ["a" * 12, "default/web", "i-1", "10.0.0.5", "running", "(dial", "failed)", "3h"])
        self.assertEqual(rows[3], ["c" * 12, "default/new", "-", "-", "created", "3h"])

    def test_journal_directory(self) -> None:
        d = os.path.abspath(self.mktemp())
        SandboxStore(d).put(_record())
        self.assertEqual([s.id for s in ctl.journal_sandboxes(d)], ["a" * 64])
        missing = os.path.abspath(self.mktemp())
        self.assertEqual(ctl.journal_sandboxes(missing), [])
        self.assertFalse(os.path.exists(missing))  # listing never creates the directory


class ListFromAdaptorTests(TestCase):
    """A real ttrpc server on a unix socket standing for the adaptor, with the Admin service registered as the
    daemon registers it."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="caactl-", dir="/tmp")  # short: sun_path holds 108 bytes
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.socket = os.path.join(self.dir, "hypervisor.sock")
        self.records = [_record(created=reactor.seconds() - 120)]

    async def _serve(self, admin: bool = True) -> None:
        server = Server(clock=reactor, name="hypervisor")
        if admin:
            register_admin(server, lambda: list(self.records))
        port = await unix_server_endpoint(reactor, self.socket).listen(server.factory())
        self.addCleanup(port.stopListening)
        self.addCleanup(server.abort)

    async def _list(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        code = await ctl.run(reactor, ctl.parse_args(["--socket", self.socket, "list", *argv]), out, err)
        return code, out.getvalue(), err.getvalue()

    async def test_running_sandbox_is_listed(self) -> None:
        """Bug 7a: the list comes from the adaptor, not from a journal directory of caactl's own."""
        await self._serve()
        own = os.path.join(self.dir, "empty-pods")
        self.patch(os, "environ", {**os.environ, "PODS_DIR": own})
        code, out, err = await self._list()
        self.assertEqual((code, err), (0, ""))
        rows = _rows(out)
        self.assertEqual(rows[1], ["a" * 12, "default/web", "i-1", "10.0.0.5", "running", "2m"])
        self.assertEqual(len(rows), 2)
        # The adaptor's current view at each call.
        self.records.append(_record("d" * 64, "api", SandboxState.CREATE_INTENT, created=reactor.seconds()))
        code, out, _ = await self._list()
        self.assertEqual([r[1] for r in _rows(out)[1:]], ["default/web", "default/api"])

    async def test_pods_dir_reads_the_journal_instead(self) -> None:
        pods = os.path.join(self.dir, "pods")
        SandboxStore(pods).put(_record("e" * 64, "offline", created=reactor.seconds()))
        code, out, err = await self._list("--pods-dir", pods)  # no adaptor listening at all
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(_rows(out)[1][:5], ["e" * 12, "default/offline", "i-1", "10.0.0.5", "running"])

    async def test_adaptor_without_admin_service(self) -> None:
        await self._serve(admin=False)
        code, out, err = await self._list()
        self.assertEqual((code, out), (1, ""))
        self.assertIn("caactl: UNIMPLEMENTED: service caa.adaptor.v1.Admin", err)
        self.assertIn("list --pods-dir", err)

    async def test_no_adaptor(self) -> None:
        code, out, err = await self._list()
        self.assertEqual((code, out), (1, ""))
        self.assertTrue(err.startswith("caactl: "), err)


class ConsoleScriptTests(TestCase):
    """`python -m caa.ctl` as a process: `task.react` runs the call and exits with the command's code."""

    def setUp(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="caactl-", dir="/tmp")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.socket = os.path.join(self.dir, "hypervisor.sock")

    async def _caactl(self, *argv: str) -> tuple[int, str, str]:
        env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
        out, err, code = await getProcessOutputAndValue(sys.executable, ["-m", "caa.ctl", *argv], env=env,
                                                        path=ROOT)
        return code, out.decode(), err.decode()

    async def test_exit_codes(self) -> None:
        server = Server(clock=reactor, name="hypervisor")
        register_admin(server, lambda: [_record(created=reactor.seconds())])
        port = await unix_server_endpoint(reactor, self.socket).listen(server.factory())
        self.addCleanup(port.stopListening)
        self.addCleanup(server.abort)
        code, out, err = await self._caactl("--socket", self.socket, "list")
        self.assertEqual((code, err), (0, ""))
        self.assertIn("default/web", out)
        code, out, err = await self._caactl("--socket", self.socket, "version")  # no Hypervisor service here
        self.assertEqual(code, 1)
        self.assertIn("caactl: UNIMPLEMENTED", err)
        code, _, err = await self._caactl("--socket", self.socket, "nonsense")
        self.assertEqual(code, 2)
        self.assertIn("usage: caactl", err)

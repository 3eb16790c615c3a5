"""The sandbox state machine: the written table, its check on every journal write, and the order of journal
writes against side effects (intent before effect) with the journal's runner driven by hand."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from caa.adaptor import states
from caa.adaptor.interfaces import SandboxRecord
from caa.adaptor.service import CloudService, ServiceConfig
from caa.adaptor.states import GOING, STARTING, TRANSITIONS, IllegalTransition, SandboxState, check_transition
from caa.adaptor.store import SandboxStore
from caa.providers.interfaces import Instance, InstanceSpec
from tests.fakes.adaptor import FakeNetworking, FakeProxyFactory, FakeTLS
from tests.fakes.provider import FakeProvider

T = TypeVar("T")
S = SandboxState
SID = "5e" * 32


def record(state: SandboxState = S.CREATED) -> SandboxRecord:
    return SandboxRecord(sandbox_id=SID, pod_name="p", pod_namespace="ns", netns="/n", socket_path="/s",
                         server_name="podvm-p-5e5e5e5e", state=state, created=1.0)


class TableTests(SynchronousTestCase):
    def test_every_state_has_a_row(self) -> None:
        self.assertEqual(set(TRANSITIONS), set(SandboxState) | {None})
        for news in TRANSITIONS.values():
            self.assertLessEqual(news, set(SandboxState) | {None})

    def test_sets(self) -> None:
        self.assertEqual(STARTING, {S.CREATE_INTENT, S.INSTANCE, S.TUNNEL_INTENT, S.TUNNEL})
        self.assertEqual(GOING, {S.STOPPING, S.ORPHAN})
        # every live state can be stopped, and a start can always be rolled back to CREATED
        for s in SandboxState:
            if s not in GOING:
                self.assertIn(S.STOPPING, TRANSITIONS[s], s)
            if s in STARTING or s is S.RUNNING:
                self.assertIn(S.CREATED, TRANSITIONS[s], s)
        # only a stop ends a sandbox
        self.assertEqual({s for s, news in TRANSITIONS.items() if None in news}, GOING)

    def test_journal_values_kept(self) -> None:
        # the values earlier versions wrote stay readable
        for value in ("created", "create-intent", "instance", "tunnel-intent", "tunnel", "running", "stop-intent"):
            SandboxState(value)
        self.assertIs(SandboxState("stop-intent"), S.STOPPING)

    def test_docstring_table_is_the_table(self) -> None:
        """The table in the module docstring (copied into docs/architecture.md) says what the code enforces."""
        doc = states.__doc__ or ""
        rows = [line for line in doc.splitlines() if line.startswith("| ") and not line.startswith("| State")]
        names: dict[str, SandboxState | None] = {"(none)": None, **{s.name: s for s in SandboxState}}
        seen = {}
        for row in rows:
            cells = [c.strip() for c in row.strip("|").split("|")]
            seen[names[cells[0]]] = frozenset(names[n.strip()] for n in cells[-1].split(","))
            if cells[0] != "(none)":
                self.assertEqual(cells[1], names[cells[0]].value)  # type: ignore[union-attr]
        self.assertEqual(seen, dict(TRANSITIONS))
        md = states.transition_table_markdown()
        self.assertEqual(len(md.splitlines()), len(TRANSITIONS) + 2)

    def test_check(self) -> None:
        check_transition(SID, None, S.CREATED)
        check_transition(SID, S.RUNNING, S.RUNNING)  # a field update
        check_transition(SID, S.ORPHAN, None)
        for old, new in ((None, S.RUNNING), (S.CREATED, S.RUNNING), (S.RUNNING, S.TUNNEL),
                         (S.STOPPING, S.CREATED), (S.CREATED, None), (None, None)):
            e = self.assertRaises(IllegalTransition, check_transition, SID, old, new)
            self.assertEqual((e.old, e.new, e.sandbox_id), (old, new, SID))
        e = self.assertRaises(IllegalTransition, check_transition, SID, S.STOPPING, S.RUNNING)
        self.assertEqual(str(e), f"sandbox {SID}: illegal state transition STOPPING -> RUNNING")

    def test_advance(self) -> None:
        r = record().advance(S.CREATE_INTENT, error="")
        self.assertEqual(r.state, S.CREATE_INTENT)
        r2 = r.advance(instance_id="i-1")
        self.assertEqual((r2.state, r2.instance_id), (S.CREATE_INTENT, "i-1"))
        self.assertRaises(IllegalTransition, r.advance, S.RUNNING)


class ManualRunner:
    """A journal runner the test drives: each submitted function waits in `pending` until `step()` runs it;
    `after` is called after each one."""

    def __init__(self, after: Callable[[], None]) -> None:
        self.pending: list[tuple[Callable[[], Any], Deferred[Any]]] = []
        self.after = after

    def __call__(self, f: Callable[[], T]) -> Deferred[T]:
        d: Deferred[T] = Deferred()
        self.pending.append((f, d))
        return d

    def step(self) -> None:
        f, d = self.pending.pop(0)
        result = f()
        self.after()
        d.callback(result)

    def drain(self) -> None:
        while self.pending:
            self.step()


class EventsProvider(FakeProvider):
    """The fake provider, logging create/delete into a shared event list."""

    def __init__(self, clock: Clock, events: list[str]) -> None:
        super().__init__(clock)
        self.events = events

    def create_instance(self, pod_name: str, sandbox_id: str, user_data: bytes,
                        spec: InstanceSpec) -> Deferred[Instance]:
        self.events.append("create_instance")
        return super().create_instance(pod_name, sandbox_id, user_data, spec)


class JournalOrderTests(SynchronousTestCase):
    """Journal writes run on the store's runner (a thread pool in the daemon); the service starts a side effect
    only once its intent record is durable, and every write is a legal move."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.events: list[str] = []
        self.runner = ManualRunner(self.journal_changed)
        self.pods_dir = os.path.abspath(self.mktemp())
        self.store = SandboxStore(self.pods_dir, self.runner)
        self.on_disk: dict[str, str | None] = {}
        self.net = FakeNetworking()
        self.netns = os.path.abspath(self.mktemp())
        open(self.netns, "w").close()
        self.provider = EventsProvider(self.clock, self.events)
        self.svc = CloudService(self.clock, self.provider, FakeProxyFactory(), self.store, self.net, FakeTLS(),
                                ServiceConfig(pods_dir=self.pods_dir), wallclock=self.clock.seconds)

    def journal_changed(self) -> None:
        """Log each sandbox's state as it is on disk whenever it changed: what a restart would see."""
        for sid in sorted(set(os.listdir(self.pods_dir)) | set(self.on_disk)):
            try:
                with open(os.path.join(self.pods_dir, sid, "sandbox.json")) as f:
                    state: str | None = json.load(f)["state"]
            except FileNotFoundError:
                state = None
            if state != self.on_disk.get(sid):
                self.on_disk[sid] = state
                self.events.append(f"durable {sid[:2]} {state or 'removed'}")

    def create(self, sid: str) -> None:
        d = Deferred.fromCoroutine(self.svc.create_vm(
            sid, {"io.kubernetes.cri.sandbox-name": "p", "io.kubernetes.cri.sandbox-namespace": "ns"}, self.netns))
        self.runner.drain()
        self.successResultOf(d)

    def test_intent_before_effect(self) -> None:
        self.create(SID)
        self.events.clear()
        d = Deferred.fromCoroutine(self.svc.start_vm(SID))
        self.runner.step()  # read user-data
        self.assertEqual(self.events, [])  # the CREATE_INTENT write is queued, not durable: no create yet
        self.assertEqual(len(self.runner.pending), 1)
        self.runner.step()
        self.assertEqual(self.events, ["durable 5e create-intent", "create_instance"])
        self.runner.drain()
        self.successResultOf(d)
        self.assertEqual(self.events, ["durable 5e create-intent", "create_instance", "durable 5e tunnel-intent",
                                       "durable 5e running"])
        # the tunnel (a side effect) was set up only after TUNNEL_INTENT was durable: the runner was stepped
        self.assertIn(("setup", SID), self.net.calls)

    def test_per_sandbox_order_and_concurrency(self) -> None:
        a, b = "aa" * 32, "bb" * 32
        self.create(a)
        self.create(b)
        self.events.clear()
        da = Deferred.fromCoroutine(self.svc.start_vm(a))
        db = Deferred.fromCoroutine(self.svc.start_vm(b))
        # both sandboxes have work queued at once (they do not wait for each other)
        self.assertEqual(len(self.runner.pending), 2)
        self.runner.drain()
        self.successResultOf(da)
        self.successResultOf(db)
        for sid in ("aa", "bb"):
            mine = [e.split()[2] for e in self.events if e.startswith(f"durable {sid}")]
            self.assertEqual(mine, ["create-intent", "tunnel-intent", "running"])

    def test_stop_cancels_start_while_a_write_is_queued(self) -> None:
        """StopVM during a queued journal write: the write still lands (in order), then the stop's own."""
        self.create(SID)
        d = Deferred.fromCoroutine(self.svc.start_vm(SID))
        self.runner.step()  # user-data read; CREATE_INTENT queued
        s = Deferred.fromCoroutine(self.svc.stop_vm(SID))
        self.failureResultOf(d)
        self.runner.drain()
        self.successResultOf(s)
        self.assertEqual([e.split()[2] for e in self.events if e.startswith("durable")],
                         ["created", "create-intent", "stop-intent", "removed"])
        self.assertNotIn("create_instance", self.events)
        self.assertFalse(os.path.exists(os.path.join(self.pods_dir, SID)))

    def test_start_and_stop_wait_for_create(self) -> None:
        """StartVM and StopVM of an id whose CreateVM is still writing wait for it (the sandbox's lock)."""
        c = Deferred.fromCoroutine(self.svc.create_vm(
            SID, {"io.kubernetes.cri.sandbox-name": "p", "io.kubernetes.cri.sandbox-namespace": "ns"}, self.netns))
        st = Deferred.fromCoroutine(self.svc.start_vm(SID))
        sp = Deferred.fromCoroutine(self.svc.stop_vm(SID))
        self.assertNotIn("create_instance", self.events)
        self.runner.drain()
        self.assertEqual(self.successResultOf(c), os.path.join(self.pods_dir, SID, "agent.ttrpc"))
        self.failureResultOf(st)  # it got the lock after CreateVM and found the sandbox STOPPING
        self.successResultOf(sp)
        self.assertNotIn("create_instance", self.events)
        self.assertEqual(os.listdir(self.pods_dir), [])
        self.assertEqual(self.net.vnis, {})
        self.assertEqual(self.svc.sandboxes, {})

    def test_illegal_transition_fails_loudly(self) -> None:
        self.create(SID)
        sb = self.svc.sandboxes[SID]
        self.assertRaises(IllegalTransition, self.svc._put, sb, S.RUNNING)
        self.assertEqual(sb.record.state, S.CREATED)  # nothing changed, nothing written
        self.assertEqual(self.runner.pending, [])

    def test_journalled_moves_are_legal(self) -> None:
        """Every sequence of states a sandbox's journal goes through in a full lifecycle is a path in the table."""
        self.create(SID)
        d = Deferred.fromCoroutine(self.svc.start_vm(SID))
        self.runner.drain()
        self.successResultOf(d)
        s = Deferred.fromCoroutine(self.svc.stop_vm(SID))
        self.runner.drain()
        self.successResultOf(s)
        seq: list[SandboxState | None] = [None]
        seq += [None if e.endswith("removed") else S(e.split()[2]) for e in self.events if e.startswith("durable")]
        for old, new in zip(seq, seq[1:], strict=False):
            check_transition(SID, old, new)
        self.assertEqual(seq, [None, S.CREATED, S.CREATE_INTENT, S.TUNNEL_INTENT, S.RUNNING, S.STOPPING, None])


class LockTests(SynchronousTestCase):
    def test_locked_releases_on_error(self) -> None:
        from twisted.internet.defer import DeferredLock

        from caa.adaptor.service import locked

        lock = DeferredLock()

        async def body() -> None:
            async with locked(lock):
                self.assertTrue(lock.locked)
                raise ValueError("x")

        self.failureResultOf(Deferred.fromCoroutine(body()), ValueError)
        self.assertFalse(lock.locked)
        order: list[int] = []

        async def waiter(n: int) -> None:
            async with locked(lock):
                order.append(n)

        held = lock.acquire()
        self.successResultOf(held)
        ds = [Deferred.fromCoroutine(waiter(n)) for n in range(3)]
        self.assertEqual(order, [])
        lock.release()
        for d in ds:
            self.successResultOf(d)
        self.assertEqual(order, [0, 1, 2])


"""The sandbox state machine: every state a sandbox can be in, and the written table of allowed moves.

A sandbox's state is journalled (`caa.adaptor.interfaces.SandboxRecord.state`, sandbox.json "state").
`*_INTENT` states are written *before* a side effect (instance create, tunnel setup), the result state
after it, so a restarted adaptor knows what may exist in the cloud and on the node. The hypervisor
service moves a record only through `SandboxRecord.advance`, which checks `TRANSITIONS`: an illegal move
is a bug and raises `IllegalTransition` (tests fail loudly). `None` stands for "no record" (before
CreateVM's first journal write, after the record is removed). A move to the same state (a field update:
error text, a cleared instance id) is always allowed.

| State | Journal value | Meaning | Allowed next states |
|---|---|---|---|
| (none) | - | no record | CREATED |
| CREATED | created | CreateVM done: pod dir, apf.json, user-data, VNI; nothing in the cloud | CREATE_INTENT, STOPPING |
| CREATE_INTENT | create-intent | about to call provider.create_instance | INSTANCE, TUNNEL_INTENT, CREATED, STOPPING |
| INSTANCE | instance | instance exists (id known) but has no IP: rolled back | TUNNEL_INTENT, CREATED, STOPPING |
| TUNNEL_INTENT | tunnel-intent | instance up (id, IPs); next: tunnel, proxy | TUNNEL, RUNNING, CREATED, STOPPING |
| TUNNEL | tunnel | tunnel up, proxy dialling (earlier versions only; = TUNNEL_INTENT) | RUNNING, CREATED, STOPPING |
| RUNNING | running | StartVM answered OK | CREATED, STOPPING |
| STOPPING | stop-intent | StopVM (or the sweeper) is tearing it down | ORPHAN, (none) |
| ORPHAN | orphan | torn down except the instance, whose delete failed; the sweeper retries | STOPPING, (none) |

A StartVM journals three records: CREATE_INTENT, TUNNEL_INTENT (with the instance's id and IPs: the create's
result and the tunnel's intent in one fsync) and RUNNING (before StartVM answers). Moves back to CREATED are
StartVM's rollback (a failed or interrupted start, or a failed re-adoption after a
restart): whatever was built is undone and the shim may StartVM again or StopVM. Recovery after a restart:
CREATED is kept, RUNNING re-adopted, the four start states rolled back, STOPPING and ORPHAN finished.
StopVM of a sandbox in STOPPING or ORPHAN answers NOT_FOUND, as for an unknown one.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping


class SandboxState(enum.StrEnum):
    """Where a sandbox is in its lifecycle (the values are what sandbox.json holds)."""

    CREATED = "created"
    CREATE_INTENT = "create-intent"
    INSTANCE = "instance"
    TUNNEL_INTENT = "tunnel-intent"
    TUNNEL = "tunnel"
    RUNNING = "running"
    STOPPING = "stop-intent"  # the journal value of earlier versions, kept readable
    ORPHAN = "orphan"


S = SandboxState

#: The StartVM steps: a sandbox in one of these has a start in progress (or interrupted by a restart).
STARTING: frozenset[SandboxState] = frozenset({S.CREATE_INTENT, S.INSTANCE, S.TUNNEL_INTENT, S.TUNNEL})

#: States in which the sandbox is on its way out: StartVM and StopVM answer NOT_FOUND.
GOING: frozenset[SandboxState] = frozenset({S.STOPPING, S.ORPHAN})

#: state -> the states it may move to; None = no record (before the first write, after removal).
TRANSITIONS: Mapping[SandboxState | None, frozenset[SandboxState | None]] = {
    None: frozenset({S.CREATED}),
    S.CREATED: frozenset({S.CREATE_INTENT, S.STOPPING}),
    S.CREATE_INTENT: frozenset({S.INSTANCE, S.TUNNEL_INTENT, S.CREATED, S.STOPPING}),
    S.INSTANCE: frozenset({S.TUNNEL_INTENT, S.CREATED, S.STOPPING}),
    S.TUNNEL_INTENT: frozenset({S.TUNNEL, S.RUNNING, S.CREATED, S.STOPPING}),
    S.TUNNEL: frozenset({S.RUNNING, S.CREATED, S.STOPPING}),
    S.RUNNING: frozenset({S.CREATED, S.STOPPING}),
    S.STOPPING: frozenset({S.ORPHAN, None}),
    S.ORPHAN: frozenset({S.STOPPING, None}),
}


class IllegalTransition(Exception):
    """A move the table does not allow: a bug in the caller, never an operational error."""

    def __init__(self, sandbox_id: str, old: SandboxState | None, new: SandboxState | None) -> None:
        self.sandbox_id = sandbox_id
        self.old = old
        self.new = new
        super().__init__(f"sandbox {sandbox_id}: illegal state transition {_name(old)} -> {_name(new)}")


def _name(state: SandboxState | None) -> str:
    return "(none)" if state is None else state.name


def check_transition(sandbox_id: str, old: SandboxState | None, new: SandboxState | None) -> None:
    """Raise `IllegalTransition` unless old -> new is in `TRANSITIONS` (or old is new)."""
    if old is new and old is not None:
        return
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(sandbox_id, old, new)


def transition_table_markdown() -> str:
    """The table as markdown rows (state, allowed next states), for the docs; a test keeps them in step."""
    rows = ["| State | Allowed next states |", "|---|---|"]
    for old, news in TRANSITIONS.items():
        rows.append(f"| {_name(old)} | {', '.join(sorted(_name(n) for n in news))} |")
    return "\n".join(rows)

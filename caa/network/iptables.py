"""The NOTRACK rules of the VXLAN flow (raw table), the only place caa runs a firewall binary.

Rules (spec-adaptor §6.3 step 1, spec-podvm §1.8 step 6), in table ``raw``::

    -N peerpod-OUTPUT;     -A OUTPUT -j peerpod-OUTPUT
    -A peerpod-OUTPUT     -m comment --comment "peerpod [vni:N]" -d <peer> -p udp -m udp --dport <port> -j NOTRACK
    -N peerpod-PREROUTING; -A PREROUTING -j peerpod-PREROUTING
    -A peerpod-PREROUTING -m comment --comment "peerpod [vni:N]" -s <peer> -p udp -m udp --dport <port> -j NOTRACK

The binary is ``iptables`` (always with ``--wait``; iptables-nft or legacy, whichever the system
has). Where iptables is absent, the same rules go into an nftables table ``ip caa_peerpod``
(chains ``output``/``prerouting`` at raw priority) with the same comments, through ``nft``.
In a network namespace other than the current one the binary runs under ``nsenter --net=<path>``.
Every function here blocks: call it from a worker thread. Calls for the same namespace are
serialised by a process-wide lock (``--wait`` serialises against other processes).
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import threading
from collections.abc import Sequence

from twisted.logger import Logger

from caa.network.interfaces import IptablesError

TABLE = "raw"
CHAINS = (("peerpod-OUTPUT", "OUTPUT", "-d"), ("peerpod-PREROUTING", "PREROUTING", "-s"))
_COMMENT_RE = re.compile(r"peerpod \[vni:(\d+)\]")

_log = Logger()
_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def _lock_for(netns: str | None) -> threading.Lock:
    with _locks_guard:
        return _locks.setdefault(netns or "", threading.Lock())


def iptables_binary() -> str:
    """Path of the iptables binary; :class:`IptablesError` when it is not installed."""
    path = shutil.which("iptables")
    if path is None:
        raise IptablesError("iptables binary not found in PATH (install the iptables package)")
    return path


def _run(netns: str | None, args: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = [iptables_binary(), "--wait", "-t", TABLE, *args]
    if netns is not None:
        argv = ["nsenter", f"--net={netns}", *argv]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise IptablesError(f"{shlex.join(argv)}: {e}") from e
    if check and proc.returncode != 0:
        raise IptablesError(f"{shlex.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def _rule(vni: int, flag: str, peer: str, port: int) -> list[str]:
    return ["-m", "comment", "--comment", f"peerpod [vni:{vni}]", flag, peer,
            "-p", "udp", "-m", "udp", "--dport", str(port), "-j", "NOTRACK"]


def _chain_exists(netns: str | None, chain: str) -> bool:
    return _run(netns, ["-S", chain], check=False).returncode == 0


def _ipt_add_notrack(netns: str | None, vni: int, peer: str, port: int) -> None:
    """Ensure both chains, their jumps and the two rules for ``vni`` exist (idempotent).
    ``peer`` is the other tunnel end's address (the pod VM on the node, the node in the VM)."""
    with _lock_for(netns):
        for chain, base, flag in CHAINS:
            if not _chain_exists(netns, chain):
                _run(netns, ["-N", chain])
            if _run(netns, ["-C", base, "-j", chain], check=False).returncode != 0:
                _run(netns, ["-A", base, "-j", chain])
            rule = _rule(vni, flag, peer, port)
            if _run(netns, ["-C", chain, *rule], check=False).returncode != 0:
                _run(netns, ["-A", chain, *rule])


def _rules_of(netns: str | None, chain: str) -> list[list[str]]:
    proc = _run(netns, ["-S", chain], check=False)
    if proc.returncode != 0:
        return []
    return [shlex.split(line) for line in proc.stdout.splitlines() if line.startswith("-A ")]


def _ipt_list_vnis(netns: str | None) -> set[int]:
    """VNIs that have a ``peerpod [vni:N]`` rule in either chain."""
    found: set[int] = set()
    with _lock_for(netns):
        for chain, _base, _flag in CHAINS:
            for rule in _rules_of(netns, chain):
                m = _COMMENT_RE.search(" ".join(rule))
                if m:
                    found.add(int(m.group(1)))
    return found


def _ipt_remove_notrack(netns: str | None, vni: int) -> None:
    """Delete every rule commented ``peerpod [vni:<vni>]`` (whatever its peer/port), then each
    chain that became empty together with its jump. Idempotent; no error when nothing is there."""
    marker = f"peerpod [vni:{vni}]"
    with _lock_for(netns):
        errors: list[str] = []
        for chain, base, _flag in CHAINS:
            for rule in _rules_of(netns, chain):
                if marker in rule:
                    proc = _run(netns, ["-D", *rule[1:]], check=False)
                    if proc.returncode != 0:
                        errors.append(proc.stderr.strip())
            _drop_chain_if_empty(netns, chain, base)
        if errors:
            raise IptablesError(f"removing NOTRACK rules of VNI {vni}: {'; '.join(errors)}")


def _drop_chain_if_empty(netns: str | None, chain: str, base: str) -> None:
    if not _chain_exists(netns, chain) or _rules_of(netns, chain):
        return
    while _run(netns, ["-C", base, "-j", chain], check=False).returncode == 0:
        _run(netns, ["-D", base, "-j", chain])
    _run(netns, ["-X", chain])


def _ipt_dump(netns: str | None) -> str:
    """The whole raw table as ``iptables -S`` prints it (for tests and diagnostics)."""
    with _lock_for(netns):
        return _run(netns, ["-S"]).stdout


# ---------------------------------------------------------------- nftables (no iptables binary)

NFT_TABLE = "caa_peerpod"
NFT_CHAINS = (("output", "daddr"), ("prerouting", "saddr"))
FORCE_BACKEND: str | None = None  # "iptables" / "nft"; None = iptables when installed


def backend() -> str:
    """``iptables`` when the binary exists, else ``nft``; :class:`IptablesError` when neither does."""
    if FORCE_BACKEND:
        return FORCE_BACKEND
    if shutil.which("iptables"):
        return "iptables"
    if shutil.which("nft"):
        return "nft"
    raise IptablesError("neither iptables nor nft found in PATH (install iptables or nftables)")


def _nft(netns: str | None, args: Sequence[str], stdin: str | None = None,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    argv = ["nft", *args]
    if netns is not None:
        argv = ["nsenter", f"--net={netns}", *argv]
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise IptablesError(f"{shlex.join(argv)}: {e}") from e
    if check and proc.returncode != 0:
        raise IptablesError(f"{shlex.join(argv)} exited {proc.returncode}: {proc.stderr.strip()}")
    return proc


def _nft_rules(netns: str | None) -> list[tuple[str, str, int]]:
    """(chain, rule text, handle) of every rule in our table."""
    proc = _nft(netns, ["-a", "list", "table", "ip", NFT_TABLE], check=False)
    if proc.returncode != 0:
        return []
    rules: list[tuple[str, str, int]] = []
    chain = ""
    for line in proc.stdout.splitlines():
        text = line.strip()
        if text.startswith("chain "):
            chain = text.split()[1]
        elif "# handle" in text and not text.startswith(("chain", "table", "type")):
            body, handle = text.rsplit("# handle", 1)
            rules.append((chain, body.strip(), int(handle)))
    return rules


def _nft_add_notrack(netns: str | None, vni: int, peer: str, port: int) -> None:
    comment = f"peerpod [vni:{vni}]"
    existing = _nft_rules(netns)
    script = [f"add table ip {NFT_TABLE}"]
    for chain, _dir in NFT_CHAINS:
        script.append(f"add chain ip {NFT_TABLE} {chain} {{ type filter hook {chain} priority -300; }}")
    for chain, direction in NFT_CHAINS:
        if any(c == chain and comment in r and f"{direction} {peer} " in r for c, r, _h in existing):
            continue
        script.append(f'add rule ip {NFT_TABLE} {chain} ip {direction} {peer} udp dport {port} notrack '
                      f'comment "{comment}"')
    _nft(netns, ["-f", "-"], stdin="\n".join(script) + "\n")


def _nft_list_vnis(netns: str | None) -> set[int]:
    return {int(m.group(1)) for _c, r, _h in _nft_rules(netns) if (m := _COMMENT_RE.search(r))}


def _nft_remove_notrack(netns: str | None, vni: int) -> None:
    comment = f'"peerpod [vni:{vni}]"'
    rules = _nft_rules(netns)
    for chain, rule, handle in rules:
        if comment in rule:
            _nft(netns, ["delete", "rule", "ip", NFT_TABLE, chain, "handle", str(handle)])
    if rules and not _nft_rules(netns):
        _nft(netns, ["delete", "table", "ip", NFT_TABLE], check=False)
    elif not rules:
        # an empty table (chains only) left by an interrupted run
        _nft(netns, ["delete", "table", "ip", NFT_TABLE], check=False)


def _nft_dump(netns: str | None) -> str:
    proc = _nft(netns, ["list", "table", "ip", NFT_TABLE], check=False)
    return proc.stdout if proc.returncode == 0 else ""


# ---------------------------------------------------------------- public API (either backend)


def add_notrack(netns: str | None, vni: int, peer: str, port: int) -> None:
    """Ensure both chains, their jumps and the two rules for ``vni`` exist (idempotent).
    ``peer`` is the other tunnel end's address (the pod VM on the node, the node in the VM)."""
    with _lock_for(netns):
        if backend() == "nft":
            _nft_add_notrack(netns, vni, peer, port)
            return
    _ipt_add_notrack(netns, vni, peer, port)


def list_vnis(netns: str | None) -> set[int]:
    """VNIs that have a ``peerpod [vni:N]`` rule in either chain."""
    if backend() == "nft":
        with _lock_for(netns):
            return _nft_list_vnis(netns)
    return _ipt_list_vnis(netns)


def remove_notrack(netns: str | None, vni: int) -> None:
    """Delete every rule commented ``peerpod [vni:<vni>]`` (whatever its peer/port), then each
    chain that became empty together with its jump. Idempotent; no error when nothing is there."""
    if backend() == "nft":
        with _lock_for(netns):
            _nft_remove_notrack(netns, vni)
        return
    _ipt_remove_notrack(netns, vni)


def dump(netns: str | None) -> str:
    """The rules as the backend prints them (``iptables -t raw -S`` or ``nft list table``)."""
    if backend() == "nft":
        with _lock_for(netns):
            return _nft_dump(netns)
    return _ipt_dump(netns)

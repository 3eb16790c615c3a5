"""Read a libvirt domain's serial console from the host while it boots, for the guest's phase markers.

The pod VM's tiny init prints `CAA-INIT <phase> uptime=<seconds>` on ttyS0 (docs/podvm.md). `ConsoleTap(name)`
waits for the domain to be defined (the adaptor names it), opens its console through libvirt's stream API (works
over the same URI the provider uses, no pty access needed) and keeps every line with the host's monotonic
instant. Markers that were printed before the tap attached are lost; each carries the guest's own uptime, so the
rest still places them on the guest's clock.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from typing import Any

MARKER = re.compile(r"CAA-INIT (\S+) uptime=([0-9.]+)")
_event_loop = threading.Lock()
_event_loop_running = False


def _ensure_event_loop() -> None:
    """libvirt delivers stream data through its event loop: register the default one, run it in a thread."""
    global _event_loop_running
    import libvirt

    with _event_loop:
        if _event_loop_running:
            return
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        threading.Thread(target=run, name="libvirt-events", daemon=True).start()
        _event_loop_running = True


class ConsoleTap:
    def __init__(self, uri: str, name: str, wait_for_domain: float = 120.0) -> None:
        self.uri = uri
        self.name = name
        self.lines: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._wait = wait_for_domain
        self._thread = threading.Thread(target=self._run, name=f"console-{name}", daemon=True)
        self._thread.start()

    def markers(self) -> dict[str, float]:
        """First guest uptime of each marker phase seen."""
        out: dict[str, float] = {}
        for _, line in list(self.lines):
            m = MARKER.search(line)
            if m and m.group(1) not in out:
                out[m.group(1)] = float(m.group(2))
        return out

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        import libvirt

        _ensure_event_loop()
        conn = libvirt.open(self.uri)
        try:
            stream = self._console(conn)
            if stream is None:
                return
            try:
                self._read(stream)
            finally:
                with contextlib.suppress(libvirt.libvirtError):
                    stream.abort()
        except libvirt.libvirtError:
            pass  # the domain went away: what was read stays
        finally:
            conn.close()

    def _console(self, conn: Any) -> Any:
        """The console stream, once the domain exists and runs (its pty exists only once QEMU started)."""
        import libvirt

        deadline = time.monotonic() + self._wait
        while not self._stop.is_set() and time.monotonic() < deadline:
            stream = conn.newStream(libvirt.VIR_STREAM_NONBLOCK)
            try:
                conn.lookupByName(self.name).openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
                return stream
            except libvirt.libvirtError:
                with contextlib.suppress(libvirt.libvirtError):
                    stream.abort()
                time.sleep(0.02)
        return None

    def _read(self, stream: Any) -> None:
        buffer = b""
        while not self._stop.is_set():
            data = stream.recv(4096)
            if data == -2:  # nothing yet (non-blocking)
                time.sleep(0.02)
                continue
            if not data:
                return
            buffer += data
            *complete, buffer = buffer.split(b"\n")
            now = time.monotonic()
            self.lines.extend((now, line.decode(errors="replace").strip()) for line in complete)

"""A hypervisor socket path with no room for a temporary name beside it (`h.sock`) is bound in place; the
adaptor must not then take its own socket for an older adaptor's and hand its sandboxes over to itself (found by
bench/pool_bench.py: every call answered "handed its sandboxes over to a newer one")."""

from __future__ import annotations

import os

from tests.test_adaptor_process import ProcessTestCase


class ShortSocketPathTests(ProcessTestCase):
    def test_short_socket_path_serves(self) -> None:
        self.a.socket = os.path.join(self.a.base, "h.sock")
        self.a.start()
        self.a.wait_for(lambda: "journal recovery done" in open(self.a.log).read(), "recovery")
        sid = f"{os.getpid() % 10000:04d}" + "5a" * 30
        path = self.a.create(sid, "web")
        self.assertTrue(path)
        with open(self.a.log) as f:
            log = f.read()
        self.assertNotIn("to hand over", log)
        self.assertNotIn("passive", log)
        r = self.a.ctl("stop", "--id", sid)
        self.assertEqual(r.returncode, 0, r.stderr)

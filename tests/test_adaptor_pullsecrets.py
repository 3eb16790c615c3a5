"""Image pull secrets -> auth.json entries (spec-adaptor §5.7), over fake lookups shaped like the API objects."""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.trial.unittest import SynchronousTestCase

from caa.adaptor.pullsecrets import registry_auths
from tests.test_adaptor_service import SID, Harness, ann


def b64(obj: Any) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


SECRETS: dict[str, Any] = {
    "sa-secret": {"data": {".dockerconfigjson": b64({"auths": {"reg.io": {"auth": "c2E6c2E="},
                                                                "other.io": {"username": "u", "password": "p"}}})}},
    "pod-secret": {"data": {".dockerconfigjson": b64({"auths": {"reg.io": {"auth": "cG9kOnBvZA=="}}})}},
    "legacy": {"data": {".dockercfg": b64({"old.io": {"username": "a", "password": "b"}})}},
    "nouser": {"data": {".dockercfg": b64({"x.io": {"username": "a"}})}},
    "broken": {"data": {".dockerconfigjson": base64.b64encode(b"{nope").decode()}},
}


def lookups(pod: dict[str, Any] | None, sa: dict[str, Any] | None) -> tuple[Any, Any, Any]:
    return (lambda ns, n: pod, lambda ns, n: sa, lambda ns, n: SECRETS.get(n))


class RegistryAuthTests(SynchronousTestCase):
    def test_pod_overrides_service_account(self) -> None:
        pod = {"spec": {"serviceAccountName": "builder",
                        "imagePullSecrets": [{"name": "pod-secret"}, {"name": "missing"}, {"name": "legacy"},
                                             {"name": "nouser"}]}}
        sa = {"imagePullSecrets": [{"name": "sa-secret"}]}
        self.assertEqual(registry_auths("ns", "p", *lookups(pod, sa)), {
            "reg.io": "cG9kOnBvZA==", "other.io": base64.b64encode(b"u:p").decode(),
            "old.io": base64.b64encode(b"a:b").decode()})

    def test_none(self) -> None:
        self.assertEqual(registry_auths("ns", "p", *lookups(None, None)), {})
        self.assertEqual(registry_auths("ns", "p", *lookups({"spec": {}}, None)), {})

    def test_malformed_fails(self) -> None:
        pod = {"spec": {"imagePullSecrets": [{"name": "broken"}]}}
        self.assertRaises(ValueError, registry_auths, "ns", "p", *lookups(pod, None))


class AuthJsonInUserData(Harness):
    def test_auth_json_written(self) -> None:
        self.svc.auth_lookup = lambda ns, pod: succeed({"reg.io": "dTpw"})
        self.create()
        with open(os.path.join(self.pods_dir, SID, "user-data")) as f:
            text = f.read()
        self.assertIn("  - path: /run/peerpod/auth.json\n    content: |\n      "
                      '{"auths":{"reg.io":{"auth":"dTpw"}}}\n', text)

    def test_lookup_failure_only_logged(self) -> None:
        async def boom(ns: str, pod: str) -> dict[str, str]:
            raise RuntimeError("apiserver down")

        self.svc.auth_lookup = boom
        self.successResultOf(Deferred.fromCoroutine(self.svc.create_vm(SID, ann(), self.netns)))
        with open(os.path.join(self.pods_dir, SID, "user-data")) as f:
            self.assertNotIn("auth.json", f.read())
        self.flushLoggedErrors()

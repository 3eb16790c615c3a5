"""caa.webhook.admission: AdmissionReview in -> AdmissionReview out; malformed reviews get an error review
(allowed false, status code 400, uid echoed when known), never an exception."""

from __future__ import annotations

import base64
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from caa.webhook import admission
from caa.webhook.admission import review
from caa.webhook.mutation import CPU_ANNOTATION, MutationConfig

CONFIG = MutationConfig()
JSON = "application/json"


def body(request: Any, api_version: str = "admission.k8s.io/v1", kind: str = "AdmissionReview") -> bytes:
    return json.dumps({"apiVersion": api_version, "kind": kind, "request": request}).encode()


def kata_pod(cpu: Any = "2", runtime_class: str = "kata-remote") -> dict[str, Any]:
    return {"metadata": {"name": "p"},
            "spec": {"runtimeClassName": runtime_class,
                     "containers": [{"name": "c", "resources": {"requests": {"cpu": cpu}}}]}}


class ReviewTests(SynchronousTestCase):
    def test_mutated_response(self) -> None:
        result = review(body({"uid": "abc", "object": kata_pod()}), JSON, CONFIG)
        self.assertEqual(result.outcome, "mutated")
        out = result.body
        self.assertEqual((out["apiVersion"], out["kind"]), ("admission.k8s.io/v1", "AdmissionReview"))
        response = out["response"]
        self.assertEqual((response["uid"], response["allowed"], response["patchType"]), ("abc", True, "JSONPatch"))
        self.assertEqual(response["status"], {"metadata": {}, "code": 200})
        patch = json.loads(base64.b64decode(response["patch"]))
        self.assertIn({"op": "add", "path": "/metadata/annotations", "value": {CPU_ANNOTATION: "2"}}, patch)
        self.assertEqual(json.loads(result.to_json()), out)

    def test_other_runtime_class_untouched(self) -> None:
        """Allowed, no patch: even with quantities that would not parse (they are not ours to judge)."""
        result = review(body({"uid": "u", "object": kata_pod("lots", "runc")}), JSON, CONFIG)
        self.assertEqual(result.outcome, "unchanged")
        self.assertEqual(result.body["response"], {"uid": "u", "allowed": True, "status": {"metadata": {},
                                                                                           "code": 200}})

    def test_v1beta1_answered_in_kind(self) -> None:
        result = review(body({"uid": "u", "object": kata_pod()}, "admission.k8s.io/v1beta1"), JSON, CONFIG)
        self.assertEqual(result.body["apiVersion"], "admission.k8s.io/v1beta1")
        self.assertTrue(result.body["response"]["allowed"])

    def test_json_number_quantity(self) -> None:
        """A bare JSON number is a quantity too, decoded exactly (2.0000000001 is more than 2 CPUs)."""
        raw = body({"uid": "u", "object": kata_pod(0)}).replace(b'"cpu": 0', b'"cpu": 2.0000000001')
        patch = json.loads(base64.b64decode(review(raw, JSON, CONFIG).body["response"]["patch"]))
        self.assertIn({"op": "add", "path": "/metadata/annotations", "value": {CPU_ANNOTATION: "3"}}, patch)

    def assertRefused(self, raw: bytes, content_type: str | None = JSON, uid: str = "", words: str = "") -> None:
        result = review(raw, content_type, CONFIG)
        self.assertEqual(result.outcome, "invalid")
        response = result.body["response"]
        self.assertEqual(response["uid"], uid)
        self.assertIs(response["allowed"], False)
        self.assertEqual(response["status"]["code"], 400)
        self.assertIn(words, response["status"]["message"])
        self.assertNotIn("patch", response)

    def test_malformed_reviews(self) -> None:
        self.assertRefused(b"", words="request body is empty")
        self.assertRefused(b"{not json", words="couldn't decode")
        self.assertRefused(b"[1, 2]", words="not an AdmissionReview")
        self.assertRefused(b'"x"', words="not an AdmissionReview")
        self.assertRefused(body({"uid": "u"}, kind="Pod"), words="expected kind AdmissionReview")
        self.assertRefused(body({"uid": "u"}, api_version="admission.k8s.io/v2"), words="expected kind")
        self.assertRefused(json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).encode(),
                           words="no request")
        self.assertRefused(body({"uid": "u"}), uid="u", words="no content to decode")
        self.assertRefused(b"[" * 100000 + b"]" * 100000, words="couldn't decode")
        self.assertRefused(b"x" * (admission.MAX_REQUEST_SIZE + 1), words="too large")

    def test_content_type(self) -> None:
        raw = body({"uid": "u", "object": kata_pod()})
        self.assertRefused(raw, "text/plain", words="expected application/json")
        self.assertRefused(raw, None, words="expected application/json")
        self.assertEqual(review(raw, "application/json; charset=utf-8", CONFIG).outcome, "mutated")

    def test_invalid_pod_echoes_uid(self) -> None:
        self.assertRefused(body({"uid": "u7", "object": kata_pod("two")}), uid="u7", words="cpu")
        self.assertRefused(body({"uid": "u8", "object": {"spec": {"runtimeClassName": "kata-remote",
                                                                   "containers": []}}}),
                           uid="u8", words="at least one container")
        self.assertRefused(body({"uid": "u9", "object": "a pod"}), uid="u9", words="not a Pod")

    def test_internal_error_is_500(self) -> None:
        def broken(pod: Any, config: MutationConfig) -> Any:
            raise KeyError("bug")

        self.patch(admission, "mutate_pod", broken)
        result = review(body({"uid": "u", "object": kata_pod()}), JSON, CONFIG)
        self.assertEqual(result.body["response"]["status"]["code"], 500)
        self.assertEqual(result.body["response"]["uid"], "u")

    @settings(max_examples=300, deadline=None)
    @given(st.one_of(st.binary(max_size=200),
                     st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                                  lambda inner: st.lists(inner, max_size=3)
                                  | st.dictionaries(st.sampled_from(["request", "object", "uid", "spec",
                                                                     "runtimeClassName", "containers",
                                                                     "resources", "requests", "cpu",
                                                                     "metadata", "annotations"]),
                                                    inner, max_size=4),
                                  max_leaves=20).map(lambda o: body(o))))
    def test_fuzz_never_raises(self, raw: bytes) -> None:
        """Any body: a well-formed AdmissionReview answer, allowed only with a (possibly empty) patch."""
        out = review(raw, JSON, CONFIG).body
        self.assertEqual(out["kind"], "AdmissionReview")
        response = out["response"]
        self.assertIsInstance(response["allowed"], bool)
        self.assertIn(response["status"]["code"], (200, 400))

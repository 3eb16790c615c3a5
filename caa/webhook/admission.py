"""AdmissionReview (admission.k8s.io/v1) in, AdmissionReview out: what controller-runtime's webhook
handler and upstream's `PodMutator.Handle` do, as a pure function of the HTTP body.

The patch is the JSON-Patch diff between the pod as received and the mutated pod (`jsonpatch.make_patch`,
upstream's `PatchResponseFromRaw`). Anything wrong with the request is an AdmissionReview with
`allowed: false` and a status code (400 for a bad review or pod, 500 for our own failure), so the API
server shows the reason; the uid is echoed whenever the request had one.
"""

from __future__ import annotations

import base64
import decimal
import json
from typing import Any

import attrs
import jsonpatch

from caa.webhook.mutation import InvalidPod, MutationConfig, is_target, mutate_pod

__all__ = ["MAX_REQUEST_SIZE", "API_VERSIONS", "AdmissionResult", "review"]

#: controller-runtime's limit on a review body.
MAX_REQUEST_SIZE = 7 * 1024 * 1024
#: v1beta1 has the same shape; controller-runtime accepts it and answers in the caller's version.
API_VERSIONS = ("admission.k8s.io/v1", "admission.k8s.io/v1beta1")


class _BadReview(ValueError):
    pass


@attrs.frozen
class AdmissionResult:
    """The response review and what happened, for logs and metrics."""

    body: dict[str, Any]
    outcome: str  # "mutated", "unchanged", "invalid"
    uid: str
    patch: list[dict[str, Any]] = attrs.field(factory=list)
    message: str = ""

    def to_json(self) -> bytes:
        return json.dumps(self.body, separators=(",", ":")).encode() + b"\n"


def _decode(body: bytes) -> tuple[str, dict[str, Any]]:
    if not body:
        raise _BadReview("request body is empty")
    if len(body) > MAX_REQUEST_SIZE:
        raise _BadReview("request entity is too large")
    try:
        # Decimal keeps JSON numbers exact (a quantity may be a bare number).
        review_in = json.loads(body, parse_float=decimal.Decimal)
    except (ValueError, RecursionError) as e:
        raise _BadReview(f"couldn't decode the AdmissionReview: {e}") from None
    if not isinstance(review_in, dict):
        raise _BadReview("the body is not an AdmissionReview object")
    api_version = review_in.get("apiVersion")
    if review_in.get("kind") != "AdmissionReview" or api_version not in API_VERSIONS:
        raise _BadReview(f"expected kind AdmissionReview of {' or '.join(API_VERSIONS)}, got "
                         f"kind {review_in.get('kind')!r} apiVersion {api_version!r}")
    request = review_in.get("request")
    if not isinstance(request, dict):
        raise _BadReview("the AdmissionReview has no request")
    return str(api_version), request


def _review(api_version: str, response: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": "AdmissionReview", "response": response}


def _errored(api_version: str, uid: str, code: int, message: str) -> AdmissionResult:
    response = {"uid": uid, "allowed": False, "status": {"metadata": {}, "message": message, "code": code}}
    return AdmissionResult(_review(api_version, response), "invalid", uid, message=message)


def review(body: bytes, content_type: str | None, config: MutationConfig) -> AdmissionResult:
    """Answer one AdmissionReview body (never raises)."""
    api_version, uid = API_VERSIONS[0], ""
    try:
        if (content_type or "").split(";")[0].strip().lower() != "application/json":
            raise _BadReview(f"contentType={content_type}, expected application/json")
        api_version, request = _decode(body)
        raw_uid = request.get("uid", "")
        uid = raw_uid if isinstance(raw_uid, str) else ""
        pod = request.get("object")
        if pod is None:
            raise _BadReview("there is no content to decode")
        if not is_target(pod, config):
            return AdmissionResult(_review(api_version, _allowed(uid, [])), "unchanged", uid)
        patch = jsonpatch.make_patch(pod, mutate_pod(pod, config)).patch
    except (_BadReview, InvalidPod) as e:
        return _errored(api_version, uid, 400, str(e))
    except Exception as e:  # a bug of ours must still answer, not drop the API server's call
        return _errored(api_version, uid, 500, f"internal error: {e!r}")
    return AdmissionResult(_review(api_version, _allowed(uid, patch)), "mutated" if patch else "unchanged",
                           uid, patch)


def _allowed(uid: str, patch: list[dict[str, Any]]) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": uid, "allowed": True, "status": {"metadata": {}, "code": 200}}
    if patch:
        # Values in the patch come from the mutated pod's new parts; a Decimal there would be an old
        # number carried over, printed as JSON number.
        text = json.dumps(patch, separators=(",", ":"), default=_number)
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(text.encode()).decode("ascii")
    return response


def _number(value: object) -> object:
    if isinstance(value, decimal.Decimal):
        return float(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")

"""caa.webhook.mutation: upstream's 11 worked examples (spec-providers §12.1) and a property test over
random pods: the JSON patch always applies, other runtime classes are never touched, and the annotations
equal a reference computed here with `fractions.Fraction` from the values the generator chose."""

from __future__ import annotations

import base64
import copy
import json
import math
from fractions import Fraction
from typing import Any

import jsonpatch
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from caa.webhook.admission import review
from caa.webhook.mutation import (
    CPU_ANNOTATION,
    GPU_ANNOTATION,
    MEMORY_ANNOTATION,
    InvalidPod,
    MutationConfig,
    mutate_pod,
)

VM = "kata.peerpods.io/vm"
CONFIG = MutationConfig()


def container(name: str, requests: dict[str, str] | None = None,
              limits: dict[str, str] | None = None) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits
    return {"name": name, "image": "busybox", "resources": resources}


def pod(*containers: dict[str, Any], init: tuple[dict[str, Any], ...] = (),
        runtime_class: str = "kata-remote") -> dict[str, Any]:
    spec: dict[str, Any] = {"runtimeClassName": runtime_class, "containers": list(containers)}
    if init:
        spec["initContainers"] = list(init)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "namespace": "default"}, "spec": spec}


class UpstreamExampleTests(SynchronousTestCase):
    """`TestMutatePod_*` of upstream's mutating-webhook_test.go, one test each."""

    def check(self, original: dict[str, Any], cpu: str | None, memory: str | None, gpu: str | None) -> None:
        mutated = mutate_pod(original, CONFIG)
        annotations = mutated["metadata"].get("annotations", {})
        for key, expected in ((CPU_ANNOTATION, cpu), (MEMORY_ANNOTATION, memory), (GPU_ANNOTATION, gpu)):
            self.assertEqual(annotations.get(key), expected, key)
        spec = mutated["spec"]
        self.assertEqual(spec["containers"][0]["resources"], {"requests": {VM: "1"}, "limits": {VM: "1"}})
        for c in spec["containers"][1:] + spec.get("initContainers", []):
            self.assertEqual(c["resources"], {})
        # Everything else is the pod as it came.
        for c in spec["containers"] + spec.get("initContainers", []):
            c.pop("resources")
        for c in original["spec"]["containers"] + original["spec"].get("initContainers", []):
            c.pop("resources")
        mutated["metadata"].pop("annotations", None)
        self.assertEqual(mutated, original)

    def test_cpu_mem_req_limit(self) -> None:
        self.check(pod(container("c1", {"cpu": "2", "memory": "4Gi"}, {"cpu": "3", "memory": "5Gi"})),
                   "3", "5120", None)

    def test_cpu_req(self) -> None:
        self.check(pod(container("c1", {"cpu": "2"})), "2", None, None)

    def test_mem_req(self) -> None:
        self.check(pod(container("c1", {"memory": "4Gi"})), None, "4096", None)

    def test_gpu_req(self) -> None:
        self.check(pod(container("c1", {"nvidia.com/gpu": "1"})), None, None, "1")

    def test_no_req(self) -> None:
        self.check(pod(container("c1")), None, None, None)

    def test_cpu_mem_req_limit_same(self) -> None:
        self.check(pod(container("c1", {"cpu": "2", "memory": "4Gi"}, {"cpu": "2", "memory": "4Gi"})),
                   "2", "4096", None)

    def test_init_containers(self) -> None:
        self.check(pod(container("c1", {"cpu": "2", "memory": "4Gi"}, {"cpu": "3", "memory": "5Gi"}),
                       container("c2", {"cpu": "1", "memory": "1Gi"}, {"cpu": "1", "memory": "1Gi"}),
                       container("c3", {"cpu": "1", "nvidia.com/gpu": "1"}, {"cpu": "1", "nvidia.com/gpu": "1"}),
                       init=(container("i1", {"cpu": "1", "memory": "2Gi"}, {"cpu": "1", "memory": "2Gi"}),)),
                   "6", "8192", "1")

    def test_no_change_for_different_runtime_class(self) -> None:
        original = pod(container("c1", {"cpu": "2", "memory": "4Gi"}, {"cpu": "3", "memory": "5Gi"}),
                       runtime_class="different-runtime")
        self.assertEqual(mutate_pod(original, CONFIG), original)

    def test_fractional_cpu(self) -> None:
        self.check(pod(container("c1", {"cpu": "200m", "memory": "4Gi"}, {"cpu": "500m", "memory": "4Gi"})),
                   "1", "4096", None)

    def test_fractional_cpu_more_than_one(self) -> None:
        self.check(pod(container("c1", {"cpu": "200m", "memory": "4Gi"}, {"cpu": "1500m", "memory": "4Gi"})),
                   "2", "4096", None)

    def test_fractional_cpu_multiple_containers(self) -> None:
        self.check(pod(container("c1", {"cpu": "200m", "memory": "4Gi"}, {"cpu": "0.5", "memory": "4Gi"}),
                       init=(container("i1", {"cpu": "200m", "memory": "4Gi"}, {"cpu": "0.7", "memory": "4Gi"}),)),
                   "2", "8192", None)


class MutationRuleTests(SynchronousTestCase):
    def test_input_not_modified(self) -> None:
        original = pod(container("c1", {"cpu": "2"}))
        before = copy.deepcopy(original)
        mutate_pod(original, CONFIG)
        self.assertEqual(original, before)

    def test_existing_annotations_overwritten_others_kept(self) -> None:
        original = pod(container("c1", {"cpu": "2"}))
        original["metadata"]["annotations"] = {CPU_ANNOTATION: "64", "team": "a"}
        annotations = mutate_pod(original, CONFIG)["metadata"]["annotations"]
        self.assertEqual(annotations, {CPU_ANNOTATION: "2", "team": "a"})

    def test_configured_runtime_class_and_resource(self) -> None:
        config = MutationConfig("my-class", "example.com/vm")
        mutated = mutate_pod(pod(container("c1", {"cpu": "1"}), runtime_class="my-class"), config)
        self.assertEqual(mutated["spec"]["containers"][0]["resources"]["limits"], {"example.com/vm": "1"})
        kata = pod(container("c1", {"cpu": "1"}))
        self.assertEqual(mutate_pod(kata, config), kata)

    def test_empty_config_values_are_defaults(self) -> None:
        self.assertEqual(MutationConfig("", ""), MutationConfig())

    def test_limit_below_request_uses_request(self) -> None:
        mutated = mutate_pod(pod(container("c1", {"cpu": "4", "memory": "2Gi"}, {"cpu": "2", "memory": "1Gi"})),
                             CONFIG)
        self.assertEqual(mutated["metadata"]["annotations"], {CPU_ANNOTATION: "4", MEMORY_ANNOTATION: "2048"})

    def test_gpu_printed_as_go_does(self) -> None:
        mutated = mutate_pod(pod(container("c1", {"nvidia.com/gpu": "1000m"}),
                                 container("c2", {"nvidia.com/gpu": "1"})), CONFIG)
        self.assertEqual(mutated["metadata"]["annotations"][GPU_ANNOTATION], "2")

    def test_invalid_shapes(self) -> None:
        bad = [
            {"spec": {"runtimeClassName": "kata-remote", "containers": {}}},
            {"spec": {"runtimeClassName": "kata-remote", "containers": []}},
            {"spec": {"runtimeClassName": "kata-remote", "containers": ["x"]}},
            pod(container("c1", {"cpu": "two"})),
            pod(container("c1", {"cpu": "1K"})),
            {"spec": {"runtimeClassName": "kata-remote", "containers": [{"resources": []}]}},
            {"metadata": [], "spec": {"runtimeClassName": "kata-remote",
                                      "containers": [{"resources": {"requests": {"cpu": "1"}}}]}},
        ]
        for p in bad:
            with self.subTest(pod=p), self.assertRaises(InvalidPod):
                mutate_pod(p, CONFIG)
        with self.assertRaises(InvalidPod):
            mutate_pod([], CONFIG)


# --- property test --------------------------------------------------------------------------------------

DECIMAL = {"m": Fraction(1, 1000), "": Fraction(1), "k": Fraction(1000), "M": Fraction(10**6),
           "G": Fraction(10**9)}
BINARY = {"Ki": Fraction(2**10), "Mi": Fraction(2**20), "Gi": Fraction(2**30)}


@st.composite
def quantity(draw: st.DrawFn) -> tuple[Any, Fraction, str]:
    """(JSON value, exact value, Go format) in one of every notation, on the nano grid, below int64."""
    whole = draw(st.integers(0, 5000))
    frac = draw(st.sampled_from(["", "5", "25", "125"]))
    mantissa = Fraction(int(f"{whole}{frac}"), 10 ** len(frac))
    number = f"{whole}.{frac}" if frac else str(whole)
    kind = draw(st.sampled_from(["decimal", "binary", "exponent", "json-int"]))
    if kind == "decimal":
        suffix = draw(st.sampled_from(sorted(DECIMAL)))
        return number + suffix, mantissa * DECIMAL[suffix], "DecimalSI"
    if kind == "binary":
        suffix = draw(st.sampled_from(sorted(BINARY)))
        return number + suffix, mantissa * BINARY[suffix], "BinarySI"
    if kind == "exponent":
        exponent = draw(st.integers(-3, 6))
        return f"{number}e{exponent}", mantissa * Fraction(10) ** exponent, "DecimalExponent"
    return whole, Fraction(whole), "DecimalSI"


RESOURCE_NAMES = ["cpu", "memory", "nvidia.com/gpu", "ephemeral-storage", "example.com/dongle"]


@st.composite
def resources(draw: st.DrawFn) -> tuple[Any, dict[str, dict[str, tuple[Fraction, str]]]]:
    """A container's `resources` (sometimes absent, null or empty) and the exact values it holds."""
    shape = draw(st.sampled_from(["absent", "null", "empty", "full", "full", "full"]))
    if shape == "absent":
        return ..., {}
    if shape == "null":
        return None, {}
    if shape == "empty":
        return {}, {}
    doc: dict[str, Any] = {}
    exact: dict[str, dict[str, tuple[Fraction, str]]] = {}
    for kind in ("requests", "limits"):
        if draw(st.booleans()):
            names = draw(st.lists(st.sampled_from(RESOURCE_NAMES), unique=True, max_size=4))
            doc[kind] = {}
            exact[kind] = {}
            for name in names:
                value, fraction, fmt = draw(quantity())
                doc[kind][name] = value
                exact[kind][name] = (fraction, fmt)
    return doc, exact


@st.composite
def pods(draw: st.DrawFn) -> tuple[dict[str, Any], list[dict[str, dict[str, tuple[Fraction, str]]]]]:
    """A random pod and, per container then init container (upstream's order), its exact resources."""
    exact: list[dict[str, dict[str, tuple[Fraction, str]]]] = []
    spec: dict[str, Any] = {}
    runtime = draw(st.one_of(st.sampled_from(["kata-remote", "kata-remote", "kata-remote", "runc", None, ...]),
                             st.text(max_size=12)))
    if runtime is not ...:
        spec["runtimeClassName"] = runtime
    for key, low in (("containers", 1), ("initContainers", 0)):
        items: list[dict[str, Any]] = []
        for i in range(draw(st.integers(low, 3))):
            doc, values = draw(resources())
            c: dict[str, Any] = {"name": f"{key}-{i}", "image": "busybox", "ports": [{"containerPort": 80 + i}]}
            if doc is not ...:
                c["resources"] = doc
            items.append(c)
            exact.append(values)
        keep_empty_list: bool = draw(st.booleans())
        if items or keep_empty_list:
            spec[key] = items
    metadata: dict[str, Any] = {"name": "p", "namespace": "default", "labels": {"app": "x"}}
    existing = draw(st.sampled_from([..., None, {}, {CPU_ANNOTATION: "99", "keep": "me"}]))
    if existing is not ...:
        metadata["annotations"] = existing
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}, exact


def reference_annotations(exact: list[dict[str, dict[str, tuple[Fraction, str]]]]) -> dict[str, str]:
    """Spec-providers §12.1 on exact fractions, independently of caa.webhook.quantity."""

    def total(kind: str, name: str) -> Fraction:
        return sum((c.get(kind, {})[name][0] for c in exact if name in c.get(kind, {})), Fraction(0))

    def chosen(name: str) -> Fraction | None:
        request, limit = total("requests", name), total("limits", name)
        if request != 0 and limit >= request:
            return limit
        return request if request > 0 else None

    out: dict[str, str] = {}
    cpu = chosen("cpu")
    if cpu is not None:
        out[CPU_ANNOTATION] = str(math.ceil(cpu))
    memory = chosen("memory")
    if memory is not None:
        out[MEMORY_ANNOTATION] = str(math.ceil(Fraction(math.ceil(memory), 2**20)))
    gpu = total("requests", "nvidia.com/gpu")
    if gpu > 0:
        out[GPU_ANNOTATION] = go_string(gpu, gpu_format(exact))
    return out


def gpu_format(exact: list[dict[str, dict[str, tuple[Fraction, str]]]]) -> str:
    """The format of Go's sum: that of the last addend added while the running total was zero."""
    running, fmt = Fraction(0), "DecimalSI"
    for c in exact:
        if "nvidia.com/gpu" in c.get("requests", {}):
            value, value_fmt = c["requests"]["nvidia.com/gpu"]
            if running == 0:
                fmt = value_fmt
            running += value
    return fmt


def go_string(value: Fraction, fmt: str) -> str:
    """Quantity.String() by search: the largest suffix that leaves an integer mantissa."""
    if fmt == "BinarySI" and value >= 1024 and value.denominator == 1:
        for suffix, power in [("Ei", 60), ("Pi", 50), ("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10), ("", 0)]:
            if value % 2**power == 0:
                return f"{value // 2**power}{suffix}"
    for exponent in range(30, -10, -3):
        scaled = value / Fraction(10) ** exponent
        if scaled.denominator == 1:
            if fmt == "DecimalExponent":
                return f"{scaled}e{exponent}" if exponent else str(scaled)
            suffixes = {-9: "n", -6: "u", -3: "m", 0: "", 3: "k", 6: "M", 9: "G", 12: "T", 15: "P", 18: "E"}
            return f"{scaled}{suffixes[exponent]}"
    raise AssertionError(value)


def apply(original: dict[str, Any], patch: list[dict[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = jsonpatch.apply_patch(original, patch)
    return result


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(pods())
    def test_random_pods(self, case: tuple[dict[str, Any], list[Any]]) -> None:
        original, exact = case
        body = json.dumps({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                           "request": {"uid": "u-1", "object": original}}).encode()
        response = review(body, "application/json", CONFIG).body["response"]
        self.assertEqual((response["uid"], response["allowed"]), ("u-1", True))
        patch = json.loads(base64.b64decode(response["patch"])) if "patch" in response else []
        patched = apply(original, patch)
        self.assertEqual(patched, mutate_pod(original, CONFIG))  # the patch is the diff, exactly
        # reinvocationPolicy IfNeeded: a second pass over the mutated pod changes nothing.
        self.assertEqual(mutate_pod(patched, CONFIG), patched)
        if original["spec"].get("runtimeClassName") != "kata-remote":
            self.assertNotIn("patch", response)
            self.assertNotIn("patchType", response)
            return
        self.assertEqual(response["patchType"], "JSONPatch")
        expected = reference_annotations(exact)
        annotations = patched["metadata"].get("annotations") or {}
        before = original["metadata"].get("annotations") or {}
        self.assertEqual(annotations, {**before, **expected})
        spec = patched["spec"]
        self.assertEqual(spec["containers"][0]["resources"], {"requests": {VM: "1"}, "limits": {VM: "1"}})
        for c in spec["containers"][1:] + spec.get("initContainers", []):
            self.assertEqual(c["resources"], {})
        # Nothing else moved: names, images, ports, labels.
        for key in ("containers", "initContainers"):
            self.assertEqual([{k: v for k, v in c.items() if k != "resources"} for c in spec.get(key, [])],
                             [{k: v for k, v in c.items() if k != "resources"}
                              for c in original["spec"].get(key, [])])
        self.assertEqual(patched["metadata"]["labels"], original["metadata"]["labels"])

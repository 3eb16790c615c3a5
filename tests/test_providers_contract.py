"""
The provider contract, as a mixin every provider's tests run (`ProviderContractMixin`), and its run
against the adaptor engineer's in-memory fake provider (tests/fakes/provider.py) so fakes keep the
contract too.

A provider test class mixes this into `twisted.trial.unittest.TestCase` and implements:
`make_provider()` (an IProvider, torn down by the test's cleanup), `good_spec()`, `impossible_spec()`
(a spec that can never be satisfied and the ErrorKind it must fail with) and `leftovers(names)` (what
is left on the host/cloud of the instances with these names: must be empty after delete). Optionally
`check_running(instance, user_data)` proves the instance really runs with the given user data.
"""

from __future__ import annotations

import itertools
import os
import uuid
from typing import Any

from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from caa.providers.interfaces import ErrorKind, Instance, InstanceSpec, IProvider, ProviderError

_counter = itertools.count(1)


def unique_pod(prefix: str = "ct") -> tuple[str, str]:
    """A pod name and a 64-hex sandbox id unique across trial workers."""
    return f"{prefix}{os.getpid()}-{next(_counter)}", (uuid.uuid4().hex + uuid.uuid4().hex)


class ProviderContractMixin:
    concurrent_creates = 10
    user_data = b"#cloud-config\nwrite_files: []\n"

    # -- to implement ------------------------------------------------------------------------------
    async def make_provider(self) -> IProvider:
        raise NotImplementedError

    def good_spec(self) -> InstanceSpec:
        return InstanceSpec()

    def impossible_spec(self) -> tuple[InstanceSpec, ErrorKind]:
        raise NotImplementedError

    async def leftovers(self, names: list[str]) -> list[str]:
        raise NotImplementedError

    async def check_running(self, instance: Instance, user_data: bytes) -> None:
        return None

    # -- the contract ------------------------------------------------------------------------------
    def test_contract_lifecycle(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._lifecycle())

    async def _lifecycle(self) -> None:
        case: Any = self
        provider = await self.make_provider()
        verifyObject(IProvider, provider)
        pod, sid = unique_pod()
        instance = await provider.create_instance(pod, sid, self.user_data, self.good_spec())
        case.assertEqual(instance.name, provider.instance_name(pod, sid))
        case.assertTrue(instance.id)
        case.assertTrue(instance.ips, "a created instance has at least one IP")
        await self.check_running(instance, self.user_data)
        found = await provider.find_instance(instance.name)
        case.assertIsNotNone(found)
        assert found is not None
        case.assertEqual((found.id, found.name), (instance.id, instance.name))
        await provider.delete_instance(instance.id)
        await provider.delete_instance(instance.id)  # idempotent
        case.assertIsNone(await provider.find_instance(instance.name))
        case.assertEqual(await self.leftovers([instance.name]), [])

    def test_contract_impossible_spec(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._impossible())

    async def _impossible(self) -> None:
        case: Any = self
        provider = await self.make_provider()
        spec, kind = self.impossible_spec()
        pod, sid = unique_pod()
        try:
            await provider.create_instance(pod, sid, self.user_data, spec)
        except ProviderError as e:
            case.assertIs(e.kind, kind, str(e))
            case.assertFalse(e.retryable and kind is not ErrorKind.TRANSIENT)
        else:
            case.fail(f"create with {spec} succeeded")
        name = provider.instance_name(pod, sid)
        case.assertIsNone(await provider.find_instance(name))
        case.assertEqual(await self.leftovers([name]), [])

    def test_contract_find_unknown_and_delete_unknown(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._unknown())

    async def _unknown(self) -> None:
        case: Any = self
        provider = await self.make_provider()
        pod, sid = unique_pod()
        case.assertIsNone(await provider.find_instance(provider.instance_name(pod, sid)))
        await provider.delete_instance(str(uuid.uuid4()))

    def test_contract_concurrent_creates(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._concurrent())

    async def _concurrent(self) -> None:
        case: Any = self
        provider = await self.make_provider()
        pods = [unique_pod() for _ in range(self.concurrent_creates)]
        instances: list[Instance] = await gatherResults(
            [provider.create_instance(pod, sid, self.user_data, self.good_spec()) for pod, sid in pods],
            consumeErrors=True,
        )
        try:
            case.assertEqual(len({i.id for i in instances}), len(pods))
            case.assertEqual(len({i.ips[0] for i in instances}), len(pods), "every instance has its own IP")
            for instance, (pod, sid) in zip(instances, pods, strict=True):
                case.assertEqual(instance.name, provider.instance_name(pod, sid))
        finally:
            await gatherResults([provider.delete_instance(i.id) for i in instances], consumeErrors=True)
        case.assertEqual(await self.leftovers([i.name for i in instances]), [])


class FakeProviderContractTests(ProviderContractMixin, TestCase):
    """The adaptor's in-memory fake provider keeps the same contract as the real ones."""

    async def make_provider(self) -> IProvider:
        from tests.fakes.provider import FakeProvider

        self.fake = FakeProvider(global_reactor, fail_image="no-such-image")
        return self.fake

    def impossible_spec(self) -> tuple[InstanceSpec, ErrorKind]:
        return InstanceSpec(image="no-such-image"), ErrorKind.INVALID_CONFIG

    async def leftovers(self, names: list[str]) -> list[str]:
        return [i.name for i in self.fake.instances.values() if i.name in names]

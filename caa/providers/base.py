"""`CoroutineProvider`: the Deferred face of `IProvider` for providers written as coroutines.

The cloud providers (REST on treq) write their work as `async def`; the contract is Deferred-based. This base
turns the five calls into `Deferred.fromCoroutine` once, names instances the shared way, and closes the HTTP
connection pool a provider made for itself (`owned_pool`) at teardown.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.client import HTTPConnectionPool

from caa.podvm_api.naming import MAX_NAME_LENGTH, instance_name
from caa.providers.interfaces import Instance, InstanceSpec, ProviderError

__all__ = ["CoroutineProvider"]


class CoroutineProvider(ABC):
    """Subclasses implement `_create(name, user_data, spec)`, `_delete(instance_id)`, `_find(name)` and
    `_verify()`; a subclass holding more than an HTTP pool extends `_teardown` (calling this one)."""

    _log = Logger()
    #: the longest instance name the cloud accepts
    name_limit: int = MAX_NAME_LENGTH
    #: the connection pool the provider made itself (None when the caller handed in its HTTP client)
    owned_pool: HTTPConnectionPool | None = None

    def instance_name(self, pod_name: str, sandbox_id: str) -> str:
        return instance_name(pod_name, sandbox_id, self.name_limit)

    def create_instance(
        self, pod_name: str, sandbox_id: str, user_data: bytes, spec: InstanceSpec
    ) -> Deferred[Instance]:
        return Deferred.fromCoroutine(self._create(self.instance_name(pod_name, sandbox_id), user_data, spec))

    def delete_instance(self, instance_id: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._delete(instance_id))

    def find_instance(self, name: str) -> Deferred[Instance | None]:
        return Deferred.fromCoroutine(self._find(name))

    def verify_config(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._verify())

    def teardown(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._teardown())

    @abstractmethod
    async def _create(self, name: str, user_data: bytes, spec: InstanceSpec) -> Instance:
        """Create and start the instance `name`; on failure or cancel, roll back what exists (`_roll_back`)."""

    @abstractmethod
    async def _delete(self, instance_id: str) -> None:
        """Delete the instance and what it owns; an instance already gone is a success."""

    @abstractmethod
    async def _find(self, name: str) -> Instance | None:
        """The live instance named `name`, None when there is none."""

    @abstractmethod
    async def _verify(self) -> None:
        """Check the configuration against the cloud (start-up, `--cloud-config-verify`)."""

    async def _roll_back(
        self, leftover: str, error: BaseException, delete: Callable[[], Awaitable[None]] | None = None
    ) -> None:
        """The contract's cleanup of a create that failed or was cancelled once `leftover` exists: delete it
        (`delete`, else `_delete(leftover)`). When that fails too, a failed create becomes a ProviderError naming
        the leftover (the adaptor records it); otherwise the caller re-raises `error` (a cancel stays a cancel)."""
        try:
            await (delete() if delete is not None else self._delete(leftover))
        except ProviderError as cleanup:
            self._log.warn("rollback of {id} failed: {error}", id=leftover, error=cleanup)
            if isinstance(error, ProviderError):
                raise ProviderError(error.kind, error.message, leftover) from error

    async def _teardown(self) -> None:
        if self.owned_pool is not None:
            await self.owned_pool.closeCachedConnections()
            self.owned_pool = None

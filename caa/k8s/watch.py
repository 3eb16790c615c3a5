"""Watching a collection: list, then watch from the list's resourceVersion, and keep at it.

`ResourceWatchSource` is one collection on the real API server (a generated `list_*` method plus fixed
arguments). `Watcher` is the Twisted service that keeps a consumer in step with it:

- first a list, delivered as ADDED events, then a watch from the list's resourceVersion;
- the server ending a watch (its timeout) → watch again from the last resourceVersion seen;
- 410 Gone (resourceVersion compacted away) → list again, and deliver the difference to what the consumer
  knew as ADDED / MODIFIED / DELETED, so no change is lost or repeated;
- a dropped stream, a timeout or any API error → reconnect after an exponential back-off with jitter
  (reset as soon as an event arrives);
- BOOKMARK events (asked for with allowWatchBookmarks) only advance the resourceVersion;
- every event reaches the callback on the reactor thread; a failing callback is logged, never stops the watch.

A running watch holds one thread of the client's pool for its whole life: size the pool for the calls plus
the watches.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Any

import attrs
from twisted.application.internet import backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from zope.interface import implementer

from caa.k8s.client import KubeClient
from caa.k8s.errors import Gone, KubeError, from_status_object, map_exception
from caa.k8s.interfaces import IWatchSource, IWatchStream
from caa.k8s.objects import PEERPOD_GROUP, PEERPOD_PLURAL, PEERPOD_VERSION, JSONObject, resource_version_of
from caa.notifier import Notifier

ADDED, MODIFIED, DELETED, BOOKMARK, ERROR = "ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"


@attrs.frozen
class WatchEvent:
    """One change as the consumer sees it: type ADDED/MODIFIED/DELETED and the object (JSON)."""

    type: str
    object: JSONObject


@implementer(IWatchStream)
class _ResourceWatchStream:
    def __init__(self, source: ResourceWatchSource, resource_version: str,
                 deliver: Callable[[JSONObject], None]) -> None:
        self._source = source
        self._deliver = deliver
        self._stopped = threading.Event()  # set on the reactor thread, read by the worker
        self._response: Any = None
        client = source.client
        self.done: Deferred[None] = deferToThreadPool(client.reactor, client.threadpool, self._run, resource_version)

    def _run(self, resource_version: str) -> None:
        # Worker thread: open the stream, hand each event line to the reactor thread.
        source, client = self._source, self._source.client
        try:
            response = source.fn(*source.args, watch=True, resource_version=resource_version,
                                 allow_watch_bookmarks=True, timeout_seconds=source.server_timeout,
                                 _preload_content=False,
                                 _request_timeout=(client.timeout, source.server_timeout + client.timeout),
                                 **source.kwargs)
        except Exception as e:
            raise map_exception(e, "watch") from e
        self._response = response
        clean = False
        try:
            if self._stopped.is_set():
                return
            for line in response:
                if self._stopped.is_set():
                    return
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("type") == ERROR:
                    raise from_status_object(event.get("object") or {})
                client.reactor.callFromThread(self._deliver, event)
            clean = True
        except KubeError:
            raise
        except Exception as e:
            if self._stopped.is_set():
                return
            raise map_exception(e, "watch stream") from e
        finally:
            if not clean:
                response.close()  # never hand a half-read or shut-down connection back to the pool
            response.release_conn()

    def stop(self) -> None:
        self._stopped.set()
        response = self._response
        if response is not None:
            # urllib3's documented way to interrupt a read blocked in another thread.
            response.shutdown()


@implementer(IWatchSource)
class ResourceWatchSource:
    """One collection on the API server: `fn` is a generated list method (e.g. `client.core.list_node`,
    `client.custom.list_cluster_custom_object`) and args/kwargs its fixed arguments (group, namespace,
    label_selector, ...). `server_timeout` bounds each watch request; the server then ends it cleanly."""

    def __init__(self, client: KubeClient, fn: Callable[..., Any], *args: Any, server_timeout: int = 300,
                 **kwargs: Any) -> None:
        self.client = client
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.server_timeout = server_timeout

    def list(self) -> Deferred[JSONObject]:
        return self.client.call(self.fn, *self.args, **self.kwargs)

    def watch(self, resource_version: str, deliver: Callable[[JSONObject], None]) -> IWatchStream:
        return _ResourceWatchStream(self, resource_version, deliver)


def peerpods_source(client: KubeClient, namespace: str | None = None, server_timeout: int = 300,
                    label_selector: str | None = None) -> ResourceWatchSource:
    """PeerPods cluster-wide (namespace None, the controller) or in one namespace."""
    if namespace is None:
        return ResourceWatchSource(client, client.custom.list_cluster_custom_object, PEERPOD_GROUP,
                                   PEERPOD_VERSION, PEERPOD_PLURAL, server_timeout=server_timeout,
                                   label_selector=label_selector)
    return ResourceWatchSource(client, client.custom.list_namespaced_custom_object, PEERPOD_GROUP,
                               PEERPOD_VERSION, namespace, PEERPOD_PLURAL, server_timeout=server_timeout,
                               label_selector=label_selector)


def namespaced_source(client: KubeClient, kind: str, namespace: str, server_timeout: int = 300,
                      field_selector: str | None = None) -> ResourceWatchSource:
    """ConfigMaps, Secrets or Pods ("config_map", "secret", "pod") of one namespace, e.g.
    `field_selector="metadata.name=peer-pods-cm"` to follow one object."""
    fn = getattr(client.core, f"list_namespaced_{kind}")
    return ResourceWatchSource(client, fn, namespace, server_timeout=server_timeout, field_selector=field_selector)


def _key(obj: JSONObject) -> str:
    meta = obj.get("metadata", {})
    return str(meta.get("uid") or f"{meta.get('namespace', '')}/{meta.get('name', '')}")


class Watcher(Service):
    """Keeps `on_event` in step with a collection (see the module docstring). `known` holds the current
    objects by uid; `whenSynced()` fires after the first list was delivered."""

    _log = Logger()

    def __init__(self, source: IWatchSource, clock: IReactorTime, on_event: Callable[[WatchEvent], object],
                 name: str = "watch", backoff: Callable[[int], float] | None = None) -> None:
        self.setName(name)
        self.source = source
        self.clock = clock
        self.on_event = on_event
        self.backoff = backoff or backoffPolicy(initialDelay=0.5, maxDelay=30.0, factor=2.0)
        self.known: dict[str, JSONObject] = {}
        self.resource_version = ""
        self.synced = False
        self.failures = 0
        self._gone_streak = 0
        self._synced = Notifier[None]()
        self._stream: IWatchStream | None = None
        self._sleep: Deferred[None] | None = None
        self._running_loop: Deferred[None] | None = None

    def whenSynced(self) -> Deferred[None]:
        if self.synced:
            return succeed(None)
        return self._synced.wait()

    def startService(self) -> None:
        super().startService()
        self._running_loop = Deferred.fromCoroutine(self._loop())

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._sleep is not None:
            self._sleep.cancel()
        if self._stream is not None:
            self._stream.stop()
        return self._running_loop

    async def _loop(self) -> None:
        need_list = True
        while self.running:
            try:
                if need_list:
                    listing = await self.source.list()
                    if not self.running:
                        break
                    self._relist(listing)
                    need_list = False
                    self.failures = 0
                self._stream = self.source.watch(self.resource_version, self._deliver)
                await self._stream.done
                continue  # the server ended the watch (its timeout): watch on from the last resourceVersion
            except Gone as e:
                need_list = True
                self._gone_streak += 1
                self._log.info("{name}: {error}; listing again", name=self.name, error=e)
                if self._gone_streak == 1:
                    continue  # a first Gone is routine (compaction): list again at once
                error: Exception = e
            except CancelledError:
                continue
            except Exception as e:
                error = e
            finally:
                self._stream = None
            if not self.running:
                break
            await self._back_off(error)

    async def _back_off(self, error: Exception) -> None:
        self.failures += 1
        delay = self.backoff(self.failures)
        self._log.warn("{name}: {error}; retrying in {delay:.1f}s (attempt {attempt})", name=self.name,
                       error=error, delay=delay, attempt=self.failures)
        self._sleep = deferLater(self.clock, delay)
        try:
            await self._sleep
        except CancelledError:
            pass  # stopService
        finally:
            self._sleep = None

    def _emit(self, event: WatchEvent) -> None:
        try:
            self.on_event(event)
        except Exception:
            self._log.failure("{name}: event handler failed on {type}", name=self.name, type=event.type)

    def _relist(self, listing: JSONObject) -> None:
        current = {_key(obj): obj for obj in listing.get("items") or []}
        before, self.known = self.known, {}
        self.resource_version = resource_version_of(listing)
        for key, obj in current.items():
            self.known[key] = obj
            old = before.get(key)
            if old is None:
                self._emit(WatchEvent(ADDED, obj))
            elif resource_version_of(old) != resource_version_of(obj):
                self._emit(WatchEvent(MODIFIED, obj))
        for key, obj in before.items():
            if key not in current:
                self._emit(WatchEvent(DELETED, obj))
        if not self.synced:
            self.synced = True
            self._synced.notify(None)

    def _deliver(self, raw: JSONObject) -> None:
        if not self.running:
            return
        kind, obj = raw.get("type", ""), raw.get("object") or {}
        self.failures = 0
        self._gone_streak = 0
        rv = resource_version_of(obj)
        if rv:
            self.resource_version = rv
        if kind == BOOKMARK:
            return
        if kind == DELETED:
            self.known.pop(_key(obj), None)
        elif kind in (ADDED, MODIFIED):
            self.known[_key(obj)] = obj
        else:
            self._log.warn("{name}: unknown watch event type {type}", name=self.name, type=kind)
            return
        self._emit(WatchEvent(kind, obj))


__all__ = ["ADDED", "BOOKMARK", "DELETED", "MODIFIED", "ResourceWatchSource", "WatchEvent", "Watcher",
           "namespaced_source", "peerpods_source"]

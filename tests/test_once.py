"""caa.once.Once: one computation shared by concurrent first callers, kept after success, retried after failure."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from caa.once import Once


class OnceTests(TestCase):
    def setUp(self) -> None:
        self.pending: list[Deferred[int]] = []
        self.once = Once(self.compute)

    def compute(self) -> Deferred[int]:
        self.pending.append(Deferred())
        return self.pending[-1]

    def get(self) -> Deferred[int]:
        return Deferred.fromCoroutine(self.once.get())

    def test_concurrent_first_callers_share_one_computation(self) -> None:
        first, second = self.get(), self.get()
        self.assertEqual(len(self.pending), 1)
        self.assertNoResult(first)
        self.pending[0].callback(7)
        self.assertEqual((self.successResultOf(first), self.successResultOf(second)), (7, 7))
        self.assertEqual(self.successResultOf(self.get()), 7)
        self.assertEqual(len(self.pending), 1)  # never computed again
        self.assertTrue(self.once.done)

    def test_a_failure_is_not_kept(self) -> None:
        first, second = self.get(), self.get()
        self.pending[0].errback(RuntimeError("cloud unreachable"))
        self.failureResultOf(first, RuntimeError)
        # the waiter behind the lock tries again itself rather than inheriting the failure
        self.assertEqual(len(self.pending), 2)
        self.assertFalse(self.once.done)
        self.pending[1].callback(3)
        self.assertEqual(self.successResultOf(second), 3)
        self.assertEqual(self.successResultOf(self.get()), 3)
        self.assertEqual(len(self.pending), 2)

    def test_none_is_a_value(self) -> None:
        once: Once[None] = Once(lambda: Deferred.fromCoroutine(_none()))
        self.assertIsNone(self.successResultOf(Deferred.fromCoroutine(once.get())))
        self.assertTrue(once.done)


async def _none() -> None:
    return None

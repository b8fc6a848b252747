"""``tests.cluster.wait_until``: what a condition that raises does to the wait (session 75).

The project CI on 2f4605d0 failed on a wait whose condition looked for node1's client view with
``next()`` before the node's first report was stored: the StopIteration came out of the wait
bare, naming neither the wait nor the cause. A state merely not there yet is the condition's
False (or an exception the wait names as ``not_yet``); any other exception still fails the wait
at once, with what it waited for."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.cluster import wait_until


def counting(outcomes: list[bool | Exception]) -> tuple[Callable[[], bool], list[int]]:
    """A condition that gives ``outcomes`` in turn (an exception is raised), the last again."""
    calls = [0]

    def condition() -> bool:
        outcome = outcomes[min(calls[0], len(outcomes) - 1)]
        calls[0] += 1
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return condition, calls


def test_a_next_without_a_default_that_finds_nothing_fails_the_wait_at_once_naming_it() -> None:
    views: list[dict[str, str]] = []  # node1 not reported yet

    def reported() -> bool:
        return next(v for v in views if v["node"] == "node1")["state"] == "done"

    with pytest.raises(AssertionError) as caught:
        wait_until(reported, 5, "node1 reported", interval=0.01)
    assert str(caught.value).startswith("node1 reported: the condition's next() found nothing")
    assert isinstance(caught.value.__cause__, StopIteration)


def test_a_not_yet_exception_is_waited_through_until_the_condition_holds() -> None:
    condition, calls = counting([KeyError("node1"), StopIteration(), False, True])
    wait_until(condition, 30, "node1 reported", interval=0.01, not_yet=(KeyError, StopIteration))
    assert calls == [4]


def test_a_wait_that_ends_in_a_not_yet_exception_names_it() -> None:
    condition, calls = counting([False, KeyError("node_clients")])
    with pytest.raises(TimeoutError) as caught:
        wait_until(condition, 0.2, "node1 reported", interval=0.01, not_yet=(KeyError,))
    assert str(caught.value) == (
        "node1 reported: not within 0.2 s (the last look: KeyError: 'node_clients')"
    )
    assert isinstance(caught.value.__cause__, KeyError)
    assert calls[0] > 2


def test_a_not_yet_exception_followed_by_a_plain_false_is_not_named() -> None:
    condition, _calls = counting([KeyError("x"), False])
    with pytest.raises(TimeoutError) as caught:
        wait_until(condition, 0.2, "node1 reported", interval=0.01, not_yet=(KeyError,))
    assert str(caught.value) == "node1 reported: not within 0.2 s"


@pytest.mark.parametrize("not_yet", [(), (KeyError,)])
def test_any_other_exception_fails_the_wait_at_once(not_yet: tuple[type[Exception], ...]) -> None:
    condition, calls = counting([ValueError("a real failure"), True])
    with pytest.raises(ValueError, match="a real failure"):
        wait_until(condition, 30, "node1 reported", interval=0.01, not_yet=not_yet)
    assert calls == [1]

"""Start a coroutine at once, in the caller's turn of the loop; a Task only if it suspends.

A server handler that answers without waiting (the common small request) then replies from the
progress callback that received its header: no task, no extra loop turn. This is Python 3.12's
``asyncio.eager_task_factory``, for one call site and for 3.11.
"""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any, Coroutine


def run_eagerly(coro: Coroutine[Any, Any, Any]) -> asyncio.Task | None:
    """Run ``coro`` until it first suspends. None if it finished (its result is dropped, its
    exception raised here); otherwise a Task that goes on with it (cancel it like any task).
    The coroutine runs in a copy of the current context, as a Task's would."""
    context = contextvars.copy_context()
    try:
        waiting_on = context.run(coro.send, None)
    except StopIteration:
        return None
    return asyncio.get_running_loop().create_task(_Resume(coro, waiting_on).run(),
                                                  context=context)


class _Resume:
    """Awaitable that hands the driving of a started coroutine over to the awaiting Task: it
    yields what the coroutine yielded (the future it waits on), then relays sends and throws."""

    __slots__ = ("_coro", "_waiting_on")

    def __init__(self, coro: Coroutine[Any, Any, Any], waiting_on: Any) -> None:
        self._coro = coro
        self._waiting_on = waiting_on

    async def run(self) -> Any:
        return await self

    def __await__(self):
        coro, waiting_on = self._coro, self._waiting_on
        self._coro = self._waiting_on = None
        while True:
            try:
                value = yield waiting_on
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as e:  # the Task throws cancellation in: the coroutine gets it
                try:
                    waiting_on = coro.throw(e)
                except StopIteration as stop:
                    return stop.value
            else:
                try:
                    waiting_on = coro.send(value)
                except StopIteration as stop:
                    return stop.value

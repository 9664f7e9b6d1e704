"""transport.eager: a coroutine starts in the caller's turn; a task only once it waits."""

from __future__ import annotations

import asyncio
import contextvars

import pytest

from transport.eager import run_eagerly

VAR = contextvars.ContextVar("VAR", default="outside")


async def test_coroutine_that_never_waits_runs_to_the_end_at_once():
    steps = []

    async def quick():
        steps.append("ran")

    assert run_eagerly(quick()) is None
    assert steps == ["ran"]


async def test_coroutine_that_waits_starts_at_once_and_finishes_in_a_task():
    steps, gate = [], asyncio.get_running_loop().create_future()

    async def slow():
        steps.append("started")
        value = await gate
        steps.append(value)
        await asyncio.sleep(0)
        return "done"

    task = run_eagerly(slow())
    assert steps == ["started"] and isinstance(task, asyncio.Task) and not task.done()
    gate.set_result("resumed")
    assert await task == "done"
    assert steps == ["started", "resumed"]


async def test_error_before_the_first_wait_is_raised_by_the_call():
    async def broken():
        raise KeyError("early")

    with pytest.raises(KeyError, match="early"):
        run_eagerly(broken())


async def test_error_after_a_wait_is_the_task_result():
    async def broken_later():
        await asyncio.sleep(0)
        raise KeyError("late")

    with pytest.raises(KeyError, match="late"):
        await run_eagerly(broken_later())


async def test_cancelling_the_task_cancels_the_coroutine():
    cleaned = asyncio.Event()

    async def waits_forever():
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.set()

    task = run_eagerly(waits_forever())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cleaned.is_set() and task.cancelled()


async def test_context_changes_stay_inside_like_a_task():
    async def sets_var():
        VAR.set("inside")
        await asyncio.sleep(0)
        return VAR.get()

    task = run_eagerly(sets_var())
    assert VAR.get() == "outside"  # set before the coroutine's first wait
    assert await task == "inside"

"""The progress driver's sleep policy, against a stand-in UCX worker (no sockets): after a linger
it polls until the deadline, then sleeps in epoll; without one an idle driver sleeps at once."""

from __future__ import annotations

import asyncio
import os

import pytest

from transport.progress import Progress


class _Worker:
    """Counts progress() and arm() calls; arm() succeeds (nothing pending), as on an idle worker."""

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()  # never written: the driver never wakes from it
        self.epoll_file_descriptor = self._read_fd
        self.num_progress = 0
        self.num_arm = 0

    def init_blocking_progress_mode(self) -> None:
        pass

    def progress(self) -> None:
        self.num_progress += 1

    def arm(self) -> bool:
        self.num_arm += 1
        return True

    def close(self) -> None:
        os.close(self._read_fd)
        os.close(self._write_fd)


@pytest.fixture
async def driver():
    worker = _Worker()
    progress = Progress(worker, asyncio.get_running_loop(), spin_us=0)
    yield worker, progress
    progress.close()
    worker.close()


async def test_idle_driver_sleeps_at_once(driver):
    worker, progress = driver
    progress.kick(spin=False)
    await asyncio.sleep(0.05)
    assert worker.num_progress == 1 and worker.num_arm == 1  # one turn, then asleep in epoll


async def test_linger_polls_until_its_deadline_then_sleeps(driver):
    worker, progress = driver
    progress.linger(0.1)
    await asyncio.sleep(0.02)
    polled = worker.num_progress
    assert polled >= 2 and worker.num_arm == 0  # polling, never armed
    await asyncio.sleep(0.15)
    assert worker.num_arm == 1  # the deadline passed: armed once, asleep
    settled = worker.num_progress
    await asyncio.sleep(0.05)
    assert worker.num_progress == settled  # no more polling once asleep


async def test_linger_zero_ends_an_earlier_linger(driver):
    worker, progress = driver
    progress.linger(10.0)
    await asyncio.sleep(0.01)
    assert worker.num_arm == 0
    progress.linger(0)
    await asyncio.sleep(0.01)
    assert worker.num_arm == 1
    settled = worker.num_progress
    await asyncio.sleep(0.05)
    assert worker.num_progress == settled


class _Receive:
    completed = False

    def check_error(self) -> None:
        pass


async def test_a_message_ends_the_linger(driver):
    worker, progress = driver
    received = []
    incoming = _Receive()
    progress.watch(incoming, received.append)
    progress.linger(10.0)
    await asyncio.sleep(0.01)
    assert worker.num_arm == 0 and not received
    incoming.completed = True  # the message it lingered for
    await asyncio.sleep(0.01)
    assert received == [incoming] and worker.num_arm == 1
    settled = worker.num_progress
    await asyncio.sleep(0.05)
    assert worker.num_progress == settled


async def test_a_callback_may_linger_anew(driver):
    worker, progress = driver
    incoming = _Receive()
    progress.watch(incoming, lambda _: progress.linger(10.0))  # a server answering, then expecting more
    incoming.completed = True
    await asyncio.sleep(0.02)
    assert worker.num_arm == 0 and worker.num_progress >= 2


async def test_a_linger_for_one_reply_outlasts_other_messages(driver):
    worker, progress = driver
    other = _Receive()
    progress.watch(other, lambda _: None)
    progress.linger(10.0, any_message=False)  # a thread waiting for one reply among several
    other.completed = True
    await asyncio.sleep(0.02)
    assert worker.num_arm == 0  # still polling
    progress.linger(0)
    await asyncio.sleep(0.01)
    assert worker.num_arm == 1

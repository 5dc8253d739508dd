"""OrderedPool: results in input order whatever the worker count, and a worker that dies (even
halfway through sending its result) or raises ends the map at once with a clear error."""
import os
import signal
import time

import pytest

from megatron_snm.data.worker_pool import OrderedPool, WorkerDied, WorkerFailed


def slow_square(x):
    time.sleep(0.001 * (x % 5))  # finish out of order
    return x * x


def test_results_come_in_input_order():
    with OrderedPool(slow_square, workers=3) as pool:
        assert list(pool.map(range(50))) == [x * x for x in range(50)]
    with OrderedPool(slow_square, workers=1) as pool:
        assert list(pool.map(iter([]))) == []


def big_second_result(x):
    if x == 1:
        time.sleep(0.1)  # after item 0's result, so the main process is not reading this one yet
        return b"x" * (16 << 20)  # far more than a pipe holds: the send blocks, half done
    return x


def test_worker_killed_halfway_through_sending_ends_the_map_at_once():
    """The hang of concurrent.futures: a half-sent result in a pipe other workers keep open."""
    with OrderedPool(big_second_result, workers=2) as pool:
        results = []
        with pytest.raises(WorkerDied, match=r"worker 1 \(pid \d+\) died \(killed by SIGKILL"):
            for r in pool.map(range(6)):
                results.append(r)
                if r == 0:  # while we hold on to result 0, worker 1 blocks in the middle of its send
                    time.sleep(1.0)
                    holder = next(w for w in pool._workers if w.sequence == 1)
                    os.kill(holder.process.pid, signal.SIGKILL)
                    killed_at = time.monotonic()
        assert time.monotonic() - killed_at < 5
    assert results == [0]


def raise_on_three(x):
    if x == 3:
        raise ValueError("bad item 3")
    return x


def test_an_exception_in_a_worker_is_reported_with_its_traceback():
    with OrderedPool(raise_on_three, workers=2) as pool:
        with pytest.raises(WorkerFailed, match=r"(?s)raised:.*ValueError: bad item 3"):
            list(pool.map(range(6)))


def test_close_reaps_every_worker():
    pool = OrderedPool(slow_square, workers=2)
    processes = [w.process for w in pool._workers]
    assert list(pool.map(range(4))) == [0, 1, 4, 9]
    pool.close()
    assert all(not p.is_alive() for p in processes)

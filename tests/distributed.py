"""Runs a function in N CPU processes joined by a gloo process group.

The processes are started once per world size and reused by every test (starting Python and
importing torch costs seconds per process); a failed or stuck call takes its pool down, and the
next call starts a fresh one.
"""

import atexit
import datetime
import os
import queue
import socket
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
CALL_TIMEOUT_SECONDS = 180
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)  # a rank left waiting in a collective errors out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, tasks, results):
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "tests"))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT)
    while (task := tasks.get()) is not None:
        fn, args = task
        try:
            torch.manual_seed(0)
            results.put((rank, True, fn(rank, world_size, *args)))
        except BaseException:
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class _Pool:
    def __init__(self, world_size: int):
        ctx = mp.get_context("spawn")
        self.world_size, self.tasks, self.results = world_size, [ctx.Queue() for _ in range(world_size)], ctx.Queue()
        port = _free_port()
        self.procs = [ctx.Process(target=_worker, args=(r, world_size, port, self.tasks[r], self.results), daemon=True) for r in range(world_size)]
        for p in self.procs:
            p.start()

    def run(self, fn, args) -> list:
        for q in self.tasks:
            q.put((fn, args))
        out = [None] * self.world_size
        for _ in range(self.world_size):
            try:
                rank, ok, value = self.results.get(timeout=CALL_TIMEOUT_SECONDS)
            except queue.Empty:
                raise TimeoutError(f"distributed call {fn.__name__} did not finish in {CALL_TIMEOUT_SECONDS}s") from None
            if not ok:  # the other ranks may wait in a collective for this one: fail now
                raise AssertionError(f"{fn.__name__} failed on rank {rank}:\n{value}")
            out[rank] = value
        return out

    def close(self):
        for q in self.tasks:
            q.put(None)
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


_pools: dict[int, _Pool] = {}


def run_distributed(fn, world_size: int, *args) -> list:
    """fn(rank, world_size, *args) in each process; returns the list of their return values.
    An exception on any rank fails the call with that rank's traceback."""
    pool = _pools.get(world_size) or _pools.setdefault(world_size, _Pool(world_size))
    try:
        return pool.run(fn, args)
    except BaseException:
        _pools.pop(world_size)
        for p in pool.procs:  # a rank may be stuck in a collective: do not reuse the pool
            p.kill()
        raise


@atexit.register
def _close_pools():
    for pool in _pools.values():
        pool.close()

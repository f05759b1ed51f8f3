"""The reader's read-ahead: a thread that reads samples into a queue bounded in bytes, and the
pool of member buffers it reads into.

- :class:`BufferPool` — reuses the memory of members whose samples the consumer dropped.
- :class:`BytesQueue` — the FIFO between the thread and the consumer, bounded by the bytes in
  flight (queued, or handed out and not yet released).
- :func:`threaded` — drives a producer (an iterator) in a background thread through that
  queue; errors raised there are raised in the consumer.

Nothing here knows about shards: :mod:`dataengine.reader` hands in the producer and how to
measure an item.
"""

from __future__ import annotations

import collections
import ctypes
import threading
import weakref
from typing import Any, Callable, Iterator

import numpy as np
import torch

_QUEUE_LOW = 2 << 20


class BufferPool:
    """Reuses the memory of members whose samples the consumer has dropped.

    A fresh buffer per member costs a page fault and a page of zeroing per 4 KiB: about a
    tenth of the read. So the pool keeps up to ``max_bytes`` of memory blocks and hands each
    out as a *lease*: :meth:`get` returns a uint8 array whose base is a ctypes array over the
    block. numpy views and torch tensors made from it (``torch.from_numpy``, slices, views of
    views) all keep that lease alive, so the lease dies exactly when the last of them does;
    a weak reference to it then puts the block back on the free list. Ownership is therefore
    explicit in the object graph — the pool never inspects reference counts — and a block
    can never be written while anything can still see it. (An interpreter that frees later,
    or a reference cycle, only delays the reuse.)

    Of the free blocks of a size, the one freed last is taken: it was read by the consumer
    last, so it is the likeliest still in the CPU cache (cycling through the whole pool
    instead writes into memory that has left the cache: a third more than the read itself).
    Past ``max_bytes``, buffers are plain allocations the consumer owns outright.
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        """Memory the pool owns (free and leased)."""
        self.free: dict[int, list[np.ndarray]] = {}
        """Per size, the blocks no lease holds, the last freed at the end."""
        self.reused = 0
        self._leases: dict[int, weakref.ref] = {}
        """The weak references whose callbacks return blocks (kept here so that they fire)."""
        self._lock = threading.RLock()  # RLock: a callback may run in a thread inside get()

    def get(self, size: int) -> np.ndarray:
        """A writable uint8 array of ``size`` bytes that nothing else can see."""
        with self._lock:
            ring = self.free.get(size)
            block = ring.pop() if ring else None
        if block is not None:
            self.reused += 1
        else:
            block = np.empty(size, dtype=np.uint8)
            if self.bytes + size > self.max_bytes:
                return block
            self.bytes += size
        lease = (ctypes.c_uint8 * size).from_buffer(block)
        ref = weakref.ref(lease, lambda ref, block=block: self._returned(ref, block))
        with self._lock:
            self._leases[id(ref)] = ref
        return np.frombuffer(lease, dtype=np.uint8)

    def _returned(self, ref: weakref.ref, block: np.ndarray) -> None:
        with self._lock:
            self._leases.pop(id(ref), None)
            self.free.setdefault(len(block), []).append(block)

    @property
    def leased(self) -> int:
        """Blocks handed out and still held by someone."""
        return len(self._leases)


def sample_nbytes(sample: dict[str, Any]) -> int:
    """Roughly the memory a decoded sample holds (tensors and bytes; 1 KiB for the rest)."""
    total = 1024  # the dict, key and json, roughly
    for value in sample.values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif isinstance(value, (bytes, bytearray)):
            total += len(value)
    return total


class BytesQueue:
    """A FIFO between the prefetch thread and the consumer, bounded by the bytes of the
    items in it or handed out and not yet released (one item may exceed the bound).

    A consumer that finds it empty waits until ``low`` bytes are ready (or the producer
    finished, or is blocked) and takes all of it: one wake-up and GIL hand-off per few
    samples rather than per small sample. ``low`` is kept small (2 MiB at most), not a
    fraction of the bound: every byte in flight is a member buffer the pool cannot reuse,
    and a consumer that waits for a large batch keeps tens of MiB in flight, so the
    producer writes into memory that has left the CPU cache (measured: a quarter of 64
    MiB cost a fifth of the throughput).
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.low = max(1, min(max_bytes // 4, _QUEUE_LOW))
        self.items: collections.deque = collections.deque()
        self.bytes = 0
        self.peak_bytes = 0
        self.cond = threading.Condition()
        self.closed = False
        self.done = False
        self.blocked = False
        self.started = False

    def put(self, item: Any, size: int, last: bool = False) -> bool:
        with self.cond:
            while self.bytes and self.bytes + size > self.max_bytes and not self.closed:
                self.blocked = True
                self.cond.notify_all()
                self.cond.wait()
            self.blocked = False
            if self.closed:
                return False
            self.items.append((item, size))
            self.bytes += size
            self.peak_bytes = max(self.peak_bytes, self.bytes)
            self.done = self.done or last
            if self.bytes >= self.low or last or not self.started:
                self.cond.notify_all()
            return True

    def take(self) -> list[tuple[Any, int]]:
        """Everything queued, once there is enough; release each item's size when done."""
        with self.cond:
            while not self.items or not (self.bytes >= self.low or self.done or self.blocked
                                         or not self.started):
                self.cond.wait()
            self.started = True
            out = list(self.items)
            self.items.clear()
            return out

    def release(self, size: int) -> None:
        with self.cond:
            self.bytes -= size
            if self.blocked:
                self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.items.clear()
            self.bytes = 0
            self.cond.notify_all()


_END = object()


def threaded(produced: Iterator[Any], queue: BytesQueue, size_of: Callable[[Any], int]) -> Iterator[Any]:
    """Drive the producer in a background thread that reads ahead into a bytes-bounded queue.

    Closing the returned iterator (or finishing it) stops and joins the thread, which closes
    the producer in the thread that runs it."""
    def run() -> None:
        try:
            for item in produced:
                if not queue.put(item, size_of(item)):
                    return  # the consumer stopped
                del item  # not held while the next sample is read: its buffers may be reused
            queue.put(_END, 0, last=True)
        except BaseException as exc:  # handed to the consumer and raised there
            queue.put(exc, 0, last=True)
        finally:
            produced.close()  # in this thread, which runs it: closes the open shard

    thread = threading.Thread(target=run, name="ShardReader-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            batch = collections.deque(queue.take())
            while batch:
                # popped, not iterated: a sample the consumer dropped must not stay referenced
                # here, or the pool cannot reuse its buffers while the batch lasts
                item, size = batch.popleft()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
                del item
                queue.release(size)
    finally:
        queue.close()
        thread.join()

"""The local engines' wait queue: one FIFO per client, served round-robin, so one client flooding the service cannot
starve the others.

Why round-robin and not one FIFO: a client that queues fifty requests ahead of another's one would otherwise make
that one wait for all fifty. Here the next free slot goes to the next client in the rotation that has a request
waiting, so the other client waits for at most one request of each client ahead of it in the rotation. A client
served goes to the back of the rotation; a client with nothing waiting leaves it, and comes back at the back.

Not thread-safe: each engine calls it under its own lock.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")
Client = Hashable  # GenerationRequest.client: an opaque name, or None for requests without one


class FairQueue(Generic[T]):
    """Per-client FIFO queues, taken round-robin across clients."""

    def __init__(self) -> None:
        # Insertion order is the rotation: the first client with an item (and room, see `pop`) is served next.
        self._queues: dict[Client, collections.deque[T]] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def push(self, client: Client, item: T) -> None:
        """Queue `item` behind `client`'s other waiting items (a new client joins the rotation at the back)."""
        self._queues.setdefault(client, collections.deque()).append(item)
        self._size += 1

    def peek(self, eligible: Callable[[Client], bool] | None = None) -> T | None:
        """The item `pop` would take, left in place (the batched engine checks that it fits memory first)."""
        for client, queue in self._queues.items():
            if eligible is None or eligible(client):
                return queue[0]
        return None

    def pop(self, eligible: Callable[[Client], bool] | None = None) -> T | None:
        """The oldest item of the next client in the rotation that has one and is `eligible` (the per-client cap:
        a client at it keeps its items waiting while the others are served); None when there is none."""
        for client, queue in self._queues.items():
            if eligible is None or eligible(client):
                item = queue.popleft()
                del self._queues[client]  # served: to the back of the rotation, or out of it when empty
                if queue:
                    self._queues[client] = queue
                self._size -= 1
                return item
        return None

    def remove(self, client: Client, item: T) -> bool:
        """Take `item` out of the queue (a request cancelled while waiting); False if it is not waiting."""
        queue = self._queues.get(client)
        if queue is None:
            return False
        try:
            queue.remove(item)
        except ValueError:
            return False
        if not queue:
            del self._queues[client]
        self._size -= 1
        return True

    def drop_stale(self, stale: Callable[[T], bool]) -> list[T]:
        """Take out every client's oldest items while `stale` says so (cancelled, or past QUEUE_TIMEOUT): each
        client's queue is in arrival order, so its oldest items are the first to go stale."""
        dropped: list[T] = []
        for client in list(self._queues):
            queue = self._queues[client]
            while queue and stale(queue[0]):
                dropped.append(queue.popleft())
            if not queue:
                del self._queues[client]
        self._size -= len(dropped)
        return dropped

    def take_all(self) -> list[T]:
        """Empty the queue (shutdown): every waiting item, client by client."""
        items = [item for queue in self._queues.values() for item in queue]
        self._queues.clear()
        self._size = 0
        return items

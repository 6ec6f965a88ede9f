"""Live updates: the status database's ``_changes``, fanned out to browsers.

One :class:`UserFeed` per set of credentials follows the status database's
continuous ``_changes`` feed (``Accept-Encoding: identity``, see
:mod:`himbeere.couch`) in a thread of its own, *as that user*, so CouchDB's
rules decide what anyone sees.  Every browser tab of that user is a
:class:`Subscriber` with a bounded queue; the server-sent-events view drains
it.  Events say *which* documents changed, never what is in them: a page
fetches what it shows through the JSON API, and a log ring of 1000 lines
is not pushed to every tab each second.

Events (each one ``data:`` line of JSON)::

    {"type": "changes", "ids": ["status:1234", "log:1234:1234:blink"]}
    {"type": "resync"}      # the feed (re)connected or a queue overflowed: refetch all
    {"type": "offline", "error": "..."}     # the server is unreachable; retrying
    {"type": "unauthorized", "error": "..."}  # sign in again

A feed stops when its last subscriber leaves (its thread notices at the
next heartbeat from CouchDB, within ``FEED_TIMEOUT / 3`` seconds).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Iterator
from typing import Any, Callable, Hashable

from himbeere.component import Backoff
from himbeere.couch import Database, Seq
from himbeere.exceptions import CouchError, Unauthorized

log = logging.getLogger(__name__)

#: Seconds of silence from CouchDB after which the feed counts as dead; the
#: server sends a heartbeat every third of it, which is also how soon a feed
#: without subscribers notices that it should stop.
FEED_TIMEOUT = 6.0
#: Seconds between keep-alive comments to a browser; a closed tab is noticed
#: when one of them cannot be written.
KEEPALIVE = 15.0
#: Events a subscriber may have waiting before it is told to resync instead.
QUEUE_SIZE = 500

Event = dict[str, Any]


class Subscriber:
    """One browser tab's queue of events."""

    def __init__(self) -> None:
        self.events: queue.Queue[Event] = queue.Queue(QUEUE_SIZE)
        self.overflowed = False

    def put(self, event: Event) -> None:
        try:
            self.events.put_nowait(event)
        except queue.Full:
            self.overflowed = True

    def next_batch(self, timeout: float) -> list[Event]:
        """Wait up to ``timeout`` for events; return them merged (``[]`` on timeout)."""
        try:
            first = self.events.get(timeout=timeout)
        except queue.Empty:
            return []
        batch = [first]
        while True:
            try:
                batch.append(self.events.get_nowait())
            except queue.Empty:
                break
        if self.overflowed:
            self.overflowed = False
            return [{"type": "resync"}]
        return merge(batch)


def merge(events: list[Event]) -> list[Event]:
    """Runs of ``changes`` events become one, with each id once."""
    merged: list[Event] = []
    for event in events:
        if event.get("type") == "changes" and merged and merged[-1].get("type") == "changes":
            ids = merged[-1]["ids"]
            ids.extend(i for i in event["ids"] if i not in ids)
        elif event.get("type") == "changes":
            merged.append({"type": "changes", "ids": list(dict.fromkeys(event["ids"]))})
        else:
            merged.append(event)
    return merged


class UserFeed:
    """Follows one database's ``_changes`` as one user, for that user's tabs."""

    def __init__(self, db: Database, on_idle: Callable[[UserFeed], None]) -> None:
        self.db = db
        self.on_idle = on_idle
        self.subscribers: set[Subscriber] = set()
        self.lock = threading.Lock()
        self.stop = threading.Event()
        user = db.couch.auth[0] if db.couch.auth else "anonymous"
        self.thread = threading.Thread(target=self.run, name=f"live-{user}", daemon=True)
        self.since: Seq = "now"
        #: True while the feed is connected: a new subscriber can resync at once.
        self.connected = False

    def start(self) -> None:
        self.thread.start()

    def broadcast(self, event: Event) -> None:
        with self.lock:
            subscribers = list(self.subscribers)
        for subscriber in subscribers:
            subscriber.put(event)

    def run(self) -> None:
        backoff = Backoff()  # capped and jittered, as the node's feed does
        while not self.stop.is_set():
            try:
                self.follow()
                backoff.reset()
            except Unauthorized as exc:
                log.info("live feed of %s refused: %s", self.db.name, exc)
                self.broadcast({"type": "unauthorized", "error": str(exc)})
                break
            except CouchError as exc:
                self.connected = False
                self.broadcast({"type": "offline", "error": str(exc)})
                wait = backoff.next()
                log.info("live feed of %s broke (%s); reconnecting in %.1f s",
                         self.db.name, exc, wait)
                self.stop.wait(wait)
            except Exception:
                log.exception("live feed of %s failed", self.db.name)
                self.stop.wait(backoff.next())
            if self.idle():
                break
        self.stop.set()
        self.on_idle(self)

    def follow(self) -> None:
        def opened() -> None:
            # Whatever changed before this moment is not in the feed: pages refetch.
            self.connected = True
            self.broadcast({"type": "resync"})

        for change in self.db.follow(self.since, timeout=FEED_TIMEOUT, include_docs=False,
                                     stop=self.stop, on_open=opened):
            if "seq" in change:
                self.since = change["seq"]
            if "id" in change:
                self.broadcast({"type": "changes", "ids": [change["id"]]})
            if self.idle():
                return

    def idle(self) -> bool:
        """No subscriber: stop following (checked at each change or heartbeat)."""
        with self.lock:
            if self.subscribers:
                return False
            self.stop.set()
            return True


class LiveHub:
    """The feeds of one dashboard, one per set of credentials."""

    def __init__(self) -> None:
        self.feeds: dict[Hashable, UserFeed] = {}
        self.lock = threading.Lock()

    def subscribe(self, key: Hashable, db: Database) -> tuple[UserFeed, Subscriber]:
        """A new subscriber to the feed of ``key`` (started if needed)."""
        subscriber = Subscriber()
        with self.lock:
            feed = self.feeds.get(key)
            if feed is not None:
                with feed.lock:
                    if not feed.stop.is_set():
                        feed.subscribers.add(subscriber)
                        if feed.connected:
                            subscriber.put({"type": "resync"})
                        return feed, subscriber
            feed = UserFeed(db, self._forget)
            feed.subscribers.add(subscriber)
            self.feeds[key] = feed
        feed.start()
        return feed, subscriber

    def unsubscribe(self, feed: UserFeed, subscriber: Subscriber) -> None:
        """Forget ``subscriber``; the last one out stops the feed (within a heartbeat)."""
        with feed.lock:
            feed.subscribers.discard(subscriber)
            if not feed.subscribers:
                feed.stop.set()

    def _forget(self, feed: UserFeed) -> None:
        with self.lock:
            for key, known in list(self.feeds.items()):
                if known is feed:
                    del self.feeds[key]

    def close(self, timeout: float = 10.0) -> None:
        """Stop every feed (their threads notice within a heartbeat)."""
        with self.lock:
            feeds = list(self.feeds.values())
        for feed in feeds:
            feed.stop.set()
        for feed in feeds:
            if feed.thread.is_alive():
                feed.thread.join(timeout)


def stream(hub: LiveHub, key: Hashable, db: Database,
           keepalive: float = KEEPALIVE) -> Iterator[str]:
    """The text of a ``text/event-stream`` response for one tab."""
    feed, subscriber = hub.subscribe(key, db)
    try:
        yield "retry: 2000\n\n"
        while True:
            batch = subscriber.next_batch(keepalive)
            if not batch:
                yield ": keep-alive\n\n"
                continue
            for event in batch:
                yield f"data: {json.dumps(event)}\n\n"
                if event.get("type") == "unauthorized":
                    return
            if feed.stop.is_set() and not feed.thread.is_alive():
                return
    finally:
        hub.unsubscribe(feed, subscriber)

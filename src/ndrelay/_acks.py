"""Acknowledgements of a queue consumer: what the application took goes back to the relay.

The application thread only notes, once per batch of units it takes, how far it got
(`took`); a background thread sends that to `POST /streams/{name}/ack`, batched in time
(every `interval`) and in count (a quarter of the stream's window, since unacknowledged
items still count against the stream's `size` and `max_bytes`), as lines of one
long-lived NDJSON request, so an acknowledgement costs a line, not a request.
`finish` acknowledges the last item taken and gives the rest back (`release`).
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from ._exceptions import NDRelayError
from ._http import Endpoint, open_request, read_response

__all__ = ["AckChannel"]

log = logging.getLogger("ndrelay.client")

#: Seconds between acknowledgements while items are taken slowly.
ACK_INTERVAL = 0.1


class AckChannel:
    """The acknowledgements of one consumer id on one stream.

    Args:
        endpoint, path, headers: where `POST .../ack` goes (the client's endpoint).
        consumer: the consumer id.
        window_items, window_bytes: the stream's `size` and `max_bytes` (the relay says
            them in the `ndrelay-size` and `ndrelay-max-bytes` headers).
    """

    def __init__(
        self,
        endpoint: Endpoint,
        path: str,
        headers: dict[str, str],
        consumer: str,
        window_items: int,
        window_bytes: int,
        interval: float = ACK_INTERVAL,
    ) -> None:
        self.endpoint = endpoint
        self.path = path
        self.headers = {"Content-Type": "application/x-ndjson", **headers}
        self.consumer = consumer
        self.interval = interval
        self.every_items = max(1, window_items // 4)
        self.every_bytes = max(1, window_bytes // 4)
        #: most units a reader takes in one go (batched units hold several items)
        self.every_units = self.every_items
        #: (items taken, seq of the last one or None, bytes taken): one tuple, so the
        #: sending thread always sees a consistent triple
        self.taken: tuple[int, int | None, int] = (0, None, 0)
        self._acked = (0, 0)  # (items, bytes) acknowledged
        self._cond = threading.Condition()
        self._stop = False
        self._gone = False  # the relay no longer knows the consumer: nothing to send
        # the acknowledgement request ended unanswered (a relay replica died behind a
        # balancer): the last acknowledgement may be lost with it, so it goes again
        self._again = False
        self._conn: Any = None
        self._thread = threading.Thread(target=self._run, name="ndrelay-acks", daemon=True)
        self._thread.start()

    # -- the application's side -----------------------------------------------------------

    def took(self, items: int, seq: int, nbytes: int) -> None:
        """The application took `items` more items (`nbytes` in all), the last one `seq`."""
        count, _, total = self.taken
        self.taken = (count + items, seq, total + nbytes)
        acked_items, acked_bytes = self._acked
        if (
            count + items - acked_items >= self.every_items
            or total + nbytes - acked_bytes >= self.every_bytes
        ):
            with self._cond:
                self._cond.notify()

    def flush(self, received_items: int, received_bytes: int) -> None:
        """The application is about to wait for more: if what it holds unacknowledged
        may be what keeps the relay from sending (half the threshold), send it now."""
        count, _, total = self.taken
        acked_items, acked_bytes = self._acked
        if count > acked_items and (
            2 * (count - acked_items) >= self.every_items
            or 2 * (total - acked_bytes) >= self.every_bytes
        ):
            with self._cond:
                self._cond.notify()

    # -- the sending thread ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                if not self._stop:
                    self._cond.wait(self.interval)
                if self._stop:
                    return
            if self._conn is not None and self._conn.readable_now():
                self._again = self._answer() is None  # cut, not answered
            count, seq, total = self.taken
            if (count > self._acked[0] or self._again) and seq is not None and not self._gone:
                if self._send({"consumer": self.consumer, "upto": seq}):
                    self._acked = (count, total)
                    self._again = False

    def _send(self, ack: dict[str, Any], last: bool = False) -> bool:
        """Write one acknowledgement line (opening the request if needed)."""
        line = (json.dumps(ack) + "\n").encode()
        chunk = b"%x\r\n%s\r\n" % (len(line), line)
        for attempt in range(2):
            try:
                if self._conn is None:
                    self._conn, self._url = open_request(
                        self.endpoint, "POST", self.path, self.headers, chunked_body=True
                    )
                elif self._conn.readable_now():  # the relay answered early: a refusal
                    self._answer()
                    return False
                self._conn.send_buffers([chunk, b"0\r\n\r\n"] if last else [chunk])
                return True
            except (OSError, NDRelayError) as exc:
                self._close()
                if attempt:
                    log.info("acknowledgement to %s failed: %s", self.path, exc)
        return False

    def _answer(self) -> dict[str, Any] | None:
        """Read the relay's answer to the acknowledgement request, then close it."""
        conn, self._conn = self._conn, None
        try:
            response = read_response(conn, self._url)
            body = json.loads(response.read_all() or b"null")
        except (OSError, NDRelayError, ValueError):
            return None
        finally:
            conn.close()
        if response.status == 404:
            self._gone = True  # released, or its lease ran out: the relay moved on
        elif response.status != 200:
            log.info("acknowledgement refused (%s): %s", response.status, body)
        return body if isinstance(body, dict) else None

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    # -- the end ---------------------------------------------------------------------------

    def finish(self, release: bool = True, timeout: float = 5.0) -> dict[str, Any] | None:
        """Acknowledge the last item taken and (with `release`) give back the rest; stop
        the sending thread. Returns the relay's answer, or `None` if it could not be had.
        """
        with self._cond:
            self._stop = True
            self._cond.notify()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)
        if self._gone:
            self._close()
            return None
        _, seq, _ = self.taken
        ack: dict[str, Any] = {"consumer": self.consumer, "upto": seq}
        if release:
            ack["release"] = True
        elif seq is None:
            self._close()
            return None
        try:
            if not self._send(ack, last=True):
                return None
            self._conn.sock.settimeout(timeout)
            return self._answer()
        finally:
            self._close()

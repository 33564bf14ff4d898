"""Acknowledgements of a queue consumer: what the application took goes back to the relay.

The application thread notes, once per batch of units it takes, how far it got (`took`).
Acknowledgements go to `POST /streams/{name}/ack` as lines of one long-lived NDJSON
request, so one costs a line, not a request; they are batched in count (half the
stream's window, since unacknowledged items still count against the stream's `size` and
`max_bytes`: the relay always has the other half to send ahead, and a consumer that waits
for more has always acknowledged enough for the relay to send it) and in time (every
`interval`). A count-due line is written by the thread that took the items, on the open
connection (a small `send`: no hand-off to another thread, whose wake-up would wait for
the interpreter lock while the relay waits for room); a background thread sends the
time-due ones, and opens (and reopens) the connection. `finish` acknowledges the last
item taken and gives the rest back (`release`).
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

#: An acknowledgement goes out once the items taken and not yet acknowledged reach this
#: fraction of the stream's window (`size` items or `max_bytes`, 1/2): the relay then has
#: the other half to send ahead. Every acknowledgement wakes the relay's producer for a
#: refill; halves measured fewer of those per item than quarters, and faster throughput.
ACK_FRACTION = 2


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
        self._consumer_json = json.dumps(consumer).encode()
        self.interval = interval
        self.every_items = max(1, window_items // ACK_FRACTION)
        self.every_bytes = max(1, window_bytes // ACK_FRACTION)
        #: most units a reader takes in one go (batched units hold several items)
        self.every_units = self.every_items
        #: (items taken, seq of the last one or None, bytes taken): one tuple, so the
        #: sending thread always sees a consistent triple
        self.taken: tuple[int, int | None, int] = (0, None, 0)
        self._acked = (0, 0)  # (items, bytes) acknowledged
        self._cond = threading.Condition()
        self._sending = threading.Lock()  # one writer of the connection at a time
        self._stop = False
        self._gone = False  # the relay no longer knows the consumer: nothing to send
        self._resend = False  # a line may have been lost with its connection: send again
        self._conn: Any = None
        #: how many times the stream's reader connected again (`resumed`); and what it was
        #: when the open acknowledgement connection was opened
        self._epoch = 0
        self._conn_epoch = 0
        self._newest: int | None = None  # `upto` of the newest line written
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
            self._send_now()

    def _send_now(self) -> None:
        """Send what is due from the caller's thread, if the connection is open and no
        other send is under way; else leave it to the sending thread, at once."""
        if self._conn is not None and self._sending.acquire(blocking=False):
            try:
                if self._conn is not None and not self._stop:
                    self._send_due(check=False)
                    return
            finally:
                self._sending.release()
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
            with self._sending:
                self._send_due()

    def _send_due(self, check: bool = True) -> None:
        """Send the newest acknowledgement if items were taken since the last one (or the
        last one may have been lost); `_sending` held. `check`: first see whether the
        relay answered (a refusal) or the connection broke: a `select`, which the sends
        from the taking thread leave to the sending thread's next round."""
        if check and self._conn is not None and self._conn.readable_now():
            # the last lines written may never have reached the relay, or the relay
            # failed to apply them: say the newest one again (they are cumulative)
            self._resend = self._answer() is None and not self._gone
        count, seq, total = self.taken
        due = count > self._acked[0] or self._resend
        if due and seq is not None and not self._gone:
            if self._send(self._line(seq), check=check):
                self._acked = (count, total)
                self._resend = False

    def _line(self, upto: int | None, release: bool = False) -> bytes:
        """One acknowledgement as an NDJSON line (the newest one said)."""
        self._newest = upto
        return b'{"consumer": %s, "upto": %s%s}\n' % (
            self._consumer_json,
            b"null" if upto is None else b"%d" % upto,
            b', "release": true' if release else b"",
        )

    def _send(self, line: bytes, last: bool = False, check: bool = True) -> bool:
        """Write one acknowledgement line (opening the request if needed)."""
        chunk = b"%x\r\n%s\r\n" % (len(line), line)
        if last:
            chunk += b"0\r\n\r\n"
        for attempt in range(2):
            try:
                if self._conn is None:
                    self._conn_epoch = self._epoch
                    self._conn, self._url = open_request(
                        self.endpoint, "POST", self.path, self.headers, chunked_body=True
                    )
                elif (check or attempt) and self._conn.readable_now():
                    # a refusal, a failure of the relay's, or the connection broke
                    if self._answer() is not None or self._gone:
                        return False  # refused: saying it again would not help
                    self._resend = True
                    continue  # the connection broke: once more on a new one
                self._conn.sock.sendall(chunk)
                return True
            except (OSError, NDRelayError) as exc:
                self._close()
                if attempt:
                    log.info("acknowledgement to %s failed: %s", self.path, exc)
        return False

    def _answer(self) -> dict[str, Any] | None:
        """Read the relay's answer to the acknowledgement request, then close it; `None`
        when the newest line written may not have been applied and saying it again may
        succeed: no answer (the connection broke), a failure of the relay's own (5xx: its
        backend unreachable, say), a refusal of an older line (the relay answers at the
        first bad line and ignores the rest), or a 404 from before the reader connected
        again."""
        conn, self._conn = self._conn, None
        try:
            response = read_response(conn, self._url)
            body = json.loads(response.read_all() or b"null")
        except (OSError, NDRelayError, ValueError):
            return None
        finally:
            conn.close()
        if response.status >= 500:
            log.info("acknowledgement failed at the relay (%s): %s", response.status, body)
            return None
        if response.status == 404 or (
            isinstance(body, dict) and body.get("error") == "ConsumerNotFound"
        ):
            if self._conn_epoch != self._epoch:
                # refused before the reader connected again (between the relay letting
                # the old connection go and taking the new one, a consumer with nothing
                # pending is unknown): the relay knows it again now
                return None
            self._gone = True  # deleted, released, or its lease ran out: the relay moved on
        elif response.status != 200:
            log.info("acknowledgement refused (%s): %s", response.status, body)
            if isinstance(body, dict) and body.get("seq", self._newest) != self._newest:
                return None  # lines after the refused one were not read
        return body if isinstance(body, dict) else {"status": response.status}

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def resumed(self) -> None:
        """The stream's reader connected again: the relay knows this consumer (again,
        if its lease had run out and an acknowledgement was refused meanwhile), and may
        have lost the last acknowledgement (a backend restarted): the newest one is said
        again, and the items taken from now on are acknowledged."""
        with self._cond:
            self._epoch += 1
            self._gone = False
            self._resend = True
            self._cond.notify()

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
        # a send under way in another thread finishes first
        if not self._sending.acquire(timeout=timeout):
            return None  # stuck on a connection that does not answer: the lease decides
        try:
            return self._finish(release, timeout)
        finally:
            self._sending.release()

    def _finish(self, release: bool, timeout: float) -> dict[str, Any] | None:
        if self._gone:
            self._close()
            return None
        _, seq, _ = self.taken
        if seq is None and not release:
            self._close()
            return None
        try:
            if not self._send(self._line(seq, release), last=True):
                return None
            self._conn.sock.settimeout(timeout)
            return self._answer()
        finally:
            self._close()

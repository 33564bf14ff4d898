// Follow an ndrelay stream from a browser page with EventSource (README: "Browsers").
//   follow("/streams/radar?policy=latest", { token, onData, onEnd, onError })
// onData gets each data frame's JSON (seq, dtype, shape, data as nested lists; bytes as
// base64). At the end or on a stream error the EventSource is closed, so the browser
// does not reconnect. A lost connection is retried by the browser, which sends the last
// seq it got (Last-Event-ID): the relay resumes after it. On a queue stream, name the
// page's consumer (`?consumer=tab-1`): what onData has handled is acknowledged (at most
// four times a second), and a reconnect gets that consumer's unacknowledged items first.
export function follow(path, { token, onData, onEnd, onError } = {}) {
  const url = new URL(path, location.href);
  url.searchParams.set("format", "sse");
  if (token) url.searchParams.set("token", token); // EventSource cannot send headers
  const consumer = url.searchParams.get("consumer");
  let handled = -1, acked = -1, timer = null;
  const ack = () => {
    timer = null;
    if (handled <= acked) return;
    acked = handled;
    fetch(new URL(url.pathname + "/ack", url), {
      method: "POST",
      headers: { "Content-Type": "application/json", ...(token && { Authorization: "Bearer " + token }) },
      body: JSON.stringify({ consumer, upto: acked }),
    }).catch(() => {}); // lost: the next reconnect acknowledges by its Last-Event-ID
  };
  const source = new EventSource(url);
  source.addEventListener("data", (e) => {
    const frame = JSON.parse(e.data);
    onData?.(frame);
    if (consumer) {
      handled = frame.seq + (frame.count ?? 1) - 1;
      timer ??= setTimeout(ack, 250);
    }
  });
  source.addEventListener("end", (e) => {
    source.close();
    onEnd?.(JSON.parse(e.data));
  });
  source.addEventListener("stream-error", (e) => {
    source.close(); // the producer raised, or the relay failed the stream
    onError?.(JSON.parse(e.data));
  });
  source.addEventListener("error", () => {
    // the connection: CONNECTING again means the browser retries by itself
    if (source.readyState === EventSource.CLOSED) onError?.({ type: "ConnectionClosed" });
  });
  return source;
}

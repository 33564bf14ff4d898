// Follow an ndrelay stream from a browser page with EventSource (README: "Browsers").
//   follow("/streams/radar?policy=latest", { token, onData, onEnd, onError })
// onData gets each data frame's JSON (seq, dtype, shape, data as nested lists; bytes as
// base64). At the end or on a stream error the EventSource is closed, so the browser
// does not reconnect; a lost connection is retried by the browser itself.
export function follow(path, { token, onData, onEnd, onError } = {}) {
  const url = new URL(path, location.href);
  url.searchParams.set("format", "sse");
  if (token) url.searchParams.set("token", token); // EventSource cannot send headers
  const source = new EventSource(url);
  source.addEventListener("data", (e) => onData?.(JSON.parse(e.data)));
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

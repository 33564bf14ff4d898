// The ndrelay dashboard: polls /streams once a second for the table, and the newest item
// of the selected stream (/streams/{name}/latest, which never consumes) at most twice a
// second for the preview. The token of the page's own URL (?token=) is passed on.
import { decode } from "./msgpack.js";
import { follow } from "./ndrelay-sse.js";

const params = new URLSearchParams(location.search);
const token = params.get("token");
const headers = token ? { Authorization: "Bearer " + token } : {};
const TABLE_EVERY_MS = 1000;
const PREVIEW_EVERY_MS = 500;

const $ = (id) => document.getElementById(id);
const state = { streams: [], selected: decodeURIComponent(location.hash.slice(1)) || null };
window.ndrelayDashboard = state; // for tests and the curious: what the page last saw

// -- the streams table ---------------------------------------------------------------

function fmtRate(value, unit, scale = 1) {
  if (value === null || value === undefined) return "–";
  const v = value / scale;
  return (v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2)) + unit;
}

function fmtByteRate(v) {
  if (v === null || v === undefined) return "–";
  if (v < 1e3) return fmtRate(v, " B/s");
  if (v < 1e6) return fmtRate(v, " kB/s", 1e3);
  return fmtRate(v, " MB/s", 1e6);
}

function fmtBytes(n) {
  if (n < 1024) return n + " B";
  if (n < 1024 * 1024) return (n / 1024).toFixed(1) + " KiB";
  return (n / 1024 / 1024).toFixed(1) + " MiB";
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function renderTable() {
  const body = $("streams-body");
  body.replaceChildren();
  for (const s of state.streams) {
    const tr = document.createElement("tr");
    tr.dataset.name = s.name;
    if (s.name === state.selected) tr.classList.add("selected");
    cell(tr, s.name, "name");
    cell(tr, s.mode);
    cell(tr, s.state, "state-" + s.state);
    cell(tr, s.depth + "/" + s.size, "num");
    cell(tr, String(s.produced), "num");
    cell(tr, fmtRate(s.items_per_s, "/s"), "num rate-items");
    cell(tr, fmtByteRate(s.bytes_per_s), "num rate-bytes");
    cell(tr, String(s.consumers), "num");
    cell(tr, String(s.dropped), s.dropped ? "num dropped" : "num");
    cell(tr, fmtBytes(s.bytes), "num");
    tr.addEventListener("click", () => select(s.name));
    body.appendChild(tr);
  }
  $("empty").hidden = state.streams.length > 0;
}

async function refreshTable() {
  try {
    const resp = await fetch("streams", { headers, cache: "no-store" });
    if (!resp.ok) throw new Error(resp.status === 401 ? "401: wrong or missing ?token=" : "HTTP " + resp.status);
    state.streams = await resp.json();
    state.updated = Date.now();
    renderTable();
    updateFollowButton();
    $("status").textContent = "updated " + new Date().toLocaleTimeString();
    $("status").className = "";
  } catch (err) {
    $("status").textContent = "relay unreachable: " + err.message;
    $("status").className = "bad";
  }
  setTimeout(refreshTable, TABLE_EVERY_MS);
}

// -- the preview ---------------------------------------------------------------------

// -- following a fanout stream's events (the README's snippet) ----------------------------

let following = null;

function stopFollowing(why) {
  if (following) following.close();
  following = null;
  $("follow").textContent = "follow events";
  $("follow-state").textContent = why || "";
}

function logEvent(text) {
  const li = document.createElement("li");
  li.textContent = text;
  const log = $("event-log");
  log.prepend(li);
  while (log.children.length > 12) log.lastChild.remove();
}

function toggleFollow() {
  if (following) return stopFollowing("stopped");
  const name = state.selected;
  $("event-log").replaceChildren();
  $("follow").textContent = "stop";
  $("follow-state").textContent = "following " + name + " (newest items only)";
  following = follow("streams/" + encodeURIComponent(name) + "?policy=latest", {
    token,
    onData: (f) => logEvent(`seq ${f.seq} · ${f.dtype ? f.dtype + " " + JSON.stringify(f.shape) : "bytes"}`),
    onEnd: (end) => { logEvent(`end after ${end.seq} items`); stopFollowing("ended"); },
    onError: (err) => { logEvent(`error: ${err.type}: ${err.message || ""}`); stopFollowing("failed"); },
  });
}

function updateFollowButton() {
  const s = state.streams.find((x) => x.name === state.selected);
  // following a queue stream would take its items from the real consumers
  $("follow").hidden = !s || s.mode !== "fanout";
}

function select(name) {
  if (name !== state.selected) stopFollowing("");
  state.selected = name;
  history.replaceState(null, "", location.pathname + location.search + "#" + encodeURIComponent(name));
  $("preview-title").textContent = name;
  renderTable();
  updateFollowButton();
}

const TYPED = {
  u1: Uint8Array, i1: Int8Array, u2: Uint16Array, i2: Int16Array,
  u4: Uint32Array, i4: Int32Array, f4: Float32Array, f8: Float64Array,
  u8: BigUint64Array, i8: BigInt64Array, b1: Uint8Array,
};

// The array's values as numbers (a typed array where the layout allows), or null.
function numbers(bytes, dtype) {
  const order = dtype[0], code = dtype.slice(1);
  const Typed = TYPED[code];
  if (!Typed) return null;
  const little = new Uint8Array(new Uint16Array([1]).buffer)[0] === 1;
  const copy = bytes.slice(); // aligned, owned copy
  if (order === ">" && Typed.BYTES_PER_ELEMENT > 1 && little) {
    const w = Typed.BYTES_PER_ELEMENT;
    for (let i = 0; i < copy.length; i += w) copy.subarray(i, i + w).reverse();
  }
  const typed = new Typed(copy.buffer, 0, copy.length / Typed.BYTES_PER_ELEMENT);
  return typed instanceof BigInt64Array || typed instanceof BigUint64Array
    ? Float64Array.from(typed, Number)
    : typed;
}

function range(values) {
  let lo = Infinity, hi = -Infinity;
  for (const v of values) {
    if (Number.isFinite(v)) { if (v < lo) lo = v; if (v > hi) hi = v; }
  }
  return lo === Infinity ? [0, 0] : [lo, hi];
}

function fmtNum(v) {
  return Number.isInteger(v) ? String(v) : Math.abs(v) >= 1e4 || Math.abs(v) < 1e-3 ? v.toExponential(3) : v.toFixed(3);
}

function canvas(width, height) {
  const c = $("preview-canvas");
  c.width = width;
  c.height = height;
  c.hidden = false;
  return c.getContext("2d");
}

function drawImage(values, h, w, channels) {
  const ctx = canvas(w, h);
  const img = ctx.createImageData(w, h);
  const px = img.data;
  for (let i = 0, j = 0; i < h * w; i++, j += channels) {
    const o = i * 4;
    if (channels === 1) { px[o] = px[o + 1] = px[o + 2] = values[j]; }
    else { px[o] = values[j]; px[o + 1] = values[j + 1]; px[o + 2] = values[j + 2]; }
    px[o + 3] = channels === 4 ? values[j + 3] : 255;
  }
  ctx.putImageData(img, 0, 0);
  $("preview-canvas").className = "image";
}

// viridis, at 5 stops
const STOPS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
function colour(t) {
  const x = Math.min(Math.max(t, 0), 1) * (STOPS.length - 1);
  const i = Math.min(Math.floor(x), STOPS.length - 2), f = x - i;
  return STOPS[i].map((a, k) => Math.round(a + (STOPS[i + 1][k] - a) * f));
}

function drawHeatmap(values, h, w) {
  const [lo, hi] = range(values);
  const ctx = canvas(w, h);
  const img = ctx.createImageData(w, h);
  for (let i = 0; i < h * w; i++) {
    const [r, g, b] = colour(hi > lo ? (values[i] - lo) / (hi - lo) : 0.5);
    img.data.set([r, g, b, 255], i * 4);
  }
  ctx.putImageData(img, 0, 0);
  $("preview-canvas").className = "heatmap";
  return [lo, hi];
}

function drawPlot(values) {
  const [lo, hi] = range(values);
  const W = 640, H = 240, pad = 8;
  const ctx = canvas(W, H);
  ctx.fillStyle = "#10151c";
  ctx.fillRect(0, 0, W, H);
  ctx.strokeStyle = "#4fc3f7";
  ctx.lineWidth = 2;
  ctx.beginPath();
  const n = values.length;
  for (let i = 0; i < n; i++) {
    const x = pad + (n > 1 ? (i / (n - 1)) * (W - 2 * pad) : (W - 2 * pad) / 2);
    const y = H - pad - (hi > lo ? (values[i] - lo) / (hi - lo) : 0.5) * (H - 2 * pad);
    i ? ctx.lineTo(x, y) : ctx.moveTo(x, y);
  }
  ctx.stroke();
  $("preview-canvas").className = "plot";
  return [lo, hi];
}

function hex(bytes) {
  return Array.from(bytes.subarray(0, 64), (b) => b.toString(16).padStart(2, "0")).join(" ");
}

function render(frame) {
  const meta = $("preview-meta");
  const c = $("preview-canvas");
  $("preview-text").textContent = "";
  if (frame.dtype === undefined) { // bytes
    c.hidden = true;
    meta.textContent = `seq ${frame.seq} · bytes · ${fmtBytes(frame.data.length)}`;
    $("preview-text").textContent = hex(frame.data) + (frame.data.length > 64 ? " …" : "");
    return;
  }
  const shape = frame.shape;
  let label = `seq ${frame.seq} · ${frame.dtype} ${JSON.stringify(shape)}`;
  const values = numbers(frame.data, frame.dtype);
  if (values === null) {
    c.hidden = true;
    meta.textContent = label + " · " + fmtBytes(frame.data.length) + " (no preview for this dtype)";
    return;
  }
  const isImage = frame.dtype === "|u1" && (shape.length === 2 ||
    (shape.length === 3 && [1, 3, 4].includes(shape[2])));
  let lohi = null;
  if (isImage) {
    drawImage(values, shape[0], shape[1], shape.length === 2 ? 1 : shape[2]);
    label += " · image";
  } else if (shape.length === 0) {
    c.hidden = true;
    $("preview-text").textContent = fmtNum(values[0]);
  } else if (shape.length === 1) {
    lohi = drawPlot(values);
  } else {
    // 2-D: a heatmap; more dimensions: the first 2-D slice
    const h = shape[shape.length - 2], w = shape[shape.length - 1];
    lohi = drawHeatmap(values.subarray(0, h * w), h, w);
    if (shape.length > 2) label += ` · slice [${"0, ".repeat(shape.length - 2)}:, :]`;
  }
  if (lohi) label += ` · range ${fmtNum(lohi[0])} … ${fmtNum(lohi[1])}`;
  meta.textContent = label;
  c.dataset.seq = String(frame.seq);
}

async function refreshPreview() {
  const name = state.selected;
  if (name) {
    try {
      const resp = await fetch("streams/" + encodeURIComponent(name) + "/latest", { headers, cache: "no-store" });
      if (name !== state.selected) { /* changed meanwhile */ }
      else if (resp.status === 204) {
        $("preview-meta").textContent = "no item buffered right now";
        $("preview-canvas").hidden = true;
      } else if (resp.status === 404) {
        $("preview-meta").textContent = "stream deleted";
        $("preview-canvas").hidden = true;
      } else if (resp.ok) {
        const frame = decode(new Uint8Array(await resp.arrayBuffer()));
        render(frame);
        state.preview = { seq: frame.seq, dtype: frame.dtype, shape: frame.shape, at: Date.now() };
      } else {
        $("preview-meta").textContent = "HTTP " + resp.status;
      }
    } catch (err) {
      $("preview-meta").textContent = "preview failed: " + err.message;
    }
  }
  setTimeout(refreshPreview, PREVIEW_EVERY_MS);
}

if (state.selected) $("preview-title").textContent = state.selected;
$("follow").addEventListener("click", toggleFollow);
refreshTable();
refreshPreview();

// A small msgpack decoder for one ndrelay frame (DESIGN.md §2): maps, arrays, strings,
// bin (returned as a Uint8Array view, not copied), integers, floats, nil and booleans.
// Extension types are refused. Written for the dashboard; no dependencies.

const utf8 = new TextDecoder("utf-8");

export function decode(buffer) {
  const bytes = buffer instanceof Uint8Array ? buffer : new Uint8Array(buffer);
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let pos = 0;

  function need(n) {
    if (pos + n > bytes.length) throw new Error("msgpack: truncated input");
  }
  function u8() { need(1); return bytes[pos++]; }
  function u16() { need(2); const v = view.getUint16(pos); pos += 2; return v; }
  function u32() { need(4); const v = view.getUint32(pos); pos += 4; return v; }
  function u64() { need(8); const v = view.getBigUint64(pos); pos += 8; return Number(v); }
  function i64() { need(8); const v = view.getBigInt64(pos); pos += 8; return Number(v); }
  function str(n) { need(n); const s = utf8.decode(bytes.subarray(pos, pos + n)); pos += n; return s; }
  function bin(n) { need(n); const b = bytes.subarray(pos, pos + n); pos += n; return b; }
  function arr(n) { const out = new Array(n); for (let i = 0; i < n; i++) out[i] = value(); return out; }
  function map(n) {
    const out = {};
    for (let i = 0; i < n; i++) { const k = value(); out[k] = value(); }
    return out;
  }

  function value() {
    const b = u8();
    if (b <= 0x7f) return b;
    if (b >= 0xe0) return b - 0x100;
    if ((b & 0xf0) === 0x80) return map(b & 0x0f);
    if ((b & 0xf0) === 0x90) return arr(b & 0x0f);
    if ((b & 0xe0) === 0xa0) return str(b & 0x1f);
    switch (b) {
      case 0xc0: return null;
      case 0xc2: return false;
      case 0xc3: return true;
      case 0xc4: return bin(u8());
      case 0xc5: return bin(u16());
      case 0xc6: return bin(u32());
      case 0xca: { need(4); const v = view.getFloat32(pos); pos += 4; return v; }
      case 0xcb: { need(8); const v = view.getFloat64(pos); pos += 8; return v; }
      case 0xcc: return u8();
      case 0xcd: return u16();
      case 0xce: return u32();
      case 0xcf: return u64();
      case 0xd0: { need(1); const v = view.getInt8(pos); pos += 1; return v; }
      case 0xd1: { need(2); const v = view.getInt16(pos); pos += 2; return v; }
      case 0xd2: { need(4); const v = view.getInt32(pos); pos += 4; return v; }
      case 0xd3: return i64();
      case 0xd9: return str(u8());
      case 0xda: return str(u16());
      case 0xdb: return str(u32());
      case 0xdc: return arr(u16());
      case 0xdd: return arr(u32());
      case 0xde: return map(u16());
      case 0xdf: return map(u32());
      default: throw new Error("msgpack: unsupported type byte 0x" + b.toString(16));
    }
  }

  return value();
}

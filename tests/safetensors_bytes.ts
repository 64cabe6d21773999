/**
 * Hand-made safetensors files for the tests: any header, even one the encoder would never write.
 *
 * @module
 */

/**
 * Safetensors bytes: the 8-byte header length (the header's own, or `headerLength`), the header
 * (JSON of `header`, or `header` itself when it is text, padding and all), then `data`.
 */
export function safetensorsBytes(
  header: unknown,
  data: Uint8Array = new Uint8Array(0),
  headerLength?: number,
): Uint8Array {
  const json = new TextEncoder().encode(typeof header === "string" ? header : JSON.stringify(header));
  const out = new Uint8Array(8 + json.length + data.length);
  new DataView(out.buffer).setBigUint64(0, BigInt(headerLength ?? json.length), true);
  out.set(json, 8);
  out.set(data, 8 + json.length);
  return out;
}

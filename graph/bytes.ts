/**
 * Byte helpers shared by the file formats and stamps that hash or join raw
 * bytes: concatenation, SHA-256 and hex.
 *
 * @module
 */

/**
 * The bytes of `parts`, one after another, in a fresh array.
 *
 * @example
 * ```ts
 * import { concatBytes } from "./bytes.ts";
 * concatBytes([new Uint8Array([1]), new Uint8Array([2, 3])]); // Uint8Array [1, 2, 3]
 * ```
 */
export function concatBytes(parts: readonly Uint8Array[]): Uint8Array {
  let length = 0;
  for (const p of parts) length += p.byteLength;
  const out = new Uint8Array(length);
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.byteLength;
  }
  return out;
}

/**
 * Lowercase hex digits of `bytes`, two per byte.
 *
 * @example
 * ```ts
 * import { hexString } from "./bytes.ts";
 * hexString(new Uint8Array([0, 255])); // "00ff"
 * ```
 */
export function hexString(bytes: Uint8Array): string {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

/**
 * The SHA-256 digest of `data` (32 bytes), through Web Crypto.
 *
 * @example
 * ```ts
 * import { hexString, sha256 } from "./bytes.ts";
 * hexString(await sha256(new Uint8Array())); // "e3b0c442…b855"
 * ```
 */
export async function sha256(data: Uint8Array): Promise<Uint8Array> {
  return new Uint8Array(await crypto.subtle.digest("SHA-256", data as Uint8Array<ArrayBuffer>));
}

/**
 * A tensor of the native backend: its bytes, viewed from TypeScript, and the
 * address the C side reads them at.
 *
 * @module
 */

import type { DeviceTensor } from "../contract.ts";

/** A tensor held by the native backend. */
export interface NativeTensor extends DeviceTensor {
  /** The bytes (host memory for weights, library memory for state). */
  bytes: Uint8Array;
  /** Address of the first byte. */
  readonly address: bigint;
  /** Library allocation to free on release (state), or null for weights. */
  owned: Deno.PointerValue;
  /** Set once released: the bytes are gone. */
  released: boolean;
}

/** The address of the first byte of `bytes`. */
export function addressOf(bytes: Uint8Array): bigint {
  return BigInt(Deno.UnsafePointer.value(Deno.UnsafePointer.of(bytes as Uint8Array<ArrayBuffer>)));
}

/**
 * A safetensors reader that trusts nothing in the file.
 *
 * Layout: an 8-byte little-endian header length N, N bytes of JSON mapping tensor
 * names to `{dtype, shape, data_offsets: [begin, end]}` (offsets relative to the
 * data after the header) plus an optional `__metadata__` object of strings, then
 * the data. Tensors come back as views of the file's bytes (zero-copy); F64 is
 * narrowed to f32 at load.
 *
 * @module
 */

import type { HostTensor } from "../../backends/contract.ts";
import type { DType } from "../../graph/dtype.ts";
import { readAccessError } from "./read_access.ts";

/** A malformed or hostile safetensors file; the message names the file and what is wrong. */
export class SafetensorsError extends SyntaxError {
  /** The file at fault. */
  readonly file: string;
  /**
   * An error whose message names the file, then says what is wrong.
   *
   * @param file the file at fault
   * @param message what is wrong, sentence case
   */
  constructor(file: string, message: string) {
    super(`Invalid safetensors file "${file}": ${message}`);
    this.name = "SafetensorsError";
    this.file = file;
  }
}

/** The parsed contents of one safetensors file. */
export interface SafetensorsFile {
  /** The file's path (or the name given to {@link parseSafetensors}). */
  readonly file: string;
  /** The `__metadata__` strings (empty when absent). */
  readonly metadata: Readonly<Record<string, string>>;
  /** Tensors by name, in file order. */
  readonly tensors: ReadonlyMap<string, HostTensor>;
}

/** The spec's limit on the header size. */
const MAX_HEADER_BYTES = 100 * 1024 * 1024;

const DTYPES: Record<string, { dtype: DType | "f64"; bytes: number }> = {
  F32: { dtype: "f32", bytes: 4 },
  F16: { dtype: "f16", bytes: 2 },
  BF16: { dtype: "bf16", bytes: 2 },
  F64: { dtype: "f64", bytes: 8 },
};
const KNOWN_UNSUPPORTED = ["I8", "U8", "I16", "U16", "I32", "U32", "I64", "U64", "BOOL", "F8_E4M3", "F8_E5M2"];

/** Reads and validates a safetensors file from disk. */
export async function readSafetensors(path: string): Promise<SafetensorsFile> {
  let bytes: Uint8Array;
  try {
    bytes = await Deno.readFile(path);
  } catch (e) {
    if (e instanceof Deno.errors.NotFound) {
      throw new Deno.errors.NotFound(`Cannot read safetensors file "${path}": not found`);
    }
    throw readAccessError(path, e) ?? e;
  }
  return parseSafetensors(bytes, path);
}

/**
 * Parses and validates safetensors bytes; `file` names the source in errors.
 *
 * The rules are the reference implementation's (Hugging Face's `safetensors` crate): sorted by
 * `data_offsets` (begin, then end), the tensors tile the data exactly, from offset 0 with no gap
 * and no overlap (a zero-size tensor is an empty range anywhere in that tiling); the file ends
 * where the last tensor does; and each tensor's offsets span exactly its shape's element count
 * times its dtype's size, computed without overflow. A header length that is off by even one byte
 * (into the header's padding, say) shifts every tensor and so breaks the tiling.
 */
export function parseSafetensors(bytes: Uint8Array, file: string): SafetensorsFile {
  const fail = (msg: string): never => {
    throw new SafetensorsError(file, msg);
  };
  if (bytes.byteLength < 8) fail(`it is truncated: ${bytes.byteLength} bytes, shorter than the 8-byte header length`);
  const dv = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const headerLen = Number(dv.getBigUint64(0, true));
  if (headerLen > bytes.byteLength - 8) {
    fail(`header length ${headerLen} is past the end of the file (${bytes.byteLength} bytes)`);
  }
  if (headerLen > MAX_HEADER_BYTES) fail(`header length ${headerLen} exceeds the limit of ${MAX_HEADER_BYTES} bytes`);
  let header: unknown;
  try {
    header = JSON.parse(new TextDecoder("utf-8", { fatal: true }).decode(bytes.subarray(8, 8 + headerLen)));
  } catch (e) {
    fail(`malformed header JSON (${(e as Error).message})`);
  }
  if (typeof header !== "object" || header === null || Array.isArray(header)) fail("the header is not a JSON object");

  const dataStart = 8 + headerLen;
  const dataSize = bytes.byteLength - dataStart;
  const metadata: [string, string][] = [];
  const entries: Entry[] = [];
  for (const [name, value] of Object.entries(header as Record<string, unknown>)) {
    if (name === "__metadata__") {
      if (typeof value !== "object" || value === null || Array.isArray(value)) fail(`"__metadata__" is not an object`);
      for (const [k, v] of Object.entries(value as Record<string, unknown>)) {
        if (typeof v !== "string") fail(`"__metadata__" field "${k}" is not a string`);
        metadata.push([k, v as string]);
      }
      continue;
    }
    entries.push(parseEntry(name, value, dataSize, fail));
  }
  checkTiling(entries, dataSize, fail);

  const tensors = new Map<string, HostTensor>();
  for (const e of entries) {
    const data = bytes.subarray(dataStart + e.begin, dataStart + e.end);
    if (e.dtype === "f64") {
      const count = data.byteLength / 8;
      const src = new DataView(data.buffer, data.byteOffset, data.byteLength);
      const f32 = new Float32Array(count);
      for (let i = 0; i < count; i++) f32[i] = src.getFloat64(i * 8, true);
      tensors.set(e.name, { name: e.name, dtype: "f32", shape: e.shape, data: new Uint8Array(f32.buffer) });
    } else {
      tensors.set(e.name, { name: e.name, dtype: e.dtype, shape: e.shape, data });
    }
  }
  // fromEntries defines own properties, so a "__proto__" key stays a key.
  return { file, metadata: Object.fromEntries(metadata), tensors };
}

/** One tensor's header entry, checked on its own. */
interface Entry {
  name: string;
  dtype: DType | "f64";
  shape: number[];
  begin: number;
  end: number;
}

/** Checks one header entry: its dtype, shape, offsets within the data, and size for its shape. */
function parseEntry(name: string, value: unknown, dataSize: number, fail: (msg: string) => never): Entry {
  if (typeof value !== "object" || value === null || Array.isArray(value)) fail(`tensor "${name}" is not an object`);
  const { dtype, shape, data_offsets } = value as Record<string, unknown>;
  if (typeof dtype !== "string") fail(`tensor "${name}" has no dtype`);
  const info = Object.hasOwn(DTYPES, dtype as string) ? DTYPES[dtype as string] : undefined;
  if (!info) {
    fail(
      KNOWN_UNSUPPORTED.includes(dtype as string)
        ? `tensor "${name}" has dtype "${dtype}", which the engine does not load (F32, F16, BF16, F64)`
        : `tensor "${name}" has unknown dtype "${dtype}"`,
    );
  }
  const { dtype: stored, bytes: width } = info!;
  if (!Array.isArray(shape) || shape.some((d) => !Number.isSafeInteger(d) || d < 0)) {
    fail(`tensor "${name}" has shape ${JSON.stringify(shape)}: expected non-negative integers`);
  }
  const offsets = data_offsets as unknown[];
  if (
    !Array.isArray(offsets) || offsets.length !== 2 ||
    offsets.some((o) => !Number.isSafeInteger(o) || (o as number) < 0)
  ) {
    fail(`tensor "${name}" has data_offsets ${JSON.stringify(data_offsets)}: expected [begin, end]`);
  }
  const [begin, end] = offsets as number[];
  if (begin > end || end > dataSize) {
    fail(`tensor "${name}" has data_offsets [${begin}, ${end}] outside the ${dataSize} data bytes`);
  }
  // BigInt: a product of safe integers can pass 2^53 (or any limit) and round to a false match.
  const need = (shape as number[]).reduce((n, d) => n * BigInt(d), BigInt(width));
  if (need !== BigInt(end - begin)) {
    fail(
      `tensor "${name}" of shape [${shape}] and dtype ${dtype} needs ${need} bytes, but its data_offsets span ${
        end - begin
      } bytes ([${begin}, ${end}])`,
    );
  }
  return { name, dtype: stored, shape: shape as number[], begin, end };
}

/**
 * Checks that the tensors, sorted by (begin, end), tile the data from offset 0 to its last byte:
 * each one begins where the one before ended.
 */
function checkTiling(entries: readonly Entry[], dataSize: number, fail: (msg: string) => never): void {
  const sorted = [...entries].sort((a, b) => a.begin - b.begin || a.end - b.end);
  let at = 0;
  let previous: Entry | undefined;
  for (const e of sorted) {
    if (e.begin < at) {
      fail(
        `tensors "${previous!.name}" and "${e.name}" overlap: data_offsets [${previous!.begin}, ${
          previous!.end
        }] and [${e.begin}, ${e.end}]`,
      );
    }
    if (e.begin > at) {
      fail(
        previous
          ? `tensor "${e.name}" has data_offsets [${e.begin}, ${e.end}], leaving a gap of ${
            e.begin - at
          } bytes after "${previous.name}" [${previous.begin}, ${previous.end}]`
          : `tensor "${e.name}" has data_offsets [${e.begin}, ${e.end}], leaving a gap of ${e.begin} bytes at the start of the data`,
      );
    }
    at = e.end;
    previous = e;
  }
  if (at !== dataSize) {
    fail(
      previous
        ? `the data has ${dataSize} bytes, but the last tensor "${previous.name}" [${previous.begin}, ${previous.end}] ends at ${at}: ${
          dataSize - at
        } trailing bytes (a wrong header length shifts every tensor)`
        : `the header lists no tensor, but ${dataSize} data bytes follow it`,
    );
  }
}

/** Encodes tensors as safetensors bytes (used by the model generator and tests). */
export function encodeSafetensors(
  tensors: readonly HostTensor[],
  metadata: Readonly<Record<string, string>> = {},
): Uint8Array {
  const names: Record<DType, string> = { f32: "F32", f16: "F16", bf16: "BF16", q8_0: "", q4_0: "", i32: "I32" };
  const header: Record<string, unknown> = {};
  if (Object.keys(metadata).length) header.__metadata__ = metadata;
  let offset = 0;
  for (const t of tensors) {
    if (!names[t.dtype]) throw new TypeError(`Cannot write tensor "${t.name}" of dtype "${t.dtype}" to safetensors`);
    header[t.name] = { dtype: names[t.dtype], shape: t.shape, data_offsets: [offset, offset + t.data.byteLength] };
    offset += t.data.byteLength;
  }
  const json = JSON.stringify(header);
  const length = new TextEncoder().encode(json).byteLength;
  // Spaces after the JSON keep the data 8-byte aligned, as the format allows.
  const head = new TextEncoder().encode(json + " ".repeat((8 - ((8 + length) % 8)) % 8));
  const out = new Uint8Array(8 + head.byteLength + offset);
  new DataView(out.buffer).setBigUint64(0, BigInt(head.byteLength), true);
  out.set(head, 8);
  let at = 8 + head.byteLength;
  for (const t of tensors) {
    out.set(t.data, at);
    at += t.data.byteLength;
  }
  return out;
}

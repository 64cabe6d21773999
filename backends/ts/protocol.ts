/**
 * How the TypeScript backend talks to its worker. Two channels:
 *
 * - A shared control block (an `Int32Array` over a `SharedArrayBuffer`) carries
 *   every step: the caller writes the executable's id and sets {@link CMD} to
 *   {@link Command.run}; the worker, parked in `Atomics.wait` on that word, runs the
 *   step, writes {@link STATUS} (and an error's name and message) and sets the word
 *   back to idle with `Atomics.notify`, which resolves the caller's
 *   `Atomics.waitAsync`. A step costs no message and no copy: inputs, outputs, the
 *   step's dimensions and its per-node times are in the executable's shared memory.
 * - Messages carry what happens once per plan (compile, free). A parked worker sees
 *   no message, so the caller posts it and then sets {@link CMD} to
 *   {@link Command.message}: the worker leaves its loop, handles the message, replies
 *   and parks again.
 *
 * The caller sends one command at a time and waits for it to finish, so the worker
 * never finds two commands in the word. Stopping does not wait: the caller sets
 * {@link STOP} (read between nodes, so a long step ends early) and the command word.
 *
 * @module
 */

import type { ExecutionPlan } from "../../graph/plan.ts";
import { UnsupportedError } from "../contract.ts";
import type { TensorMemory } from "./program.ts";

/** What {@link CMD} holds. */
export const Command = {
  /** Nothing to do: the worker parks on the word. */
  idle: 0,
  /** Run executable {@link EXEC}'s step. */
  run: 1,
  /** A message is posted: leave the loop to receive it. */
  message: 2,
  /** The backend is disposed: the worker ends. */
  stop: 3,
} as const;

/** Index of the command word (see {@link Command}). */
export const CMD = 0;
/** Index of the stop flag: non-zero once the backend is disposed; read between nodes. */
export const STOP = 1;
/** Index of the id of the executable to run. */
export const EXEC = 2;
/** Index of the profile flag of the step (1: time every node). */
export const PROFILE = 3;
/** Index of the outcome of the last step (see {@link Status}). */
export const STATUS = 4;
/** Index of the byte length of the last error's name. */
const ERROR_NAME_BYTES = 5;
/** Index of the byte length of the last error's message. */
const ERROR_MESSAGE_BYTES = 6;

/** What {@link STATUS} holds after a step. */
export const Status = {
  /** The step ran. */
  ok: 0,
  /** A kernel threw: the error's name and message are in the block. */
  error: 1,
  /** The step ended early: the backend was disposed. */
  stopped: 2,
} as const;

/** Bytes of a control block. */
export const CONTROL_BYTES = 4096;

/** Where an error's name starts, and the bytes it may take; its message takes the rest (longer text is cut). */
const ERROR_NAME_AT = 32;
const ERROR_NAME_ROOM = 96;
const ERROR_MESSAGE_AT = ERROR_NAME_AT + ERROR_NAME_ROOM;

/** A message to the worker. */
export type ToWorker =
  /** The first message: the control block. */
  | { readonly kind: "init"; readonly control: SharedArrayBuffer }
  /** Build executable `id` over `memory` (laid out by `stepLayout`) with these tensors. */
  | {
    readonly kind: "compile";
    readonly id: number;
    readonly plan: ExecutionPlan;
    readonly memory: SharedArrayBuffer;
    readonly bindings: readonly (readonly [number, TensorMemory])[];
  }
  /** Forget executable `id`. */
  | { readonly kind: "free"; readonly id: number };

/** An error as plain data: what crosses the thread boundary. */
export interface ErrorData {
  /** The error's `name` (`"RangeError"`, `"UnsupportedError"`, …). */
  readonly name: string;
  /** Its message. */
  readonly message: string;
}

/** A message from the worker: the reply to the last {@link ToWorker}. */
export type FromWorker =
  | { readonly kind: "ready" }
  | { readonly kind: "compiled"; readonly id: number; readonly error?: ErrorData }
  | { readonly kind: "freed"; readonly id: number };

/** The name and message of anything thrown. */
export function errorData(e: unknown): ErrorData {
  return e instanceof Error ? { name: e.name, message: e.message } : { name: "Error", message: String(e) };
}

/** The error classes rebuilt by name, so `instanceof` holds on the caller's side too. */
const ERROR_CLASSES: Readonly<Record<string, new (message: string) => Error>> = {
  Error,
  RangeError,
  TypeError,
  ReferenceError,
  SyntaxError,
  EvalError,
  URIError,
  UnsupportedError,
};

/** An error with the name and message of `data`, of the same class when it is a standard one. */
export function rebuildError(data: ErrorData): Error {
  const Class = Object.hasOwn(ERROR_CLASSES, data.name) ? ERROR_CLASSES[data.name] : Error;
  const e = new Class(data.message);
  if (e.name !== data.name) e.name = data.name;
  return e;
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** Writes an error's name and message into the control block (truncated to the room there is). */
export function writeError(control: Int32Array, e: unknown): void {
  const { name, message } = errorData(e);
  const bytes = new Uint8Array(control.buffer, control.byteOffset, CONTROL_BYTES);
  control[ERROR_NAME_BYTES] = encoder.encodeInto(name, bytes.subarray(ERROR_NAME_AT, ERROR_MESSAGE_AT)).written;
  control[ERROR_MESSAGE_BYTES] = encoder.encodeInto(message, bytes.subarray(ERROR_MESSAGE_AT)).written;
}

/** Reads the error {@link writeError} wrote. */
export function readError(control: Int32Array): Error {
  const bytes = new Uint8Array(control.buffer, control.byteOffset, CONTROL_BYTES);
  // TextDecoder refuses shared memory: the text is copied out first.
  const text = (at: number, length: number) => decoder.decode(bytes.slice(at, at + length));
  return rebuildError({
    name: text(ERROR_NAME_AT, control[ERROR_NAME_BYTES]),
    message: text(ERROR_MESSAGE_AT, control[ERROR_MESSAGE_BYTES]),
  });
}

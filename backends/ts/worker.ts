/**
 * The worker of the TypeScript backend: it builds each compiled plan's
 * {@link Program} over the shared memory it is sent, then parks on the control
 * block and runs the steps it is handed (see `protocol.ts`). Started by
 * `thread.ts`; not an entry point for anyone else.
 *
 * @module
 */

import {
  CMD,
  Command,
  errorData,
  EXEC,
  type FromWorker,
  PROFILE,
  STATUS,
  Status,
  STOP,
  type ToWorker,
  writeError,
} from "./protocol.ts";
import { Program, type TsTensor, viewTensor } from "./program.ts";

/** The channel to the caller: a web worker's global scope, or under Deno a `node:worker_threads` port. */
interface Channel {
  onMessage(handler: (message: ToWorker) => void): void;
  post(message: FromWorker): void;
  close(): void;
}

/** The channel this worker was started with (see `thread.ts`, which picks the kind). */
async function openChannel(): Promise<Channel> {
  if ((globalThis as { Deno?: unknown }).Deno !== undefined) {
    const { parentPort } = await import("node:worker_threads");
    if (parentPort) {
      return {
        onMessage: (handler) => parentPort.on("message", handler),
        post: (message) => parentPort.postMessage(message),
        // Deno's node ports have no close(); a worker's global close() ends the thread in either kind.
        close: () => (globalThis as { close?: () => void }).close?.(),
      };
    }
  }
  const scope = globalThis as unknown as {
    onmessage: ((event: MessageEvent<ToWorker>) => void) | null;
    postMessage(message: FromWorker): void;
    close(): void;
  };
  return {
    onMessage: (handler) => scope.onmessage = (event) => handler(event.data),
    post: (message) => scope.postMessage(message),
    close: () => {
      scope.onmessage = null;
      scope.close();
    },
  };
}

const channel = await openChannel();
const programs = new Map<number, Program>();
let control: Int32Array | undefined;

function reply(message: FromWorker): void {
  channel.post(message);
}

/** Handles one message, replies, and parks on the control block again. */
function receive(message: ToWorker): void {
  switch (message.kind) {
    case "init":
      control = new Int32Array(message.control);
      reply({ kind: "ready" });
      break;
    case "compile":
      try {
        const bindings = new Map<number, TsTensor>(message.bindings.map(([id, m]) => [id, viewTensor(m)]));
        programs.set(message.id, new Program(message.plan, message.memory, bindings));
        reply({ kind: "compiled", id: message.id });
      } catch (e) {
        reply({ kind: "compiled", id: message.id, error: errorData(e) });
      }
      break;
    case "free":
      programs.delete(message.id);
      reply({ kind: "freed", id: message.id });
      break;
  }
  park();
}

/**
 * Waits on the command word and runs steps until a message is posted (returns, so
 * the event loop delivers it) or the backend stops (closes the worker).
 */
function park(): void {
  const ctl = control;
  if (ctl === undefined) return;
  for (;;) {
    if (Atomics.load(ctl, STOP) !== 0) {
      channel.close();
      return;
    }
    const cmd = Atomics.load(ctl, CMD);
    if (cmd === Command.idle) {
      Atomics.wait(ctl, CMD, Command.idle);
    } else if (cmd === Command.message) {
      Atomics.store(ctl, CMD, Command.idle);
      return;
    } else if (cmd === Command.run) {
      runStep(ctl);
      Atomics.store(ctl, CMD, Command.idle);
      Atomics.notify(ctl, CMD);
    } else {
      // Command.stop: the stop flag is set too; the loop's first check ends the worker.
      Atomics.wait(ctl, CMD, cmd, 10);
    }
  }
}

function runStep(ctl: Int32Array): void {
  const program = programs.get(ctl[EXEC]);
  try {
    if (program === undefined) throw new TypeError(`Cannot run executable ${ctl[EXEC]}: it is not compiled here`);
    program.run(ctl[PROFILE] !== 0, ctl, STOP);
    ctl[STATUS] = Atomics.load(ctl, STOP) !== 0 ? Status.stopped : Status.ok;
  } catch (e) {
    writeError(ctl, e);
    ctl[STATUS] = Status.error;
  }
}

channel.onMessage(receive);

/**
 * The tools' stdout: whole writes that survive a reader going away. A write to a closed pipe
 * (`deno task story | head`) or to a stdout that something closed (a `pipeTo(Deno.stdout.writable)`
 * without `preventClose`, or one aborted) throws {@link OutputClosedError}, which `runCli` turns into
 * a quiet exit 0 instead of a stack trace.
 *
 * @module
 */

/** Thrown by {@link Stdout} once stdout is closed or its reader has gone: there is no one left to write to. */
export class OutputClosedError extends Error {
  /** An error saying that stdout is closed; `cause` is the write's own error. */
  constructor(cause?: unknown) {
    super("stdout is closed", { cause });
    this.name = "OutputClosedError";
  }
}

/** True for the errors a write gives when stdout's reader has gone or its resource was closed. */
function isClosedOutput(e: unknown): boolean {
  return e instanceof Deno.errors.BrokenPipe || e instanceof Deno.errors.BadResource;
}

/** Writes text to stdout; after the first failed write every write throws {@link OutputClosedError}. */
export class Stdout {
  readonly #enc = new TextEncoder();
  #closed = false;

  /** True once a write found stdout closed. */
  get closed(): boolean {
    return this.#closed;
  }

  /** Writes all of `text`, waiting for the reader without blocking the event loop. */
  async write(text: string): Promise<void> {
    const bytes = this.#bytes(text);
    try {
      for (let at = 0; at < bytes.length;) at += await Deno.stdout.write(bytes.subarray(at));
    } catch (e) {
      throw this.#failed(e);
    }
  }

  /** Writes all of `text` at once (blocking), for prompts and replies between reads. */
  writeSync(text: string): void {
    const bytes = this.#bytes(text);
    try {
      for (let at = 0; at < bytes.length;) at += Deno.stdout.writeSync(bytes.subarray(at));
    } catch (e) {
      throw this.#failed(e);
    }
  }

  /** Writes `text` and a newline at once. */
  line(text = ""): void {
    this.writeSync(`${text}\n`);
  }

  #bytes(text: string): Uint8Array {
    if (this.#closed) throw new OutputClosedError();
    return this.#enc.encode(text);
  }

  #failed(e: unknown): unknown {
    if (!isClosedOutput(e)) return e;
    this.#closed = true;
    return new OutputClosedError(e);
  }
}

/** The one {@link Stdout} of the process. */
export const stdout: Stdout = new Stdout();

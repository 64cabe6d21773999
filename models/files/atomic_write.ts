/**
 * All-or-nothing file writes: the bytes go to a temporary file in the target's
 * folder, are flushed to disk, and the temporary file is renamed over the target
 * (then the folder is flushed, so the rename itself survives a crash). A write
 * that fails or is killed midway leaves the previous file as it was, plus at most
 * a stray temporary file named `.<name>.<random>.tmp`.
 *
 * @module
 */

/** Options of {@link writeFileAtomic}. */
export interface AtomicWriteOptions {
  /** Permission bits of a new file (default: the process's default, usually 0o644). */
  readonly mode?: number;
}

/**
 * Writes `data` to `path` so that readers see either the old file or the whole new
 * one, never a part: temporary file, fsync, rename, fsync of the folder.
 *
 * @example
 * ```ts
 * import { writeFileAtomic } from "./atomic_write.ts";
 * const path = await Deno.makeTempFile();
 * await writeFileAtomic(path, new TextEncoder().encode("hello"));
 * await Deno.remove(path);
 * ```
 */
export async function writeFileAtomic(
  path: string,
  data: Uint8Array | ReadableStream<Uint8Array>,
  options: AtomicWriteOptions = {},
): Promise<void> {
  const slash = path.lastIndexOf("/");
  const dir = slash > 0 ? path.slice(0, slash) : slash === 0 ? "/" : ".";
  const name = path.slice(slash + 1);
  if (name === "") throw new TypeError(`Cannot write "${path}": it names a folder, not a file`);
  const tmp = `${dir}/.${name}.${crypto.randomUUID().slice(0, 8)}.tmp`;
  const file = await Deno.open(tmp, { write: true, createNew: true, mode: options.mode });
  try {
    if (data instanceof Uint8Array) {
      let written = 0;
      while (written < data.byteLength) written += await file.write(data.subarray(written));
    } else {
      for await (const chunk of data) {
        let written = 0;
        while (written < chunk.byteLength) written += await file.write(chunk.subarray(written));
      }
    }
    await file.sync();
    file.close();
    await Deno.rename(tmp, path);
  } catch (e) {
    try {
      file.close();
    } catch {
      // already closed
    }
    await Deno.remove(tmp).catch(() => {});
    throw e;
  }
  await syncFolder(dir);
}

/** Flushes a folder's entries (a rename in it) to disk, where the platform allows opening folders. */
async function syncFolder(dir: string): Promise<void> {
  let folder: Deno.FsFile;
  try {
    folder = await Deno.open(dir, { read: true });
  } catch {
    return; // Windows cannot open a folder as a file; its renames are durable on their own there.
  }
  try {
    await folder.sync();
  } catch {
    // Some file systems refuse fsync on a folder; the rename has still happened.
  } finally {
    folder.close();
  }
}

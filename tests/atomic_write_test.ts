/**
 * `writeFileAtomic`: a write is all or nothing, also when it fails midway or the
 * process is stopped by the file size limit in the middle of it.
 */

import assert from "node:assert/strict";
import { writeFileAtomic } from "../mod.ts";

const enc = new TextEncoder();

/** The names in `dir`, sorted. */
async function names(dir: string): Promise<string[]> {
  const out: string[] = [];
  for await (const e of Deno.readDir(dir)) out.push(e.name);
  return out.sort();
}

Deno.test("writeFileAtomic: creates, replaces, and leaves no temporary file", async () => {
  const dir = await Deno.makeTempDir({ prefix: "atomic_" });
  try {
    const path = `${dir}/session.bin`;
    await writeFileAtomic(path, enc.encode("first"));
    assert.equal(await Deno.readTextFile(path), "first");
    const stream = ReadableStream.from([enc.encode("sec"), enc.encode("ond")]);
    await writeFileAtomic(path, stream);
    assert.equal(await Deno.readTextFile(path), "second");
    assert.deepEqual(await names(dir), ["session.bin"]);
    await assert.rejects(() => writeFileAtomic(`${dir}/`, enc.encode("x")), TypeError);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("writeFileAtomic: a write that fails midway leaves the previous file as it was", async () => {
  const dir = await Deno.makeTempDir({ prefix: "atomic_" });
  try {
    const path = `${dir}/model.safetensors`;
    const good = new Uint8Array(100_000).map((_, i) => i % 251);
    await writeFileAtomic(path, good);
    const failing = new ReadableStream<Uint8Array>({
      start(controller) {
        controller.enqueue(new Uint8Array(50_000));
        controller.error(new Error("the source broke"));
      },
    });
    await assert.rejects(() => writeFileAtomic(path, failing), /the source broke/);
    assert.deepEqual(await Deno.readFile(path), good);
    assert.deepEqual(await names(dir), ["model.safetensors"]);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("writeFileAtomic: a process stopped by the file size limit mid-write loses nothing", async () => {
  const dir = await Deno.makeTempDir({ prefix: "atomic_" });
  try {
    const path = `${dir}/session.bin`;
    const good = new Uint8Array(4096).fill(7);
    await writeFileAtomic(path, good);
    const script = `${dir}/write.ts`;
    const helper = new URL("../models/files/atomic_write.ts", import.meta.url).href;
    await Deno.writeTextFile(
      script,
      `import { writeFileAtomic } from ${JSON.stringify(helper)};\n` +
        `await writeFileAtomic(${JSON.stringify(path)}, new Uint8Array(1 << 20).fill(9));\n`,
    );
    // ulimit -f counts 512-byte blocks: 64 KiB, far below the 1 MiB being written.
    const out = await new Deno.Command("bash", {
      args: ["-c", `ulimit -f 128; exec "$0" run --allow-read --allow-write "$1"`, Deno.execPath(), script],
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert.notEqual(out.code, 0, "the write must have been stopped");
    assert.deepEqual(await Deno.readFile(path), good);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

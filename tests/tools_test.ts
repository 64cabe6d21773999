/**
 * The tools as a new user meets them: the permissions each deno.json task grants (no more than the
 * tool needs), one-line errors for a permission that is missing, `--version`, the statistics line,
 * Ctrl-C in a real terminal, and a stdout whose reader goes away.
 */

import assert from "node:assert/strict";
import denoConfig from "../deno.json" with { type: "json" };
import { SHAPES, writeRandomModel } from "../examples/_random_model.ts";
import { MINUEZA_DIR, STORY_DIR } from "./helpers.ts";
import { ROOT, type Run, runDeno, spawnDeno } from "./subprocess.ts";
import { inCi, shellCommand, Terminal, tmuxAvailable } from "./terminal.ts";

/**
 * What each task needs, and why. FFI cannot be scoped to the library's path: Deno accepts
 * `--allow-ffi=build/libllm_native.so` for `Deno.dlopen`, but the native backend also reads and
 * passes pointers (`Deno.UnsafePointerView`, `Deno.UnsafePointer.of`), which need FFI unscoped.
 */
const TASK_NEEDS: Record<string, { script: string; flags: readonly string[] }> = {
  // read: the model; env: LLM_MODELS_DIR, HF_*; net and write: a download into the Hugging Face cache;
  // ffi: --backend native.
  story: {
    script: "examples/story.ts",
    flags: ["--allow-read", "--allow-env", "--allow-net", "--allow-write", "--allow-ffi"],
  },
  // As story; write also for /save.
  chat: {
    script: "examples/chat.ts",
    flags: ["--allow-read", "--allow-env", "--allow-net", "--allow-write", "--allow-ffi"],
  },
  // As story; net also to listen.
  serve: {
    script: "examples/serve.ts",
    flags: ["--allow-read", "--allow-env", "--allow-net", "--allow-write", "--allow-ffi"],
  },
  // Loads on the ts backend only: no FFI; it may download its model.
  graph: { script: "examples/graph.ts", flags: ["--allow-read", "--allow-env", "--allow-net", "--allow-write"] },
  // Writes a model from a shape and a local tokenizer: no network, no FFI.
  "make-model": { script: "examples/make_model.ts", flags: ["--allow-read", "--allow-env", "--allow-write"] },
  // As story, plus the llama.cpp kit (node), llama-batched-bench (wherever the user built it, so run is unscoped)
  // and the cache size (cat of a /sys file).
  bench: {
    script: "examples/bench.ts",
    flags: ["--allow-read", "--allow-env", "--allow-net", "--allow-write", "--allow-ffi", "--allow-run"],
  },
  // Runs the server (serve.ts with the serve task's flags: a deno subprocess, whose path is wherever deno is,
  // so run is unscoped) and talks to it on 127.0.0.1.
  load: { script: "examples/load.ts", flags: ["--allow-run", "--allow-net=127.0.0.1"] },
  // The compiler is $CC (any command), and the library is written into build/.
  "build:native": {
    script: "backends/native/build.ts",
    flags: ["--allow-read", "--allow-env", "--allow-write", "--allow-run"],
  },
};

/** Runs the story tool on the story model with the permission `flags` and the tool's `args`. */
function story(flags: string[], ...args: string[]): Promise<Run> {
  return runDeno(["run", ...flags, "examples/story.ts", "--model", STORY_DIR, ...args]);
}

/** The stderr lines of a tool, without the line `deno task` prints first. */
function toolErrors(r: Run): string[] {
  return r.stderr.trim().split("\n").filter((l) => l !== "" && !l.startsWith("Task "));
}

Deno.test("tasks: each deno.json task grants what its tool needs and nothing more", () => {
  const tasks = denoConfig.tasks as Record<string, string>;
  for (const [name, need] of Object.entries(TASK_NEEDS)) {
    const words = tasks[name]?.split(/\s+/);
    assert.ok(words, `task "${name}" exists`);
    assert.deepEqual(words.slice(0, 2), ["deno", "run"], name);
    assert.equal(words.at(-1), need.script, name);
    const flags = words.slice(2, -1);
    assert.deepEqual([...flags].sort(), [...need.flags].sort(), `the flags of task "${name}"`);
  }
  // Every task that runs a tool is in the table.
  for (const [name, line] of Object.entries(tasks)) {
    if (/^deno run .*examples\//.test(line)) assert.ok(name in TASK_NEEDS, `task "${name}" is in the table`);
  }
});

Deno.test("tasks: story, graph and make-model run under their own task's flags", async () => {
  const story = await runDeno(["task", "story", "--model", STORY_DIR, "--max-tokens", "8", "--seed", "1", "Once"]);
  assert.equal(story.code, 0, story.stderr);
  assert.ok(story.stdout.startsWith("Once"), story.stdout);
  assert.match(story.stderr, /generated 8 tokens \(maxTokens\)/);

  const graph = await runDeno(["task", "graph", "--model", STORY_DIR]);
  assert.equal(graph.code, 0, graph.stderr);
  assert.match(graph.stdout, /^output logits/m);

  const tmp = await Deno.makeTempDir({ prefix: "tools-make-" });
  try {
    const shape = { ...SHAPES["stories15m"], hidden_size: 32, intermediate_size: 64, num_hidden_layers: 1 };
    await Deno.writeTextFile(
      `${tmp}/tiny.json`,
      JSON.stringify({ ...shape, num_attention_heads: 2, num_key_value_heads: 2 }),
    );
    const make = await runDeno(["task", "make-model", `${tmp}/tiny.json`, "--out", `${tmp}/m`]);
    assert.equal(make.code, 0, make.stderr);
    assert.equal(make.stdout.trim(), `${tmp}/m`);
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});

Deno.test("tools: a missing permission is one line that names the flag to grant", async () => {
  const noFfi = await story(["--allow-read", "--allow-env"], "--backend", "native", "hi");
  assert.equal(noFfi.code, 1);
  assert.deepEqual(toolErrors(noFfi), [
    "story: Cannot use --backend native: FFI access is not granted (run with --allow-ffi)",
  ]);

  const noRead = await story(["--allow-env"], "hi");
  assert.equal(noRead.code, 1);
  assert.deepEqual(toolErrors(noRead), [
    `story: Cannot read "${STORY_DIR}": read access is not granted (run with --allow-read)`,
  ]);
});

Deno.test("tools: --version names the tool, the engine's version and Deno's", async () => {
  for (const tool of ["story", "chat", "serve", "graph", "make_model", "bench"]) {
    const r = await runDeno(["run", "examples/" + tool + ".ts", "--version"]);
    assert.equal(r.code, 0, `${tool}: ${r.stderr}`);
    const name = tool.replace("_", "-");
    assert.equal(r.stdout, `${name} ${denoConfig.version} (${denoConfig.name}, Deno ${Deno.version.deno})\n`);
  }
});

Deno.test("story: the statistics give load time and time to first token; a short prompt's prefill rate has its count", async () => {
  const run = (prompt: string, ...flags: string[]) =>
    story(["--allow-read", "--allow-env"], "--max-tokens", "8", ...flags, prompt);
  const short = await run("Once upon a time");
  assert.equal(short.code, 0, short.stderr);
  assert.match(
    short.stderr,
    /prompt 6 tokens, .*; load \d+ ms, first token \d+ ms, 6-token prefill [\d.]+ tok\/s, decode [\d.]+ tok\/s$/m,
  );
  const long = await run("Once upon a time, there was a little girl named Lily. She liked to play.");
  assert.equal(long.code, 0, long.stderr);
  assert.match(long.stderr, /first token \d+ ms, prefill [\d.]+ tok\/s, decode/);
  assert.doesNotMatch(long.stderr, /-token prefill/);

  // Converting at load is reported too (one line when stderr is not a terminal).
  const q8 = await run("Once", "--dtype", "q8_0");
  assert.equal(q8.code, 0, q8.stderr);
  assert.match(q8.stderr, /^loaded 20 tensors in \d+ ms\nconverted 20 tensors to q8_0 in \d+ ms$/m);
});

Deno.test("tools: a reader that goes away ends the tool quietly (exit 0, no error)", async () => {
  // The chat answers a line, and the reader stops after the first bytes; the story writes a long text.
  const cases: [string, string[], string][] = [
    ["examples/chat.ts", ["--model", await minuezaModel(), "--max-tokens", "400", "--temperature", "0"], "hello\n"],
    ["examples/story.ts", ["--model", STORY_DIR, "--max-tokens", "400", "--ignore-eos", "Once"], ""],
  ];
  for (const [script, args, input] of cases) {
    const child = spawnDeno(["run", "--allow-read", "--allow-env", script, ...args], { stdin: input });
    const reader = child.stdout.getReader();
    await reader.read();
    await reader.cancel(); // closes the pipe: the next write fails with EPIPE
    const [status, stderr] = await Promise.all([child.status, new Response(child.stderr).text()]);
    assert.equal(status.code, 0, `${script}: ${stderr}`);
    assert.doesNotMatch(stderr, /Broken pipe|Bad resource|^\s+at /m, script);
  }
});

let minuezaRandom: Promise<string> | undefined;

/**
 * A random-weight model of the Minueza chat shape (its real tokenizer and chat template), made once:
 * slow enough on the ts backend to be interrupted mid-stream, and it seldom ends a text by itself.
 */
function minuezaModel(): Promise<string> {
  return minuezaRandom ??= (async () => {
    const dir = await Deno.makeTempDir({ prefix: "tools-minueza-" });
    globalThis.addEventListener("unload", () => Deno.removeSync(dir, { recursive: true }));
    await writeRandomModel(dir, SHAPES["minueza-32m-shape"], { tokenizerFrom: MINUEZA_DIR, seed: 11, dtype: "f16" });
    return dir;
  })();
}

Deno.test({
  name: "story in a terminal (tmux): Ctrl-C mid-stream prints the statistics and exits 130",
  ignore: !tmuxAvailable && !inCi,
  async fn() {
    const term = new Terminal("story");
    const model = await minuezaModel();
    const stderr = `${model}/story.stderr`;
    try {
      // Through `deno task`, as the README says to run it; the shell prints the exit status.
      const story = shellCommand([
        Deno.execPath(),
        "task",
        "story",
        "--model",
        model,
        "--max-tokens",
        "100000",
        "--ignore-eos",
        "Once upon a time",
      ]);
      await term.start(`${story} 2> '${stderr}'; echo "[exited $?]"`, ROOT);
      const storyText = (t: string) => t.slice(t.indexOf("Once upon a time") + "Once upon a time".length).trim();
      const first = storyText(await term.waitFor("the story to start", (t) => storyText(t).length >= 5));
      await term.waitFor("more of the story", (t) => storyText(t).length > first.length + 5);
      assert.equal(await term.state(), "0", "still generating when Ctrl-C is pressed");
      await term.send("C-c");
      const text = await term.waitFor("the story to exit", (t) => /\[exited \d+\]/.test(t), 30_000);
      assert.match(text, /\[exited 130\]/);
      const errors = await Deno.readTextFile(stderr);
      assert.match(errors, /generated \d+ tokens \(interrupted\); load \d+ ms, first token \d+ ms/);
      assert.doesNotMatch(errors, /Bad resource|story: /);
    } finally {
      await term.close();
    }
  },
});

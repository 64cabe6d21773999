/**
 * The command-line tools as a user runs them: `story`, `graph` and `make-model` in subprocesses, with
 * the permissions their deno.json tasks grant.
 */

import assert from "node:assert/strict";
import { loadModel } from "../models/model.ts";
import { STORY_DIR } from "./helpers.ts";
import { ROOT, type Run, runDeno } from "./subprocess.ts";

const PERMS = ["--allow-read", "--allow-write", "--allow-env", "--allow-net", "--allow-ffi"];

function run(script: string, args: string[], options: { stdin?: string; env?: Record<string, string> } = {}) {
  return runDeno(["run", ...PERMS, `examples/${script}`, ...args], options);
}

function noStack(r: Run): void {
  assert.ok(!/^\s+at /m.test(r.stderr), `no stack trace expected:\n${r.stderr}`);
  assert.equal(r.stderr.trim().split("\n").length, 1, `one line expected:\n${r.stderr}`);
}

const STORY = ["--model", STORY_DIR, "--max-tokens", "24"];

Deno.test("story streams text on stdout and statistics on stderr; the seed fixes the text", async () => {
  const a = await run("story.ts", [...STORY, "--seed", "7", "Once upon a time"]);
  assert.equal(a.code, 0, a.stderr);
  assert.ok(a.stdout.startsWith("Once upon a time"), a.stdout);
  assert.ok(a.stdout.trim().length > "Once upon a time".length + 20, `a continuation: ${JSON.stringify(a.stdout)}`);
  assert.match(a.stderr, /prompt 6 tokens, generated 24 tokens \(maxTokens\)/);
  assert.match(a.stderr, /prefill \d+(\.\d+)? tok\/s, decode \d+(\.\d+)? tok\/s/);
  assert.match(a.stderr, /seed 7/);

  const b = await run("story.ts", [...STORY, "--seed", "7", "Once upon a time"]);
  assert.equal(b.stdout, a.stdout);
  const c = await run("story.ts", [...STORY, "--seed", "8", "--temperature", "1.5", "Once upon a time"]);
  assert.equal(c.code, 0, c.stderr);
  assert.notEqual(c.stdout, a.stdout);
});

Deno.test("story: greedy with --stop and --ignore-eos, and the prompt from stdin", async () => {
  const greedy = [...STORY, "--temperature", "0", "--max-tokens", "60"];
  const full = await run("story.ts", [...greedy, "--ignore-eos", "Once upon a time"]);
  assert.equal(full.code, 0, full.stderr);
  const cut = full.stdout.indexOf(".", "Once upon a time".length);
  assert.ok(cut > 0, `greedy text has a full stop: ${full.stdout}`);
  const stopped = await run("story.ts", [...greedy, "--stop", ".", "Once upon a time"]);
  assert.equal(stopped.code, 0, stopped.stderr);
  assert.equal(stopped.stdout.trimEnd(), full.stdout.slice(0, cut).trimEnd());
  assert.match(stopped.stderr, /\(stop\)/);

  const piped = await run("story.ts", greedy, { stdin: "Once upon a time\n" });
  assert.equal(piped.code, 0, piped.stderr);
  assert.match(piped.stderr, /prompt 6 tokens/);
  const plain = await run("story.ts", [...greedy, "Once upon a time"]);
  assert.equal(piped.stdout, plain.stdout);
});

Deno.test("story: --help, bad flags (exit 2) and a missing model (exit 1)", async () => {
  const help = await run("story.ts", ["--help"]);
  assert.equal(help.code, 0);
  for (const flag of ["--model", "--backend", "--max-tokens", "--top-p", "--seed", "--stop", "--ignore-eos"]) {
    assert.ok(help.stdout.includes(flag), `help mentions ${flag}`);
  }

  const unknown = await run("story.ts", ["--bogus", "x"]);
  assert.equal(unknown.code, 2);
  assert.match(unknown.stderr, /"--bogus"/);
  noStack(unknown);

  for (
    const [args, flag] of [
      [["--top-p", "3"], "--top-p"],
      [["--max-tokens", "many"], "--max-tokens"],
      [["--backend", "quantum"], "--backend"],
      [["--dtype", "f8"], "--dtype"],
      [["--kv-dtype", "q8_0"], "--kv-dtype"],
      [["--max-tokens"], "--max-tokens"],
    ] as const
  ) {
    const r = await run("story.ts", [...STORY.slice(0, 2), ...args]);
    assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
    assert.ok(r.stderr.includes(flag), `${args.join(" ")} names ${flag}: ${r.stderr}`);
    noStack(r);
  }

  const missing = await run("story.ts", ["--model", "/no/such/model-dir", "hi"]);
  assert.equal(missing.code, 1);
  assert.match(missing.stderr, /"\/no\/such\/model-dir"/);
  assert.match(missing.stderr, /--model DIR/);
  noStack(missing);
});

Deno.test("story without --model finds the bundled story model offline", async () => {
  const empty = await Deno.makeTempDir({ prefix: "hf-empty-" });
  try {
    const env = { HF_HUB_CACHE: empty, HF_ENDPOINT: "http://127.0.0.1:9", LLM_MODELS_DIR: `${empty}/none` };
    const r = await run("story.ts", ["--max-tokens", "8", "--seed", "1", "Once upon a time"], { env });
    assert.equal(r.code, 0, r.stderr);
    assert.ok(r.stderr.includes(`${STORY_DIR} on ts`), r.stderr);
  } finally {
    await Deno.remove(empty, { recursive: true });
  }
});

Deno.test("graph prints the model's graph as text and as DOT", async () => {
  const text = await run("graph.ts", ["--model", STORY_DIR]);
  assert.equal(text.code, 0, text.stderr);
  assert.match(text.stdout, /^weight model\.embed_tokens\.weight: f32\[2048, 128\]$/m);
  assert.match(text.stdout, /= embedding\(tokens, model\.embed_tokens\.weight\)$/m);
  assert.match(text.stdout, /^output logits/m);

  const dot = await run("graph.ts", ["--model", STORY_DIR, "--format", "dot"]);
  assert.equal(dot.code, 0, dot.stderr);
  assert.ok(dot.stdout.startsWith("digraph model {"), dot.stdout.slice(0, 40));
  assert.ok(dot.stdout.trimEnd().endsWith("}"));
  assert.ok((dot.stdout.match(/->/g) ?? []).length > 20);

  const bad = await run("graph.ts", ["--format", "svg"]);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /--format "svg"/);
});

Deno.test("make-model writes a loadable random model; the same seed gives the same bytes", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "make-model-" });
  try {
    const shape = {
      architectures: ["LlamaForCausalLM"],
      hidden_size: 64,
      intermediate_size: 96,
      num_hidden_layers: 2,
      num_attention_heads: 4,
      num_key_value_heads: 2,
      vocab_size: 32002,
      max_position_embeddings: 128,
      rms_norm_eps: 1e-5,
      tie_word_embeddings: true,
      bos_token_id: 1,
      eos_token_id: 2,
    };
    await Deno.writeTextFile(`${tmp}/tiny.json`, JSON.stringify(shape));
    const make = (out: string, seed: string, dtype = "f32") =>
      run("make_model.ts", [`${tmp}/tiny.json`, "--out", `${tmp}/${out}`, "--seed", seed, "--dtype", dtype]);
    const [a, b, c, h] = [
      await make("a", "5"),
      await make("b", "5"),
      await make("c", "6"),
      await make("h", "5", "f16"),
    ];
    for (const r of [a, b, c, h]) assert.equal(r.code, 0, r.stderr);
    assert.equal(a.stdout.trim(), `${tmp}/a`);
    const bytes = (d: string) => Deno.readFile(`${tmp}/${d}/model.safetensors`);
    assert.deepEqual(await bytes("a"), await bytes("b"));
    assert.notDeepEqual(await bytes("a"), await bytes("c"));
    assert.ok((await bytes("h")).length < (await bytes("a")).length * 0.6, "f16 is about half the size");

    const model = await loadModel(`${tmp}/a`);
    assert.equal(model.config.hiddenSize, 64);
    assert.equal(model.tokenizer.vocabSize, 32002);
    const ids: number[] = [];
    for await (const t of model.generateTokens("Hello", { maxTokens: 4, temperature: 0 })) ids.push(t.id);
    assert.equal(ids.length, 4);
    await model.dispose();

    const unknown = await run("make_model.ts", ["stories1t"]);
    assert.equal(unknown.code, 2);
    assert.match(unknown.stderr, /Unknown shape "stories1t"/);
    noStack(unknown);
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});

Deno.test("bench --json times the story model at --parallel 1,3, beside a llama.cpp kit and llama-batched-bench", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "bench-kit-" });
  try {
    // A stand-in for the anchor kit with the same command lines, logging how it was called.
    const kit = `${tmp}/kit`;
    await Deno.mkdir(`${kit}/node_modules/node-llama-cpp`, { recursive: true });
    await Deno.writeTextFile(
      `${kit}/gguf.mjs`,
      `import fs from "node:fs";
const [dir, out, , type] = process.argv.slice(2);
fs.appendFileSync(${JSON.stringify(`${tmp}/calls.log`)}, JSON.stringify(["gguf", dir, out, type]) + "\\n");
fs.writeFileSync(out, "GGUF");
console.log(JSON.stringify({ out, type }));`,
    );
    await Deno.writeTextFile(
      `${kit}/llamacpp.mjs`,
      `import fs from "node:fs";
const a = process.argv.slice(2);
fs.appendFileSync(${JSON.stringify(`${tmp}/calls.log`)}, JSON.stringify(a) + "\\n");
const t = Number(a[a.indexOf("--threads") + 1]);
const s = (m) => ({ median: m, min: m, max: m, all: [m] });
console.log(JSON.stringify({ prefill_tok_s: s(1000 * t), decode_tok_s: s(100 / t) }));`,
    );
    // A stand-in for llama-batched-bench: its JSON lines (one per -npl value), S_TG = 50 × pl × t.
    const batched = `${tmp}/llama-batched-bench`;
    await Deno.writeTextFile(
      batched,
      `#!/bin/sh
echo "batched $*" >> '${tmp}/calls.log'
echo "llama_batched_bench: some log line" >&2
t=1; npl=1
while [ $# -gt 0 ]; do
  case "$1" in -t) t=$2 ;; -npl) npl=$2 ;; esac
  shift
done
for pl in $(echo "$npl" | tr , ' '); do
  printf '{"n_kv_max": 99, "pp": 8, "tg": 4, "pl": %s, "speed_pp": %s, "speed_tg": %s}\\n' "$pl" $((700 * pl)) $((50 * pl * t))
done
`,
    );
    await Deno.chmod(batched, 0o755);
    const args = ["--model", "story", "--prompt", "8", "--gen", "4", "--reps", "1", "--parallel", "1,3", "--json"];
    args.push("--llamacpp", kit, "--llama-batched-bench", batched);
    const cmd = new Deno.Command(Deno.execPath(), {
      // No --allow-ffi: the bench skips the native bandwidth measurement (a 1 GiB read) and the native backend.
      args: ["run", "--allow-read", "--allow-write", "--allow-env", "--allow-run", "examples/bench.ts", ...args],
      cwd: ROOT,
      stdout: "piped",
      stderr: "piped",
      env: { LLM_CACHE_DIR: `${tmp}/cache`, LLM_MODELS_DIR: `${tmp}/none` },
    });
    const out = await cmd.output();
    const stderr = new TextDecoder().decode(out.stderr);
    assert.equal(out.code, 0, stderr);
    const rows = new TextDecoder().decode(out.stdout).trim().split("\n").map((l) => JSON.parse(l));
    assert.deepEqual(rows.map((r) => r.parallel), [1, 3]);
    const close = (a: number, b: number) => Math.abs(a - b) <= 1e-9 * Math.max(1, Math.abs(b));
    for (const r of rows) {
      assert.equal(r.model, "story");
      assert.equal(r.backend, "ts");
      assert.deepEqual([r.promptTokens, r.genTokens], [8, 4]);
      assert.equal(r.groups, "embeddings f32, attention f32, ffn f32, norms f32");
      assert.equal(r.weightBytes, 2624000);
      assert.ok(r.prefillTokS > 0 && r.decodeTokS > 0 && r.perSequenceDecodeTokS > 0, JSON.stringify(r));
      assert.ok(close(r.msPerToken, 1000 / r.perSequenceDecodeTokS));
      // llama-batched-bench's best over 1 and 2 threads at this row's parallel count.
      const b = r.llamaBatched;
      assert.deepEqual([b.parallel, b.decodeTokS, b.decodeThreads, b.prefillTokS], [
        r.parallel,
        100 * r.parallel,
        2,
        700 * r.parallel,
      ]);
      assert.deepEqual(b.byThreads["1"], { prefill: 700 * r.parallel, decode: 50 * r.parallel });
      assert.ok(close(r.batchedDecodeRatio, r.decodeTokS / b.decodeTokS));
    }
    // One generation: the aggregate is that generation's own rate.
    const [one, three] = rows;
    assert.ok(close(one.decodeTokS, one.perSequenceDecodeTokS));
    // The kit's bench runs one sequence: it stands beside the parallel 1 row only.
    assert.deepEqual([one.llama.prefillTokS, one.llama.prefillThreads, one.llama.decodeTokS, one.llama.decodeThreads], [
      2000,
      2,
      100,
      1,
    ]);
    assert.ok(close(one.prefillRatio, one.prefillTokS / 2000));
    assert.ok(close(one.decodeRatio, one.decodeTokS / 100));
    assert.equal(three.llama, undefined);

    const calls = (await Deno.readTextFile(`${tmp}/calls.log`)).trim().split("\n");
    const gguf = `${tmp}/cache/models/gguf/story-F32.gguf`;
    // The kit converts into a partial file beside the target, which is renamed over it once whole; once.
    const convert = JSON.parse(calls[0]);
    const partial = `${tmp}/cache/models/gguf/.story-F32.${convert[2].split(".").at(-3)}.partial.gguf`;
    assert.deepEqual(convert, ["gguf", STORY_DIR, partial, "F32"]);
    assert.deepEqual([...Deno.readDirSync(`${tmp}/cache/models/gguf`)].map((e) => e.name), ["story-F32.gguf"]);
    assert.equal(await Deno.readTextFile(gguf), "GGUF");
    assert.equal(calls.length, 5);
    for (const [i, t] of [[1, "1"], [2, "2"]] as const) {
      const c = JSON.parse(calls[i]).join(" ");
      assert.ok(c.startsWith(`bench ${gguf} --prompt 8 --gen 4 --reps 1`), c);
      assert.ok(c.includes(`--threads ${t} --kv F32 --json`), c);
    }
    // The same GGUF, a context for three sequences of prompt and generation, every parallel count in one run.
    for (const [i, t] of [[3, "1"], [4, "2"]] as const) {
      assert.equal(
        calls[i],
        `batched -m ${gguf} -c 39 -npp 8 -ntg 4 -npl 1,3 -t ${t} -ctk f32 -ctv f32 --output-format jsonl`,
      );
    }
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});

Deno.test("bench: bad --parallel and --llama-batched-bench values are one-line errors (exit 2)", async () => {
  for (
    const [args, text] of [
      [["--parallel", "0"], '--parallel "0"'],
      [["--parallel", "1,x"], '--parallel "x"'],
      [["--gen", "1"], '--gen "1"'],
      [["--llama-batched-bench", "/no/such/binary"], '--llama-batched-bench "/no/such/binary"'],
    ] as const
  ) {
    const r = await run("bench.ts", ["--model", "story", ...args]);
    assert.equal(r.code, 2, `${args.join(" ")}: ${r.stderr}`);
    assert.ok(r.stderr.includes(text), `${args.join(" ")}: ${r.stderr}`);
    noStack(r);
  }
  // A binary it may not run is refused before the engine's rows run (the bench task grants node and cat only).
  const denied = await run("bench.ts", ["--model", "story", "--llama-batched-bench", Deno.execPath()]);
  assert.equal(denied.code, 1, denied.stderr);
  assert.ok(denied.stderr.includes(`run access is not granted (run with --allow-run=${Deno.execPath()})`));
  noStack(denied);
});

Deno.test("the bench prompt is the anchor kit's pseudo-random id list", async () => {
  const { kitPrompt } = await import("../examples/bench.ts");
  // The kit's formula with exact integer arithmetic.
  let s = 12345n;
  const expected = Array.from({ length: 300 }, () => {
    s = (s * 1103515245n + 12345n) % 2n ** 32n;
    return 3 + Number(s % 2000n);
  });
  assert.deepEqual(kitPrompt(300, 32002), expected);
  assert.ok(kitPrompt(50, 40).every((id) => id >= 3 && id < 40));
});

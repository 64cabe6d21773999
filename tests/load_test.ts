/**
 * The load tool (`deno task load`) as a user runs it: a small run on the story model (ts backend)
 * answers every request with sane numbers and stops its server; a model it cannot chat with, a
 * server that cannot start and bad flags are one-line errors with their exit codes. No timing
 * thresholds: the numbers are only checked for consistency.
 */

import assert from "node:assert/strict";
import { STORY_DIR } from "./helpers.ts";
import { type Run, runDeno } from "./subprocess.ts";

/** A chat template for the story model (which has none); the same as in chat_test.ts. */
const STORY_TEMPLATE = "{{ bos_token }}{% for m in messages %}" +
  "{% if m.role == 'system' %}{{ m.content }}\n" +
  "{% elif m.role == 'user' %}Question: {{ m.content }}\n" +
  "{% else %}Answer:{{ m.content }}\n{% endif %}" +
  "{% endfor %}{% if add_generation_prompt %}Answer:{% endif %}";

/** Runs `deno task load` with `args`. */
function load(...args: string[]): Promise<Run> {
  return runDeno(["task", "load", ...args]);
}

/** The tool's stderr lines, without the line `deno task` prints first. */
function errors(r: Run): string[] {
  return r.stderr.trim().split("\n").filter((l) => l !== "" && !l.startsWith("Task "));
}

/** Asserts that `p` describes `count` values, in order. */
function assertPercentiles(p: { p50: number; p99: number; max: number; count: number }, count: number, what: string) {
  assert.equal(p.count, count, what);
  assert.ok(0 <= p.p50 && p.p50 <= p.p99 && p.p99 <= p.max && Number.isFinite(p.max), `${what}: ${JSON.stringify(p)}`);
}

Deno.test("load: a small run on the story model answers every request, reports sane numbers, and stops its server", async () => {
  const dir = await Deno.makeTempDir({ prefix: "load_" });
  try {
    const template = `${dir}/template.jinja`;
    await Deno.writeTextFile(template, STORY_TEMPLATE);
    const common = ["--model", STORY_DIR, "--template-file", template, "--backend", "ts", "--parallel", "3"];
    const r = await load(...common, "--concurrency", "8", "--max-tokens", "12", "--timeout", "120", "--json");
    assert.equal(r.code, 0, r.stderr);
    const report = JSON.parse(r.stdout);
    assert.deepEqual(
      [report.model, report.backend, report.parallel, report.concurrency, report.maxTokens],
      [STORY_DIR, "ts", 3, 8, 12],
    );
    assert.deepEqual([report.completed, report.failed, report.healthFailures, report.errors], [8, 0, 0, []]);
    // Each answer has at least one token and at most max_tokens; the aggregate rate is their sum over the wall time.
    assert.ok(report.completionTokens >= 8 && report.completionTokens <= 8 * 12, String(report.completionTokens));
    assert.ok(report.wallMs > 0);
    assert.ok(Math.abs(report.tokS - report.completionTokens / (report.wallMs / 1000)) < 1e-6 * report.tokS);
    assertPercentiles(report.timeToFirstTokenMs, 8, "time to first token");
    assert.ok(report.timeToFirstTokenMs.max <= report.wallMs);
    // A gap between every two content chunks of an answer: fewer gaps than tokens, some of them.
    assert.ok(report.interTokenMs.count > 0 && report.interTokenMs.count < report.completionTokens);
    assertPercentiles(report.interTokenMs, report.interTokenMs.count, "inter-token latency");
    assertPercentiles(report.healthMs, report.healthMs.count, "/health latency");
    assert.ok(report.healthMs.count >= 1, "/health was polled during the run");
    // The server is gone.
    assert.match(report.url, /^http:\/\/127\.0\.0\.1:\d+$/);
    await assert.rejects(fetch(`${report.url}/health`));

    // The table, for people.
    const table = await load(...common, "--concurrency", "2", "--max-tokens", "4");
    assert.equal(table.code, 0, table.stderr);
    assert.match(table.stdout, /^\| time to first token \| [\d.]+ \| [\d.]+ \| [\d.]+ \| 2 \|$/m);
    assert.match(table.stdout, /^\| inter-token latency \|/m);
    assert.match(table.stdout, /^\| \/health latency \(polled every 50 ms\) \|/m);
    assert.match(table.stdout, /^2 of 2 requests answered, \d+ tokens in [\d.]+ s: [\d.]+ tok\/s aggregate$/m);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("load: a model without a chat template, a server that cannot start, and bad flags are one-line errors", async () => {
  const noTemplate = await load("--model", STORY_DIR, "--concurrency", "1");
  assert.equal(noTemplate.code, 2, noTemplate.stderr);
  assert.deepEqual(errors(noTemplate), [
    'load: Model "story" has no chat template: pass one with --template-file FILE',
  ]);

  // A request the server refuses (a prompt past a 16-token context) fails the run, which still ends cleanly.
  const dir = await Deno.makeTempDir({ prefix: "load_" });
  try {
    await Deno.writeTextFile(`${dir}/template.jinja`, STORY_TEMPLATE);
    const refused = await load(
      ...["--model", STORY_DIR, "--template-file", `${dir}/template.jinja`, "--context-length", "16"],
      ...["--concurrency", "2", "--max-tokens", "32"],
    );
    assert.equal(refused.code, 1, refused.stderr);
    const lines = errors(refused);
    assert.equal(lines.at(-1), "load: 2 of 2 requests and 0 /health polls failed");
    assert.match(lines[0], /^load: request \d: status 400: .*context_length_exceeded/);
    assert.match(refused.stdout, /^0 of 2 requests answered/m);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }

  const missing = await load("--model", "/no/such/model-dir", "--concurrency", "1");
  assert.equal(missing.code, 1, missing.stderr);
  assert.equal(errors(missing).length, 1, missing.stderr);
  assert.match(
    errors(missing)[0],
    /^load: The server exited \(code 1\) before listening: serve: .*"\/no\/such\/model-dir"/,
  );

  for (
    const [flag, value] of [["--concurrency", "0"], ["--max-tokens", "x"], ["--timeout", "0"], ["--backend", "gpu9"]]
  ) {
    const r = await load("--model", STORY_DIR, flag, value);
    assert.equal(r.code, 2, `${flag} ${value}: ${r.stderr}`);
    assert.deepEqual(errors(r).length, 1, r.stderr);
    assert.ok(errors(r)[0].includes(`${flag} "${value}"`), r.stderr);
  }

  const help = await load("--help");
  assert.equal(help.code, 0);
  for (const flag of ["--model", "--parallel", "--concurrency", "--max-tokens", "--timeout", "--json"]) {
    assert.ok(help.stdout.includes(flag), `help mentions ${flag}`);
  }
});

/**
 * The server against hostile and unlucky clients (issue 13), on 127.0.0.1: a
 * client that disconnects during a long prefill frees its slot within a chunk,
 * huge prompts are refused before they are tokenized and long ones are
 * tokenized off the event loop, slow clients are timed out and open
 * connections capped, API keys, Content-Type and Host checks, and a client
 * that vanishes mid-body is logged as one line.
 *
 * The model is the real story model, with a chat template passed in.
 */

import assert from "node:assert/strict";
import OpenAI from "openai";
import { loadModel, type Model } from "../models/model.ts";
import { type RunningServer, type StartOptions, startServer } from "../server/mod.ts";
import { registerInstrumentedTs, STORY_DIR } from "./helpers.ts";

/** A chat template for the story model (which has none); the same as in server_test.ts. */
const STORY_TEMPLATE = "{{ bos_token }}{% for m in messages %}" +
  "{% if m.role == 'system' %}{{ m.content }}\n" +
  "{% elif m.role == 'user' %}Question: {{ m.content }}\n" +
  "{% else %}Answer:{{ m.content }}\n{% endif %}" +
  "{% endfor %}{% if add_generation_prompt %}Answer:{% endif %}";

/** Milliseconds each step of the slow backend takes at least: a prefill of many chunks lasts seconds. */
const SLOW_STEP_MS = 150;
registerInstrumentedTs("hardening-slow-ts", () => new Promise((r) => setTimeout(r, SLOW_STEP_MS)));

interface ModelSetup {
  contextLength?: number;
  prefillChunk?: number;
  backend?: string;
}

async function withServer(
  options: Partial<StartOptions>,
  fn: (s: RunningServer, model: Model) => Promise<void>,
  setup: ModelSetup = {},
): Promise<void> {
  const model = await loadModel(STORY_DIR, { contextLength: 256, backend: "ts", ...setup });
  const server = await startServer({ models: [{ id: "story", model, template: STORY_TEMPLATE }], port: 0, ...options });
  try {
    await fn(server, model);
  } finally {
    await server.close();
    await model.dispose();
  }
}

async function post(url: string, body: unknown, init: RequestInit = {}): Promise<Response> {
  return await fetch(url, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: typeof body === "string" ? body : JSON.stringify(body),
    ...init,
  });
}

async function waitFor(what: string, ok: () => boolean | Promise<boolean>, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!(await ok())) {
    if (Date.now() > end) throw new Error(`Timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

function errorOf(body: unknown): { message: string; type: string; param: unknown; code: unknown } {
  const e = (body as { error?: { message: string; type: string; param: unknown; code: unknown } }).error;
  assert.equal(typeof e, "object", `no error object in ${JSON.stringify(body)}`);
  assert.ok(/^[A-Z]/.test(e!.message), `message ${e!.message}`);
  assert.ok("param" in e! && "code" in e!);
  return e!;
}

Deno.test("server hardening: a client that disconnects during a long prefill frees its slot within a chunk", async () => {
  await withServer(
    { parallel: 1, maxQueue: 4, cacheBytes: 0 },
    async (server) => {
      // 448 prompt tokens in chunks of 16 at 150 ms a step: a prefill of over 4 s.
      const prompt = Array.from({ length: 448 }, (_, i) => 100 + (i % 500));
      const gone = new AbortController();
      const first = post(`${server.url}/v1/completions`, { model: "story", prompt, max_tokens: 8, stream: true }, {
        signal: gone.signal,
      }).catch((e) => e);
      await waitFor("the long prompt to run", () => server.stats().running === 1);
      await new Promise((r) => setTimeout(r, 3 * SLOW_STEP_MS)); // well into the prefill
      const next = post(`${server.url}/v1/completions`, { model: "story", prompt: "Hi", max_tokens: 1 });
      await waitFor("the next request to queue", () => server.stats().queued === 1);
      const t0 = Date.now();
      gone.abort();
      await first;
      const res = await next;
      assert.equal(res.status, 200);
      assert.equal((await res.json()).usage.completion_tokens, 1);
      // The next request needs about three steps of its own (a prefill chunk, a token); the abandoned prefill had
      // over 25 chunks (about 4 s) left. One chunk of it may finish first.
      const waited = Date.now() - t0;
      assert.ok(waited < 8 * SLOW_STEP_MS, `the next request waited ${waited} ms`);
      await waitFor("the slot to be free", () => server.stats().running === 0);
      assert.deepEqual([server.stats().cancelled, server.stats().completed], [1, 1]);
      assert.equal(server.stats().cache.live, 0);
    },
    { contextLength: 512, prefillChunk: 16, backend: "hardening-slow-ts" },
  );
});

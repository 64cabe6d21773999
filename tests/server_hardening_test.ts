/**
 * The server against hostile and unlucky clients (issue 13), on 127.0.0.1: a
 * client that disconnects during a long prefill frees its slot within a chunk,
 * huge prompts are refused before they are tokenized and long ones are
 * tokenized off the event loop, slow clients are timed out and open
 * connections capped, API keys, Content-Type and Host checks, and a client
 * that vanishes mid-body is logged as one line. A client that goes away
 * however it goes (mid-stream with a write failing first, with requests
 * pipelined, before its answer, its whole process dying) leaves no slot
 * taken: every response body not delivered is cancelled, and a generation
 * whose client left ends even when nothing reads its body; a connection past
 * the cap gets its 503 as the answer to its request.
 *
 * The model is the real story model, with a chat template passed in.
 */

import assert from "node:assert/strict";
import OpenAI from "openai";
import { loadModel, type Model } from "../models/model.ts";
import { createHandler, type RunningServer, type StartOptions, startServer } from "../server/mod.ts";
import { serveHttp1 } from "../server/http1.ts";
import { ChatTemplate, encodeChatPrompt } from "../models/chat/session.ts";
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
    body: typeof body === "string" || body instanceof Uint8Array ? body as BodyInit : JSON.stringify(body),
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

/** Sends `head` (and `body`) over a raw connection with `Connection: close`; resolves with the whole reply. */
async function rawRequest(port: number, head: string[], body = ""): Promise<{ status: number; text: string }> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    const bytes = new TextEncoder().encode(body);
    const lines = [...head, `Content-Length: ${bytes.byteLength}`, "Connection: close"];
    await conn.write(new TextEncoder().encode(`${lines.join("\r\n")}\r\n\r\n`));
    if (bytes.byteLength) await conn.write(bytes);
    const text = await new Response(conn.readable).text();
    return { status: Number(/^HTTP\/1\.1 (\d{3})/.exec(text)?.[1]), text };
  } finally {
    try {
      conn.close();
    } catch { /* closed with its readable */ }
  }
}

Deno.test("server hardening: --api-key keys lock the API (401 in the OpenAI shape), /health and the page stay open", async () => {
  const key = "sk-local-0123456789";
  await withServer({ apiKeys: ["sk-other-key", key] }, async (server) => {
    const client = (apiKey: string) => new OpenAI({ baseURL: `${server.url}/v1`, apiKey, maxRetries: 0 });
    const ask = { model: "story", messages: [{ role: "user" as const, content: "Hi" }], max_tokens: 2 };
    for (const wrong of ["sk-local-012345678", "sk-local-01234567890", "nope"]) {
      await assert.rejects(client(wrong).chat.completions.create(ask), (e) => {
        assert.ok(e instanceof OpenAI.AuthenticationError, String(e));
        assert.equal(e.status, 401);
        assert.equal(e.code, "invalid_api_key");
        assert.equal(e.type, "invalid_request_error");
        return true;
      });
      await assert.rejects(client(wrong).models.list(), (e) => e instanceof OpenAI.AuthenticationError);
    }
    // No key at all: the same error, in the OpenAI shape, with a challenge.
    const bare = await post(`${server.url}/v1/completions`, { model: "story", prompt: "Hi", max_tokens: 2 });
    assert.equal(bare.status, 401);
    assert.match(bare.headers.get("www-authenticate") ?? "", /^Bearer/);
    const e = errorOf(await bare.json());
    assert.deepEqual([e.type, e.code, e.param], ["invalid_request_error", "invalid_api_key", null]);
    assert.equal(server.stats().completed, 0);
    // The right key: everything works.
    const ok = await client(key).chat.completions.create(ask);
    assert.equal(ok.choices[0].message.role, "assistant");
    assert.deepEqual((await client(key).models.list()).data.map((m) => m.id), ["story"]);
    // Open without a key.
    const health = await fetch(`${server.url}/health`);
    assert.equal(health.status, 200);
    assert.equal((await health.json()).status, "ok");
    const page = await fetch(`${server.url}/`);
    assert.equal(page.status, 200);
    await page.body?.cancel();
  });
  const model = await loadModel(STORY_DIR, { contextLength: 256 });
  await assert.rejects(createHandler({ models: [{ id: "story", model }], apiKeys: [key, ""] }), /apiKeys\[1\]/);
  await model.dispose();
});

Deno.test("server hardening: a POST body must be declared application/json (415), so a cross-origin form or text POST runs nothing", async () => {
  await withServer({}, async (server) => {
    const body = JSON.stringify({ model: "story", prompt: "Once upon a time", max_tokens: 2 });
    const url = `${server.url}/v1/completions`;
    const sends: [string, () => Promise<Response>][] = [
      ["text/plain (what a page's fetch or form sends without asking)", () => fetch(url, { method: "POST", body })],
      ["a form", () => post(url, body, { headers: { "content-type": "application/x-www-form-urlencoded" } })],
      ["no Content-Type", () => fetch(url, { method: "POST", body: new Blob([body]) })],
      ["multipart", () => post(url, body, { headers: { "content-type": "multipart/form-data; boundary=x" } })],
    ];
    for (const [what, send] of sends) {
      const res = await send();
      assert.equal(res.status, 415, what);
      assert.equal(errorOf(await res.json()).code, "unsupported_media_type", what);
    }
    assert.deepEqual([server.stats().completed, server.stats().cancelled], [0, 0]);
    // JSON, with or without parameters, is served.
    for (const type of ["application/json", "Application/JSON; charset=utf-8"]) {
      const res = await post(url, body, { headers: { "content-type": type } });
      assert.equal(res.status, 200, type);
      assert.equal((await res.json()).object, "text_completion");
    }
    assert.equal(server.stats().completed, 2);
  });
});

Deno.test("server hardening: on loopback a Host other than this machine's names is refused (403), against DNS rebinding", async () => {
  await withServer({ allowedHosts: ["llm.internal"] }, async (server) => {
    const port = server.addr.port;
    const get = (host: string) => rawRequest(port, ["GET /v1/models HTTP/1.1", `Host: ${host}`]);
    for (const host of ["evil.example", `evil.example:${port}`, "127.0.0.1.evil.example", "localhost.evil.example"]) {
      const res = await get(host);
      assert.equal(res.status, 403, `${host}: ${res.text}`);
      assert.match(res.text, /"code":"host_not_allowed"/);
    }
    for (const host of [`127.0.0.1:${port}`, `localhost:${port}`, "localhost", `LLM.internal:${port}`, "[::1]"]) {
      const res = await get(host);
      assert.equal(res.status, 200, `${host}: ${res.text}`);
    }
    // A rebinding page could also post: refused before anything runs.
    const chat = JSON.stringify({ model: "story", messages: [{ role: "user", content: "Hi" }], max_tokens: 2 });
    const posted = await rawRequest(port, [
      "POST /v1/chat/completions HTTP/1.1",
      `Host: evil.example:${port}`,
      "Content-Type: application/json",
    ], chat);
    assert.equal(posted.status, 403);
    assert.equal(server.stats().completed, 0);
  });
});

Deno.test("server hardening: a client that vanishes mid-body is logged as one line, not an internal error", async () => {
  const logged: string[] = [];
  const original = console.error;
  console.error = (...args: unknown[]) => logged.push(args.map(String).join(" "));
  try {
    await withServer({}, async (server) => {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port: server.addr.port });
      const head = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" +
        "Content-Length: 1000\r\n\r\n";
      await conn.write(new TextEncoder().encode(`${head}{"model": "story", "messages": [`));
      await new Promise((r) => setTimeout(r, 200));
      conn.close();
      await waitFor("the server to log the vanished client", () => logged.length > 0);
      await new Promise((r) => setTimeout(r, 200)); // anything else it would log
      // The server keeps serving.
      const res = await post(`${server.url}/v1/completions`, { model: "story", prompt: "Once", max_tokens: 2 });
      assert.equal(res.status, 200);
      await res.body?.cancel();
    });
  } finally {
    console.error = original;
  }
  assert.equal(logged.length, 1, logged.join("\n---\n"));
  assert.ok(!logged[0].includes("\n"), logged[0]);
  assert.match(logged[0], /^POST \/v1\/chat\/completions: The client went away after \d+ bytes of the body/);
});

/** Polls `/health` every few milliseconds until `until` settles; resolves with the slowest answer's milliseconds. */
async function slowestHealth(url: string, until: Promise<unknown>): Promise<{ worst: number; polls: number }> {
  let settled = false;
  void until.finally(() => settled = true).catch(() => {});
  let worst = 0;
  let polls = 0;
  while (!settled && polls < 2000) {
    const t0 = performance.now();
    const res = await fetch(`${url}/health`);
    await res.json();
    worst = Math.max(worst, performance.now() - t0);
    if (Deno.env.get("DEBUG_POLLS")) console.log(polls, (performance.now() - t0).toFixed(1));
    polls++;
    await new Promise((r) => setTimeout(r, 2));
  }
  return { worst, polls };
}

/** `examples/serve.ts` in a subprocess (its own event loop, as in use), serving the story model as "story". */
async function spawnServe(args: string[]): Promise<{ url: string; stop: () => Promise<string> }> {
  const dir = await Deno.makeTempDir({ prefix: "serve_hardening_" });
  await Deno.writeTextFile(`${dir}/template.jinja`, STORY_TEMPLATE);
  const child = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--allow-read",
      "--allow-env",
      "--allow-net=127.0.0.1",
      new URL("../examples/serve.ts", import.meta.url).pathname,
      ...["--model", STORY_DIR, "--name", "story", "--template-file", `${dir}/template.jinja`, "--port", "0"],
      ...args,
    ],
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const errText: string[] = [];
  const errDone = (async () => {
    for await (const t of child.stderr.pipeThrough(new TextDecoderStream())) errText.push(t);
  })();
  const lines = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  const stop = async () => {
    try {
      child.kill("SIGTERM");
    } catch { /* already gone */ }
    await child.status;
    await lines.cancel().catch(() => {});
    await errDone.catch(() => {});
    await Deno.remove(dir, { recursive: true });
    return errText.join("");
  };
  let banner = "";
  while (!/http:\/\/127\.0\.0\.1:\d+/.test(banner)) {
    const r = await lines.read();
    if (r.done) {
      const err = await stop();
      throw new Error(`The server did not start: ${banner}${err}`);
    }
    banner += r.value;
  }
  return { url: /http:\/\/127\.0\.0\.1:\d+/.exec(banner)![0], stop };
}

Deno.test("server hardening: a 1 MB prompt is refused before tokenizing, a long one is tokenized off the event loop", async () => {
  const model = await loadModel(STORY_DIR, { contextLength: 512 });
  const server = await spawnServe(["--context-length", "512", "--cache-mb", "0"]);
  try {
    // What /health takes with nothing else to do, on this machine now (busy machines are slower): the bounds
    // below are on top of it. Before prompts were refused by size and tokenized in a worker, a 1 MB prompt
    // stalled /health for seconds, and the 36,000-character one for about 300 ms.
    const idle = await slowestHealth(server.url, new Promise((r) => setTimeout(r, 300)));
    // 1 MB of text: far more characters than 512 tokens of the longest token (71 characters) could hold.
    const huge = "Once upon a time, there was a little dog. ".repeat(25_000).slice(0, 1_000_000);
    const enc = new TextEncoder();
    const completion = enc.encode(JSON.stringify({ model: "story", prompt: huge, max_tokens: 2 }));
    const chat = enc.encode(
      JSON.stringify({ model: "story", messages: [{ role: "user", content: huge }], max_tokens: 2 }),
    );
    const requests: [string, () => Promise<Response>][] = [
      ["completion", () => post(`${server.url}/v1/completions`, completion)],
      ["chat", () => post(`${server.url}/v1/chat/completions`, chat)],
    ];
    // Each case runs up to three times and passes on the first whose slowest /health is within the bound: a stall
    // the server causes happens every time, a busy machine's scheduling hiccup does not.
    const measure = async (
      what: string,
      send: () => Promise<Response>,
      bound: number,
      check: (res: Response, took: number) => Promise<void>,
    ) => {
      const seen: string[] = [];
      for (let attempt = 0; attempt < 3; attempt++) {
        const t0 = performance.now();
        const sent = send();
        const { worst, polls } = await slowestHealth(server.url, sent);
        await check(await sent, performance.now() - t0);
        seen.push(`${worst.toFixed(0)} ms over ${polls} polls`);
        if (worst < idle.worst + bound) return;
      }
      assert.fail(`${what}: /health took ${seen.join(", ")} (idle: ${idle.worst.toFixed(0)} ms; bound +${bound} ms)`);
    };
    for (const [what, send] of requests) {
      await measure(what, send, 50, async (res, took) => {
        assert.equal(res.status, 400, what);
        const e = errorOf(await res.json());
        assert.equal(e.code, "context_length_exceeded", what);
        assert.match(e.message, /characters/, what);
        assert.ok(took < 1000, `${what}: refused after ${took.toFixed(0)} ms`);
      });
    }
    // 36,000 characters: within the bound (512 × 71), so it is tokenized (a few hundred ms of work), in the worker:
    // /health keeps answering, and the count is the tokenizer's own.
    const long = enc.encode(JSON.stringify({
      model: "story",
      prompt: "Once upon a time, there was a little dog. ".repeat(900).slice(0, 36_000),
      max_tokens: 2,
    }));
    const tokens = model.tokenizer.encode("Once upon a time, there was a little dog. ".repeat(900).slice(0, 36_000));
    await measure("a long prompt", () => post(`${server.url}/v1/completions`, long), 100, async (res) => {
      assert.equal(res.status, 400);
      const e = errorOf(await res.json());
      assert.equal(e.code, "context_length_exceeded");
      assert.match(e.message, new RegExp(`^The prompt has ${tokens.length} tokens`));
    });
    // Long prompts that fit are answered as before.
    const fits = "something unexpected happened. The ".repeat(130); // 35 characters a token
    assert.ok(fits.length > 4096);
    const ok = await post(`${server.url}/v1/completions`, { model: "story", prompt: fits, max_tokens: 2 });
    assert.equal(ok.status, 200, await ok.clone().text());
    assert.equal((await ok.json()).usage.prompt_tokens, model.tokenizer.encode(fits).length);
  } finally {
    await server.stop();
    await model.dispose();
  }
});

/**
 * A raw client that sends `prefix` at once, then one byte of `drip` every 100 ms (at most 60 of them); resolves
 * with what the server answered (maybe nothing) and how long after opening the server closed the connection.
 */
async function trickle(port: number, prefix: string, drip: string): Promise<{ reply: string; closedMs: number }> {
  const t0 = performance.now();
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  const enc = new TextEncoder();
  let closed = false;
  const reading = (async () => {
    let reply = "";
    const buf = new Uint8Array(4096);
    try {
      for (let n = await conn.read(buf); n !== null; n = await conn.read(buf)) {
        reply += new TextDecoder().decode(buf.subarray(0, n));
      }
    } catch { /* reset: closed too */ }
    closed = true;
    return { reply, closedMs: performance.now() - t0 };
  })();
  try {
    if (prefix) await conn.write(enc.encode(prefix));
    for (let i = 0; i < 60 && !closed; i++) {
      await new Promise((r) => setTimeout(r, 100));
      if (!closed) await conn.write(enc.encode(drip[i % drip.length]));
    }
  } catch { /* the server closed it */ }
  const result = await Promise.race([reading, new Promise<null>((r) => setTimeout(() => r(null), 1000))]);
  try {
    conn.close();
  } catch { /* closed */ }
  if (result === null) return { reply: "", closedMs: Infinity }; // still open after 6 s of trickling
  return result;
}

Deno.test("server hardening: clients trickling headers or a body are closed after the timeouts; open connections are capped", async () => {
  await withServer({ headersTimeoutMs: 1000, bodyTimeoutMs: 1000, maxConnections: 4 }, async (server) => {
    const port = server.addr.port;
    const head = "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ";
    // Three trickle their headers; a normal request still gets in beside them.
    const slow = [0, 1, 2].map(() => trickle(port, head, "abcdefghij"));
    await new Promise((r) => setTimeout(r, 200));
    const health = await rawRequest(port, ["GET /health HTTP/1.1", "Host: 127.0.0.1"]);
    assert.equal(health.status, 200, health.text);
    // A fourth fills the cap (once the server has closed that request's connection): the next connection is
    // refused at once, in the OpenAI shape.
    await new Promise((r) => setTimeout(r, 100));
    slow.push(trickle(port, head, "abcdefghij"));
    await new Promise((r) => setTimeout(r, 200));
    const t0 = performance.now();
    const refused = await rawRequest(port, ["GET /health HTTP/1.1", "Host: 127.0.0.1"]);
    assert.equal(refused.status, 503, refused.text);
    assert.match(refused.text, /"code":"too_many_connections"/);
    assert.ok(performance.now() - t0 < 500, `refused after ${performance.now() - t0} ms`);
    // Each trickler is told 408 and closed after about the 1 s header timeout (they would go on for 6 s).
    for (const r of await Promise.all(slow)) {
      assert.match(r.reply, /^HTTP\/1\.1 408 /, r.reply);
      assert.match(r.reply, /"code":"request_timeout"/);
      assert.ok(r.closedMs > 900 && r.closedMs < 3000, `closed after ${r.closedMs.toFixed(0)} ms`);
    }
    // A body trickled after its headers: 408 after the 1 s body timeout, and nothing ran.
    const body = await trickle(
      port,
      "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 200\r\n\r\n",
      '{"model": "story", "prompt": "Once upon a time", "max_tokens": 2, "pad": "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx',
    );
    assert.match(body.reply, /^HTTP\/1\.1 408 /, body.reply);
    assert.match(body.reply, /Request body timeout/);
    assert.ok(body.closedMs > 900 && body.closedMs < 3000, `closed after ${body.closedMs.toFixed(0)} ms`);
    // A connection that never sends anything is closed without a word after the header timeout.
    const silent = await trickle(port, "", "");
    assert.equal(silent.reply, "");
    assert.ok(silent.closedMs > 900 && silent.closedMs < 3000, `closed after ${silent.closedMs.toFixed(0)} ms`);
    // Once they are gone, everything works again, over fetch's keep-alive connections too.
    await waitFor(
      "the tricklers' connections to close",
      async () => (await rawRequest(port, ["GET /health HTTP/1.1", "Host: 127.0.0.1"])).status === 200,
      3000,
    );
    for (let i = 0; i < 3; i++) {
      const res = await post(`${server.url}/v1/completions`, { model: "story", prompt: "Once", max_tokens: 2 });
      assert.equal(res.status, 200);
      await res.json();
    }
    assert.equal(server.stats().completed, 3);
  });
});

Deno.test("server hardening: deno task serve takes --header-timeout, --max-connections, --api-key-file and --allowed-hosts", async () => {
  const keyFile = await Deno.makeTempFile({ prefix: "serve_keys_" });
  await Deno.writeTextFile(keyFile, "# keys\nsk-from-file-1\n\n  sk-from-file-2  \n");
  const server = await spawnServe([
    ...["--header-timeout", "1", "--body-timeout", "1.5", "--max-connections", "3"],
    ...["--api-key-file", keyFile, "--allowed-hosts", "llm.test,other.test"],
  ]);
  try {
    const port = Number(new URL(server.url).port);
    // Three tricklers fill the cap before anything else connects: the next connection is refused, and each is
    // closed after the 1 s header timeout.
    const slow = [0, 1, 2].map(() => trickle(port, "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ", "abc"));
    await new Promise((r) => setTimeout(r, 300));
    const refused = await rawRequest(port, ["GET /health HTTP/1.1", "Host: 127.0.0.1"]);
    assert.equal(refused.status, 503, refused.text);
    for (const r of await Promise.all(slow)) {
      assert.match(r.reply, /^HTTP\/1\.1 408 /, r.reply);
      assert.ok(r.closedMs > 900 && r.closedMs < 3000, `closed after ${r.closedMs.toFixed(0)} ms`);
    }
    // The server closes its side at once, and its count drops when the client's side is gone too.
    await waitFor(
      "the tricklers' connections to close",
      async () => (await rawRequest(port, ["GET /health HTTP/1.1", "Host: 127.0.0.1"])).status === 200,
      3000,
    );
    // The keys come from the file; the listed hosts are allowed, others not.
    const client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: "sk-from-file-2", maxRetries: 0 });
    const res = await client.completions.create({ model: "story", prompt: "Once", max_tokens: 2 });
    assert.equal(res.object, "text_completion");
    const wrong = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: "sk-from-file-3", maxRetries: 0 });
    await assert.rejects(wrong.models.list(), (e) => e instanceof OpenAI.AuthenticationError);
    const named = await rawRequest(port, ["GET /health HTTP/1.1", `Host: other.test:${port}`]);
    assert.equal(named.status, 200, named.text);
    const other = await rawRequest(port, ["GET /health HTTP/1.1", "Host: third.test"]);
    assert.equal(other.status, 403, other.text);
  } finally {
    await server.stop();
    await Deno.remove(keyFile);
  }
});

Deno.test("server hardening: the HTTP/1.1 layer reads chunked bodies, pipelined requests, 100-continue and HTTP/1.0", async () => {
  const logged: string[] = [];
  const server = serveHttp1({
    hostname: "127.0.0.1",
    port: 0,
    headersTimeoutMs: 2000,
    bodyTimeoutMs: 2000,
    maxConnections: 8,
    maxHeadBytes: 4096,
    onLog: (line) => logged.push(line),
  }, async (req) => {
    const body = req.body ? await req.text() : "";
    return new Response(`${req.method} ${new URL(req.url).pathname} ${body.length}:${body}`);
  });
  // The client never shuts down its sending side: like hyper's (Deno.serve's) default, that means it went away.
  const exchange = async (text: string): Promise<string> => {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: server.addr.port });
    await conn.write(new TextEncoder().encode(text));
    return await new Response(conn.readable).text();
  };
  /** The bodies of the chunked responses in `reply`, in order (a malformed one ends the list with its rest). */
  const bodies = (reply: string) => {
    const out: string[] = [];
    let at = 0;
    for (let responses = 0; at < reply.length && responses < 10; responses++) {
      const headEnd = reply.indexOf("\r\n\r\n", at);
      if (headEnd < 0) return [...out, `malformed: ${reply.slice(at)}`];
      const interim = reply.startsWith("HTTP/1.1 100 ", at);
      at = headEnd + 4;
      if (interim) continue;
      let body = "";
      for (let chunks = 0; chunks < 100; chunks++) {
        const lineEnd = reply.indexOf("\r\n", at);
        const size = parseInt(reply.slice(at, lineEnd), 16);
        if (lineEnd < 0 || !(size >= 0)) return [...out, `malformed: ${reply.slice(at)}`];
        at = lineEnd + 2;
        if (size === 0) break;
        body += reply.slice(at, at + size);
        at += size + 2;
      }
      at += 2; // the end of the (empty) trailers
      out.push(body);
    }
    return out;
  };
  try {
    const h = "Host: 127.0.0.1\r\n";
    // A chunked body with an extension and a trailer.
    const chunked = await exchange(
      `POST /a HTTP/1.1\r\n${h}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n` +
        "5;x=1\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n",
    );
    assert.match(chunked, /^HTTP\/1\.1 200 OK\r\n/);
    assert.deepEqual(bodies(chunked), ["POST /a 11:hello world"]);
    // Three pipelined requests on one connection, answered in order.
    const piped = await exchange(
      `GET /one HTTP/1.1\r\n${h}\r\nPOST /two HTTP/1.1\r\n${h}Content-Length: 3\r\n\r\nabc` +
        `GET /three HTTP/1.1\r\n${h}Connection: close\r\n\r\n`,
    );
    assert.deepEqual(bodies(piped), ["GET /one 0:", "POST /two 3:abc", "GET /three 0:"]);
    // Expect: 100-continue gets its interim answer once the handler reads the body.
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: server.addr.port });
    await conn.write(
      new TextEncoder().encode(
        `POST /c HTTP/1.1\r\n${h}Content-Length: 2\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n`,
      ),
    );
    const buf = new Uint8Array(1024);
    const n = await conn.read(buf);
    assert.equal(new TextDecoder().decode(buf.subarray(0, n!)), "HTTP/1.1 100 Continue\r\n\r\n");
    await conn.write(new TextEncoder().encode("ok"));
    const rest = await new Response(conn.readable).text();
    assert.deepEqual(bodies(rest), ["POST /c 2:ok"]);
    // HTTP/1.0: no chunking, then closed.
    const old = await exchange("GET /old HTTP/1.0\r\n\r\n");
    assert.match(old, /^HTTP\/1\.1 200 OK\r\n[^]*connection: close\r\n\r\nGET \/old 0:$/);
    // Bad heads: 431 past the size limit, 400 for garbage, 505 for another version; each closes.
    assert.match(await exchange(`GET / HTTP/1.1\r\n${h}X-Big: ${"a".repeat(5000)}\r\n\r\n`), /^HTTP\/1\.1 431 /);
    assert.match(await exchange("NOT HTTP\r\n\r\n"), /^HTTP\/1\.1 400 /);
    assert.match(await exchange(`GET / HTTP/2.0\r\n${h}\r\n`), /^HTTP\/1\.1 505 /);
    assert.match(
      await exchange(`POST / HTTP/1.1\r\n${h}Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n`),
      /^HTTP\/1\.1 400 /,
    );
    // fetch works over it, keep-alive included.
    for (let i = 0; i < 3; i++) {
      const res = await fetch(`http://127.0.0.1:${server.addr.port}/f`, { method: "POST", body: `n${i}` });
      assert.equal(await res.text(), `POST /f 2:n${i}`);
    }
    assert.deepEqual(logged, []);
  } finally {
    await server.shutdown();
  }
  assert.equal(server.connections, 0);
});

Deno.test("server hardening: special-token text in a chat message stays text (special tokens come only from the template)", async () => {
  await withServer({ cacheBytes: 0 }, async (server, model) => {
    const template = ChatTemplate.forModel(model, STORY_TEMPLATE);
    const bos = model.tokenizer.bosToken!;
    assert.equal(bos, "<|start_story|>");
    // Short (encoded at once) and long (encoded in the worker) conversations whose user text spells the BOS token.
    for (const filler of ["", "something unexpected happened. The ".repeat(130)]) {
      const messages = [{ role: "user", content: `${filler}${bos}Once upon a time${bos}` }];
      const res = await post(`${server.url}/v1/chat/completions`, { model: "story", messages, max_tokens: 1 });
      assert.equal(res.status, 200);
      const promptTokens = (await res.json()).usage.prompt_tokens;
      const safe = encodeChatPrompt(template, model.tokenizer, messages);
      const naive = model.tokenizer.encode(template.render(messages), { addSpecialTokens: false });
      assert.equal(promptTokens, safe.length);
      // The typed BOS texts became text tokens (only the template's own BOS is the control token), where
      // encoding the rendered text makes them control tokens.
      const bosCount = (ids: number[]) => ids.filter((id) => id === model.tokenizer.bosId).length;
      assert.equal(bosCount(safe), 1, `${safe}`);
      assert.ok(bosCount(naive) >= 2, `${naive}`);
      assert.notDeepEqual(safe, naive);
    }
  }, { contextLength: 512 });
});

/**
 * A handler for the HTTP/1.1 layer's own tests whose bodies never end: each is a stream that gives a line every few
 * milliseconds for as long as it is read, as a generation's does, and records in `cancelled` the path of each one
 * cancelled. `GET /quick` answers at once, `/late` only once the request's signal aborts (the client left first).
 */
function endlessBodies(
  cancelled: string[],
  signals: AbortSignal[],
  held?: Promise<void>,
): (req: Request) => Promise<Response> {
  return async (req) => {
    const path = new URL(req.url).pathname;
    signals.push(req.signal);
    if (path === "/quick") return new Response("quick");
    if (path === "/late") await new Promise((r) => req.signal.addEventListener("abort", r, { once: true }));
    if (path === "/held") await held;
    let lines = 0;
    return new Response(
      new ReadableStream<Uint8Array>({
        async pull(controller) {
          await new Promise((r) => setTimeout(r, 5));
          controller.enqueue(new TextEncoder().encode(`line ${lines++}\n`));
        },
        cancel() {
          cancelled.push(`${req.method} ${path}`);
        },
      }, { highWaterMark: 0 }),
    );
  };
}

/** Reads from `conn` until `pattern` has come (or the connection ends); what came. */
async function readUntil(conn: Deno.Conn, pattern: RegExp): Promise<string> {
  let text = "";
  const buf = new Uint8Array(4096);
  while (!pattern.test(text)) {
    const n = await conn.read(buf);
    if (n === null) break;
    text += new TextDecoder().decode(buf.subarray(0, n));
  }
  return text;
}

Deno.test("server hardening: the HTTP/1.1 layer cancels every response body it does not deliver, however the client left", async () => {
  const cancelled: string[] = [];
  const signals: AbortSignal[] = [];
  const held = Promise.withResolvers<void>();
  const server = serveHttp1({
    hostname: "127.0.0.1",
    port: 0,
    headersTimeoutMs: 5000,
    bodyTimeoutMs: 5000,
    maxConnections: 8,
    onLog: () => {},
  }, endlessBodies(cancelled, signals, held.promise));
  const h = "Host: 127.0.0.1\r\n";
  const enc = new TextEncoder();
  /** Opens a stream, reads its first lines, sends `more` (pipelined bytes, read by the server's watch), leaves. */
  const leaveMidStream = async (path: string, more: Uint8Array) => {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: server.addr.port });
    await conn.write(enc.encode(`GET ${path} HTTP/1.1\r\n${h}\r\n`));
    assert.match(await readUntil(conn, /line 1\n/), /^HTTP\/1\.1 200 OK\r\n/);
    if (more.length > 0) await conn.write(more);
    await new Promise((r) => setTimeout(r, 50)); // the server reads what it may of it
    conn.close(); // with response bytes unread: a reset, so the server's next write fails
    await waitFor(`the body of ${path} to be cancelled`, () => cancelled.includes(`GET ${path}`));
  };
  try {
    // The client pipelines its next request, then leaves: the server went on watching after those bytes came.
    await leaveMidStream("/pipelined", enc.encode(`GET /quick HTTP/1.1\r\n${h}\r\n`));
    // More pipelined than the server reads ahead: only the failed write tells, and the body is cancelled then.
    const big = "x".repeat(100_000);
    await leaveMidStream(
      "/flooded",
      enc.encode(`POST /quick HTTP/1.1\r\n${h}Content-Length: ${big.length}\r\n\r\n${big}`),
    );
    // The client left before the answer came: it is never read, and cancelled.
    const conn = await Deno.connect({ hostname: "127.0.0.1", port: server.addr.port });
    await conn.write(enc.encode(`GET /late HTTP/1.1\r\n${h}\r\n`));
    await waitFor("the request to arrive", () => signals.length === 3);
    conn.close();
    await waitFor("the body of /late to be cancelled", () => cancelled.includes("GET /late"));
    // The client leaves with an answer unread (a reset) just before the next one is ready: the server's write
    // fails before it has seen the reset (the load client of the report, dying as its requests got their slots).
    const reset = await Deno.connect({ hostname: "127.0.0.1", port: server.addr.port });
    await reset.write(enc.encode(`GET /quick HTTP/1.1\r\n${h}\r\nGET /held HTTP/1.1\r\n${h}\r\n`));
    await waitFor("the held request to arrive", () => signals.length === 5);
    await new Promise((r) => setTimeout(r, 50)); // the answer to /quick is in
    reset.close();
    held.resolve(); // in the same turn: the server writes before it reads again
    await waitFor("the body of /held to be cancelled", () => cancelled.includes("GET /held"));
    // A HEAD's body is not sent: cancelled too.
    const headed = await Deno.connect({ hostname: "127.0.0.1", port: server.addr.port });
    await headed.write(enc.encode(`HEAD /head HTTP/1.1\r\n${h}Connection: close\r\n\r\n`));
    assert.match(await new Response(headed.readable).text(), /^HTTP\/1\.1 200 OK\r\n[^]*\r\n\r\n$/);
    await waitFor("the body of /head to be cancelled", () => cancelled.includes("HEAD /head"));
    // A request whose response was delivered is not aborted when its client leaves afterwards.
    const keep = await Deno.connect({ hostname: "127.0.0.1", port: server.addr.port });
    await keep.write(enc.encode(`GET /quick HTTP/1.1\r\n${h}\r\n`));
    assert.match(await readUntil(keep, /\r\n0\r\n\r\n$/), /^HTTP\/1\.1 200 OK\r\n[^]*quick/);
    keep.close();
    await waitFor("the connection to close", () => server.connections === 0);
    await new Promise((r) => setTimeout(r, 50));
    assert.equal(signals.at(-1)!.aborted, false);
    assert.deepEqual(cancelled.sort(), ["GET /flooded", "GET /held", "GET /late", "GET /pipelined", "HEAD /head"]);
  } finally {
    await server.shutdown(500);
  }
});

Deno.test("server hardening: a generation whose client left while nobody read its body gives its slots back", async () => {
  const model = await loadModel(STORY_DIR, { contextLength: 256, backend: "ts" });
  const h = await createHandler({ models: [{ id: "story", model, template: STORY_TEMPLATE }], parallel: 2 });
  /** A request answered 200 whose body is never read, as when a server layer drops the response. */
  const unread = async (body: Record<string, unknown>, signal?: AbortSignal) => {
    const res = await h.handler(
      new Request("http://127.0.0.1/v1/chat/completions", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ model: "story", messages: [{ role: "user", content: "Hi" }], max_tokens: 64, ...body }),
        signal,
      }),
    );
    assert.equal(res.status, 200);
    return res;
  };
  try {
    // The client leaves (the request's signal aborts): before its first token is asked for, and after some.
    for (const stream of [true, false]) {
      const gone = new AbortController();
      const res = await unread({ stream, n: 2 }, gone.signal);
      assert.equal(h.stats().running, 2);
      gone.abort();
      await waitFor(`the slots of an unread ${stream ? "stream" : "answer"} to be free`, () => h.stats().running === 0);
      // Whoever reads it after all gets its end: an error event in a stream, else a broken body (the status was sent).
      if (stream) assert.match(await res.text(), /^data: [^]*"error":\{"message":"The client disconnected"/);
      else await assert.rejects(res.text());
    }
    const gone = new AbortController();
    const res = await unread({ stream: true }, gone.signal);
    const reader = res.body!.getReader();
    for (let i = 0; i < 3; i++) await reader.read();
    gone.abort(); // between two reads: the next never comes
    await waitFor("the slot of a stream left between reads to be free", () => h.stats().running === 0);
    reader.releaseLock();
    assert.deepEqual([h.stats().cancelled, h.stats().completed], [3, 0]);
    // The server closing stops an unread one too.
    await unread({ stream: true });
    assert.equal(h.stats().running, 1);
  } finally {
    await h.close();
    await model.dispose();
  }
  assert.equal(h.stats().running, 0);
  assert.equal(h.stats().cache.live, 0);
});

Deno.test("server hardening: a connection past the cap is answered 503 once its request is in, not before", async () => {
  const server = serveHttp1({
    hostname: "127.0.0.1",
    port: 0,
    headersTimeoutMs: 5000,
    bodyTimeoutMs: 5000,
    maxConnections: 2,
    onLog: () => {},
  }, () => Promise.resolve(new Response("ok")));
  const port = server.addr.port;
  const held = [
    await Deno.connect({ hostname: "127.0.0.1", port }),
    await Deno.connect({ hostname: "127.0.0.1", port }),
  ];
  const enc = new TextEncoder();
  try {
    await waitFor("the cap to be reached", () => server.connections === 2);
    // An answer before the request would be, to an HTTP client, an unexpected message on a broken connection.
    const refused = await Deno.connect({ hostname: "127.0.0.1", port });
    let answered = false;
    const reply = new Response(refused.readable).text().finally(() => answered = true);
    await new Promise((r) => setTimeout(r, 100));
    assert.equal(answered, false, "the 503 came before the request");
    await refused.write(enc.encode("GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"));
    const text = await reply;
    assert.match(
      text,
      /^HTTP\/1\.1 503 Service Unavailable\r\n[^]*connection: close\r\n[^]*"code":"too_many_connections"/,
    );
    // One that never sends a request is answered anyway, after a moment, and closed.
    const silent = await Deno.connect({ hostname: "127.0.0.1", port });
    assert.match(await new Response(silent.readable).text(), /^HTTP\/1\.1 503 /);
  } finally {
    for (const c of held) c.close();
    await server.shutdown(500);
  }
});

Deno.test("server hardening: a client process that dies with streams in flight, past the connection cap, leaves no slot taken", async () => {
  await withServer({ parallel: 4, maxQueue: 16, maxConnections: 6, cacheBytes: 0 }, async (server) => {
    // Seven streamed chats at once over fetch's pool: four run, two queue, one is past the cap. The process then
    // dies without closing anything (as the load client of the report did when its refused fetch failed).
    const client = `
      const url = Deno.args[0];
      for (let i = 0; i < 7; i++) {
        fetch(url + "/v1/chat/completions", {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ model: "story", messages: [{ role: "user", content: "Tell me a story " + i }],
            max_tokens: 200, stream: true }),
        }).then(async (res) => {
          if (res.status !== 200) return console.log(JSON.stringify({ status: res.status, text: await res.text() }));
          const reader = res.body.getReader();
          let text = "";
          while (!/"content":"[^"]/.test(text)) text += new TextDecoder().decode((await reader.read()).value);
          console.log(JSON.stringify({ status: 200 }));
        }, (e) => console.log(JSON.stringify({ error: String(e) })));
      }
      setInterval(() => {}, 1000);
    `;
    const child = new Deno.Command(Deno.execPath(), {
      args: ["eval", "--no-config", client, server.url],
      stdout: "piped",
      stderr: "null",
    }).spawn();
    const lines = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
    const seen: { status?: number; text?: string; error?: string }[] = [];
    let out = "";
    try {
      while (seen.filter((s) => s.status === 200).length < 4 || seen.length < 5) {
        const r = await lines.read();
        if (r.done) break;
        out += r.value;
        const done = out.split("\n");
        out = done.pop()!;
        seen.push(...done.map((l) => JSON.parse(l)));
      }
      assert.equal(server.stats().running, 4);
    } finally {
      child.kill("SIGKILL");
      await child.status;
      await lines.cancel().catch(() => {});
    }
    // Every stream of the dead client is cancelled and its queued requests dropped; the server serves on.
    await waitFor("the dead client's slots to be free", () => server.stats().running === 0, 10_000);
    assert.equal(server.stats().queued, 0);
    // The one past the cap was told so, as an answer to its request (fetch does not take an answer before it).
    const refused = seen.filter((s) => s.status !== 200);
    assert.equal(refused.length, 1, JSON.stringify(seen));
    assert.equal(refused[0].status, 503, JSON.stringify(refused[0]));
    assert.match(refused[0].text!, /"code":"too_many_connections"/);
    const res = await post(`${server.url}/v1/completions`, { model: "story", prompt: "Once", max_tokens: 2 });
    assert.equal(res.status, 200);
    assert.equal((await res.json()).usage.completion_tokens, 2);
  }, { backend: "hardening-slow-ts" });
});

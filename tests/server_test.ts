/**
 * The OpenAI-compatible server, driven with the official `openai` client and
 * raw `fetch` on 127.0.0.1: both endpoints streaming and not, `usage` and the
 * prompt cache, LRU eviction, the queue (429), client disconnects, bad input,
 * and a bounded load test against `examples/serve.ts` in a subprocess that
 * checks the server's memory returns to where it started.
 *
 * The model is the real story model with a chat template passed in.
 */

import assert from "node:assert/strict";
import OpenAI from "openai";
import { loadModel, type Model } from "../models/model.ts";
import { PromptCache, type RunningServer, type ServerOptions, startServer } from "../server/mod.ts";
import { registerInstrumentedTs, STORY_DIR } from "./helpers.ts";

/** A chat template for the story model (which has none); the same as in chat_test.ts. */
const STORY_TEMPLATE = "{{ bos_token }}{% for m in messages %}" +
  "{% if m.role == 'system' %}{{ m.content }}\n" +
  "{% elif m.role == 'user' %}Question: {{ m.content }}\n" +
  "{% else %}Answer:{{ m.content }}\n{% endif %}" +
  "{% endfor %}{% if add_generation_prompt %}Answer:{% endif %}";

const CONTEXT = 256;

/**
 * The ts backend at 8 ms a step at least: for the tests that must catch a generation
 * while it runs (the queue, disconnects), however fast the machine.
 */
registerInstrumentedTs("paced-ts", () => new Promise((r) => setTimeout(r, 8)));

async function withServer(
  options: Partial<ServerOptions>,
  fn: (s: RunningServer, client: OpenAI, model: Model) => Promise<void>,
  contextLength = CONTEXT,
  backend = "ts",
): Promise<void> {
  const model = await loadModel(STORY_DIR, { contextLength, backend });
  const server = await startServer({ models: [{ id: "story", model, template: STORY_TEMPLATE }], port: 0, ...options });
  const client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: "unused", maxRetries: 0 });
  try {
    await fn(server, client, model);
  } finally {
    await server.close();
    await model.dispose();
  }
}

function promptTokens(model: Model, messages: { role: string; content: string }[]): number {
  // Mirrors the template: BOS, "Question:"/"Answer:" lines, then "Answer:".
  let text = "<|start_story|>";
  for (const m of messages) {
    text += m.role === "system"
      ? `${m.content}\n`
      : m.role === "user"
      ? `Question: ${m.content}\n`
      : `Answer:${m.content}\n`;
  }
  return model.tokenizer.encode(`${text}Answer:`, { addSpecialTokens: false }).length;
}

function assertApiError(body: unknown, param: string | null, code?: string): void {
  const e = (body as { error: Record<string, unknown> }).error;
  assert.equal(typeof e, "object", `no error object in ${JSON.stringify(body)}`);
  assert.equal(typeof e.message, "string");
  assert.ok((e.message as string).length > 0 && /^[A-Z]/.test(e.message as string), `message ${e.message}`);
  assert.equal(typeof e.type, "string");
  assert.ok("param" in e && "code" in e);
  assert.equal(e.param, param);
  if (code !== undefined) assert.equal(e.code, code);
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

Deno.test("server: models, health, and chat completions with the openai client (JSON and streamed)", async () => {
  await withServer({}, async (server, client, model) => {
    const models = await client.models.list();
    assert.deepEqual(models.data.map((m) => m.id), ["story"]);
    assert.equal(models.data[0].object, "model");
    const health = await (await fetch(`${server.url}/health`)).json();
    assert.equal(health.status, "ok");

    const messages = [{ role: "system" as const, content: "A story." }, {
      role: "user" as const,
      content: "Who was Sam?",
    }];
    const res = await client.chat.completions.create({ model: "story", messages, max_tokens: 12, temperature: 0 });
    assert.equal(res.object, "chat.completion");
    assert.match(res.id, /^chatcmpl-/);
    assert.equal(res.model, "story");
    assert.equal(res.choices.length, 1);
    assert.equal(res.choices[0].message.role, "assistant");
    const text = res.choices[0].message.content!;
    assert.ok(text.length > 0);
    assert.ok(["stop", "length"].includes(res.choices[0].finish_reason));
    assert.equal(res.usage!.prompt_tokens, promptTokens(model, messages));
    assert.ok(res.usage!.completion_tokens >= 1 && res.usage!.completion_tokens <= 12);
    assert.equal(res.usage!.total_tokens, res.usage!.prompt_tokens + res.usage!.completion_tokens);

    const stream = await client.chat.completions.create({
      model: "story",
      messages,
      max_tokens: 12,
      temperature: 0,
      stream: true,
      stream_options: { include_usage: true },
    });
    let streamed = "";
    let chunks = 0;
    let finish: string | null = null;
    let usage: OpenAI.CompletionUsage | undefined;
    for await (const chunk of stream) {
      assert.equal(chunk.object, "chat.completion.chunk");
      const c = chunk.choices[0];
      if (c?.delta?.content) {
        streamed += c.delta.content;
        chunks++;
      }
      if (c?.finish_reason) finish = c.finish_reason;
      if (chunk.usage) usage = chunk.usage;
    }
    assert.equal(streamed, text);
    assert.ok(chunks > 1, "the answer came in one piece");
    assert.equal(finish, res.choices[0].finish_reason);
    assert.equal(usage!.prompt_tokens, res.usage!.prompt_tokens);
    assert.equal(usage!.completion_tokens, res.usage!.completion_tokens);
  });
});

Deno.test("server: completions, stop strings, seeds and max_tokens", async () => {
  await withServer({}, async (_server, client) => {
    const prompt = "Once upon a time";
    const greedy = await client.completions.create({ model: "story", prompt, max_tokens: 30, temperature: 0 });
    assert.equal(greedy.object, "text_completion");
    assert.equal(greedy.choices[0].finish_reason, "length");
    assert.equal(greedy.usage!.completion_tokens, 30);
    const text = greedy.choices[0].text;
    const words = text.trim().split(/\s+/);
    const stopWord = words[Math.min(5, words.length - 1)];
    const cut = await client.completions.create({
      model: "story",
      prompt,
      max_tokens: 30,
      temperature: 0,
      stop: [stopWord],
    });
    assert.equal(cut.choices[0].finish_reason, "stop");
    assert.equal(cut.choices[0].text, text.slice(0, text.indexOf(stopWord)));

    const sampled = async (seed: number) => {
      const s = await client.completions.create({
        model: "story",
        prompt,
        max_tokens: 16,
        temperature: 1,
        top_p: 0.9,
        seed,
        stream: true,
      });
      let out = "";
      for await (const c of s) out += c.choices[0]?.text ?? "";
      return out;
    };
    const a = await sampled(1);
    assert.equal(await sampled(1), a);
    assert.notEqual(await sampled(2), a);
  });
});

Deno.test("server: a follow-up turn reuses the cached prefix, with the same answer as without the cache", async () => {
  const conversation = async (cacheBytes: number) => {
    const out: { text: string; usage: OpenAI.CompletionUsage }[] = [];
    await withServer({ cacheBytes }, async (_server, client) => {
      const messages: OpenAI.ChatCompletionMessageParam[] = [
        { role: "system", content: "Stories about animals for small children." },
        { role: "user", content: "Tell me about the dog." },
      ];
      for (const next of ["What did the dog eat?", "Where did the dog sleep?"]) {
        const res = await client.chat.completions.create({ model: "story", messages, max_tokens: 10, temperature: 0 });
        const text = res.choices[0].message.content!;
        out.push({ text, usage: res.usage! });
        messages.push({ role: "assistant", content: text }, { role: "user", content: next });
      }
    });
    return out;
  };
  const cached = await conversation(64 << 20);
  const uncached = await conversation(0);
  assert.deepEqual(cached.map((t) => t.text), uncached.map((t) => t.text));
  assert.equal(cached[0].usage.prompt_tokens_details!.cached_tokens, 0);
  for (const t of uncached) assert.equal(t.usage.prompt_tokens_details!.cached_tokens, 0);
  const second = cached[1].usage;
  // The first request's prompt (less possibly its last token, re-tokenized with the answer) came from the cache.
  assert.ok(second.prompt_tokens_details!.cached_tokens! >= cached[0].usage.prompt_tokens - 1);
  assert.ok(second.prompt_tokens - second.prompt_tokens_details!.cached_tokens! <= 25, JSON.stringify(second));
});

Deno.test("server: the prompt cache stays within its budget, evicting the least recently used conversation", async () => {
  const model = await loadModel(STORY_DIR, { contextLength: CONTEXT });
  const seqBytes = PromptCache.sequenceBytes(model);
  const seq = model.createSequence();
  assert.equal(seqBytes, seq.kv.layers.reduce((n, l) => n + l.k.byteLength + l.v.byteLength, 0));
  await seq.dispose();
  await model.dispose();
  // An f16 KV cache counts half the bytes.
  const half = await loadModel(STORY_DIR, { contextLength: CONTEXT, kvDtype: "f16" });
  assert.equal(PromptCache.sequenceBytes(half), seqBytes / 2);
  await half.dispose();
  await withServer({ cacheBytes: 2 * seqBytes }, async (server, client) => {
    const ask = async (topic: string, extra: string[] = []) => {
      const messages: OpenAI.ChatCompletionMessageParam[] = [
        { role: "system", content: `Long ago there was a ${topic} who lived by the sea with a friend.` },
        { role: "user", content: `Tell me about the ${topic}.` },
      ];
      for (const e of extra) {
        messages.push({ role: "assistant", content: " It was happy." }, { role: "user", content: e });
      }
      const res = await client.chat.completions.create({ model: "story", messages, max_tokens: 4, temperature: 0 });
      return res.usage!;
    };
    await ask("cat");
    await ask("bird");
    const stats = () => fetch(`${server.url}/debug/stats`);
    assert.equal((await stats()).status, 404, "debug stats are off unless asked for");
    const s = server.stats();
    assert.equal(s.cache.sequences, 2);
    assert.equal(s.cache.bytes, 2 * seqBytes);
    // The bird is most recent: a third conversation evicts the cat.
    await ask("fish");
    assert.equal(server.stats().cache.sequences, 2);
    assert.ok(server.stats().cache.evictions >= 1);
    const bird = await ask("bird", ["And then?"]);
    const cat = await ask("cat", ["And then?"]);
    assert.ok(bird.prompt_tokens_details!.cached_tokens! > 15, `bird: ${JSON.stringify(bird)}`);
    assert.ok(cat.prompt_tokens_details!.cached_tokens! < 10, `cat: ${JSON.stringify(cat)}`);
    assert.ok(server.stats().cache.bytes <= 2 * seqBytes);
  });
});

Deno.test("server: a full queue answers 429; a client that disconnects cancels its generation and frees its slot", async () => {
  await withServer(
    { parallel: 1, maxQueue: 1, cacheBytes: 0 },
    async (server, client) => {
      // 480 paced tokens with end-of-story banned: seconds of work, so the request is surely running when the
      // others arrive and when it is cancelled.
      const body = {
        model: "story",
        prompt: "Once upon a time",
        max_tokens: 480,
        stream: true,
        temperature: 1,
        seed: 1,
        logit_bias: { "2": -100 },
      };
      const first = new AbortController();
      const res1 = await post(`${server.url}/v1/completions`, body, { signal: first.signal });
      assert.equal(res1.status, 200);
      const reader = res1.body!.getReader();
      const chunk = await reader.read();
      assert.ok(!chunk.done && new TextDecoder().decode(chunk.value).startsWith("data: "));
      assert.equal(server.stats().running, 1);

      // The second waits in the queue; the third is refused.
      const second = post(`${server.url}/v1/completions`, { ...body, stream: false, max_tokens: 3 });
      await waitFor("the second request to queue", () => server.stats().queued === 1);
      const third = await post(`${server.url}/v1/completions`, { ...body, stream: false, max_tokens: 3 });
      assert.equal(third.status, 429);
      assertApiError(await third.json(), null, "rate_limit_exceeded");
      await assert.rejects(
        client.completions.create({ model: "story", prompt: "Hi", max_tokens: 2 }),
        (e) => e instanceof OpenAI.RateLimitError && e.status === 429,
      );
      assert.equal(server.stats().rejected, 2);

      // Disconnect the first mid-stream: its generation stops and the queued one runs.
      first.abort();
      await reader.cancel().catch(() => {});
      const res2 = await second;
      assert.equal(res2.status, 200);
      const json2 = await res2.json();
      assert.equal(json2.usage.completion_tokens, 3);
      await waitFor("the slot to be free", () => server.stats().running === 0 && server.stats().queued === 0);
      const s = server.stats();
      assert.equal(s.cancelled, 1);
      assert.equal(s.completed, 1);
      // Nothing is kept with a zero cache budget: every sequence was freed.
      assert.equal(s.cache.live, 0);
      assert.equal(s.cache.sequences, 0);
    },
    512,
    "paced-ts",
  );
});

Deno.test("server: parallel requests generate at the same time, interleaved token by token", async () => {
  await withServer(
    { parallel: 2, maxQueue: 0, cacheBytes: 0 },
    async (server) => {
      const body = { model: "story", max_tokens: 480, stream: true, seed: 1, logit_bias: { "2": -100 } };
      const a = await post(`${server.url}/v1/completions`, { ...body, prompt: "Once upon a time" });
      const b = await post(`${server.url}/v1/completions`, { ...body, prompt: "The little dog" });
      assert.deepEqual([a.status, b.status], [200, 200]);
      assert.equal(server.stats().running, 2);
      const ra = a.body!.getReader();
      const rb = b.body!.getReader();
      // Both streams keep delivering while the other is open.
      for (let i = 0; i < 5; i++) {
        assert.equal((await ra.read()).done, false);
        assert.equal((await rb.read()).done, false);
      }
      const c = await post(`${server.url}/v1/completions`, { ...body, prompt: "Hi", stream: false, max_tokens: 2 });
      assert.equal(c.status, 429);
      await c.body?.cancel();
      await ra.cancel();
      await rb.cancel();
      await waitFor("both generations to stop", () => server.stats().running === 0);
      assert.equal(server.stats().cancelled, 2);
    },
    512,
    "paced-ts",
  );
});

Deno.test("server: a client that disconnects from a non-streamed request cancels its generation", async () => {
  await withServer(
    { cacheBytes: 0 },
    async (server) => {
      const ac = new AbortController();
      const body = { model: "story", prompt: "Once upon a time", max_tokens: 480, logit_bias: { "2": -100 }, seed: 3 };
      // The status line may come before the body: the abort then ends the body's read.
      const pending = post(`${server.url}/v1/completions`, body, { signal: ac.signal }).then((r) => r.text()).catch((
        e,
      ) => e);
      await waitFor("the request to run", () => server.stats().running === 1);
      const t0 = Date.now();
      ac.abort();
      assert.equal((await pending as Error).name, "AbortError");
      await waitFor("the generation to stop", () => server.stats().running === 0);
      // 480 paced tokens take over 3.8 s; the generation stopped well before.
      assert.ok(Date.now() - t0 < 1000, `stopped after ${Date.now() - t0} ms`);
      assert.deepEqual([server.stats().cancelled, server.stats().completed], [1, 0]);
      assert.equal(server.stats().cache.live, 0);
    },
    512,
    "paced-ts",
  );
});

Deno.test("server: bad requests get OpenAI-shaped 4xx errors and the server keeps serving", async () => {
  await withServer({ maxBodyBytes: 4096 }, async (server) => {
    const chat = `${server.url}/v1/chat/completions`;
    const ok = { model: "story", messages: [{ role: "user", content: "Hi" }], max_tokens: 2 };
    const cases: [string, () => Promise<Response>, number, string | null, string?][] = [
      ["malformed JSON", () => post(chat, "{ not json"), 400, null],
      ["a non-object body", () => post(chat, "[1, 2]"), 400, null],
      ["a wrong type", () => post(chat, { ...ok, temperature: "hot" }), 400, "temperature"],
      ["an out-of-range value", () => post(chat, { ...ok, top_p: 1.5 }), 400, "top_p"],
      [
        "a bad message",
        () => post(chat, { ...ok, messages: [{ role: "robot", content: "x" }] }),
        400,
        "messages[0].role",
      ],
      [
        "a non-string content",
        () => post(chat, { ...ok, messages: [{ role: "user", content: 5 }] }),
        400,
        "messages[0].content",
      ],
      ["empty messages", () => post(chat, { ...ok, messages: [] }), 400, "messages", "empty_array"],
      ["a missing model", () => post(chat, { messages: ok.messages }), 400, "model"],
      ["an unknown model", () => post(chat, { ...ok, model: "gpt-4" }), 404, "model", "model_not_found"],
      ["a bad stop", () => post(chat, { ...ok, stop: [""] }), 400, "stop"],
      ["n > 1", () => post(chat, { ...ok, n: 2 }), 400, "n"],
      [
        "max_tokens past the context",
        () => post(chat, { ...ok, max_tokens: CONTEXT }),
        400,
        "max_tokens",
        "context_length_exceeded",
      ],
      [
        "a prompt past the context",
        () => post(`${server.url}/v1/completions`, { model: "story", prompt: "word ".repeat(400) }),
        400,
        "prompt",
        "context_length_exceeded",
      ],
      ["an empty prompt", () => post(`${server.url}/v1/completions`, { model: "story", prompt: "" }), 400, "prompt"],
      [
        "an oversized body",
        () => post(chat, { ...ok, messages: [{ role: "user", content: "x".repeat(5000) }] }),
        413,
        null,
        "request_too_large",
      ],
      [
        "a chunked oversized body",
        () =>
          fetch(chat, {
            method: "POST",
            body: ReadableStream.from([new TextEncoder().encode(JSON.stringify({ ...ok, pad: "x".repeat(5000) }))]),
          }),
        413,
        null,
        "request_too_large",
      ],
      ["a wrong method", () => fetch(chat), 405, null, "method_not_allowed"],
      ["an unknown path", () => fetch(`${server.url}/v1/files`), 404, null, "not_found"],
    ];
    for (const [what, send, status, param, code] of cases) {
      const res = await send();
      assert.equal(res.status, status, `${what}: status ${res.status}`);
      assert.match(res.headers.get("content-type") ?? "", /application\/json/, what);
      assertApiError(await res.json(), param, code);
    }
    const res = await post(chat, ok);
    assert.equal(res.status, 200);
    assert.equal((await res.json()).choices[0].message.role, "assistant");
  });
});

Deno.test("server: a model without a chat template serves completions and refuses chat clearly", async () => {
  const model = await loadModel(STORY_DIR, { contextLength: CONTEXT });
  const server = await startServer({ models: [{ id: "plain", model }], port: 0 });
  try {
    const res = await post(`${server.url}/v1/chat/completions`, {
      model: "plain",
      messages: [{ role: "user", content: "x" }],
    });
    assert.equal(res.status, 400);
    assertApiError(await res.json(), "model", "no_chat_template");
    const ok = await post(`${server.url}/v1/completions`, { model: "plain", prompt: "Once", max_tokens: 2 });
    assert.equal(ok.status, 200);
    await ok.body?.cancel();
  } finally {
    await server.close();
    await model.dispose();
  }
});

Deno.test("server: /v1/models says which models can chat, so a client need not send a message to find out", async () => {
  const model = await loadModel(STORY_DIR, { contextLength: CONTEXT });
  const server = await startServer({
    models: [{ id: "plain", model }, { id: "story", model, template: STORY_TEMPLATE }],
    port: 0,
  });
  try {
    const list = await (await fetch(`${server.url}/v1/models`)).json();
    assert.equal(list.object, "list");
    assert.deepEqual(
      list.data.map((m: { id: string; object: string; capabilities: unknown }) => [m.id, m.object, m.capabilities]),
      [
        ["plain", "model", { chat_completions: false, completions: true }],
        ["story", "model", { chat_completions: true, completions: true }],
      ],
    );
    const one = await (await fetch(`${server.url}/v1/models/plain`)).json();
    assert.deepEqual(one, list.data[0]);
    // The openai client reads the same list (the extra field rides along).
    const client = new OpenAI({ baseURL: `${server.url}/v1`, apiKey: "unused", maxRetries: 0 });
    const seen = (await client.models.list()).data as (OpenAI.Model & { capabilities?: unknown })[];
    assert.deepEqual(seen.map((m) => m.capabilities), list.data.map((m: { capabilities: unknown }) => m.capabilities));
  } finally {
    await server.close();
    await model.dispose();
  }
});

Deno.test("server: load test on 127.0.0.1 (200 requests, 16 at once) — every request answered or refused, memory back to its start", async () => {
  const dir = await Deno.makeTempDir({ prefix: "serve_load_" });
  const templateFile = `${dir}/template.jinja`;
  await Deno.writeTextFile(templateFile, STORY_TEMPLATE);
  const cmd = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--allow-read",
      "--allow-env",
      "--allow-net=127.0.0.1",
      "--v8-flags=--expose-gc",
      new URL("../examples/serve.ts", import.meta.url).pathname,
      ...["--model", STORY_DIR, "--name", "story", "--template-file", templateFile, "--context-length", "256"],
      ...["--port", "0", "--parallel", "4", "--max-queue", "8", "--cache-mb", "2", "--debug"],
    ],
    stdout: "piped",
    stderr: "piped",
  });
  const child = cmd.spawn();
  const stderr = child.stderr.pipeThrough(new TextDecoderStream()).getReader();
  const errText: string[] = [];
  const errDone = (async () => {
    for (let r = await stderr.read(); !r.done; r = await stderr.read()) errText.push(r.value);
  })();
  const lines = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  try {
    let banner = "";
    while (!/http:\/\/127\.0\.0\.1:\d+/.test(banner)) {
      const r = await lines.read();
      if (r.done) throw new Error(`The server did not start: ${banner}${errText.join("")}`);
      banner += r.value;
    }
    const url = /http:\/\/127\.0\.0\.1:\d+/.exec(banner)![0];
    const stats = async () => await (await fetch(`${url}/debug/stats?gc=1`)).json();

    const request = async (i: number): Promise<"ok" | "busy"> => {
      const chat = i % 2 === 0;
      const stream = i % 3 === 0;
      const body = chat
        ? {
          model: "story",
          messages: [{ role: "user", content: `Question ${i % 7}?` }],
          max_tokens: 6,
          stream,
          seed: i,
        }
        : { model: "story", prompt: `Once upon a time ${i % 5}`, max_tokens: 6, stream, seed: i };
      const res = await post(`${url}/v1/${chat ? "chat/completions" : "completions"}`, body);
      if (res.status === 429) {
        assertApiError(await res.json(), null, "rate_limit_exceeded");
        return "busy";
      }
      assert.equal(res.status, 200, `request ${i}: status ${res.status}`);
      if (!stream) {
        const j = await res.json();
        assert.ok(j.usage.completion_tokens >= 1 && j.usage.completion_tokens <= 6);
        assert.ok(["stop", "length"].includes(j.choices[0].finish_reason));
        return "ok";
      }
      const text = await res.text();
      const events = text.split("\n\n").filter((e) => e.startsWith("data: "));
      assert.equal(events[events.length - 1], "data: [DONE]", `request ${i}: ${text}`);
      const last = JSON.parse(events[events.length - 2].slice(6));
      assert.ok(["stop", "length"].includes(last.choices[0].finish_reason), `request ${i}: ${text}`);
      return "ok";
    };

    // Warm up (compiled steps, the prompt cache filled to its budget), then measure the baseline.
    for (let i = 0; i < 24; i++) await request(i);
    const before = await stats();
    assert.equal(before.gcExposed, true);

    const results: ("ok" | "busy")[] = [];
    let next = 0;
    const worker = async () => {
      while (next < 200) results.push(await request(next++));
    };
    await Promise.all(Array.from({ length: 16 }, worker));
    assert.equal(results.length, 200);
    const ok = results.filter((r) => r === "ok").length;
    assert.ok(ok >= 50, `only ${ok} of 200 requests were answered`);

    await waitFor("the server to be idle", async () => (await stats()).running === 0);
    const after = await stats();
    assert.equal(after.queued, 0);
    assert.equal(after.completed - before.completed, ok);
    assert.equal(after.rejected - before.rejected, 200 - ok);
    // Sequences: only the prompt cache's, within its budget.
    assert.equal(after.cache.live, after.cache.sequences);
    assert.ok(after.cache.bytes <= after.cache.budgetBytes);
    // Memory after a full GC: the JS heap within 8 MiB of the baseline; external memory (array
    // buffers: the KV caches) within 1 MiB once the prompt cache's own change is counted out (the
    // warm-up fills the cache to its 2 MiB budget, so that change is small too).
    const heapGrowth = after.memory.heapUsed - before.memory.heapUsed;
    const cacheGrowth = after.cache.bytes - before.cache.bytes;
    const externalGrowth = after.memory.external - before.memory.external - cacheGrowth;
    assert.ok(heapGrowth < 8 << 20, `heap grew by ${heapGrowth} bytes`);
    assert.ok(externalGrowth < 1 << 20, `external memory grew by ${externalGrowth} bytes besides the cache`);
    assert.ok(Math.abs(cacheGrowth) <= 1 << 20, `the prompt cache grew by ${cacheGrowth} bytes`);
    console.log(
      `load test: ${ok} answered, ${
        200 - ok
      } refused (429); heap ${before.memory.heapUsed} → ${after.memory.heapUsed}, ` +
        `external ${before.memory.external} → ${after.memory.external}, rss ${before.memory.rss} → ${after.memory.rss}, ` +
        `prompt cache ${before.cache.bytes} → ${after.cache.bytes} bytes`,
    );
  } finally {
    child.kill("SIGTERM");
    await child.status;
    await lines.cancel().catch(() => {});
    await errDone.catch(() => {});
    await Deno.remove(dir, { recursive: true });
  }
});

/**
 * The OpenAI-compatible server, driven with the official `openai` client and
 * raw `fetch` on 127.0.0.1: both endpoints streaming and not, `usage` and the
 * prompt cache (its budget of KV pages, LRU eviction, the room it gives
 * running requests in the shared pool), the queue (429), client disconnects
 * (cancelling only their own sequences), `n` choices sharing their prompt's
 * pages, concurrent requests decoded together and each as it is alone,
 * `/health` during generation, bad input, and a bounded load test against
 * `examples/serve.ts` in a subprocess that checks the server's memory returns
 * to where it started.
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

/**
 * The ts backend, holding its steps once `hold.steps` more have run, until `hold.release` resolves
 * (`hold.reached` resolves when it starts holding): a test stops a generation where it wants to look.
 */
const hold = { steps: Infinity, reached: Promise.withResolvers<void>(), release: Promise.withResolvers<void>() };
registerInstrumentedTs("held-ts", async () => {
  if (hold.steps-- > 0) return;
  hold.reached.resolve();
  await hold.release.promise;
});

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

Deno.test("server: the prompt cache stays within its budget of KV pages, evicting the least recently used conversation", async () => {
  const probe = await loadModel(STORY_DIR, { contextLength: CONTEXT });
  const c = probe.config;
  const kv = probe.kvStats();
  // A page holds pageSize rows of keys and values in every layer.
  const pageBytes = kv.pageSize * c.numKvHeads * c.headDim * 4 * 2 * c.numLayers;
  assert.equal(kv.bytes, kv.pages * pageBytes);
  const seq = probe.createSequence();
  await seq.evaluate([1, 2, 3]);
  assert.equal(seq.kvBytes, pageBytes, "a sequence holds only the pages its tokens fill");
  await seq.evaluate(Array.from({ length: kv.pageSize }, (_, i) => 3 + i));
  assert.equal(seq.kvBytes, 2 * pageBytes);
  await seq.dispose();
  // Each conversation below holds the same number of pages: its prompt and 3 of its 4 answer tokens.
  const conversation = (topic: string, extra: string[] = []) => {
    const messages: OpenAI.ChatCompletionMessageParam[] = [
      { role: "system", content: `Long ago there was a ${topic} who lived by the sea with a friend.` },
      { role: "user", content: `Tell me about the ${topic}.` },
    ];
    for (const e of extra) {
      messages.push({ role: "assistant", content: " It was happy." }, { role: "user", content: e });
    }
    return messages;
  };
  const pagesOf = (topic: string) =>
    Math.ceil((promptTokens(probe, conversation(topic) as { role: string; content: string }[]) + 3) / kv.pageSize);
  const pages = pagesOf("cat");
  assert.deepEqual([pagesOf("bird"), pagesOf("fish")], [pages, pages]);
  await probe.dispose();
  const budget = 2 * pages * pageBytes;
  await withServer({ cacheBytes: budget }, async (server, client) => {
    const ask = async (topic: string, extra: string[] = []) => {
      const messages = conversation(topic, extra);
      const res = await client.chat.completions.create({ model: "story", messages, max_tokens: 4, temperature: 0 });
      return res.usage!;
    };
    assert.equal((await ask("cat")).completion_tokens, 4);
    assert.equal(server.stats().cache.bytes, pages * pageBytes);
    await ask("bird");
    const stats = () => fetch(`${server.url}/debug/stats`);
    assert.equal((await stats()).status, 404, "debug stats are off unless asked for");
    const s = server.stats();
    assert.equal(s.cache.sequences, 2);
    assert.equal(s.cache.bytes, budget);
    // The pool holds the cached conversations' pages, and nothing else is alive.
    assert.equal(s.kv.story.usedPages, 2 * pages);
    // The bird is most recent: a third conversation evicts the cat.
    await ask("fish");
    assert.equal(server.stats().cache.sequences, 2);
    assert.equal(server.stats().cache.evictions, 1);
    const bird = await ask("bird", ["And then?"]);
    const cat = await ask("cat", ["And then?"]);
    assert.ok(bird.prompt_tokens_details!.cached_tokens! > 15, `bird: ${JSON.stringify(bird)}`);
    assert.ok(cat.prompt_tokens_details!.cached_tokens! < 10, `cat: ${JSON.stringify(cat)}`);
    assert.ok(server.stats().cache.bytes <= budget);
  });
});

Deno.test("server: the prompt cache gives its pages back while running requests may need them", async () => {
  // A pool of 20 pages (the least the context allows).
  const model = await loadModel(STORY_DIR, { contextLength: 320, kvCacheTokens: 320 });
  const cache = new PromptCache(1 << 30);
  const used = () => model.kvStats().usedPages;
  const idle = async (first: number, tokens: number) => {
    const ids = Array.from({ length: tokens }, (_, i) => first + i);
    const taken = cache.take(model, ids);
    assert.equal(taken.reuse, 0);
    await taken.seq.evaluate(ids);
    await cache.put(model, taken.seq);
  };
  try {
    await idle(3, 130); // 9 pages
    await idle(500, 130);
    assert.equal(used(), 18);
    const small = await cache.claim(model, [], 2);
    assert.equal(small.fits, true);
    assert.equal(cache.stats().evictions, 0, "two pages are free: nothing to evict");
    // 2 + 5 pages claimed: the least recently used conversation goes.
    const more = await cache.claim(model, [], 5);
    assert.deepEqual([more.fits, cache.stats().evictions, cache.stats().sequences, used()], [true, 1, 1, 9]);
    const branch = cache.take(model, [500, 501, 502, 7]);
    assert.equal(branch.reuse, 3, "the newer conversation is still there");
    await cache.put(model, branch.seq);
    small.release();
    more.release();
    await cache.clear();
    await idle(500, 130);

    // A running request's claim counts what its sequences hold already, and holds when sequences come back.
    const running = model.createSequence();
    const claim = await cache.claim(model, [running], 10);
    assert.deepEqual([claim.fits, cache.stats().evictions], [true, 1], "11 pages are free: nothing to evict");
    await running.evaluate(Array.from({ length: 130 }, (_, i) => 1000 + i));
    assert.equal(used(), 18);
    await idle(1500, 20); // 2 more pages: none would be left for the running request's last one
    assert.deepEqual([cache.stats().evictions, cache.stats().sequences, used()], [2, 1, 11]);
    claim.release();
    await running.dispose();
    const whole = await cache.claim(model, [], 21);
    assert.equal(whole.fits, false, "more than the whole pool");
    assert.equal(cache.stats().sequences, 0);
    whole.release();
  } finally {
    await cache.clear();
    await model.dispose();
  }
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
      ["n past 16", () => post(chat, { ...ok, n: 17 }), 400, "n", "invalid_value"],
      ["n of 0", () => post(chat, { ...ok, n: 0 }), 400, "n", "invalid_value"],
      ["a fractional n", () => post(chat, { ...ok, n: 1.5 }), 400, "n", "invalid_value"],
      // The default parallel is 4: five choices would never get their slots together.
      ["n past parallel", () => post(chat, { ...ok, n: 5 }), 400, "n", "invalid_value"],
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

/** The `data:` events of a server-sent event stream, parsed (`[DONE]` as the string). */
function sseEvents(text: string): unknown[] {
  return text.split("\n\n").filter((e) => e.startsWith("data: ")).map((e) => {
    const data = e.slice("data: ".length);
    return data === "[DONE]" ? data : JSON.parse(data);
  });
}

/** A streamed completion's or chat's text, finish reason and role chunks per choice index, and its usage. */
function assembleStream(events: unknown[]) {
  const texts: string[] = [];
  const reasons: (string | null)[] = [];
  const roles: number[] = [];
  let usage: Record<string, unknown> | undefined;
  assert.equal(events.at(-1), "[DONE]");
  for (const e of events.slice(0, -1) as Record<string, unknown>[]) {
    if (e.usage) usage = e.usage as Record<string, unknown>;
    for (const c of e.choices as Record<string, unknown>[]) {
      const i = c.index as number;
      texts[i] ??= "";
      reasons[i] ??= null;
      const d = c.delta as { role?: string; content?: string } | undefined;
      if (d?.role) roles.push(i);
      texts[i] += d?.content ?? (c.text as string | undefined) ?? "";
      if (c.finish_reason) {
        assert.equal(reasons[i], null, `choice ${i} finished twice`);
        reasons[i] = c.finish_reason as string;
      }
    }
  }
  return { texts, reasons, roles, usage };
}

Deno.test("server: n choices from one prompt, choice i seeded with seed + i, streamed with their index", async () => {
  await withServer({ cacheBytes: 0 }, async (server, client, model) => {
    const prompt = "Once upon a time";
    const sampled = await client.completions.create({
      model: "story",
      prompt,
      max_tokens: 12,
      temperature: 1,
      seed: 5,
      n: 3,
    });
    assert.deepEqual(sampled.choices.map((c) => c.index), [0, 1, 2]);
    const texts = sampled.choices.map((c) => c.text);
    assert.equal(new Set(texts).size, 3, `three different choices: ${JSON.stringify(texts)}`);
    // Choice i is what a request for one choice seeded with 5 + i gives: sharing the prompt changes nothing.
    let completion = 0;
    for (const [i, text] of texts.entries()) {
      const one = await client.completions.create({
        model: "story",
        prompt,
        max_tokens: 12,
        temperature: 1,
        seed: 5 + i,
      });
      assert.equal(text, one.choices[0].text, `choice ${i}`);
      assert.equal(sampled.choices[i].finish_reason, one.choices[0].finish_reason);
      assert.equal(sampled.usage!.prompt_tokens, one.usage!.prompt_tokens, "the prompt is counted once");
      completion += one.usage!.completion_tokens;
    }
    assert.equal(sampled.usage!.completion_tokens, completion);
    assert.equal(sampled.usage!.total_tokens, sampled.usage!.prompt_tokens + completion);

    // Greedy: three times the same text, the one-choice greedy text.
    const greedy = await client.completions.create({ model: "story", prompt, max_tokens: 12, temperature: 0, n: 3 });
    const alone = await client.completions.create({ model: "story", prompt, max_tokens: 12, temperature: 0 });
    assert.deepEqual(greedy.choices.map((c) => c.text), Array(3).fill(alone.choices[0].text));

    // A streamed chat: a role chunk, content and one finish reason per index, the same texts as not streamed.
    const messages = [{ role: "user" as const, content: "Who was Sam?" }];
    const chat = { model: "story", messages, max_tokens: 10, temperature: 1, seed: 9, n: 3 };
    const whole = await client.chat.completions.create(chat);
    const res = await post(`${server.url}/v1/chat/completions`, {
      ...chat,
      stream: true,
      stream_options: { include_usage: true },
    });
    assert.equal(res.status, 200);
    const events = sseEvents(await res.text());
    const streamed = assembleStream(events);
    assert.deepEqual(streamed.roles, [0, 1, 2]);
    assert.deepEqual(streamed.texts, whole.choices.map((c) => c.message.content));
    assert.deepEqual(streamed.reasons, whole.choices.map((c) => c.finish_reason));
    assert.deepEqual(streamed.usage, whole.usage);
    // Every chunk speaks for one choice, so a client can tell them apart.
    for (const e of events.slice(0, -2) as { choices: unknown[] }[]) assert.equal(e.choices.length, 1);
    assert.equal(model.liveSequences, 0, "the choices' sequences are disposed");
  });
});

Deno.test("server: the choices of an n request share the prompt's KV pages", async () => {
  await withServer(
    { cacheBytes: 0 },
    async (server) => {
      // 48 prompt positions before the last fill three pages, shared; each choice writes the prompt's last token
      // and its answer (fewer than 16 tokens) into a page of its own.
      const prompt = [1, ...Array.from({ length: 48 }, (_, i) => 3 + i * 7)];
      const body = { model: "story", prompt, max_tokens: 10, stream: true, temperature: 0, logit_bias: { "2": -100 } };
      for (const [n, pages] of [[1, 4], [3, 3 + 3]]) {
        // Two steps (the prompt, then the prompt's last token of each choice), then hold the steps: the
        // pages stay as they are until the generation ends.
        hold.steps = 2;
        hold.reached = Promise.withResolvers();
        hold.release = Promise.withResolvers();
        const res = await post(`${server.url}/v1/completions`, { ...body, n });
        const reader = res.body!.getReader();
        await hold.reached.promise;
        const health = await (await fetch(`${server.url}/health`)).json();
        assert.equal(health.kv.story.usedPages, pages, `n = ${n}: ${JSON.stringify(health.kv)}`);
        assert.equal(health.running, n);
        hold.steps = Infinity;
        hold.release.resolve();
        while (!(await reader.read()).done);
      }
    },
    CONTEXT,
    "held-ts",
  );
});

Deno.test("server: 16 concurrent requests are all answered, decoded together, each as it is alone", async () => {
  await withServer({ parallel: 4, maxQueue: 16, cacheBytes: 0 }, async (server, _client, model) => {
    const starts = ["Once upon a time", "The little dog", "Lily and Tom", "One day, a bird"];
    const request = async (i: number) => {
      const chat = i % 2 === 0;
      const stream = i % 4 < 2;
      const text = `${starts[i % 4]} ${i}`;
      const body = chat
        ? { model: "story", messages: [{ role: "user", content: text }], max_tokens: 8, temperature: 0, stream }
        : { model: "story", prompt: text, max_tokens: 8, temperature: 0, stream };
      const res = await post(`${server.url}/v1/${chat ? "chat/completions" : "completions"}`, body);
      assert.equal(res.status, 200, `request ${i}`);
      if (stream) return assembleStream(sseEvents(await res.text())).texts[0];
      const json = await res.json();
      return chat ? json.choices[0].message.content : json.choices[0].text;
    };
    const alone: string[] = [];
    const s0 = model.steps;
    for (let i = 0; i < 16; i++) alone.push(await request(i));
    const s1 = model.steps;
    const together = await Promise.all(Array.from({ length: 16 }, (_, i) => request(i)));
    const s2 = model.steps;
    assert.deepEqual(together, alone);
    // Four at a time share their steps.
    assert.ok(s2 - s1 < (s1 - s0) / 2, `${s1 - s0} steps one at a time, ${s2 - s1} together`);
    const stats = server.stats();
    assert.deepEqual([stats.completed, stats.rejected, stats.running, stats.queued], [32, 0, 0, 0]);
  });
});

Deno.test("server: a client that disconnects cancels only its own sequences; the others finish in full", async () => {
  await withServer(
    { parallel: 4, cacheBytes: 0 },
    async (server, _client, model) => {
      const body = {
        model: "story",
        prompt: "Once upon a time",
        max_tokens: 40,
        temperature: 0,
        logit_bias: { "2": -100 },
      };
      const full = await (await post(`${server.url}/v1/completions`, body)).json();
      assert.equal(full.usage.completion_tokens, 40);
      const gone = new AbortController();
      const streams = [
        await post(`${server.url}/v1/completions`, { ...body, stream: true, n: 2 }, { signal: gone.signal }),
        await post(`${server.url}/v1/completions`, { ...body, stream: true }),
        await post(`${server.url}/v1/completions`, { ...body, stream: true, prompt: "The little dog" }),
      ];
      const readers = streams.map((r) => r.body!.getReader());
      const dec = new TextDecoder();
      const texts: string[] = [];
      for (const r of readers) {
        const first = await r.read();
        assert.equal(first.done, false);
        texts.push(dec.decode(first.value));
      }
      assert.equal(server.stats().running, 4);
      gone.abort();
      await readers[0].cancel().catch(() => {});
      await waitFor("the cancelled request's two slots to be free", () => server.stats().running === 2);
      for (const i of [1, 2]) {
        for (let c = await readers[i].read(); !c.done; c = await readers[i].read()) texts[i] += dec.decode(c.value);
      }
      const [b, c] = [assembleStream(sseEvents(texts[1])), assembleStream(sseEvents(texts[2]))];
      assert.deepEqual([b.texts, b.reasons], [[full.choices[0].text], ["length"]]);
      assert.deepEqual(c.reasons, ["length"]);
      assert.ok(c.texts[0].length > 40, c.texts[0]);
      const s = server.stats();
      assert.deepEqual([s.cancelled, s.completed - 1], [1, 2]);
      assert.equal(model.liveSequences, 0);
    },
    512,
    "paced-ts",
  );
});

Deno.test("server: /health answers within milliseconds while four long generations decode", async () => {
  await withServer({ parallel: 4, cacheBytes: 0 }, async (server) => {
    const body = { model: "story", max_tokens: 400, temperature: 1, logit_bias: { "2": -100 } };
    const prompts = ["Once upon a time", "The little dog", "Lily and Tom", "One day"];
    let done = false;
    const answers = Promise.all(prompts.map(async (prompt, seed) => {
      const res = await post(`${server.url}/v1/completions`, { ...body, prompt, seed });
      return (await res.json()).usage.completion_tokens;
    })).finally(() => done = true);
    await waitFor("the generations to run", () => server.stats().running === 4);
    const times: number[] = [];
    while (!done) {
      const t0 = performance.now();
      const health = await (await fetch(`${server.url}/health`)).json();
      times.push(performance.now() - t0);
      assert.equal(health.status, "ok");
      await new Promise((r) => setTimeout(r, 20));
    }
    assert.deepEqual(await answers, [400, 400, 400, 400]);
    times.sort((a, b) => a - b);
    const worst = times.at(-1)!;
    console.log(
      `/health during generation: ${times.length} polls, median ${times[times.length >> 1].toFixed(1)} ms, ` +
        `worst ${worst.toFixed(1)} ms`,
    );
    assert.ok(times.length >= 5, `only ${times.length} polls: the generation was too short to measure`);
    assert.ok(worst < 500, `/health took ${worst.toFixed(0)} ms during generation`);
  }, 512);
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
      while (next < 200) {
        const result = await request(next++);
        results.push(result);
        // A refused client waits a little before its next request, as a real one would.
        if (result === "busy") await new Promise((r) => setTimeout(r, 10));
      }
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
    // buffers: the KV pool) within 1 MiB once the pool's own growth is counted out (it grows on demand
    // and keeps its pages); the prompt cache's pages within 1 MiB too (the warm-up fills its 2 MiB budget).
    const heapGrowth = after.memory.heapUsed - before.memory.heapUsed;
    const cacheGrowth = after.cache.bytes - before.cache.bytes;
    const poolGrowth = after.kv.story.bytes - before.kv.story.bytes;
    const externalGrowth = after.memory.external - before.memory.external - poolGrowth;
    assert.ok(heapGrowth < 8 << 20, `heap grew by ${heapGrowth} bytes`);
    assert.ok(externalGrowth < 1 << 20, `external memory grew by ${externalGrowth} bytes besides the KV pool`);
    assert.ok(after.kv.story.bytes <= after.kv.story.maxPages * (before.kv.story.bytes / before.kv.story.pages));
    assert.ok(Math.abs(cacheGrowth) <= 1 << 20, `the prompt cache grew by ${cacheGrowth} bytes`);
    console.log(
      `load test: ${ok} answered, ${
        200 - ok
      } refused (429); heap ${before.memory.heapUsed} → ${after.memory.heapUsed}, ` +
        `external ${before.memory.external} → ${after.memory.external}, rss ${before.memory.rss} → ${after.memory.rss}, ` +
        `prompt cache ${before.cache.bytes} → ${after.cache.bytes} bytes, KV pool ${before.kv.story.bytes} → ` +
        `${after.kv.story.bytes} bytes`,
    );
  } finally {
    child.kill("SIGTERM");
    await child.status;
    await lines.cancel().catch(() => {});
    await errDone.catch(() => {});
    await Deno.remove(dir, { recursive: true });
  }
});

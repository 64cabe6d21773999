/**
 * Chat sessions: template rendering, KV reuse between turns (counted in tokens
 * evaluated), undo / regenerate / fork, save and restore with validation, and
 * the context policies. Runs on the real story model with a template passed in
 * (fast) and on a random-weight model of the Minueza 32M chat shape with its
 * real tokenizer and ChatML template.
 */

import assert from "node:assert/strict";
import {
  ChatSession,
  ChatTemplate,
  ChatTemplateError,
  modelFingerprint,
  SessionBusyError,
  SessionFileError,
  SessionModelMismatchError,
} from "../models/chat/session.ts";
import { loadModel, type Model } from "../models/model.ts";
import { decodeSessionFile, encodeSessionFile } from "../models/chat/session_file.ts";
import { SHAPES, writeRandomModel } from "../examples/_random_model.ts";
import { ContextOverflowError } from "../models/exec/sequence.ts";
import { MINUEZA_DIR, STORY_DIR } from "./helpers.ts";
import { readAll, STORY_TEMPLATE } from "./chat_fixtures.ts";

function renderChatML(messages: readonly { role: string; content: string }[]): string {
  return messages.map((m) => `<|im_start|>${m.role}\n${m.content}<|im_end|>\n`).join("") + "<|im_start|>assistant\n";
}

/** Tokens the model evaluates for a turn: the prefill plus every generated token but the last. */
function expectedEvaluated(u: { promptTokens: number; cachedTokens: number; completionTokens: number }): number {
  return u.promptTokens - u.cachedTokens + Math.max(0, u.completionTokens - 1);
}

/** What a turn may take from the cache: the longest common prefix of the cache and the new prompt, less one token. */
function reusable(cached: readonly number[], prompt: readonly number[]): number {
  let n = 0;
  while (n < cached.length && n < prompt.length && cached[n] === prompt[n]) n++;
  return Math.min(n, prompt.length - 1);
}

async function withStory(fn: (model: Model) => Promise<void>, contextLength = 256): Promise<void> {
  const model = await loadModel(STORY_DIR, { contextLength });
  try {
    await fn(model);
  } finally {
    await model.dispose();
  }
}

Deno.test("chat template: renders the Minueza ChatML template from tokenizer_config.json", async () => {
  const config = JSON.parse(await Deno.readTextFile(`${MINUEZA_DIR}/tokenizer_config.json`));
  const t = new ChatTemplate(config.chat_template, { bosToken: "<s>", eosToken: "<|im_end|>" });
  const messages = [{ role: "system", content: "Be brief." }, { role: "user", content: "Hi" }];
  assert.equal(
    t.render(messages),
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
  );
  assert.equal(
    t.render(messages, { addGenerationPrompt: false }),
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
  );
  assert.throws(() => new ChatTemplate("{% for %}"), ChatTemplateError);
  assert.throws(() => t.render([{ role: "user", content: 3 as unknown as string }]), TypeError);
});

Deno.test("chat template: a model without one is refused with a typed error unless one is passed", async () => {
  await withStory(async (model) => {
    assert.equal(model.tokenizer.chatTemplate, undefined);
    assert.throws(
      () => new ChatSession(model),
      (e) => e instanceof ChatTemplateError && /no chat template/.test(e.message),
    );
    const t = ChatTemplate.forModel(model, STORY_TEMPLATE);
    assert.equal(
      t.render([{ role: "user", content: "Hi?" }, { role: "assistant", content: " Yes." }, {
        role: "user",
        content: "Ok",
      }]),
      "<|start_story|>Question: Hi?\nAnswer: Yes.\nQuestion: Ok\nAnswer:",
    );
    const chat = new ChatSession(model, { template: STORY_TEMPLATE });
    chat.dispose();
    await Promise.resolve();
  });
});

Deno.test("chat session: a new turn prefills only the tokens the cache lacks, with the same answer as a full prefill", async () => {
  await withStory(async (model) => {
    const opts = { template: STORY_TEMPLATE, system: "A story about a cat.", maxTokens: 12, temperature: 0 };
    const chat = new ChatSession(model, opts);
    try {
      const r1 = chat.send("Where did the cat go?");
      await readAll(r1);
      const u1 = await r1.usage;
      assert.equal(u1.cachedTokens, 0);
      assert.equal(chat.evaluatedTokens, expectedEvaluated(u1));
      const afterFirst = chat.evaluatedTokens;

      const cacheBefore = [...chat.cachedTokens];
      const r2 = chat.send("What did the cat eat?");
      const a2 = await readAll(r2);
      const u2 = await r2.usage;
      const prompt2 = model.tokenizer.encode(
        new ChatTemplate(STORY_TEMPLATE, model.tokenizer).render(chat.messages.slice(0, 4)),
        { addSpecialTokens: false },
      );
      assert.equal(u2.promptTokens, prompt2.length);
      assert.equal(u2.cachedTokens, reusable(cacheBefore, prompt2));
      // The first prompt came from the cache (but its last token, "Answer:", which the answer's
      // leading space re-tokenizes as "Answer: " here).
      assert.ok(u2.cachedTokens >= u1.promptTokens - 1, `cached ${u2.cachedTokens}, first prompt ${u1.promptTokens}`);
      assert.equal(chat.evaluatedTokens - afterFirst, expectedEvaluated(u2));
      assert.ok(u2.promptTokens - u2.cachedTokens < 20, `prefilled ${u2.promptTokens - u2.cachedTokens} tokens`);
      assert.equal(chat.messages.length, 5);

      // The same prompt prefilled from scratch gives the same greedy answer.
      const ref = await readAll(model.generate(prompt2, { maxTokens: 12, temperature: 0 }));
      assert.equal(a2, ref);
      assert.equal(chat.messages[4].content, a2);
    } finally {
      chat.dispose();
    }
  });
});

Deno.test("chat session: undo truncates the cache to the saved position; regenerate redoes the last answer", async () => {
  await withStory(async (model) => {
    const chat = new ChatSession(model, { template: STORY_TEMPLATE, maxTokens: 8, temperature: 0.9, seed: 5 });
    try {
      await readAll(chat.send("Who was Tom?"));
      const lengthAfterFirst = chat.cachedTokens.length;
      const messagesAfterFirst = chat.messages;
      await readAll(chat.send("What did Tom like?"));
      assert.ok(chat.cachedTokens.length > lengthAfterFirst);

      const removed = chat.undo();
      assert.deepEqual(removed.map((m) => m.role), ["user", "assistant"]);
      assert.deepEqual(chat.messages, messagesAfterFirst);
      assert.equal(chat.cachedTokens.length, lengthAfterFirst);

      // The next turn reuses the cache up to the saved position.
      const before = chat.evaluatedTokens;
      const cacheBefore = [...chat.cachedTokens];
      const r = chat.send("Where did Tom live?");
      await readAll(r);
      const u = await r.usage;
      const prompt = model.tokenizer.encode(
        new ChatTemplate(STORY_TEMPLATE, model.tokenizer).render(chat.messages.slice(0, 3)),
        { addSpecialTokens: false },
      );
      assert.equal(u.cachedTokens, reusable(cacheBefore, prompt));
      assert.ok(u.cachedTokens >= 10 && u.promptTokens - u.cachedTokens <= 25, JSON.stringify(u));
      assert.equal(chat.evaluatedTokens - before, expectedEvaluated(u));

      // Regenerate: same prompt, nothing to prefill but the last prompt token, a new draw.
      const firstAnswer = chat.messages[3].content;
      const answers = new Set([firstAnswer]);
      for (let i = 0; i < 3; i++) {
        const g = chat.regenerate();
        const text = await readAll(g);
        const gu = await g.usage;
        assert.equal(gu.promptTokens, u.promptTokens);
        assert.equal(gu.cachedTokens, u.promptTokens - 1);
        assert.equal(chat.messages.length, 4);
        assert.equal(chat.messages[3].content, text);
        answers.add(text);
      }
      assert.ok(answers.size > 1, "regenerate with a seed drew the same answer every time");

      assert.equal(chat.undo().length, 2);
      assert.equal(chat.undo().length, 2);
      assert.deepEqual(chat.undo(), []);
      assert.equal(chat.cachedTokens.length, 0);
      assert.throws(() => chat.regenerate(), RangeError);
    } finally {
      chat.dispose();
    }
  });
});

Deno.test("chat session: fork makes an independent session", async () => {
  await withStory(async (model) => {
    const chat = new ChatSession(model, { template: STORY_TEMPLATE, maxTokens: 6, temperature: 0 });
    try {
      await readAll(chat.send("Who was Lily?"));
      const messages = chat.messages;
      const tokens = [...chat.cachedTokens];
      const fork = chat.fork();
      try {
        assert.deepEqual(fork.messages, messages);
        assert.deepEqual([...fork.cachedTokens], tokens);
        const before = fork.evaluatedTokens;
        const r = fork.send("Where was she?");
        await readAll(r);
        const u = await r.usage;
        const prompt = model.tokenizer.encode(
          new ChatTemplate(STORY_TEMPLATE, model.tokenizer).render(fork.messages.slice(0, 3)),
          { addSpecialTokens: false },
        );
        assert.equal(u.cachedTokens, reusable(tokens, prompt));
        assert.ok(u.cachedTokens >= 10, "the fork did not reuse the copied cache");
        assert.equal(fork.evaluatedTokens - before, expectedEvaluated(u));
        fork.setSystem("Be kind.");
        // The original is untouched.
        assert.deepEqual(chat.messages, messages);
        assert.deepEqual([...chat.cachedTokens], tokens);
      } finally {
        fork.dispose();
      }
      // Still usable after the fork is gone, and its answer equals a fresh session's.
      const a = await readAll(chat.send("Where was she?"));
      const fresh = new ChatSession(model, { template: STORY_TEMPLATE, maxTokens: 6, temperature: 0 });
      try {
        await readAll(fresh.send("Who was Lily?"));
        assert.equal(await readAll(fresh.send("Where was she?")), a);
      } finally {
        fresh.dispose();
      }
    } finally {
      chat.dispose();
    }
  });
});

Deno.test("chat session: answers stream, can be cancelled, and one turn runs at a time", async () => {
  await withStory(async (model) => {
    const chat = new ChatSession(model, { template: STORY_TEMPLATE, maxTokens: 40, temperature: 0 });
    try {
      const r = chat.send("Tell me a story.");
      assert.ok(r instanceof ReadableStream);
      assert.throws(() => chat.send("again"), SessionBusyError);
      const reader = r.getReader();
      const first = await reader.read();
      assert.equal(first.done, false);
      assert.equal(typeof first.value, "string");
      await reader.cancel();
      const u = await r.usage;
      assert.equal(u.stopReason, "cancelled");
      assert.ok(u.completionTokens < 40);
      assert.equal(chat.busy, false);
      assert.equal(chat.messages[1].role, "assistant");
      assert.equal(chat.messages[1].content, first.value);
      assert.equal(r.stats.stopReason, "cancelled");

      // An aborted prefill takes the user message back.
      const ac = new AbortController();
      ac.abort(new Error("stop now"));
      const bad = chat.send("Never answered", { signal: ac.signal });
      await assert.rejects(readAll(bad), /stop now/);
      await assert.rejects(bad.usage, /stop now/);
      assert.equal(chat.messages.length, 2);
    } finally {
      chat.dispose();
    }
  });
});

Deno.test("chat session: saved to a file and restored; bad files are refused with typed errors", async () => {
  const dir = await Deno.makeTempDir({ prefix: "chat_test_" });
  try {
    await withStory(async (model) => {
      const opts = { template: STORY_TEMPLATE, system: "Stories for kids.", maxTokens: 8, temperature: 0 };
      const chat = new ChatSession(model, opts);
      try {
        await readAll(chat.send("Who was Ben?"));
        const path = `${dir}/s.chat`;
        await chat.save(path);
        // The generation defaults and (trusted here) the template come from the file.
        const restored = await ChatSession.load(model, path, { trustTemplate: true });
        try {
          assert.deepEqual(restored.messages, chat.messages);
          assert.deepEqual([...restored.cachedTokens], [...chat.cachedTokens]);
          assert.equal(restored.evaluatedTokens, 0);
          const r = restored.send("What did Ben do?");
          const text = await readAll(r);
          const u = await r.usage;
          const prompt = model.tokenizer.encode(
            new ChatTemplate(STORY_TEMPLATE, model.tokenizer).render(restored.messages.slice(0, 4)),
            { addSpecialTokens: false },
          );
          assert.equal(u.cachedTokens, reusable(chat.cachedTokens, prompt));
          assert.ok(u.cachedTokens >= 10, "the restored cache was not reused");
          assert.equal(restored.evaluatedTokens, expectedEvaluated(u));
          assert.equal(await readAll(chat.send("What did Ben do?")), text);
          assert.equal(restored.undo().length, 2);
        } finally {
          restored.dispose();
        }

        const bytes = await Deno.readFile(path);
        const refused = async (data: Uint8Array, reason: string) => {
          await assert.rejects(
            ChatSession.deserialize(model, data),
            (e) => e instanceof SessionFileError && e.reason === reason && /^Cannot restore/.test(e.message),
          );
        };
        await refused(bytes.slice(0, bytes.length - 100), "corrupt");
        await refused(bytes.slice(0, 20), "corrupt");
        const flipped = bytes.slice();
        flipped[Math.floor(bytes.length / 2)] ^= 0x40;
        await refused(flipped, "corrupt");
        const magic = bytes.slice();
        magic[0] = 0x58;
        await refused(magic, "magic");
        await refused(new TextEncoder().encode("hello"), "magic");
        const version = bytes.slice();
        new DataView(version.buffer).setUint32(8, 99, true);
        await refused(version, "version");

        // A model of the same shape and tokenizer with other weights is another model.
        const other = `${dir}/other`;
        const storyConfig = JSON.parse(await Deno.readTextFile(`${STORY_DIR}/config.json`));
        await writeRandomModel(other, storyConfig, { tokenizerFrom: STORY_DIR, seed: 3 });
        const otherModel = await loadModel(other, { contextLength: 256 });
        try {
          assert.notEqual(await modelFingerprint(otherModel), await modelFingerprint(model));
          await assert.rejects(
            ChatSession.load(otherModel, path),
            (e) => e instanceof SessionModelMismatchError && e.reason === "model" && /another|model/.test(e.message),
          );
        } finally {
          await otherModel.dispose();
        }
      } finally {
        chat.dispose();
      }
    });
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("chat session: an f16 KV cache takes half the bytes; a saved session moves between cache dtypes", async () => {
  const f16 = await loadModel(STORY_DIR, { contextLength: 256, kvDtype: "f16" });
  try {
    await withStory(async (f32) => {
      const c = f32.config;
      const rowValues = c.numKvHeads * c.headDim;
      // Both pools start with one context's pages (256 positions).
      const bytes = (m: Model) => m.kvStats().bytes;
      assert.deepEqual([f32.kvDtype, f16.kvDtype], ["f32", "f16"]);
      assert.deepEqual([f32.kvStats().capacityTokens, f16.kvStats().capacityTokens], [256, 256]);
      assert.equal(bytes(f32), 256 * rowValues * 4 * 2 * c.numLayers);
      assert.equal(bytes(f16), 256 * rowValues * 2 * 2 * c.numLayers);

      const opts = { template: STORY_TEMPLATE, system: "Stories for kids.", maxTokens: 8, temperature: 0 };
      const chat = new ChatSession(f16, opts);
      try {
        await readAll(chat.send("Who was Ben?"));
        const saved = await chat.serialize();
        // f16 → f32 widens exactly, and back to f16 gives the same bits: the round trip is byte-identical.
        const wide = await ChatSession.deserialize(f32, saved, { trustTemplate: true });
        try {
          assert.deepEqual([...wide.cachedTokens], [...chat.cachedTokens]);
          const back = await ChatSession.deserialize(f16, await wide.serialize(), { trustTemplate: true });
          try {
            assert.deepEqual(await back.serialize(), saved);
          } finally {
            back.dispose();
          }
          // The widened session carries on from its cache.
          const r = wide.send("What did Ben do?");
          await readAll(r);
          assert.ok((await r.usage).cachedTokens >= 10, "the restored cache was not reused");
        } finally {
          wide.dispose();
        }
        // A header naming a cache dtype that does not exist is refused, naming the field.
        const decoded = await decodeSessionFile(saved, await modelFingerprint(f16));
        const bad = await encodeSessionFile(
          { ...decoded.header, kvDtype: "q4_0" as never },
          Int32Array.from(decoded.tokens),
          decoded.kv,
        );
        await assert.rejects(
          ChatSession.deserialize(f16, bad),
          (e) => e instanceof SessionFileError && e.reason === "corrupt" && /"kvDtype" is "q4_0"/.test(e.message),
        );
      } finally {
        chat.dispose();
      }
    });
  } finally {
    await f16.dispose();
  }
});

Deno.test('chat session: context policy "error" refuses the turn and keeps the session as it was', async () => {
  await withStory(async (model) => {
    const chat = new ChatSession(model, {
      template: STORY_TEMPLATE,
      system: "Short.",
      maxTokens: 8,
      temperature: 0,
      contextPolicy: "error",
    });
    try {
      let refused: unknown;
      for (let i = 0; i < 20 && !refused; i++) {
        const before = chat.messages;
        try {
          await readAll(chat.send(`Question number ${i} about the little red ball in the park?`));
        } catch (e) {
          refused = e;
          assert.deepEqual(chat.messages, before);
        }
      }
      assert.ok(refused instanceof ContextOverflowError, `expected a ContextOverflowError, got ${refused}`);
      assert.equal(refused.capacity, 96);
      assert.equal(chat.busy, false);
    } finally {
      chat.dispose();
    }
  }, 96);
});

Deno.test('chat session: context policy "drop-oldest" drops old turns, keeps the system prompt, and re-prefills', async () => {
  await withStory(async (model) => {
    const system = "Short.";
    const chat = new ChatSession(model, {
      template: STORY_TEMPLATE,
      system,
      maxTokens: 8,
      temperature: 0,
      contextPolicy: "drop-oldest",
    });
    const tmpl = new ChatTemplate(STORY_TEMPLATE, model.tokenizer);
    try {
      let dropped = 0;
      for (let i = 0; i < 12; i++) {
        const before = chat.evaluatedTokens;
        const cacheBefore = [...chat.cachedTokens];
        const r = chat.send(`Question number ${i} about the little red ball in the park?`);
        await readAll(r);
        const u = await r.usage;
        assert.equal(chat.evaluatedTokens - before, expectedEvaluated(u));
        assert.ok(u.promptTokens + 8 <= 96, `prompt of ${u.promptTokens} tokens leaves no room`);
        const prompt = model.tokenizer.encode(tmpl.render(chat.messages.slice(0, -1)), { addSpecialTokens: false });
        assert.equal(u.promptTokens, prompt.length);
        assert.equal(u.cachedTokens, reusable(cacheBefore, prompt));
        if (u.droppedMessages > 0) {
          dropped += u.droppedMessages;
          // After a drop the conversation differs right after the system prompt and the first
          // "Question number ": everything after is prefilled again.
          const head = model.tokenizer.encode(
            tmpl.render([{ role: "system", content: system }, {
              role: "user",
              content: "Question number",
            }], { addGenerationPrompt: false }),
            { addSpecialTokens: false },
          );
          assert.ok(u.cachedTokens <= head.length, `cached ${u.cachedTokens} > ${head.length}`);
        }
        const m = chat.messages;
        assert.deepEqual(m[0], { role: "system", content: system });
        assert.equal(m[m.length - 2].content, `Question number ${i} about the little red ball in the park?`);
      }
      assert.ok(dropped > 0, "no turn was ever dropped");
      assert.ok(chat.messages.length < 1 + 2 * 12);
    } finally {
      chat.dispose();
    }
  }, 96);
});

Deno.test("chat session: Minueza-shaped random model with its real ChatML template reuses the cache", async () => {
  const dir = await Deno.makeTempDir({ prefix: "chat_minueza_" });
  try {
    await writeRandomModel(dir, SHAPES["minueza-32m-shape"], { tokenizerFrom: MINUEZA_DIR, seed: 7, dtype: "f16" });
    const model = await loadModel(dir, { contextLength: 128 });
    const chat = new ChatSession(model, { system: "You are helpful.", maxTokens: 3, temperature: 0 });
    try {
      const r1 = chat.send("Hello!");
      await readAll(r1);
      const u1 = await r1.usage;
      assert.equal(
        u1.promptTokens,
        model.tokenizer.encode(
          "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n<|im_start|>assistant\n",
          { addSpecialTokens: false },
        ).length,
      );
      const before = chat.evaluatedTokens;
      const cacheBefore = [...chat.cachedTokens];
      const r2 = chat.send("How are you?");
      await readAll(r2);
      const u2 = await r2.usage;
      const prompt2 = model.tokenizer.encode(renderChatML(chat.messages.slice(0, 4)), {
        addSpecialTokens: false,
      });
      assert.equal(u2.promptTokens, prompt2.length);
      assert.equal(u2.cachedTokens, reusable(cacheBefore, prompt2));
      // The first prompt is reused; what is prefilled is the random answer as re-tokenized, and the new turn.
      assert.ok(u2.cachedTokens >= u1.promptTokens, `cached ${u2.cachedTokens}, first prompt ${u1.promptTokens}`);
      assert.equal(chat.evaluatedTokens - before, expectedEvaluated(u2));
    } finally {
      chat.dispose();
      await model.dispose();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

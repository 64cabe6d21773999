/**
 * The chat page at `/`, in headless Chromium (Debian's `chromium`, driven by
 * `playwright-core`): it lists the models, sends a message, and streams the
 * answer into the page in several pieces; the conversation carries on. A turn
 * stopped before its first token or one that fails stays out of the history
 * sent to the server, the stats line never shows an earlier answer's numbers,
 * and a model without a chat template cannot be chosen.
 *
 * Skipped only when `/usr/bin/chromium` is missing and `CI` is not set.
 */

import assert from "node:assert/strict";
import { type Browser, chromium, type Page } from "playwright-core";
import { loadModel } from "../models/model.ts";
import { type RunningServer, startServer } from "../server/mod.ts";
import { registerInstrumentedTs, STORY_DIR } from "./helpers.ts";

const CHROMIUM = "/usr/bin/chromium";
const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

/** A chat template for the story model (which has none); the same as in chat_test.ts. */
const STORY_TEMPLATE = "{{ bos_token }}{% for m in messages %}" +
  "{% if m.role == 'system' %}{{ m.content }}\n" +
  "{% elif m.role == 'user' %}Question: {{ m.content }}\n" +
  "{% else %}Answer:{{ m.content }}\n{% endif %}" +
  "{% endfor %}{% if add_generation_prompt %}Answer:{% endif %}";

function exists(path: string): boolean {
  try {
    Deno.statSync(path);
    return true;
  } catch {
    return false;
  }
}

/**
 * The story model runs a step in about a millisecond, faster than the browser's
 * polling; 8 ms per step makes every answer last long enough to watch and to stop.
 */
registerInstrumentedTs("paced-ts", () => new Promise((r) => setTimeout(r, 8)));

/**
 * What the gated backend does before each step (after the same 8 ms as paced-ts): it waits
 * for `gate` (a test closes it to hold a generation before its first token), and fails the
 * step once `failIn` more steps have run (a test sets it to break an answer midway).
 */
const gated = { gate: Promise.resolve(), failIn: Infinity };
registerInstrumentedTs("gated-ts", async () => {
  await new Promise((r) => setTimeout(r, 8));
  await gated.gate;
  if (gated.failIn-- <= 0) {
    gated.failIn = Infinity;
    throw new Error("Injected backend failure");
  }
});

const inCi = Deno.env.get("CI") !== undefined && Deno.env.get("CI") !== "false";

function launchChromium(): Promise<Browser> {
  return chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS });
}

/** A page on `server`'s chat page, once it has listed the models; page errors go to `errors`. */
async function openChat(browser: Browser, server: RunningServer, errors: string[]): Promise<Page> {
  const page = await browser.newPage({ viewport: { width: 900, height: 640 } });
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(`${server.url}/`);
  await page.waitForSelector("body:not([data-state=loading])");
  return page;
}

async function waitFor(what: string, ok: () => boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!ok()) {
    if (Date.now() > end) throw new Error(`Timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

Deno.test({
  name: "web page: streams an answer in headless Chromium and keeps the conversation",
  ignore: !exists(CHROMIUM) && !inCi,
  async fn() {
    const model = await loadModel(STORY_DIR, { contextLength: 512, backend: "paced-ts" });
    const server = await startServer({ models: [{ id: "story", model, template: STORY_TEMPLATE }], port: 0 });
    const browser = await launchChromium();
    try {
      const page = await browser.newPage({ viewport: { width: 900, height: 640 } });
      const errors: string[] = [];
      page.on("pageerror", (e) => errors.push(e.message));
      await page.goto(`${server.url}/`);
      await page.waitForSelector("body[data-state=idle]");
      assert.deepEqual(
        await page.$$eval("#model option", (os) => os.map((o) => (o as unknown as { value: string }).value)),
        [
          "story",
        ],
      );
      await page.fill("#max-tokens", "40");
      await page.fill("#temperature", "0");
      await page.fill("#system", "A story about a fox.");

      await page.fill("#input", "Who was the fox?");
      await page.press("#input", "Enter");
      // The answer's bubble is made with the class `streaming`, which it loses when the answer ends.
      await page.waitForSelector(".msg.assistant:not(.streaming)", { timeout: 30_000 });
      await page.waitForSelector("body[data-state=idle]");
      const answer = await page.textContent(".msg.assistant");
      const chunks = Number(await page.getAttribute(".msg.assistant", "data-chunks"));
      assert.ok(chunks > 1, `the answer arrived in ${chunks} piece(s)`);
      assert.equal(await page.textContent(".msg.user"), "Who was the fox?");

      // The page shows what the API answers for the same conversation.
      const messages = [{ role: "system", content: "A story about a fox." }, {
        role: "user",
        content: "Who was the fox?",
      }];
      const res = await fetch(`${server.url}/v1/chat/completions`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ model: "story", messages, max_tokens: 40, temperature: 0 }),
      });
      const expected = (await res.json()).choices[0].message.content;
      assert.equal(answer, expected.trimStart()); // shown without the leading space or newline
      assert.match(await page.textContent("#stats") ?? "", /\d+ prompt tokens \(\d+ cached\), \d+ generated/);

      // A second turn: the page sends the whole conversation; the server's cache supplies the prefix.
      await page.fill("#input", "What did the fox eat?");
      await page.press("#input", "Enter");
      await page.waitForSelector(".msg.assistant:not(.streaming) >> nth=1", { timeout: 30_000 });
      await page.waitForSelector("body[data-state=idle]");
      const stats = await page.textContent("#stats") ?? "";
      const cached = Number(/\((\d+) cached\)/.exec(stats)?.[1]);
      assert.ok(cached > 10, `second turn: ${stats}`);
      // Stop: the page aborts its request, and the server cancels the generation. (This conversation's greedy
      // answer runs to the 300-token limit, as checked through the API first.)
      await page.click("#clear");
      const longAsk = [{ role: "system", content: "A story about a fox." }, { role: "user", content: "And then?" }];
      const probe = await fetch(`${server.url}/v1/chat/completions`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ model: "story", messages: longAsk, max_tokens: 300, temperature: 0 }),
      });
      const full = (await probe.json()).choices[0];
      assert.equal(full.finish_reason, "length");
      const before = server.stats();
      await page.fill("#max-tokens", "300");
      await page.fill("#input", "And then?");
      await page.press("#input", "Enter");
      await page.waitForFunction("Number(document.querySelector('.msg.assistant')?.dataset.chunks) >= 3");
      await page.click("#stop");
      await page.waitForSelector("body[data-state=idle]");
      const end = Date.now() + 5000;
      while (server.stats().running > 0 && Date.now() < end) await new Promise((r) => setTimeout(r, 20));
      const after = server.stats();
      assert.deepEqual([after.running, after.cancelled - before.cancelled, after.completed - before.completed], [
        0,
        1,
        0,
      ]);
      // The page shows the beginning of the answer, not all of it.
      const shown = await page.textContent(".msg.assistant") ?? "";
      assert.ok(shown.length > 0 && full.message.content.trimStart().startsWith(shown), shown);
      assert.ok(shown.length < full.message.content.trimStart().length);

      const shot = Deno.env.get("WEB_TEST_SCREENSHOT");
      if (shot) await page.screenshot({ path: shot });
      assert.deepEqual(errors, []);
    } finally {
      await browser.close();
      await server.close();
      await model.dispose();
    }
  },
});

type Message = { role: string; content: string };

Deno.test({
  name: "web page: a turn stopped before its first token or failed stays out of the history; the stats are never stale",
  ignore: !exists(CHROMIUM) && !inCi,
  async fn() {
    const model = await loadModel(STORY_DIR, { contextLength: 512, backend: "gated-ts" });
    const server = await startServer({ models: [{ id: "story", model, template: STORY_TEMPLATE }], port: 0 });
    const browser = await launchChromium();
    try {
      const errors: string[] = [];
      const page = await openChat(browser, server, errors);
      const sent: Message[][] = [];
      page.on("request", (r) => {
        if (r.url().endsWith("/v1/chat/completions")) sent.push(JSON.parse(r.postData()!).messages);
      });
      const ask = async (text: string) => {
        await page.fill("#input", text);
        await page.press("#input", "Enter");
        await page.waitForSelector("body[data-state=streaming]");
      };
      const idle = () => page.waitForSelector("body[data-state=idle]", { timeout: 30_000 });
      const assistantTexts = () => page.$$eval(".msg.assistant", (els) => els.map((e) => e.textContent));
      await page.fill("#max-tokens", "12");
      await page.fill("#temperature", "0");

      // An answered turn: its numbers are shown.
      await ask("Who was the fox?");
      await idle();
      const [first] = await assistantTexts();
      assert.ok(first && first.length > 0);
      const answered = await page.textContent("#stats") ?? "";
      assert.match(answered, /\d+ prompt tokens \(\d+ cached\), \d+ generated/);

      // Stopped before the first token: the backend holds the first step until the page has stopped.
      let open!: () => void;
      gated.gate = new Promise((r) => open = r);
      await ask("Tell me more.");
      assert.equal(await page.textContent("#stats"), "", "a new request clears the last answer's stats");
      await waitFor("the request to reach its slot", () => server.stats().running === 1);
      await page.click("#stop");
      await idle();
      open();
      await waitFor("the generation to end", () => server.stats().running === 0);
      assert.deepEqual(await assistantTexts(), [first], "no empty bubble is left");
      assert.equal(await page.textContent("#stats"), "Stopped before the first token");
      assert.deepEqual(
        await page.$$eval(".msg.user.unanswered", (els) => els.map((e) => e.textContent)),
        ["Tell me more."],
      );

      // Refused before any token (max_tokens past the context): an error, not an assistant message.
      await page.fill("#max-tokens", "100000");
      await page.fill("#input", "Again?");
      await page.press("#input", "Enter");
      await page.waitForSelector(".msg.error");
      await idle();
      assert.match(await page.textContent(".msg.error") ?? "", /max_tokens/);
      assert.deepEqual(await assistantTexts(), [first]);
      assert.equal(await page.textContent("#stats"), "");

      // Broken midway (the backend fails a step): the partial answer is marked failed, the error shown.
      await page.fill("#max-tokens", "40");
      gated.failIn = 6;
      await ask("And then?");
      await page.waitForSelector(".msg.error >> nth=1", { timeout: 30_000 });
      await idle();
      assert.match(await page.textContent(".msg.error >> nth=1") ?? "", /Injected backend failure/);
      const failed = await page.$$eval(".msg.assistant.failed", (els) => els.map((e) => e.textContent));
      assert.equal(failed.length, 1);
      assert.ok(failed[0]!.length > 0, "the failed answer had begun");
      assert.equal(await page.textContent("#stats"), "");

      // The next request carries only the answered turn.
      await page.fill("#max-tokens", "12");
      await ask("What did the fox eat?");
      await idle();
      // Every later request carries the answered turn (as streamed, before the page trims it for display), then
      // its own question: none of the stopped, refused or failed turns.
      const answeredTurn = sent[1].slice(0, 2);
      assert.deepEqual(answeredTurn.map((m) => m.role), ["user", "assistant"]);
      assert.equal(answeredTurn[1].content.trimStart(), first);
      assert.deepEqual(
        sent.slice(1),
        ["Tell me more.", "Again?", "And then?", "What did the fox eat?"].map((q) => [
          ...answeredTurn,
          { role: "user", content: q },
        ]),
      );
      assert.match(await page.textContent("#stats") ?? "", /\d+ prompt tokens \(\d+ cached\), \d+ generated/);
      assert.deepEqual(errors, []);
    } finally {
      gated.failIn = Infinity;
      await browser.close();
      await server.close();
      await model.dispose();
    }
  },
});

Deno.test({
  name: "web page: a model without a chat template is listed but cannot be chosen for chat",
  ignore: !exists(CHROMIUM) && !inCi,
  async fn() {
    const model = await loadModel(STORY_DIR, { contextLength: 256, backend: "ts" });
    const browser = await launchChromium();
    const options = (page: Page) =>
      page.$$eval("#model option", (os) =>
        os.map((o) => {
          const option = o as unknown as { value: string; textContent: string; disabled: boolean };
          return [option.value, option.textContent, option.disabled];
        }));
    try {
      const errors: string[] = [];
      // Beside a model that can chat: shown disabled, with why; the one that can chat is selected.
      const both = await startServer({
        models: [{ id: "plain", model }, { id: "story", model, template: STORY_TEMPLATE }],
        port: 0,
      });
      try {
        const page = await openChat(browser, both, errors);
        assert.equal(await page.getAttribute("body", "data-state"), "idle");
        assert.deepEqual(await options(page), [
          ["plain", "plain (no chat template)", true],
          ["story", "story", false],
        ]);
        assert.equal(await page.$eval("#model", (s) => (s as unknown as { value: string }).value), "story");
        await page.fill("#max-tokens", "4");
        await page.fill("#input", "Who was the fox?");
        await page.press("#input", "Enter");
        await page.waitForSelector(".msg.assistant:not(.streaming)", { timeout: 30_000 });
        await page.waitForSelector("body[data-state=idle]");
        assert.equal(await page.$$eval(".msg.error", (els) => els.length), 0);
      } finally {
        await both.close();
      }
      // Alone: nothing can be sent, and the page says why before anything is typed.
      const alone = await startServer({ models: [{ id: "plain", model }], port: 0 });
      try {
        const page = await openChat(browser, alone, errors);
        assert.equal(await page.getAttribute("body", "data-state"), "error");
        assert.deepEqual(await options(page), [["plain", "plain (no chat template)", true]]);
        assert.match(await page.textContent(".msg.error") ?? "", /No model on this server has a chat template/);
        assert.equal(await page.isDisabled("#send"), true);
      } finally {
        await alone.close();
      }
      assert.deepEqual(errors, []);
    } finally {
      await browser.close();
      await model.dispose();
    }
  },
});

Deno.test({
  name: "web page: on a server with an API key the page asks for the key (again after a wrong one) and chats with it",
  ignore: !exists(CHROMIUM) && !inCi,
  async fn() {
    const model = await loadModel(STORY_DIR, { contextLength: 256, backend: "ts" });
    const key = "sk-page-test-42";
    const server = await startServer({
      models: [{ id: "story", model, template: STORY_TEMPLATE }],
      port: 0,
      apiKeys: [key],
    });
    const browser = await launchChromium();
    try {
      const errors: string[] = [];
      const page = await browser.newPage({ viewport: { width: 900, height: 640 } });
      page.on("pageerror", (e) => errors.push(e.message));
      const asked: string[] = [];
      page.on("dialog", (d) => {
        asked.push(d.message());
        void d.accept(asked.length === 1 ? "wrong-key" : key);
      });
      await page.goto(`${server.url}/`);
      await page.waitForSelector("body[data-state=idle]");
      assert.equal(asked.length, 2, "a wrong key is asked again");
      assert.match(asked[1], /Invalid API key/);
      await page.fill("#max-tokens", "4");
      await page.fill("#input", "Who was the fox?");
      await page.press("#input", "Enter");
      await page.waitForSelector(".msg.assistant:not(.streaming)", { timeout: 30_000 });
      await page.waitForSelector("body[data-state=idle]");
      assert.equal(await page.$$eval(".msg.error", (els) => els.length), 0);
      assert.equal(server.stats().completed, 1);
      assert.deepEqual(errors, []);
    } finally {
      await browser.close();
      await server.close();
      await model.dispose();
    }
  },
});

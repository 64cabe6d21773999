/**
 * The chat page at `/`, in headless Chromium (Debian's `chromium`, driven by
 * `playwright-core`): it lists the models, sends a message, and streams the
 * answer into the page in several pieces; the conversation carries on.
 *
 * Skipped only when `/usr/bin/chromium` is missing and `CI` is not set.
 */

import assert from "node:assert/strict";
import { chromium } from "playwright-core";
import { loadModel } from "../models/model.ts";
import { startServer } from "../server/mod.ts";
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

const inCi = Deno.env.get("CI") !== undefined && Deno.env.get("CI") !== "false";

Deno.test({
  name: "web page: streams an answer in headless Chromium and keeps the conversation",
  ignore: !exists(CHROMIUM) && !inCi,
  async fn() {
    const model = await loadModel(STORY_DIR, { contextLength: 512, backend: "paced-ts" });
    const server = await startServer({ models: [{ id: "story", model, template: STORY_TEMPLATE }], port: 0 });
    const browser = await chromium.launch({ executablePath: CHROMIUM, args: CHROMIUM_ARGS });
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

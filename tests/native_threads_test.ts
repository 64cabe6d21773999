/**
 * The native backend's thread count: a fixed count is capped at the cores available (more only
 * makes every step wait on descheduled workers), the description says so, and the capped backend
 * still runs the story model as the uncapped one does.
 */

import assert from "node:assert/strict";
import { loadModel } from "../mod.ts";
import { createNativeBackend } from "../backends/native/mod.ts";
import { STORY_DIR } from "./helpers.ts";

const cores = navigator.hardwareConcurrency;

Deno.test("native: threads above the core count are capped at it, and the description says so", async () => {
  for (const asked of [cores + 1, 4 * cores, 256]) {
    const backend = await createNativeBackend({ threads: asked });
    try {
      assert.match(
        backend.description,
        new RegExp(`, ${cores} threads? \\(${asked} asked, capped at the ${cores} cores\\)$`),
        `threads: ${asked}`,
      );
    } finally {
      backend.dispose();
    }
  }
  const exact = await createNativeBackend({ threads: cores });
  assert.match(exact.description, new RegExp(`, ${cores} threads$`));
  exact.dispose();
  const auto = await createNativeBackend();
  assert.match(auto.description, new RegExp(`up to ${Math.min(cores, 64)} threads \\(auto\\)$`));
  auto.dispose();
});

Deno.test("native: a bad thread count is a RangeError naming it and the core count", async () => {
  for (const threads of [0, -1, 1.5, NaN]) {
    await assert.rejects(() => createNativeBackend({ threads }), (e: unknown) => {
      assert.ok(e instanceof RangeError, String(e));
      assert.ok(e.message.includes(`Invalid threads ${threads}`), e.message);
      assert.ok(e.message.includes(`${cores} cores`), e.message);
      return true;
    });
  }
});

Deno.test("native: a capped thread count generates what the core count does", async () => {
  const run = async (threads: number) => {
    const model = await loadModel(STORY_DIR, { backend: "native", threads });
    try {
      const tokens = await Array.fromAsync(model.generateTokens("Once upon a time", { temperature: 0, maxTokens: 12 }));
      return { ids: tokens.map((t) => t.id), description: model.backend.description };
    } finally {
      await model.dispose();
    }
  };
  const capped = await run(64 * cores);
  const exact = await run(cores);
  assert.match(capped.description, /capped/);
  assert.deepEqual(capped.ids, exact.ids);
});

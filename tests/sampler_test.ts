/** Sampling: each option's effect on hand-made logits, seeds, and the distribution. */

import assert from "node:assert/strict";
import {
  argmax,
  resolveSampling,
  Rng,
  Sampler,
  SamplingOptionError,
  type SamplingOptions,
} from "../models/generate/sampler.ts";

const sampler = (o: SamplingOptions, V: number) => new Sampler(resolveSampling(o, V), V);
const f = (...v: number[]) => Float32Array.from(v);
const pure = { topK: 0, topP: 1, minP: 0 };

Deno.test("argmax takes the first of equal maxima", () => {
  assert.equal(argmax(f(1, 3, 3, 2)), 1);
  assert.equal(argmax(f(-5)), 0);
});

Deno.test("temperature 0 is greedy whatever the seed", () => {
  for (const seed of [1, 2, 3]) assert.equal(sampler({ temperature: 0, seed }, 4).sample(f(0.1, 0.5, 0.2, 0.4)), 1);
});

Deno.test("top-k 1, a tiny top-p and min-p 1 all reduce to the most likely token", () => {
  const logits = f(1, 2, 3, 2.9, 0);
  for (const o of [{ topK: 1 }, { topK: 0, topP: 0.01 }, { topK: 0, topP: 1, minP: 1 }]) {
    const s = sampler({ temperature: 1.5, seed: 7, ...o }, 5);
    for (let i = 0; i < 50; i++) assert.equal(s.sample(logits), 2, JSON.stringify(o));
  }
});

Deno.test("top-k 2 only ever picks the two best", () => {
  const s = sampler({ temperature: 5, topK: 2, topP: 1, minP: 0, seed: 1 }, 4);
  const seen = new Set<number>();
  for (let i = 0; i < 400; i++) seen.add(s.sample(f(1, 0.9, 0.8, 0.95)));
  assert.deepEqual([...seen].sort(), [0, 3]);
});

Deno.test("top-p keeps the smallest set reaching p; min-p drops tokens below p·pmax", () => {
  // Probabilities 0.5, 0.3, 0.15, 0.05.
  const logits = f(Math.log(0.5), Math.log(0.3), Math.log(0.15), Math.log(0.05));
  const seen = (o: SamplingOptions) => {
    const s = sampler({ temperature: 1, seed: 3, ...pure, ...o }, 4);
    const out = new Set<number>();
    for (let i = 0; i < 2000; i++) out.add(s.sample(logits));
    return [...out].sort();
  };
  assert.deepEqual(seen({ topP: 0.8 }), [0, 1]); // 0.5 + 0.3 reaches 0.8
  assert.deepEqual(seen({ topP: 0.81 }), [0, 1, 2]);
  assert.deepEqual(seen({ minP: 0.5 }), [0, 1]); // 0.15 < 0.5 · 0.5
  assert.deepEqual(seen({ minP: 0.11 }), [0, 1, 2]); // 0.05 < 0.11 · 0.5
  assert.deepEqual(seen({ minP: 0.09 }), [0, 1, 2, 3]); // 0.05 ≥ 0.09 · 0.5
});

Deno.test("the draw follows the softmax distribution", () => {
  const probs = [0.5, 0.3, 0.2];
  const s = sampler({ temperature: 1, seed: 11, ...pure }, 3);
  const counts = [0, 0, 0];
  const n = 20000;
  for (let i = 0; i < n; i++) counts[s.sample(Float32Array.from(probs, Math.log))]++;
  counts.forEach((c, i) => assert.ok(Math.abs(c / n - probs[i]) < 0.015, `token ${i}: ${c / n}`));
  // Temperature 0.5 squares the odds: 0.25 : 0.09 : 0.04.
  const cold = sampler({ temperature: 0.5, seed: 11, ...pure }, 3);
  let first = 0;
  for (let i = 0; i < n; i++) if (cold.sample(Float32Array.from(probs, Math.log)) === 0) first++;
  assert.ok(Math.abs(first / n - 0.25 / 0.38) < 0.015, `${first / n}`);
});

Deno.test("the same seed gives the same draws", () => {
  const draw = (seed: number) => {
    const s = sampler({ temperature: 1, seed, ...pure }, 8);
    return Array.from({ length: 30 }, (_, i) => s.sample(f(1, 2, 3, 4, 4, 3, 2, i % 3)));
  };
  assert.deepEqual(draw(5), draw(5));
  assert.notDeepEqual(draw(5), draw(6));
  const a = new Rng(9);
  const b = new Rng(9);
  for (let i = 0; i < 100; i++) {
    const x = a.next();
    assert.equal(x, b.next());
    assert.ok(x >= 0 && x < 1);
  }
});

Deno.test("logit bias shifts or bans tokens", () => {
  assert.equal(sampler({ temperature: 0, logitBias: { 1: -Infinity } }, 3).sample(f(0, 5, 4)), 2);
  assert.equal(sampler({ temperature: 0, logitBias: { 0: 6 } }, 3).sample(f(0, 5, 4)), 0);
});

Deno.test("repetition, frequency and presence penalties lower recent tokens", () => {
  const rep = sampler({ temperature: 0, repetitionPenalty: 2 }, 3);
  rep.accept(0);
  assert.equal(rep.sample(f(2, 1.5, -1)), 1, "2 / 2 = 1 < 1.5");
  const neg = sampler({ temperature: 0, repetitionPenalty: 2 }, 2);
  neg.accept(0);
  assert.equal(neg.sample(f(-1, -1.5)), 1, "-1 · 2 = -2 < -1.5");
  const freq = sampler({ temperature: 0, frequencyPenalty: 0.1 }, 2);
  freq.accept(0);
  freq.accept(0);
  assert.equal(freq.sample(f(1, 0.85)), 1, "1 - 2 · 0.1 = 0.8 < 0.85");
  const pres = sampler({ temperature: 0, presencePenalty: 0.1 }, 2);
  pres.accept(0);
  pres.accept(0);
  assert.equal(pres.sample(f(1, 0.85)), 0, "1 - 0.1 = 0.9 > 0.85: presence counts once");
  const window = sampler({ temperature: 0, repetitionPenalty: 2, penaltyLastN: 1 }, 3);
  window.accept(0);
  window.accept(2);
  assert.equal(window.sample(f(2, 1.5, -1)), 0, "token 0 left the penalty window");
});

Deno.test("the penalty window past its first slots: grown as tokens come, the oldest leave it", () => {
  // 100 > the 64 slots a sampler starts with: the ring grows before it wraps.
  const s = sampler({ temperature: 0, repetitionPenalty: 1e9, penaltyLastN: 100 }, 300);
  for (let id = 0; id < 150; id++) s.accept(id); // the window holds 50..149
  const logits = new Float32Array(300).fill(1);
  logits[49] = 1.5; // left the window: unpenalized, the best
  logits[50] = 2; // in the window: 2 / 1e9
  logits[149] = 3;
  assert.equal(s.sample(logits), 49);
  logits[49] = 0.5;
  assert.equal(s.sample(logits), 0, "every id from 50 is penalized; 0 is the first unpenalized 1");
  for (let id = 150; id < 220; id++) s.accept(id); // now 120..219
  logits.fill(1);
  logits[119] = 1.5;
  logits[120] = 2;
  assert.equal(s.sample(logits), 119);
});

Deno.test("penaltyLastN resolves to the context length when past it", () => {
  assert.equal(resolveSampling({ penaltyLastN: 2 ** 31 }, 8, 512).penaltyLastN, 512);
  assert.equal(resolveSampling({ penaltyLastN: 100 }, 8, 512).penaltyLastN, 100);
  assert.equal(resolveSampling({}, 8, 16).penaltyLastN, 16);
  assert.throws(() => resolveSampling({ penaltyLastN: 2 ** 60 }, 8), { name: "SamplingOptionError" });
});

Deno.test("logit bias keys are canonical decimal ids below the vocabulary; banning all is refused", () => {
  assert.deepEqual(resolveSampling({ logitBias: { 0: 1, 7: -Infinity } }, 8).logitBias, [[0, 1], [7, -Infinity]]);
  for (const key of ["", "0x2", " 2 ", "1e3", "+1", "01", "8", "NaN", "Infinity"]) {
    assert.throws(() => resolveSampling({ logitBias: { [key]: 1 } }, 8), (e: unknown) => {
      assert.ok(e instanceof SamplingOptionError && e.option === "logitBias", String(e));
      assert.ok(e.message.includes(`token id ${JSON.stringify(key)}`), e.message);
      return true;
    }, JSON.stringify(key));
  }
  assert.throws(() => resolveSampling({ logitBias: [1, 2] as unknown as Record<number, number> }, 8), {
    message: /an array, expected an object/,
  });
  const all = { 0: -Infinity, 1: -Infinity, 2: -Infinity };
  assert.throws(() => resolveSampling({ logitBias: all }, 3), { message: /bans every one of the 3 tokens/ });
});

Deno.test("a step that leaves no token above -Infinity fails instead of emitting a banned one", () => {
  for (const temperature of [0, 1]) {
    // Token 0 banned; token 1's logit overflows to -Infinity under the frequency penalty.
    const s = sampler({ temperature, seed: 1, logitBias: { 0: -Infinity }, frequencyPenalty: 1e308 }, 2);
    s.accept(1);
    s.accept(1);
    assert.throws(() => s.sample(f(5, 5)), (e: unknown) => {
      assert.ok(e instanceof SamplingOptionError && e.option === "logitBias", String(e));
      assert.match(e.message, /every token's logit is -Infinity/);
      return true;
    }, `temperature ${temperature}`);
    // A model that gives -Infinity everywhere is refused alike.
    assert.throws(() => sampler({ temperature, seed: 1 }, 2).sample(f(-Infinity, -Infinity)), SamplingOptionError);
  }
});

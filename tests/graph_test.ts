/** The graph IR, its builder, the buffer planner, and graph printing. */

import assert from "node:assert/strict";
import { GraphBuilder } from "../graph/builder.ts";
import { graphToDot, graphToText } from "../graph/format.ts";
import { describePlan, planGraph, SLOT_ALIGN } from "../graph/plan.ts";
import { parseConfig } from "../models/arch/config.ts";
import { buildLlamaGraph } from "../models/arch/llama.ts";

const config = parseConfig({
  hidden_size: 64,
  intermediate_size: 128,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  vocab_size: 100,
});

function llamaGraph() {
  return buildLlamaGraph(config, { poolPages: 4, pageSize: 16, pagesPerSeq: 2, weightDType: () => "f32" }).graph;
}

Deno.test("builder: records ops with inferred shapes", () => {
  const g = new GraphBuilder();
  const x = g.input("x", "f32", ["T", 4]);
  const w = g.weight("w", "f32", [3, 4]);
  const y = g.matmul(x, w, "y");
  assert.deepEqual(y.shape, ["T", 3]);
  g.output(y);
  const graph = g.build();
  assert.equal(graph.nodes.length, 1);
  assert.deepEqual(graph.inputs, [x.id]);
  assert.deepEqual(graph.outputs, [y.id]);
});

Deno.test("builder: refuses shape mismatches and bad declarations with typed errors", () => {
  const g = new GraphBuilder();
  const x = g.input("x", "f32", ["T", 4]);
  assert.throws(() => g.matmul(x, g.weight("w", "f32", [3, 5]), "y"), { name: "TypeError", message: /\[5\].*\[4\]/ });
  assert.throws(() => g.rmsNorm(x, g.weight("n", "f32", [3]), 1e-6, "n2"), TypeError);
  assert.throws(() => g.input("x", "f32", [1]), { name: "TypeError", message: /"x".*taken/ });
  assert.throws(() => g.weight("bad", "f32", [0, 2]), RangeError);
  assert.throws(() => g.weight("frac", "f32", [1.5]), RangeError);
  const positions = g.input("positions", "i32", ["T"]);
  assert.throws(() => g.rope(x, positions, 1, 3, 10000, "r"), TypeError);
  assert.throws(() => g.rope(x, x, 1, 4, 10000, "r"), { name: "TypeError", message: /"x" as rope positions.*"i32"/ });
  const q = g.input("q", "f32", ["T", 12]);
  const kv = g.input("kv", "f32", ["T", 8]);
  const cache = g.state("c", "f32", [16, 8]);
  const seqOf = g.input("seq_of", "i32", ["T"]);
  const pages = g.input("pages", "i32", ["S", 2]);
  const index = { positions, seqOf, pages };
  const attrs = { heads: 3, kvHeads: 2, headDim: 4, scale: 1, window: 0, pageSize: 8 };
  assert.throws(() => g.attention(q, kv, kv, cache, cache, index, attrs, "a"), {
    name: "RangeError",
    message: /3 query heads over 2/,
  });
  assert.throws(
    () => g.attention(q, kv, kv, kv, kv, index, { ...attrs, heads: 2, kvHeads: 2, headDim: 6 }, "a2"),
    RangeError,
  );
  assert.throws(() => g.attention(q, kv, kv, cache, cache, index, { ...attrs, heads: 2, pageSize: 5 }, "a3"), {
    name: "RangeError",
    message: 'Cannot page cache "c" of 16 rows in pages of 5: expected a whole number of pages',
  });
  assert.throws(
    () => g.attention(q, kv, kv, cache, cache, { ...index, seqOf: kv }, { ...attrs, heads: 2 }, "a4"),
    TypeError,
  );
  assert.throws(() => g.gatherRows(x, x, "rows"), TypeError);
  assert.throws(() => new GraphBuilder().build(), RangeError);
});

Deno.test("llama graph: one embedding, per-layer ops, tied head reuses the table", () => {
  const graph = llamaGraph();
  const count = (kind: string) => graph.nodes.filter((n) => n.op.kind === kind).length;
  assert.equal(count("embedding"), 1);
  assert.equal(count("attention"), 2);
  assert.equal(count("matmul"), 2 * 7 + 1);
  assert.equal(count("gatherRows"), 1);
  const table = graph.tensors.find((t) => t.name === "model.embed_tokens.weight")!;
  const head = graph.nodes.find((n) => graph.tensors[n.output].name === "logits")!;
  assert.equal(head.inputs[1], table.id, "tied: the output head reads the embedding table");
  assert.deepEqual(graph.tensors[head.output].shape, ["R", 100], "logits only for the rows a step asks for");
  const cache = graph.tensors.find((t) => t.name === "l0.k_cache")!;
  assert.deepEqual(cache.shape, [64, 32], "the pool: 4 pages of 16 rows");
  assert.deepEqual(graph.tensors.find((t) => t.name === "pages")!.shape, ["S", 2]);
});

Deno.test("planner: reuses memory and never overlaps live tensors", () => {
  const graph = llamaGraph();
  const plan = planGraph(graph, { T: 16, S: 16, R: 16 });
  assert.ok(plan.arenaBytes < plan.unplannedBytes / 3, `arena ${plan.arenaBytes} vs ${plan.unplannedBytes}`);
  const placed = graph.tensors.map((t, id) => ({ t, s: plan.slots[id] })).filter((x) => x.s);
  for (const { s } of placed) assert.equal(s!.offset % SLOT_ALIGN, 0);
  for (let i = 0; i < placed.length; i++) {
    for (let j = i + 1; j < placed.length; j++) {
      const [a, b] = [placed[i].s!, placed[j].s!];
      const liveTogether = a.firstUse <= b.lastUse && b.firstUse <= a.lastUse;
      const overlap = a.offset < b.offset + b.bytes && b.offset < a.offset + a.bytes;
      assert.ok(!(liveTogether && overlap), `${placed[i].t.name} and ${placed[j].t.name} overlap while both live`);
    }
  }
  // Every node runs after the nodes that produce its inputs.
  const done = new Set<number>();
  for (const id of plan.order) {
    const node = graph.nodes[id];
    for (const i of node.inputs) {
      const producer = graph.nodes.find((n) => n.output === i);
      if (producer) assert.ok(done.has(producer.id));
    }
    done.add(id);
  }
  // Weights and state get no arena slot; the output stays live to the end.
  for (const t of graph.tensors) {
    if (t.kind === "weight" || t.kind === "state") assert.equal(plan.slots[t.id], undefined);
  }
  const out = plan.slots[graph.outputs[0]]!;
  assert.equal(out.lastUse, plan.order.length);
  assert.match(describePlan(plan), /buffer plan: \d+ nodes, arena \d+ bytes/);
});

Deno.test("planner: the arena scales with the planned number of tokens", () => {
  const graph = llamaGraph();
  const room = (n: number) => planGraph(graph, { T: n, S: n, R: n }).arenaBytes;
  assert.ok(room(64) > room(8) * 4);
});

Deno.test("format: text lists every node; DOT is a digraph with one box per node", () => {
  const graph = llamaGraph();
  const text = graphToText(graph);
  assert.match(text, /^input\s+tokens: i32\[T\]/m);
  assert.match(text, /l0\.attn: f32\[T, 64\] = attention\(heads=4, kvHeads=2, headDim=16/);
  assert.equal(text.split("\n").filter((l) => l.includes(" = ")).length, graph.nodes.length);
  const dot = graphToDot(graph);
  assert.match(dot, /^digraph model \{/);
  assert.match(dot, /\}$/);
  assert.equal((dot.match(/shape=box/g) ?? []).length, graph.nodes.length);
});

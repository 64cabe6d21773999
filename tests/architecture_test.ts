/**
 * The architecture map as a test: every relative import of the library, the server and the tools
 * must follow the folder rules below (the same rules as the map in README.md and
 * docs/architecture.md, which is checked too), and no file may take part in an import cycle.
 *
 * @module
 */

import assert from "node:assert/strict";

/** Matches every path: the layer may import anything. */
const ANYTHING = "anything";

/** Stands for the folder a `*` rule matched (`backends/native/` for `backends/*\/`). */
const OWN = "<own folder>";

/**
 * One row of the map. `folder` is a folder (ends in `/`, may hold one `*` segment) or a file;
 * `mayImport` are patterns: a folder (ends in `/`) covers everything under it, otherwise a path
 * where `*` stands for any characters but `/`. A file is governed by the most specific row
 * that covers it.
 */
interface Layer {
  readonly folder: string;
  readonly mayImport: readonly string[] | typeof ANYTHING;
}

/** The rules. Keep in step with the table in README.md and docs/architecture.md (tested below). */
const LAYERS: readonly Layer[] = [
  { folder: "graph/", mayImport: ["graph/"] },
  { folder: "backends/", mayImport: ["graph/", "backends/"] },
  // One folder per backend: the shared files of backends/, never another backend's folder.
  { folder: "backends/*/", mayImport: ["graph/", "backends/*.ts", OWN] },
  { folder: "models/arch/", mayImport: ["graph/", "models/arch/"] },
  { folder: "models/files/", mayImport: ["graph/", "backends/contract.ts", "models/arch/", "models/files/"] },
  { folder: "models/text/", mayImport: ["models/files/", "models/text/"] },
  { folder: "models/exec/", mayImport: ["graph/", "backends/", "models/arch/", "models/exec/"] },
  { folder: "models/generate/", mayImport: ["models/exec/", "models/text/", "models/generate/"] },
  {
    folder: "models/model.ts",
    mayImport: [
      "backends/",
      "graph/",
      "models/arch/",
      "models/files/",
      "models/text/",
      "models/exec/",
      "models/generate/",
    ],
  },
  {
    folder: "models/chat/",
    mayImport: [
      "models/model.ts",
      "models/generate/",
      "models/exec/",
      "models/text/",
      "models/files/",
      "graph/",
      "models/chat/",
    ],
  },
  { folder: "server/", mayImport: ["models/", "graph/", "server/"] },
  { folder: "mod.ts", mayImport: ["graph/", "backends/", "models/"] },
  {
    folder: "examples/",
    mayImport: [
      "mod.ts",
      "backends/mod.ts",
      "backends/native/mod.ts",
      "backends/webgpu/mod.ts",
      "server/mod.ts",
      "examples/_*.ts",
      // The package manifest, for the version `--version` prints.
      "deno.json",
    ],
  },
  { folder: "tests/", mayImport: ANYTHING },
];

/**
 * What the walk of the repository skips: tests/ (it may import anything), build output, caches and
 * hidden folders. Every other `.ts` file must be on the map.
 */
const UNCHECKED = new Set(["tests", "build", "node_modules"]);

const ROOT = new URL("..", import.meta.url);

// ---------------------------------------------------------------------------------------------
// Patterns

function globRegExp(pattern: string): RegExp {
  const parts = pattern.split("*").map((p) => p.replace(/[.+?^${}()|[\]\\]/g, "\\$&"));
  return new RegExp(`^${parts.join("[^/]*")}$`);
}

/** The folder a folder pattern matched for `path` (`backends/native/` for `backends/*\/`), or undefined. */
function matchedFolder(pattern: string, path: string): string | undefined {
  if (!pattern.endsWith("/")) return globRegExp(pattern).test(path) ? path : undefined;
  const depth = pattern.split("/").length - 1; // segments before the trailing slash
  const segments = path.split("/");
  if (segments.length <= depth) return undefined;
  const prefix = segments.slice(0, depth).join("/") + "/";
  return globRegExp(pattern).test(prefix) ? prefix : undefined;
}

/** The most specific layer covering `path` and the folder it matched, or undefined when none does. */
function layerOf(path: string): { layer: Layer; own: string } | undefined {
  let best: { layer: Layer; own: string } | undefined;
  for (const layer of LAYERS) {
    const own = matchedFolder(layer.folder, path);
    if (own === undefined) continue;
    if (best === undefined || own.length > best.own.length) best = { layer, own };
  }
  return best;
}

/** Whether `pattern` (a `mayImport` entry, `OWN` resolved to `own`) allows importing `target`. */
function allows(pattern: string, own: string, target: string): boolean {
  return matchedFolder(pattern === OWN ? own : pattern, target) !== undefined;
}

/** Why `from` may not import `to`, or undefined when the map allows it. */
function forbidden(from: string, to: string): string | undefined {
  const found = layerOf(from);
  if (found === undefined) return `${from} is in no folder of the architecture map`;
  const { layer, own } = found;
  if (layer.mayImport === ANYTHING) return undefined;
  if (layer.mayImport.some((p) => allows(p, own, to))) return undefined;
  const allowed = layer.mayImport.map((p) => (p === OWN ? own : p)).join(", ");
  return `${layer.folder} may import only ${allowed}`;
}

// ---------------------------------------------------------------------------------------------
// Reading imports

/** A token of TypeScript source, enough to tell code from comments, strings and regexes. */
interface Token {
  readonly kind: "name" | "string" | "template" | "regex" | "number" | "punct";
  readonly text: string;
  /** The line (1-based) where the token starts. */
  readonly line: number;
}

/** Names after which a `/` starts a regular expression rather than a division. */
const REGEX_AFTER_NAMES = new Set([
  "return",
  "typeof",
  "instanceof",
  "in",
  "of",
  "new",
  "delete",
  "void",
  "throw",
  "case",
  "do",
  "else",
  "yield",
  "await",
]);

function regexMayStart(prev: Token | undefined): boolean {
  if (prev === undefined) return true;
  switch (prev.kind) {
    case "name":
      return REGEX_AFTER_NAMES.has(prev.text);
    case "punct":
      return prev.text !== ")" && prev.text !== "]" && prev.text !== "}";
    case "string":
    case "template":
    case "regex":
    case "number":
      return false;
  }
}

/** Splits `src` into tokens, dropping comments; template literal text is one opaque token per piece. */
function tokenize(src: string): Token[] {
  const tokens: Token[] = [];
  const templateDepths: number[] = []; // brace depth at which each open `${` returns to its template
  let depth = 0;
  let line = 1;
  let i = 0;
  const advanceTo = (end: number) => {
    for (let j = i; j < end; j++) if (src[j] === "\n") line++;
    i = end;
  };
  /** Reads template text from `i` (just past "`" or "}") up to "`" or "${". */
  const readTemplate = () => {
    const start = i;
    let j = i;
    while (j < src.length && src[j] !== "`" && !(src[j] === "$" && src[j + 1] === "{")) j += src[j] === "\\" ? 2 : 1;
    const startLine = line;
    if (src[j] === "`") {
      advanceTo(j + 1);
    } else {
      templateDepths.push(depth);
      advanceTo(j + 2);
    }
    tokens.push({ kind: "template", text: src.slice(start, j), line: startLine });
  };
  while (i < src.length) {
    const c = src[i];
    const startLine = line;
    if (/\s/.test(c)) {
      advanceTo(i + 1);
    } else if (c === "/" && src[i + 1] === "/") {
      const end = src.indexOf("\n", i);
      advanceTo(end === -1 ? src.length : end);
    } else if (c === "/" && src[i + 1] === "*") {
      const end = src.indexOf("*/", i + 2);
      advanceTo(end === -1 ? src.length : end + 2);
    } else if (c === '"' || c === "'") {
      let j = i + 1;
      while (j < src.length && src[j] !== c && src[j] !== "\n") j += src[j] === "\\" ? 2 : 1;
      tokens.push({ kind: "string", text: src.slice(i + 1, j), line: startLine });
      advanceTo(j + 1);
    } else if (c === "`") {
      advanceTo(i + 1);
      readTemplate();
    } else if (c === "}" && templateDepths.length > 0 && templateDepths[templateDepths.length - 1] === depth) {
      templateDepths.pop();
      advanceTo(i + 1);
      readTemplate();
    } else if (c === "/" && regexMayStart(tokens[tokens.length - 1])) {
      let j = i + 1;
      let inClass = false;
      while (j < src.length && src[j] !== "\n" && (inClass || src[j] !== "/")) {
        if (src[j] === "[") inClass = true;
        else if (src[j] === "]") inClass = false;
        j += src[j] === "\\" ? 2 : 1;
      }
      j++;
      while (j < src.length && /[a-z]/i.test(src[j])) j++;
      tokens.push({ kind: "regex", text: src.slice(i, j), line: startLine });
      advanceTo(j);
    } else if (/[A-Za-z_$]/.test(c)) {
      let j = i + 1;
      while (j < src.length && /[\w$]/.test(src[j])) j++;
      tokens.push({ kind: "name", text: src.slice(i, j), line: startLine });
      advanceTo(j);
    } else if (/[0-9]/.test(c)) {
      let j = i + 1;
      while (j < src.length && /[\w.]/.test(src[j])) j++;
      tokens.push({ kind: "number", text: src.slice(i, j), line: startLine });
      advanceTo(j);
    } else {
      if (c === "{") depth++;
      else if (c === "}") depth--;
      tokens.push({ kind: "punct", text: c, line: startLine });
      advanceTo(i + 1);
    }
  }
  return tokens;
}

/** An import found in a file: its specifier, or undefined for a dynamic import of a computed specifier. */
interface ImportSite {
  readonly specifier: string | undefined;
  readonly line: number;
}

/**
 * The imports of a TypeScript source: `import … from "x"`, `export … from "x"`, `import "x"`,
 * `import("x")` (also in type positions), and dynamic imports whose specifier is not a string literal.
 */
function importsOf(src: string): ImportSite[] {
  const tokens = tokenize(src);
  const sites: ImportSite[] = [];
  for (let k = 0; k < tokens.length; k++) {
    const t = tokens[k];
    if (t.kind !== "name" || tokens[k - 1]?.text === ".") continue;
    const next = tokens[k + 1];
    if (t.text === "from" && next?.kind === "string") {
      sites.push({ specifier: next.text, line: next.line });
    } else if (t.text === "import" && next?.kind === "string") {
      sites.push({ specifier: next.text, line: next.line });
    } else if (t.text === "import" && next?.text === "(") {
      const arg = tokens[k + 2];
      const after = tokens[k + 3];
      const literal = arg?.kind === "string" && (after?.text === ")" || after?.text === ",");
      sites.push({ specifier: literal ? arg.text : undefined, line: t.line });
    }
  }
  return sites;
}

/** `specifier` resolved against the repository-relative `from`, or undefined when it is not relative. */
function resolveRelative(from: string, specifier: string): string | undefined {
  if (!specifier.startsWith("./") && !specifier.startsWith("../")) return undefined;
  const segments = from.split("/").slice(0, -1);
  for (const part of specifier.split("/")) {
    if (part === "" || part === ".") continue;
    if (part === "..") {
      if (segments.length === 0 || segments[segments.length - 1] === "..") segments.push("..");
      else segments.pop();
    } else {
      segments.push(part);
    }
  }
  return segments.join("/");
}

/** The repository-relative paths of every non-test `.ts` file the map governs. */
async function sourceFiles(): Promise<string[]> {
  const files: string[] = [];
  const walk = async (dir: string) => {
    for await (const entry of Deno.readDir(new URL(dir || ".", ROOT))) {
      if (entry.name.startsWith(".") || (dir === "" && UNCHECKED.has(entry.name))) continue;
      const path = `${dir}${entry.name}`;
      if (entry.isDirectory) await walk(`${path}/`);
      else if (entry.isFile && path.endsWith(".ts") && !path.endsWith("_test.ts")) files.push(path);
    }
  };
  await walk("");
  return files.sort();
}

/** Every file's relative imports (resolved) and the computed dynamic imports that cannot be checked. */
async function importGraph(): Promise<{ edges: Map<string, Map<string, number>>; computed: string[] }> {
  const edges = new Map<string, Map<string, number>>();
  const computed: string[] = [];
  for (const file of await sourceFiles()) {
    const targets = new Map<string, number>();
    for (const site of importsOf(await Deno.readTextFile(new URL(file, ROOT)))) {
      if (site.specifier === undefined) {
        computed.push(`${file}:${site.line}: a dynamic import of a computed specifier (the map cannot check it)`);
        continue;
      }
      const target = resolveRelative(file, site.specifier);
      if (target !== undefined && !targets.has(target)) targets.set(target, site.line);
    }
    edges.set(file, targets);
  }
  return { edges, computed };
}

/** Each import cycle among `edges`, as a path that starts and ends at the same file. */
function findCycles(edges: ReadonlyMap<string, ReadonlyMap<string, number>>): string[][] {
  // Tarjan's strongly connected components; each component of more than one file (or a file that
  // imports itself) holds at least one cycle, and one cycle per component is reported.
  const index = new Map<string, number>();
  const low = new Map<string, number>();
  const onStack = new Set<string>();
  const stack: string[] = [];
  const components: string[][] = [];
  let counter = 0;
  const visit = (v: string) => {
    index.set(v, counter);
    low.set(v, counter);
    counter++;
    stack.push(v);
    onStack.add(v);
    for (const w of edges.get(v)?.keys() ?? []) {
      if (!edges.has(w)) continue;
      if (!index.has(w)) {
        visit(w);
        low.set(v, Math.min(low.get(v)!, low.get(w)!));
      } else if (onStack.has(w)) {
        low.set(v, Math.min(low.get(v)!, index.get(w)!));
      }
    }
    if (low.get(v) === index.get(v)) {
      const component: string[] = [];
      let w: string;
      do {
        w = stack.pop()!;
        onStack.delete(w);
        component.push(w);
      } while (w !== v);
      if (component.length > 1 || edges.get(v)?.has(v)) components.push(component.sort());
    }
  };
  for (const v of [...edges.keys()].sort()) if (!index.has(v)) visit(v);

  return components.map((component) => {
    const members = new Set(component);
    const start = component[0];
    // Breadth-first from start back to start inside the component: the shortest cycle through it.
    const parent = new Map<string, string>();
    const queue = [start];
    while (queue.length > 0) {
      const v = queue.shift()!;
      for (const w of [...(edges.get(v)?.keys() ?? [])].sort()) {
        if (!members.has(w)) continue;
        if (w === start) {
          const path = [v];
          while (path[0] !== start) path.unshift(parent.get(path[0])!);
          return [...path, start];
        }
        if (!parent.has(w)) {
          parent.set(w, v);
          queue.push(w);
        }
      }
    }
    return component;
  });
}

// ---------------------------------------------------------------------------------------------
// The map in the docs

/** `models/{arch,files}/` → `models/arch/`, `models/files/`. */
function expandBraces(token: string): string[] {
  const m = /^(.*?)\{([^{}]*)\}(.*)$/.exec(token);
  if (!m) return [token];
  return m[2].split(",").flatMap((alt) => expandBraces(`${m[1]}${alt.trim()}${m[3]}`));
}

/** The rows of the first `| folder | owns | may import |` table in `markdown`: folder → the import cells. */
function mapTable(markdown: string): Map<string, string> {
  const lines = markdown.split("\n");
  const header = lines.findIndex((l) => /^\|\s*folder\s*\|\s*owns\s*\|\s*may import\s*\|\s*$/.test(l));
  const rows = new Map<string, string>();
  if (header === -1) return rows;
  for (const line of lines.slice(header + 2)) {
    if (!line.startsWith("|")) break;
    const cells = line.split(/(?<!\\)\|/).slice(1, -1).map((c) => c.trim());
    const folder = /^`([^`]+)`/.exec(cells[0] ?? "")?.[1];
    if (folder !== undefined) rows.set(folder, cells[2] ?? "");
  }
  return rows;
}

/** Differences between the table of `markdown` and {@link LAYERS}, one line each. */
function mapDrift(name: string, markdown: string): string[] {
  const rows = mapTable(markdown);
  const problems: string[] = [];
  if (rows.size === 0) problems.push(`${name}: no "| folder | owns | may import |" table`);
  for (const layer of LAYERS) {
    const cell = rows.get(layer.folder);
    if (cell === undefined) {
      if (rows.size > 0) problems.push(`${name}: the map has no row for ${layer.folder}`);
      continue;
    }
    const named = new Set(
      [...cell.matchAll(/`([^`]+)`/g)].flatMap((m) => expandBraces(m[1])).filter((t) => t !== layer.folder),
    );
    if (layer.mayImport === ANYTHING) {
      if (!/\banything\b/.test(cell) || named.size > 0) {
        problems.push(`${name}: ${layer.folder} should say it may import anything, says "${cell}"`);
      }
      continue;
    }
    const expected = new Set(layer.mayImport.filter((p) => p !== OWN && p !== layer.folder));
    const missing = [...expected].filter((p) => !named.has(p));
    const extra = [...named].filter((p) => !expected.has(p));
    if (missing.length > 0 || extra.length > 0) {
      problems.push(
        `${name}: ${layer.folder} may import [${[...expected].join(", ")}] in the test, ` +
          `the map says [${[...named].join(", ")}]`,
      );
    }
  }
  for (const folder of rows.keys()) {
    if (!LAYERS.some((l) => l.folder === folder)) problems.push(`${name}: the map's ${folder} is not in the test`);
  }
  return problems;
}

// ---------------------------------------------------------------------------------------------
// Tests of the checker itself (so that the real checks below can fail)

Deno.test("architecture: imports are read from code, not from comments, strings or regexes", () => {
  const src = [
    `/** @example`,
    ` * import { loadModel } from "./commented.ts";`,
    ` */`,
    `// import "./line-comment.ts";`,
    `import { a,`,
    `  b } from "./static.ts";`,
    `import type { T } from '../type_only.ts';`,
    `export { c } from "./reexport.ts";`,
    `export * from "./star.ts";`,
    `import "./side_effect.ts";`,
    `const help = \`see import("./in_template.ts") and \${"x" + \`\${1}\`} from "./template.ts"\`;`,
    `const s = 'import "./in_string.ts"';`,
    `const re = /import\\("\\.\\/regex.ts"\\)/;`,
    `const ratio = 4 / 2; const other = "from";`,
    `const mod = await import("./dynamic.ts");`,
    `type U = import("./type_position.ts").U;`,
    `const lazy = () => import("../computed/" + "mod.ts");`,
    `const items = Array.from("abc"); if (import.meta.main) {}`,
  ].join("\n");
  assert.deepEqual(importsOf(src).map((s) => s.specifier), [
    "./static.ts",
    "../type_only.ts",
    "./reexport.ts",
    "./star.ts",
    "./side_effect.ts",
    "./dynamic.ts",
    "./type_position.ts",
    undefined,
  ]);
  assert.equal(importsOf(src)[0].line, 6);
});

Deno.test("architecture: specifiers resolve against the importing file", () => {
  assert.equal(resolveRelative("models/text/tokenizer.ts", "../files/json.ts"), "models/files/json.ts");
  assert.equal(resolveRelative("mod.ts", "./models/model.ts"), "models/model.ts");
  assert.equal(resolveRelative("examples/story.ts", "../../shared/x.ts"), "../shared/x.ts");
  assert.equal(resolveRelative("mod.ts", "@huggingface/hub"), undefined);
  assert.equal(resolveRelative("mod.ts", "node:util"), undefined);
});

Deno.test("architecture: the rules allow and forbid the arrows of the map", () => {
  const allowed: [string, string][] = [
    ["graph/plan.ts", "graph/ir.ts"],
    ["backends/registry.ts", "backends/contract.ts"],
    ["backends/builtin.ts", "backends/native/mod.ts"],
    ["backends/native/backend.ts", "backends/contract.ts"],
    ["backends/native/backend.ts", "backends/native/abi.ts"],
    ["backends/native/deep/part.ts", "backends/native/abi.ts"],
    ["models/files/weights.ts", "backends/contract.ts"],
    ["models/model.ts", "models/generate/sampler.ts"],
    ["models/chat/session.ts", "models/model.ts"],
    ["server/mod.ts", "models/chat/session.ts"],
    ["examples/story.ts", "mod.ts"],
    ["examples/bench.ts", "examples/_cli.ts"],
    ["examples/_cli.ts", "backends/native/mod.ts"],
    ["tests/x_test.ts", "backends/native/backend.ts"],
  ];
  for (const [from, to] of allowed) assert.equal(forbidden(from, to), undefined, `${from} → ${to}`);
  const refused: [string, string][] = [
    ["graph/ir.ts", "models/model.ts"],
    ["graph/ir.ts", "backends/contract.ts"],
    ["backends/contract.ts", "models/model.ts"],
    ["backends/ts/backend.ts", "backends/native/abi.ts"],
    ["backends/webgpu/backend.ts", "backends/ts/kernels.ts"],
    ["backends/native/backend.ts", "models/exec/kv_cache.ts"],
    ["models/arch/llama.ts", "models/files/json.ts"],
    ["models/files/weights.ts", "backends/registry.ts"],
    ["models/text/chat_template.ts", "models/model.ts"],
    ["models/exec/sequence.ts", "models/generate/sampler.ts"],
    ["models/generate/token_generator.ts", "models/model.ts"],
    ["models/model.ts", "models/chat/session.ts"],
    ["models/chat/session.ts", "server/mod.ts"],
    ["server/mod.ts", "examples/_cli.ts"],
    ["mod.ts", "server/mod.ts"],
    ["examples/story.ts", "models/model.ts"],
    ["examples/bench.ts", "examples/make_model.ts"],
    ["examples/story.ts", "../shared/x.ts"],
    ["models/new_thing.ts", "graph/ir.ts"],
    ["notes.ts", "mod.ts"],
  ];
  for (const [from, to] of refused) assert.notEqual(forbidden(from, to), undefined, `${from} → ${to}`);
  assert.equal(
    forbidden("backends/ts/backend.ts", "backends/native/abi.ts"),
    "backends/*/ may import only graph/, backends/*.ts, backends/ts/",
  );
});

Deno.test("architecture: cycles are found and named", () => {
  const graph = (pairs: [string, string][]) => {
    const edges = new Map<string, Map<string, number>>();
    for (const [a, b] of pairs) {
      if (!edges.has(a)) edges.set(a, new Map());
      if (!edges.has(b)) edges.set(b, new Map());
      edges.get(a)!.set(b, 1);
    }
    return edges;
  };
  assert.deepEqual(findCycles(graph([["a", "b"], ["b", "c"], ["c", "d"]])), []);
  assert.deepEqual(findCycles(graph([["a", "b"], ["b", "c"], ["c", "a"], ["c", "d"]])), [["a", "b", "c", "a"]]);
  assert.deepEqual(findCycles(graph([["x", "x"]])), [["x", "x"]]);
  assert.equal(findCycles(graph([["a", "b"], ["b", "a"], ["c", "d"], ["d", "c"]])).length, 2);
});

Deno.test("architecture: the drift check sees a map that says something else", () => {
  const table = (rows: string[]) => ["| folder | owns | may import |", "| --- | --- | --- |", ...rows].join("\n");
  const faithful = LAYERS.map((l) =>
    `| \`${l.folder}\` | x | ${
      l.mayImport === ANYTHING ? "anything" : l.mayImport.filter((p) => p !== OWN).map((p) => `\`${p}\``).join(", ")
    } |`
  );
  assert.deepEqual(mapDrift("doc", table(faithful)), []);
  assert.equal(mapDrift("doc", table(faithful.slice(1))).length, 1);
  const loosened = faithful.map((r) => r.startsWith("| `graph/`") ? "| `graph/` | x | `graph/`, `models/` |" : r);
  assert.equal(mapDrift("doc", table(loosened)).length, 1);
  assert.deepEqual(mapDrift("doc", "no table"), [`doc: no "| folder | owns | may import |" table`]);
  assert.deepEqual(expandBraces("models/{arch, files}/"), ["models/arch/", "models/files/"]);
});

// ---------------------------------------------------------------------------------------------
// The checks of the code

Deno.test("architecture: every source file is on the map", async () => {
  const files = await sourceFiles();
  assert.ok(files.includes("mod.ts") && files.includes("models/model.ts"), `the walk found ${files.join(", ")}`);
  const unmapped = files.filter((f) => layerOf(f) === undefined);
  if (unmapped.length > 0) assert.fail(`files in no folder of the architecture map:\n${unmapped.join("\n")}`);
});

Deno.test("architecture: every import follows the map", async () => {
  const { edges } = await importGraph();
  const problems: string[] = [];
  for (const [from, targets] of edges) {
    for (const [to, line] of targets) {
      const why = forbidden(from, to);
      if (why !== undefined) problems.push(`${from}:${line} imports ${to}: ${why}`);
    }
  }
  if (problems.length > 0) {
    assert.fail(`${problems.length} imports break the architecture map:\n${problems.join("\n")}`);
  }
});

Deno.test("architecture: every dynamic import names its module literally", async () => {
  const { computed } = await importGraph();
  if (computed.length > 0) assert.fail(computed.join("\n"));
});

Deno.test("architecture: no import cycles", async () => {
  const { edges } = await importGraph();
  const cycles = findCycles(edges).map((c) => c.join(" → "));
  if (cycles.length > 0) assert.fail(`${cycles.length} import cycles:\n${cycles.join("\n")}`);
});

Deno.test("architecture: README.md and docs/architecture.md show the map the test checks", async () => {
  const problems: string[] = [];
  for (const name of ["README.md", "docs/architecture.md"]) {
    problems.push(...mapDrift(name, await Deno.readTextFile(new URL(name, ROOT))));
  }
  if (problems.length > 0) assert.fail(problems.join("\n"));
});

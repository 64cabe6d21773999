/**
 * Model resolution: folders, the `LLM_MODELS_DIR` mirror, the Hugging Face cache, and real downloads
 * through `@huggingface/hub` from a local server on 127.0.0.1 that answers the Hub endpoints the
 * library calls, serving the story model's files.
 */

import assert from "node:assert/strict";
import {
  cacheRepoFolder,
  DEFAULT_MODEL_ID,
  isHubId,
  ModelDownloadError,
  ModelNotFoundError,
  resolveModelSource,
} from "../models/files/hub.ts";
import type { LoadProgress } from "../models/files/weights.ts";
import { loadModel } from "../models/model.ts";
import { STORY_DIR } from "./helpers.ts";
import { type Run, runDeno } from "./subprocess.ts";

const ID = DEFAULT_MODEL_ID;
const COMMIT = "0123456789abcdef0123456789abcdef01234567";

/** Awaits a rejection of class `cls` whose message includes `includes`; returns the error. */
async function rejects<E extends Error>(
  fn: () => Promise<unknown>,
  cls: new (...args: any[]) => E,
  includes = "",
): Promise<E> {
  try {
    await fn();
  } catch (e) {
    assert.ok(e instanceof cls, `expected ${cls.name}, got ${e}`);
    assert.ok(e.message.includes(includes), `"${e.message}" should include "${includes}"`);
    return e;
  }
  throw new assert.AssertionError({ message: `expected a ${cls.name}` });
}

async function hex(algo: "SHA-1" | "SHA-256", data: Uint8Array): Promise<string> {
  const d = new Uint8Array(await crypto.subtle.digest(algo, data as Uint8Array<ArrayBuffer>));
  return [...d].map((b) => b.toString(16).padStart(2, "0")).join("");
}

interface RepoFile {
  path: string;
  data: Uint8Array<ArrayBuffer>;
  oid: string;
  lfs?: { oid: string; size: number; pointerSize: number };
}

async function storyFiles(): Promise<RepoFile[]> {
  const out: RepoFile[] = [];
  for await (const e of Deno.readDir(STORY_DIR)) {
    const data = await Deno.readFile(`${STORY_DIR}/${e.name}`);
    const header = new TextEncoder().encode(`blob ${data.length}\0`);
    const oid = await hex("SHA-1", new Uint8Array([...header, ...data]));
    const lfs = e.name.endsWith(".safetensors")
      ? { oid: await hex("SHA-256", data), size: data.length, pointerSize: 134 }
      : undefined;
    out.push({ path: e.name, data, oid, lfs });
  }
  // A file the engine does not need: it must not be downloaded.
  const readme = new TextEncoder().encode("# TinyStories-656K\n");
  out.push({ path: "README.md", data: readme, oid: await hex("SHA-1", readme) });
  return out;
}

/** A local imitation of the Hub's model endpoints for one repository; counts requests. */
class FakeHub {
  readonly requests: string[] = [];
  readonly #server: Deno.HttpServer<Deno.NetAddr>;
  readonly #files: Map<string, RepoFile>;

  constructor(files: RepoFile[]) {
    this.#files = new Map(files.map((f) => [f.path, f]));
    this.#server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen() {} }, (req) => this.#handle(req));
  }

  get url(): string {
    return `http://127.0.0.1:${this.#server.addr.port}`;
  }

  async close(): Promise<void> {
    await this.#server.shutdown();
  }

  #entry(f: RepoFile) {
    return { type: "file", path: f.path, oid: f.oid, size: f.lfs ? f.lfs.pointerSize : f.data.length, lfs: f.lfs };
  }

  async #handle(req: Request): Promise<Response> {
    const url = new URL(req.url);
    const p = decodeURIComponent(url.pathname);
    this.requests.push(`${req.method} ${p}`);
    const json = (v: unknown, status = 200) =>
      new Response(JSON.stringify(v), { status, headers: { "content-type": "application/json" } });
    if (req.method === "GET" && p.startsWith(`/api/models/${ID}/revision/`)) {
      return json({
        _id: "abc",
        id: ID,
        sha: COMMIT,
        private: false,
        downloads: 1,
        likes: 1,
        lastModified: "2024-01-01T00:00:00.000Z",
        siblings: [...this.#files.keys()].map((rfilename) => ({ rfilename })),
      });
    }
    if (req.method === "GET" && p.startsWith(`/api/models/${ID}/tree/`)) {
      return json([...this.#files.values()].map((f) => this.#entry(f)));
    }
    if (req.method === "POST" && p.startsWith(`/api/models/${ID}/paths-info/`)) {
      const { paths } = await req.json() as { paths: string[] };
      return json(
        paths.flatMap((q) => this.#files.has(q) ? [this.#entry(this.#files.get(q)!)] : []).map((e) => ({
          ...e,
          lastCommit: { id: COMMIT, title: "init", date: "2024-01-01T00:00:00.000Z" },
        })),
      );
    }
    const m = new RegExp(`^/${ID}/resolve/([^/]+)/(.+)$`).exec(p);
    if (req.method === "GET" && m) {
      const f = this.#files.get(m[2]);
      if (!f) return new Response("not found", { status: 404, headers: { "X-Error-Code": "EntryNotFound" } });
      const etag = `"${f.lfs?.oid ?? f.oid}"`;
      const headers = { etag, "x-linked-etag": etag, "content-type": "application/octet-stream" };
      const range = /^bytes=(\d+)-(\d+)$/.exec(req.headers.get("range") ?? "");
      if (range) {
        const [a, b] = [Number(range[1]), Math.min(Number(range[2]), f.data.length - 1)];
        return new Response(f.data.slice(a, b + 1), {
          status: 206,
          headers: { ...headers, "content-range": `bytes ${a}-${b}/${f.data.length}` },
        });
      }
      return new Response(f.data, { headers: { ...headers, "content-length": String(f.data.length) } });
    }
    return json({ error: `Repository not found: ${p}` }, 404);
  }
}

function closedPortUrl(): string {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return `http://127.0.0.1:${port}`;
}

Deno.test("hub ids are owner/name", () => {
  assert(isHubId("raincandy-u/TinyStories-656K"));
  assert(!isHubId("story"));
  assert(!isHubId("/abs/path"));
  assert(!isHubId("a/b/c"));
  assert(!isHubId("../x"));
});

Deno.test("an existing folder resolves to itself", async () => {
  assert.deepEqual(await resolveModelSource(`${STORY_DIR}/`), STORY_DIR);
});

Deno.test("downloads into the Hugging Face cache layout with progress, then reuses the cache offline", async () => {
  const hub = new FakeHub(await storyFiles());
  const cacheDir = await Deno.makeTempDir({ prefix: "hfcache-" });
  try {
    const events: LoadProgress[] = [];
    const dir = await resolveModelSource(ID, {
      hubUrl: hub.url,
      cacheDir,
      modelsDir: "/nonexistent-mirror",
      onProgress: (p) => events.push(p),
    });
    const repo = cacheRepoFolder(cacheDir, ID);
    assert.deepEqual(repo, `${cacheDir}/models--raincandy-u--TinyStories-656K`);
    assert.deepEqual(dir, `${repo}/snapshots/${COMMIT}`);
    assert.deepEqual((await Deno.readTextFile(`${repo}/refs/main`)).trim(), COMMIT);

    // Every needed file, as a symlink into blobs/, byte-identical to the source; README.md skipped.
    const names: string[] = [];
    for await (const e of Deno.readDir(dir)) names.push(e.name);
    assert.deepEqual(names.sort(), [
      "config.json",
      "generation_config.json",
      "model.safetensors",
      "special_tokens_map.json",
      "tokenizer.json",
      "tokenizer_config.json",
    ]);
    for (const n of names) {
      assert((await Deno.lstat(`${dir}/${n}`)).isSymlink, `${n} is a symlink`);
      assert((await Deno.realPath(`${dir}/${n}`)).startsWith(await Deno.realPath(`${repo}/blobs`)));
      assert.deepEqual(await Deno.readFile(`${dir}/${n}`), await Deno.readFile(`${STORY_DIR}/${n}`), n);
    }
    const weightsBlob = await Deno.realPath(`${dir}/model.safetensors`);
    assert.deepEqual(
      weightsBlob.split("/").pop(),
      await hex("SHA-256", await Deno.readFile(`${STORY_DIR}/model.safetensors`)),
    );

    // Byte progress: increasing per file, ending at the file's size.
    const size = (await Deno.stat(`${STORY_DIR}/model.safetensors`)).size;
    const w = events.filter((e) => e.phase === "download" && e.file === "model.safetensors") as Extract<
      LoadProgress,
      { phase: "download" }
    >[];
    assert(w.length >= 2, `progress events for the weights: ${w.length}`);
    for (let i = 1; i < w.length; i++) assert(w[i].loadedBytes >= w[i - 1].loadedBytes);
    assert(w.every((e) => e.totalBytes === size));
    assert.deepEqual(w[w.length - 1].loadedBytes, size);
    assert(w.some((e) => e.loadedBytes > 0 && e.loadedBytes < size), "intermediate progress");
    assert(!hub.requests.some((r) => r.includes("README.md")), "README.md was not downloaded");

    // The downloaded folder loads.
    const model = await loadModel(dir);
    assert.deepEqual(model.config.vocabSize, 2048);
    await model.dispose();

    // Second resolve: from the cache, without any request (the Hub is gone).
    await hub.close();
    const before = hub.requests.length;
    let fetched = 0;
    const again = await resolveModelSource(ID, {
      hubUrl: closedPortUrl(),
      cacheDir,
      fetch: (...a) => (fetched++, fetch(...a)),
    });
    assert.deepEqual(again, dir);
    assert.deepEqual(fetched, 0);
    assert.deepEqual(hub.requests.length, before);

    // A partial snapshot (weights missing) is not used.
    await Deno.remove(`${dir}/model.safetensors`);
    const err = await rejects(
      () => resolveModelSource(ID, { hubUrl: hub.url, cacheDir }),
      ModelDownloadError,
    );
    assert(err.offline);
  } finally {
    await hub.close().catch(() => {});
    await Deno.remove(cacheDir, { recursive: true });
  }
});

Deno.test("the cache folder and the Hub URL come from HF_HUB_CACHE and HF_ENDPOINT", async () => {
  const hub = new FakeHub(await storyFiles());
  const cacheDir = await Deno.makeTempDir({ prefix: "hfcache-env-" });
  const saved = ["HF_HUB_CACHE", "HF_ENDPOINT", "LLM_MODELS_DIR"].map((k) => [k, Deno.env.get(k)] as const);
  try {
    Deno.env.set("HF_HUB_CACHE", cacheDir);
    Deno.env.set("HF_ENDPOINT", hub.url);
    Deno.env.delete("LLM_MODELS_DIR");
    const dir = await resolveModelSource(ID);
    assert.deepEqual(dir, `${cacheRepoFolder(cacheDir, ID)}/snapshots/${COMMIT}`);
    assert(hub.requests.some((r) => r.startsWith("GET /raincandy-u/TinyStories-656K/resolve/")));
  } finally {
    for (const [k, v] of saved) v === undefined ? Deno.env.delete(k) : Deno.env.set(k, v);
    await hub.close();
    await Deno.remove(cacheDir, { recursive: true });
  }
});

Deno.test("LLM_MODELS_DIR: <source>, owner--name and name entries", async () => {
  const mirror = await Deno.makeTempDir({ prefix: "mirror-" });
  const saved = Deno.env.get("LLM_MODELS_DIR");
  const offline = { hubUrl: closedPortUrl(), cacheDir: `${mirror}/no-cache` };
  try {
    await Deno.symlink(STORY_DIR, `${mirror}/story`);
    assert.deepEqual(await resolveModelSource("story", { ...offline, modelsDir: mirror }), `${mirror}/story`);

    await Deno.symlink(STORY_DIR, `${mirror}/TinyStories-656K`);
    assert.deepEqual(await resolveModelSource(ID, { ...offline, modelsDir: mirror }), `${mirror}/TinyStories-656K`);
    await Deno.symlink(STORY_DIR, `${mirror}/raincandy-u--TinyStories-656K`);
    assert.deepEqual(
      await resolveModelSource(ID, { ...offline, modelsDir: mirror }),
      `${mirror}/raincandy-u--TinyStories-656K`,
    );
    await Deno.mkdir(`${mirror}/raincandy-u`);
    await Deno.symlink(STORY_DIR, `${mirror}/${ID}`);
    assert.deepEqual(await resolveModelSource(ID, { ...offline, modelsDir: mirror }), `${mirror}/${ID}`);

    Deno.env.set("LLM_MODELS_DIR", mirror);
    assert.deepEqual(await resolveModelSource("story", offline), `${mirror}/story`);
  } finally {
    saved === undefined ? Deno.env.delete("LLM_MODELS_DIR") : Deno.env.set("LLM_MODELS_DIR", saved);
    await Deno.remove(mirror, { recursive: true });
  }
});

Deno.test("fallback folders come after the cache and before a download", async () => {
  const cacheDir = await Deno.makeTempDir({ prefix: "hfcache-fb-" });
  try {
    let fetched = 0;
    const dir = await resolveModelSource(ID, {
      cacheDir,
      modelsDir: "/nonexistent-mirror",
      fallbacks: ["/nonexistent-fallback", STORY_DIR],
      fetch: (...a) => (fetched++, fetch(...a)),
    });
    assert.deepEqual(dir, STORY_DIR);
    assert.deepEqual(fetched, 0);
  } finally {
    await Deno.remove(cacheDir, { recursive: true });
  }
});

Deno.test("offline: a typed error naming a local folder and LLM_MODELS_DIR (no CLI flag)", async () => {
  const cacheDir = await Deno.makeTempDir({ prefix: "hfcache-off-" });
  try {
    // Unreachable port.
    const err = await rejects(
      () => resolveModelSource(ID, { hubUrl: closedPortUrl(), cacheDir, modelsDir: "/nonexistent-mirror" }),
      ModelDownloadError,
    );
    assert(err.offline);
    assert.deepEqual(err.source, ID);
    assert(err.message.includes("pass a local model folder") && err.message.includes("LLM_MODELS_DIR"), err.message);
    assert(!err.message.includes("--model"), err.message);
    assert(err.message.includes(`"${ID}"`), err.message);

    // A server that answers, then stops.
    const hub = new FakeHub(await storyFiles());
    const url = hub.url;
    await hub.close();
    const err2 = await rejects(() => resolveModelSource(ID, { hubUrl: url, cacheDir }), ModelDownloadError);
    assert(err2.offline);

    // HF_HUB_OFFLINE-style: no request at all.
    let fetched = 0;
    await rejects(
      () => resolveModelSource(ID, { cacheDir, offline: true, fetch: (...a) => (fetched++, fetch(...a)) }),
      ModelDownloadError,
      "downloads are off",
    );
    assert.deepEqual(fetched, 0);

    // Nothing partial is left behind as a usable snapshot.
    assert.deepEqual([...Deno.readDirSync(cacheDir)].length, 0);
  } finally {
    await Deno.remove(cacheDir, { recursive: true });
  }
});

Deno.test("an unknown model on the Hub and a missing folder give clear errors", async () => {
  const hub = new FakeHub(await storyFiles());
  const cacheDir = await Deno.makeTempDir({ prefix: "hfcache-404-" });
  try {
    const err = await rejects(
      () => resolveModelSource("nobody/no-such-model", { hubUrl: hub.url, cacheDir }),
      ModelDownloadError,
      "no such model",
    );
    assert(!err.offline);
    await rejects(
      () => resolveModelSource("./no/such/folder", { hubUrl: hub.url, cacheDir }),
      ModelNotFoundError,
      'Cannot find model "./no/such/folder"',
    );
  } finally {
    await hub.close();
    await Deno.remove(cacheDir, { recursive: true });
  }
});

Deno.test("a GGUF file or any other file says what a model folder holds", async () => {
  const layout = "a model is a Hugging Face folder with config.json, tokenizer.json and *.safetensors";
  await rejects(
    () => loadModel("/models/tinyllama-q8_0.gguf"),
    ModelNotFoundError,
    `Cannot load model "/models/tinyllama-q8_0.gguf": GGUF files are not supported yet; ${layout}`,
  );
  await rejects(
    () => resolveModelSource(`${STORY_DIR}/model.safetensors`),
    ModelNotFoundError,
    `Cannot load model "${STORY_DIR}/model.safetensors": it is a file, not a folder; ${layout}`,
  );
});

const ROOT = new URL("..", import.meta.url);

/** Runs `code` as a module with the permission `flags` (and the given config) in a subprocess. */
function runModule(code: string, flags: string[], config = new URL("deno.json", ROOT).pathname): Promise<Run> {
  return runDeno(["run", ...flags, "--config", config, "-"], { stdin: code });
}

Deno.test("without --allow-read, loading names the path and the permission", async () => {
  const r = await runModule(
    `import { loadModel } from "${new URL("mod.ts", ROOT)}";
try { await loadModel(${JSON.stringify(STORY_DIR)}); } catch (e) { console.log(e.name + ": " + e.message); }`,
    ["--allow-env"],
  );
  assert.equal(r.code, 0, r.stderr);
  assert.equal(
    r.stdout,
    `NotCapable: Cannot read "${STORY_DIR}": read access is not granted (run with --allow-read)\n`,
  );
});

Deno.test("@huggingface/hub is imported only for a download", async () => {
  const tmp = await Deno.makeTempDir({ prefix: "lazy-hub-" });
  try {
    // The project's import map, with the Hub library replaced by a module that throws when evaluated.
    await Deno.writeTextFile(
      `${tmp}/hub.js`,
      "export class HubApiError extends Error {}\n" +
        "export function downloadFileToCacheDir() {}\nexport function listFiles() {}\nexport function modelInfo() {}\n" +
        'throw new Error("the Hub library was evaluated");\n',
    );
    const config = JSON.parse(await Deno.readTextFile(new URL("deno.json", ROOT)));
    config.imports["@huggingface/hub"] = new URL(`file://${tmp}/hub.js`).href;
    await Deno.writeTextFile(`${tmp}/deno.json`, JSON.stringify({ imports: config.imports }));
    const r = await runModule(
      `import { loadModel, resolveModelSource } from "${new URL("mod.ts", ROOT)}";
const model = await loadModel(${JSON.stringify(STORY_DIR)});
console.log("loaded", model.config.vocabSize);
await model.dispose();
try {
  await resolveModelSource("nobody/nothing", { cacheDir: ${JSON.stringify(tmp)}, hubUrl: "http://127.0.0.1:9" });
} catch (e) { console.log(e.name + ": " + e.message); }`,
      ["--allow-read", "--allow-env", "--allow-write", "--no-lock"],
      `${tmp}/deno.json`,
    );
    assert.equal(r.code, 0, r.stderr);
    const [loaded, download] = r.stdout.trim().split("\n");
    assert.equal(loaded, "loaded 2048");
    assert.match(download, /^ModelDownloadError: Cannot find model "nobody\/nothing".*the Hub library was evaluated/);
  } finally {
    await Deno.remove(tmp, { recursive: true });
  }
});

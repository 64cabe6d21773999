/**
 * Resolving a model source to a local folder. {@link resolveModelSource} tries, in order:
 *
 * 1. an existing folder path;
 * 2. the `LLM_MODELS_DIR` mirror (a folder of model folders): `$LLM_MODELS_DIR/<source>`, then for a
 *    Hugging Face id `owner/name` also `$LLM_MODELS_DIR/owner--name` and `$LLM_MODELS_DIR/name`;
 * 3. for a Hugging Face id, a complete snapshot in the standard Hugging Face cache (`HF_HUB_CACHE`,
 *    else `HF_HOME/hub`, else `XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`), in
 *    its usual layout `models--owner--name/{refs,blobs,snapshots/<commit>}`;
 * 4. the caller's fallback folders ({@link ResolveOptions.fallbacks}), for a bundled copy;
 * 5. a download of the files the engine needs into that cache with `@huggingface/hub`, from
 *    `HF_ENDPOINT` (default `https://huggingface.co`), reporting byte progress. That library (and its
 *    dependencies) is imported only then: loading a local folder never evaluates it.
 *
 * Environment variables are read only where `--allow-env` grants them: without the permission they
 * count as unset, and nothing prompts. A path that cannot be read for want of `--allow-read` is an
 * error that says so, not a missing folder.
 *
 * @module
 */

import type { LoadProgress } from "./weights.ts";
import { readAccessError } from "./read_access.ts";
import { writeFileAtomic } from "./atomic_write.ts";

/** The model a bare `loadModel()` or `deno task story` uses: TinyStories-656K. */
export const DEFAULT_MODEL_ID = "raincandy-u/TinyStories-656K";

/** The Hugging Face Hub, when neither an option nor `HF_ENDPOINT` says otherwise. */
export const DEFAULT_HUB_URL = "https://huggingface.co";

/** Options of {@link resolveModelSource}. */
export interface ResolveOptions {
  /** Reports download progress: one event per received chunk, bytes counted per file. */
  onProgress?: (p: LoadProgress) => void;
  /** Folders to use, in order, when the mirror and the cache do not hold the model (before any download). */
  fallbacks?: readonly string[];
  /** The Hub's base URL. Default: `HF_ENDPOINT`, else {@link DEFAULT_HUB_URL}. */
  hubUrl?: string;
  /** The Hugging Face cache folder. Default: from the environment, as the Hugging Face tools find it. */
  cacheDir?: string;
  /** The mirror of model folders. Default: `LLM_MODELS_DIR`. */
  modelsDir?: string;
  /** Branch, tag or commit to download. Default `"main"`. */
  revision?: string;
  /** Never use the network (also when `HF_HUB_OFFLINE=1`). */
  offline?: boolean;
  /** The fetch used for the Hub (tests, proxies). Default: the global `fetch`. */
  fetch?: typeof fetch;
}

/** No folder, mirror entry, cached snapshot or download gives the model. `source` is what was asked for. */
export class ModelNotFoundError extends Error {
  /** The model source that was asked for. */
  readonly source: string;
  /**
   * An error for `source` whose message says what was tried.
   *
   * @param source the model source
   * @param message what was tried and what failed
   */
  constructor(source: string, message: string) {
    super(message);
    this.name = "ModelNotFoundError";
    this.source = source;
  }
}

/**
 * The model is not available locally and could not be downloaded (no network, Hub unreachable,
 * HTTP error). `offline` is true when the Hub could not be reached at all.
 */
export class ModelDownloadError extends ModelNotFoundError {
  /** True when no connection could be made (or the network is disallowed or disabled). */
  readonly offline: boolean;
  /**
   * An error for model `source` whose message says what failed.
   *
   * @param source the model id
   * @param message what failed
   * @param offline whether the Hub was unreachable
   * @param cause the underlying error
   */
  constructor(source: string, message: string, offline: boolean, cause?: unknown) {
    super(source, message);
    this.name = "ModelDownloadError";
    this.offline = offline;
    this.cause = cause;
  }
}

/** Files of a repository the engine reads; `*.safetensors` and a shard index are added to these. */
const MODEL_FILES = [
  "config.json",
  "tokenizer.json",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "generation_config.json",
];

const HF_ID = /^[A-Za-z0-9][\w.-]*\/[\w.-]+$/;

/** True for a Hugging Face model id of the form `owner/name`. */
export function isHubId(source: string): boolean {
  return HF_ID.test(source) && !source.includes("..");
}

/** An environment variable, or undefined when unset or not granted (never prompts). */
export function readEnv(name: string): string | undefined {
  try {
    if (Deno.permissions.querySync({ name: "env", variable: name }).state !== "granted") return undefined;
    const v = Deno.env.get(name);
    return v === "" ? undefined : v;
  } catch {
    return undefined;
  }
}

/** The Hugging Face cache folder as the Hugging Face tools find it, or undefined without `HOME`. */
export function hfCacheDir(): string | undefined {
  const hub = readEnv("HF_HUB_CACHE") ?? readEnv("HUGGINGFACE_HUB_CACHE");
  if (hub) return hub;
  const hfHome = readEnv("HF_HOME");
  if (hfHome) return `${hfHome}/hub`;
  const xdg = readEnv("XDG_CACHE_HOME");
  if (xdg) return `${xdg}/huggingface/hub`;
  const home = readEnv("HOME") ?? readEnv("USERPROFILE");
  return home ? `${home}/.cache/huggingface/hub` : undefined;
}

/** The folder of `id` in a Hugging Face cache: `models--owner--name`. */
export function cacheRepoFolder(cacheDir: string, id: string): string {
  return `${cacheDir}/models--${id.split("/").join("--")}`;
}

/**
 * What is at `path`: a folder, a file, or nothing usable (missing, unreadable, a dangling link). Only
 * a missing read permission is thrown, naming the path and the flag.
 */
async function pathKind(path: string): Promise<"folder" | "file" | "none"> {
  try {
    const info = await Deno.stat(path); // follows symlinks
    return info.isDirectory ? "folder" : info.isFile ? "file" : "none";
  } catch (e) {
    const denied = readAccessError(path, e);
    if (denied) throw denied;
    return "none";
  }
}

async function isDir(path: string): Promise<boolean> {
  return await pathKind(path) === "folder";
}

async function isFile(path: string): Promise<boolean> {
  return await pathKind(path) === "file";
}

function trimSlash(path: string): string {
  return path.length > 1 ? path.replace(/\/+$/, "") : path;
}

/**
 * True when `dir` holds a loadable model: `config.json`, `tokenizer.json` and its weights (every shard
 * its `model.safetensors.index.json` names, or else at least one `*.safetensors`).
 */
export async function isCompleteModelDir(dir: string): Promise<boolean> {
  if (!(await isFile(`${dir}/config.json`)) || !(await isFile(`${dir}/tokenizer.json`))) return false;
  const index = `${dir}/model.safetensors.index.json`;
  if (await isFile(index)) {
    try {
      const map = JSON.parse(await Deno.readTextFile(index)).weight_map as Record<string, string>;
      const shards = new Set(Object.values(map));
      if (shards.size === 0) return false;
      for (const s of shards) if (!(await isFile(`${dir}/${s}`))) return false;
      return true;
    } catch {
      return false;
    }
  }
  try {
    for await (const e of Deno.readDir(dir)) {
      if (e.name.endsWith(".safetensors") && (await isFile(`${dir}/${e.name}`))) return true;
    }
  } catch {
    return false;
  }
  return false;
}

/**
 * The snapshot folder of `id` at `revision` in the cache when it is complete: the commit that
 * `refs/<revision>` names (or `revision` itself when it is a commit hash); without the ref, the most
 * recently modified complete snapshot.
 */
export async function findCachedSnapshot(cacheDir: string, id: string, revision = "main"): Promise<string | undefined> {
  const repo = cacheRepoFolder(cacheDir, id);
  let commit: string | undefined = /^[0-9a-f]{40}$/.test(revision) ? revision : undefined;
  if (!commit) {
    try {
      commit = (await Deno.readTextFile(`${repo}/refs/${revision}`)).trim();
    } catch {
      commit = undefined;
    }
  }
  if (commit) {
    const dir = `${repo}/snapshots/${commit}`;
    return (await isCompleteModelDir(dir)) ? dir : undefined;
  }
  const candidates: { dir: string; mtime: number }[] = [];
  try {
    for await (const e of Deno.readDir(`${repo}/snapshots`)) {
      const dir = `${repo}/snapshots/${e.name}`;
      if (e.isDirectory && (await isCompleteModelDir(dir))) {
        candidates.push({ dir, mtime: (await Deno.stat(dir)).mtime?.getTime() ?? 0 });
      }
    }
  } catch {
    return undefined;
  }
  candidates.sort((a, b) => b.mtime - a.mtime);
  return candidates[0]?.dir;
}

/** The mirror entries tried for `source` under `modelsDir`, in order. */
export function mirrorCandidates(modelsDir: string, source: string): string[] {
  const root = trimSlash(modelsDir);
  const out = [`${root}/${source}`];
  if (isHubId(source)) {
    out.push(`${root}/${source.replace("/", "--")}`, `${root}/${source.slice(source.indexOf("/") + 1)}`);
  }
  return out;
}

/** What every "cannot find" message ends with: where a model can come from without the network. */
const OFFLINE_HINT = "pass a local model folder, or set LLM_MODELS_DIR to a folder of model folders";

/** What a loadable model is, for a source that is a file. */
const MODEL_LAYOUT = "a model is a Hugging Face folder with config.json, tokenizer.json and *.safetensors";

/**
 * The local folder holding the model named by `source`: a folder path, a name in the `LLM_MODELS_DIR`
 * mirror, or a Hugging Face id (`owner/name`), cached or downloaded. See the module documentation for
 * the order. Throws a {@link ModelNotFoundError} (a {@link ModelDownloadError} when a download failed)
 * whose message says what was tried and names `LLM_MODELS_DIR`; a file (a GGUF file, say) is refused
 * with what a model folder holds; a path that may not be read throws `Deno.errors.NotCapable` naming
 * it and `--allow-read`.
 */
export async function resolveModelSource(source: string, options: ResolveOptions = {}): Promise<string> {
  if (source === "") throw new ModelNotFoundError(source, `Cannot find model "": ${OFFLINE_HINT}`);
  const kind = await pathKind(source);
  if (kind === "folder") return trimSlash(source);
  if (/\.gguf$/i.test(source)) {
    throw new ModelNotFoundError(
      source,
      `Cannot load model "${source}": GGUF files are not supported yet; ${MODEL_LAYOUT}`,
    );
  }
  if (kind === "file") {
    throw new ModelNotFoundError(source, `Cannot load model "${source}": it is a file, not a folder; ${MODEL_LAYOUT}`);
  }

  const modelsDir = options.modelsDir ?? readEnv("LLM_MODELS_DIR");
  if (modelsDir && !source.startsWith("/") && !source.startsWith(".")) {
    for (const dir of mirrorCandidates(modelsDir, source)) if (await isDir(dir)) return dir;
  }

  const hubId = isHubId(source);
  const cacheDir = options.cacheDir ?? hfCacheDir();
  const revision = options.revision ?? "main";
  if (hubId && cacheDir) {
    const cached = await findCachedSnapshot(cacheDir, source, revision);
    if (cached) return cached;
  }

  for (const dir of options.fallbacks ?? []) if (await isCompleteModelDir(dir)) return trimSlash(dir);

  const tried = [
    "not a folder",
    modelsDir ? `not in LLM_MODELS_DIR "${modelsDir}"` : "LLM_MODELS_DIR is not set",
  ];
  if (!hubId) {
    throw new ModelNotFoundError(
      source,
      `Cannot find model "${source}": ${
        tried.join(", ")
      }, and it is not a Hugging Face id (owner/name); ${OFFLINE_HINT}`,
    );
  }
  if (!cacheDir) {
    throw new ModelNotFoundError(
      source,
      `Cannot find model "${source}": ${tried.join(", ")}, and there is no Hugging Face cache folder ` +
        `(set HF_HOME or HF_HUB_CACHE, or allow reading HOME); ${OFFLINE_HINT}`,
    );
  }
  const hubUrl = trimSlash(options.hubUrl ?? readEnv("HF_ENDPOINT") ?? DEFAULT_HUB_URL);
  if (options.offline || readEnv("HF_HUB_OFFLINE") === "1") {
    throw new ModelDownloadError(
      source,
      `Cannot find model "${source}": ${tried.join(", ")}, not in the Hugging Face cache "${cacheDir}", ` +
        `and downloads are off (HF_HUB_OFFLINE); ${OFFLINE_HINT}`,
      true,
    );
  }
  return await downloadModel(source, { ...options, cacheDir, hubUrl, revision });
}

/**
 * Downloads the files the engine needs of `id` into the Hugging Face cache; returns the snapshot folder.
 * `@huggingface/hub` is imported here, on the first download, so that local loads never evaluate it.
 */
async function downloadModel(
  id: string,
  options: ResolveOptions & { cacheDir: string; hubUrl: string; revision: string },
): Promise<string> {
  const { cacheDir, hubUrl, revision } = options;
  const token = readEnv("HF_TOKEN");
  const credentials = token?.startsWith("hf_") ? { accessToken: token } : {};
  const sizes = new Map<string, number>();
  const progress = countingFetch(options.fetch ?? fetch, sizes, options.onProgress);
  const common = { hubUrl, fetch: progress, ...credentials };
  let hub: typeof import("@huggingface/hub") | undefined;
  try {
    hub = await import("@huggingface/hub");
    const { downloadFileToCacheDir, listFiles, modelInfo } = hub;
    const info = await modelInfo({ name: id, revision, additionalFields: ["sha"], ...common });
    const commit = (info as { sha?: string }).sha;
    if (!commit || !/^[0-9a-f]{40}$/.test(commit)) {
      throw new ModelDownloadError(
        id,
        `Cannot download model "${id}" from ${hubUrl}: no commit id for "${revision}"`,
        false,
      );
    }
    const wanted: string[] = [];
    for await (const entry of listFiles({ repo: { type: "model", name: id }, revision: commit, ...common })) {
      if (entry.type !== "file") continue;
      const p = entry.path;
      if (MODEL_FILES.includes(p) || p.endsWith(".safetensors") || p === "model.safetensors.index.json") {
        wanted.push(p);
        sizes.set(p, entry.lfs?.size ?? entry.size);
      }
    }
    if (!wanted.includes("config.json") || !wanted.some((p) => p.endsWith(".safetensors"))) {
      throw new ModelNotFoundError(
        id,
        `Cannot use model "${id}" from ${hubUrl}: it has no config.json or no *.safetensors weights`,
      );
    }
    // Small files first, so that a bad repository fails before the weights download.
    wanted.sort((a, b) => (sizes.get(a) ?? 0) - (sizes.get(b) ?? 0));
    const quietDebug = console.debug;
    console.debug = () => {}; // the library announces each download on stdout, where the generated text goes
    try {
      for (const path of wanted) {
        await downloadFileToCacheDir({
          repo: { type: "model", name: id },
          path,
          revision: commit,
          cacheDir,
          ...common,
        });
        const size = sizes.get(path) ?? 0;
        options.onProgress?.({ phase: "download", file: path, loadedBytes: size, totalBytes: size });
      }
    } finally {
      console.debug = quietDebug;
    }
    const repo = cacheRepoFolder(cacheDir, id);
    if (revision !== commit) {
      await Deno.mkdir(`${repo}/refs`, { recursive: true });
      // The blobs are written as `.incomplete` and renamed by @huggingface/hub; the ref, all or nothing too.
      await writeFileAtomic(`${repo}/refs/${revision}`, new TextEncoder().encode(commit));
    }
    const dir = `${repo}/snapshots/${commit}`;
    if (!(await isCompleteModelDir(dir))) {
      throw new ModelNotFoundError(id, `Cannot use model "${id}": the download into "${dir}" is incomplete`);
    }
    return dir;
  } catch (e) {
    if (e instanceof ModelNotFoundError) throw e;
    if (hub && e instanceof hub.HubApiError) {
      const what = e.statusCode === 404 || e.statusCode === 401
        ? "no such model on the Hub (or it is private or gated)"
        : `HTTP ${e.statusCode}`;
      throw new ModelDownloadError(
        id,
        `Cannot download model "${id}" from ${hubUrl}: ${what}; ${OFFLINE_HINT}`,
        false,
        e,
      );
    }
    const offline = e instanceof TypeError || e instanceof Deno.errors.NotCapable ||
      e instanceof Deno.errors.PermissionDenied || e instanceof Deno.errors.ConnectionRefused;
    const reason = e instanceof Deno.errors.NotCapable || e instanceof Deno.errors.PermissionDenied
      ? "network access is not allowed (--allow-net)"
      : offline
      ? "the Hub is unreachable (offline?)"
      : (e as Error).message;
    throw new ModelDownloadError(
      id,
      `Cannot find model "${id}" locally or in the Hugging Face cache "${cacheDir}", and cannot download it from ` +
        `${hubUrl}: ${reason}; ${OFFLINE_HINT}`,
      offline,
      e,
    );
  }
}

/**
 * A fetch that reports the bytes of each file body it receives: full-file GETs of
 * `…/resolve/<revision>/<path>` (the size probes, which ask for one byte, are not counted).
 */
function countingFetch(
  inner: typeof fetch,
  sizes: Map<string, number>,
  onProgress: ((p: LoadProgress) => void) | undefined,
): typeof fetch {
  if (!onProgress) return inner;
  return async (input: RequestInfo | URL, init?: RequestInit) => {
    const res = await inner(input, init);
    const url = new URL(input instanceof Request ? input.url : String(input));
    const m = /\/resolve\/[^/]+\/(.+)$/.exec(url.pathname);
    const range = new Headers(init?.headers ?? (input instanceof Request ? input.headers : undefined)).get("range");
    if (!m || range || !res.ok || !res.body) return res;
    const file = decodeURIComponent(m[1]);
    const total = sizes.get(file) ?? Number(res.headers.get("content-length") ?? 0);
    let loaded = 0;
    const counter = new TransformStream<Uint8Array, Uint8Array>({
      transform(chunk, controller) {
        loaded += chunk.byteLength;
        onProgress({ phase: "download", file, loadedBytes: loaded, totalBytes: Math.max(total, loaded) });
        controller.enqueue(chunk);
      },
    });
    return new Response(res.body.pipeThrough(counter), {
      status: res.status,
      statusText: res.statusText,
      headers: res.headers,
    });
  };
}

/**
 * Shared pieces of the command-line tools: finding the model (with the bundled fallback), a
 * progress display on stderr, flag parsing helpers and one-line errors with exit codes.
 *
 * @module
 */

import { DEFAULT_MODEL_ID, ModelNotFoundError, resolveModelSource } from "../models/files/hub.ts";
import { KV_DTYPES, loadModel, type LoadOptions, type Model } from "../models/model.ts";
import { backendNames } from "../backends/registry.ts";
import { type LoadProgress, WeightsError } from "../models/files/weights.ts";
import { ConfigError } from "../models/arch/config.ts";
import { SafetensorsError } from "../models/files/safetensors.ts";
import { SamplingOptionError, type SamplingOptions } from "../models/generate/sampler.ts";

/** The default model of the chat tools (`chat`, `serve`). */
export const DEFAULT_CHAT_MODEL_ID = "Felladrin/Minueza-32M-UltraChat";

/** The weight dtypes `--dtype` takes. */
export const WEIGHT_DTYPES = ["f32", "f16", "bf16", "q8_0", "q4_0"] as const;

/** A user error: printed as one line, exits with `code` (2 for bad flags, 1 otherwise). */
export class CliError extends Error {
  /** The process exit code. */
  readonly code: number;
  /**
   * @param message one line, sentence case
   * @param code exit code
   */
  constructor(message: string, code = 2) {
    super(message);
    this.name = "CliError";
    this.code = code;
  }
}

/**
 * The shared folder beside the repository (`../shared`), or undefined when this file is not local.
 * It holds the story model (`models/story`) and the minueza tokenizer (`models/minueza-32m-shape`).
 */
export function sharedDir(): string | undefined {
  const url = new URL("../../shared", import.meta.url);
  return url.protocol === "file:" ? decodeURIComponent(url.pathname) : undefined;
}

/** The repository root (for the `.cache` folder), or undefined when this file is not local. */
export function repoDir(): string | undefined {
  const url = new URL("..", import.meta.url);
  return url.protocol === "file:" ? decodeURIComponent(url.pathname).replace(/\/$/, "") : undefined;
}

/** True when the permission for `variable` is granted and it is set. */
function env(variable: string): string | undefined {
  try {
    if (Deno.permissions.querySync({ name: "env", variable }).state !== "granted") return undefined;
    return Deno.env.get(variable) || undefined;
  } catch {
    return undefined;
  }
}

/**
 * Resolves `--model` for the tools: a folder, a name in `LLM_MODELS_DIR`, a Hugging Face id in the
 * cache, then, for the default id only, the bundled `../shared/models/story`, and only then a download.
 */
export async function resolveCliModel(source: string, onProgress?: (p: LoadProgress) => void): Promise<string> {
  const shared = sharedDir();
  const fallbacks = source === DEFAULT_MODEL_ID && shared ? [`${shared}/models/story`] : [];
  return await resolveModelSource(source, { fallbacks, onProgress });
}

/**
 * A one-line {@link CliError} (exit 1) for a model that cannot be resolved or loaded, pointing at
 * `--model DIR` when the message does not already.
 */
export function loadError(source: string, e: unknown): CliError {
  const reason = e instanceof Error ? e.message : String(e);
  if (e instanceof ModelNotFoundError) return new CliError(reason, 1);
  // A folder that is not a usable model (missing or bad files) gets the hint; a backend failure does not.
  const fileError = e instanceof Deno.errors.NotFound || e instanceof ConfigError || e instanceof WeightsError ||
    e instanceof SafetensorsError || e instanceof SyntaxError;
  const hint = !fileError || reason.includes("--model") ? "" : " (pass a model folder with --model DIR)";
  return new CliError(`Cannot load model "${source}": ${reason}${hint}`, 1);
}

/**
 * Finds `--model` with {@link resolveCliModel} and loads it, showing progress on `progress`; a
 * failure clears the progress and becomes a {@link loadError} (exit 1).
 */
export async function loadCliModel(
  source: string,
  options: Omit<LoadOptions, "onProgress"> = {},
  progress?: ProgressDisplay,
): Promise<Model> {
  const onProgress = progress?.onProgress;
  try {
    return await loadModel(await resolveCliModel(source, onProgress), { ...options, onProgress });
  } catch (e) {
    progress?.clear();
    throw loadError(source, e);
  }
}

/** Bytes in B, KiB, MiB or GiB. */
export function formatBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KiB`;
  if (n < 1024 ** 3) return `${(n / 1024 ** 2).toFixed(1)} MiB`;
  return `${(n / 1024 ** 3).toFixed(2)} GiB`;
}

/**
 * Shows download and load progress on stderr: a redrawn bar when stderr is a terminal, otherwise one
 * terse line per downloaded file and one when the tensors are loaded.
 */
export class ProgressDisplay {
  readonly #tty: boolean;
  readonly #enc = new TextEncoder();
  readonly #started = performance.now();
  #lastDraw = 0;
  #drawn = false;
  readonly #doneFiles = new Set<string>();

  /** @param tty draw a bar (default: whether stderr is a terminal) */
  constructor(tty = Deno.stderr.isTerminal()) {
    this.#tty = tty;
  }

  /** The callback for `loadModel` and `resolveModelSource`. */
  readonly onProgress = (p: LoadProgress): void => {
    if (p.phase === "download") {
      const done = p.loadedBytes >= p.totalBytes;
      if (this.#tty) {
        this.#bar(`downloading ${p.file}`, p.loadedBytes, p.totalBytes, done, formatBytes);
      } else if (done && !this.#doneFiles.has(p.file)) {
        this.#doneFiles.add(p.file);
        this.#line(`downloaded ${p.file} (${formatBytes(p.totalBytes)})`);
      }
    } else {
      const done = p.loaded >= p.total;
      if (this.#tty) this.#bar("loading tensors", p.loaded, p.total, done, String);
      else if (done) this.#line(`loaded ${p.total} tensors in ${(performance.now() - this.#started).toFixed(0)} ms`);
    }
  };

  /** Clears a partly drawn bar (before an error message). */
  clear(): void {
    if (this.#tty && this.#drawn) Deno.stderr.writeSync(this.#enc.encode("\r\x1b[2K"));
    this.#drawn = false;
  }

  #bar(label: string, n: number, total: number, done: boolean, fmt: (n: number) => string): void {
    const now = performance.now();
    if (!done && now - this.#lastDraw < 50) return;
    this.#lastDraw = now;
    const width = 30;
    const frac = total > 0 ? Math.min(1, n / total) : 1;
    const fill = Math.round(frac * width);
    const text = `\r\x1b[2K${label} [${"#".repeat(fill)}${"-".repeat(width - fill)}] ${
      (frac * 100).toFixed(0).padStart(3)
    }% ${fmt(n)}/${fmt(total)}`;
    Deno.stderr.writeSync(this.#enc.encode(text));
    this.#drawn = true;
    if (done) this.clear();
  }

  #line(text: string): void {
    Deno.stderr.writeSync(this.#enc.encode(`${text}\n`));
  }
}

/** Parses a number flag; `integer` and `min`/`max` bound it. Throws a {@link CliError} naming the flag. */
export function numberFlag(
  name: string,
  value: string | undefined,
  { integer = false, min = -Infinity, max = Infinity }: { integer?: boolean; min?: number; max?: number } = {},
): number | undefined {
  if (value === undefined) return undefined;
  const n = Number(value);
  if (value.trim() === "" || !Number.isFinite(n) || (integer && !Number.isInteger(n)) || n < min || n > max) {
    const kind = integer ? "an integer" : "a number";
    const range = min > -Infinity && max < Infinity
      ? ` from ${min} to ${max}`
      : min > -Infinity
      ? ` ≥ ${min}`
      : max < Infinity
      ? ` ≤ ${max}`
      : "";
    throw new CliError(`Invalid --${name} "${value}": expected ${kind}${range}`);
  }
  return n;
}

/** Parses a choice flag. Throws a {@link CliError} naming the flag and the choices. */
export function choiceFlag<T extends string>(
  name: string,
  value: string | undefined,
  choices: readonly T[],
): T | undefined {
  if (value === undefined) return undefined;
  if (!(choices as readonly string[]).includes(value)) {
    throw new CliError(`Invalid --${name} "${value}": expected one of ${choices.join(", ")}`);
  }
  return value as T;
}

/** The parseArgs declarations of the model-loading flags shared by the tools, to spread into `options`. */
export const LOAD_OPTIONS = {
  backend: { type: "string" },
  threads: { type: "string" },
  "context-length": { type: "string" },
  dtype: { type: "string" },
  "kv-dtype": { type: "string" },
} as const;

/** The values of {@link LOAD_OPTIONS} as parsed by `parseArgs`. */
export type LoadFlagValues = Partial<Record<keyof typeof LOAD_OPTIONS, string>>;

/** Parses the model-loading flags into {@link LoadOptions}; throws a {@link CliError} naming a bad flag. */
export function loadFlags(values: LoadFlagValues): Omit<LoadOptions, "onProgress"> {
  return {
    backend: choiceFlag("backend", values.backend, backendNames()) ?? "ts",
    threads: numberFlag("threads", values.threads, { integer: true, min: 1, max: 1024 }),
    contextLength: numberFlag("context-length", values["context-length"], { integer: true, min: 2 }),
    dtype: choiceFlag("dtype", values.dtype, WEIGHT_DTYPES),
    kvDtype: choiceFlag("kv-dtype", values["kv-dtype"], KV_DTYPES),
  };
}

/** The sampling flags of the generating tools: the flag, its option in `SamplingOptions`, its bounds. */
const SAMPLING_FLAGS = [
  ["temperature", "temperature", { min: 0 }],
  ["top-k", "topK", { integer: true, min: 0 }],
  ["top-p", "topP", { min: 0, max: 1 }],
  ["min-p", "minP", { min: 0, max: 1 }],
  ["repeat-penalty", "repetitionPenalty", { min: 0 }],
  ["seed", "seed", { integer: true, min: 0, max: 2 ** 32 - 1 }],
] as const;

/** A sampling flag's name, without the dashes. */
export type SamplingFlag = typeof SAMPLING_FLAGS[number][0];

/** The parseArgs declarations of the sampling flags (`--temperature`, `--top-k`, …), to spread into `options`. */
export const SAMPLING_OPTIONS = Object.fromEntries(
  SAMPLING_FLAGS.map(([flag]) => [flag, { type: "string" }]),
) as Record<
  SamplingFlag,
  { type: "string" }
>;

/**
 * Parses the sampling flags that are given (see {@link SAMPLING_OPTIONS}) into sampling options; the
 * others are left out, so the library's defaults apply. Throws a {@link CliError} naming a bad flag.
 */
export function samplingFlags(
  values: Partial<Record<SamplingFlag, string>>,
): Pick<SamplingOptions, typeof SAMPLING_FLAGS[number][1]> {
  const options: Partial<Record<typeof SAMPLING_FLAGS[number][1], number>> = {};
  for (const [flag, option, bounds] of SAMPLING_FLAGS) {
    const n = numberFlag(flag, values[flag], bounds);
    if (n !== undefined) options[option] = n;
  }
  return options;
}

/** Turns a {@link SamplingOptionError} into a {@link CliError} that names the flag; other errors give undefined. */
export function samplingError(e: unknown): CliError | undefined {
  if (!(e instanceof SamplingOptionError)) return undefined;
  const flag = SAMPLING_FLAGS.find(([, option]) => option === e.option)?.[0];
  return new CliError(`Invalid ${flag ? `--${flag}` : e.option}: ${e.message}`);
}

/** Turns `node:util` parseArgs errors into a one-line {@link CliError}. */
export function parseArgsError(e: unknown): CliError | undefined {
  const code = (e as { code?: string }).code;
  if (typeof code !== "string" || !code.startsWith("ERR_PARSE_ARGS")) return undefined;
  const msg = (e as Error).message;
  const flag = /'(-{1,2}[^' ]+)/.exec(msg)?.[1];
  if (code === "ERR_PARSE_ARGS_UNKNOWN_OPTION" && flag) return new CliError(`Unknown option "${flag}" (see --help)`);
  if (code === "ERR_PARSE_ARGS_INVALID_OPTION_VALUE" && flag) {
    return new CliError(`Invalid option "${flag}": ${msg.split(/\.\s|\n/)[0].replace(/^Option '[^']*' /, "")}`);
  }
  return new CliError(msg.split("\n")[0]);
}

/**
 * Runs a tool's `main`: a {@link CliError} or a model-loading error prints one line (no stack) on
 * stderr and exits 2 or 1; other errors also print one line and exit 1 (with the stack when
 * `LLM_DEBUG` is set).
 */
export async function runCli(tool: string, main: () => Promise<void>, clear?: () => void): Promise<void> {
  try {
    await main();
  } catch (e) {
    clear?.();
    const err = parseArgsError(e) ?? e;
    const code = err instanceof CliError ? err.code : 1;
    const message = err instanceof Error ? err.message : String(err);
    console.error(`${tool}: ${message}`);
    if (!(err instanceof CliError) && !(err instanceof ModelNotFoundError) && env("LLM_DEBUG")) {
      console.error((err as Error).stack);
    }
    Deno.exit(code);
  }
}

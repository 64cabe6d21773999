/**
 * Shared pieces of the command-line tools: flag parsing (with `--help` and `--version`), finding
 * and loading the model (with the bundled fallback), a progress display on stderr, the statistics
 * line, and one-line errors with exit codes.
 *
 * @module
 */

import { parseArgs, type ParseArgsConfig } from "node:util";
import denoConfig from "../deno.json" with { type: "json" };
import {
  backendNames,
  ConfigError,
  DEFAULT_MODEL_ID,
  type GenerateOptions,
  type GenerationStats,
  KV_DTYPES,
  loadModel,
  type LoadOptions,
  type LoadProgress,
  type Model,
  ModelNotFoundError,
  resolveModelSource,
  SafetensorsError,
  SamplingOptionError,
  type SamplingOptions,
  WEIGHT_DTYPES,
  WeightsError,
} from "../mod.ts";
import { OutputClosedError, stdout } from "./_stdout.ts";

/** The default model of the chat tools (`chat`, `serve`). */
export const DEFAULT_CHAT_MODEL_ID = "Felladrin/Minueza-32M-UltraChat";

/** A user error: printed as one line, exits with `code` (2 for bad flags, 1 otherwise). */
export class CliError extends Error {
  /** The process exit code. */
  readonly code: number;
  /**
   * An error the tool prints as `tool: message` before exiting with `code`.
   *
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

/** The value of environment variable `variable`, or undefined when it is unset or `--allow-env` does not grant it. */
export function readEnvVar(variable: string): string | undefined {
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

/** The library's advice for a model it cannot find, and the tools' version of it, which names the flag. */
const LIBRARY_HINT = "pass a local model folder";
const CLI_HINT = "pass a local model folder with --model DIR";

/**
 * A one-line {@link CliError} (exit 1) for a model that cannot be resolved or loaded, pointing at
 * `--model DIR` when the message does not already.
 */
export function loadError(source: string, e: unknown): CliError {
  const reason = e instanceof Error ? e.message : String(e);
  if (e instanceof ModelNotFoundError) return new CliError(reason.replace(LIBRARY_HINT, CLI_HINT), 1);
  if (e instanceof Deno.errors.NotCapable) return new CliError(reason, 1); // names the path and the flag to grant
  // A folder that is not a usable model (missing or bad files) gets the hint; a backend failure does not.
  const fileError = e instanceof Deno.errors.NotFound || e instanceof ConfigError || e instanceof WeightsError ||
    e instanceof SafetensorsError || e instanceof SyntaxError;
  const hint = !fileError || reason.includes("--model") ? "" : " (pass a model folder with --model DIR)";
  return new CliError(`Cannot load model "${source}": ${reason}${hint}`, 1);
}

/** The permission a backend needs beyond reading the model, with the flag that grants it. */
const BACKEND_PERMISSIONS: Readonly<Record<string, { descriptor: Deno.PermissionDescriptor; grant: string }>> = {
  native: { descriptor: { name: "ffi" }, grant: "FFI access is not granted (run with --allow-ffi)" },
};

/** Refuses, in one line, a backend whose permission is not granted, before anything loads. */
function checkBackendPermission(backend: string | undefined): void {
  const need = backend === undefined ? undefined : BACKEND_PERMISSIONS[backend];
  if (need && Deno.permissions.querySync(need.descriptor).state !== "granted") {
    throw new CliError(`Cannot use --backend ${backend}: ${need.grant}`, 1);
  }
}

/**
 * Finds `--model` with {@link resolveCliModel} and loads it, showing progress on `progress`; a
 * failure clears the progress and becomes a {@link loadError} (exit 1). A backend whose permission is
 * not granted (`--backend native` without `--allow-ffi`) is refused first.
 */
export async function loadCliModel(
  source: string,
  options: Omit<LoadOptions, "onProgress"> = {},
  progress?: ProgressDisplay,
): Promise<Model> {
  checkBackendPermission(options.backend);
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
 * Shows download, load and conversion progress on stderr: a redrawn bar when stderr is a terminal,
 * otherwise one terse line per downloaded file, one when the tensors are loaded and one when they are
 * converted to the asked-for dtype.
 */
export class ProgressDisplay {
  readonly #tty: boolean;
  readonly #enc = new TextEncoder();
  /** When the current phase began: when the display was made, then when the previous phase ended. */
  #phaseStarted = performance.now();
  #lastDraw = 0;
  #drawn = false;
  readonly #doneFiles = new Set<string>();

  /** A display that draws a bar when `tty` (default: whether stderr is a terminal). */
  constructor(tty = Deno.stderr.isTerminal()) {
    this.#tty = tty;
  }

  /** The callback for `loadModel` and `resolveModelSource`. */
  readonly onProgress = (p: LoadProgress): void => {
    switch (p.phase) {
      case "download": {
        const done = p.loadedBytes >= p.totalBytes;
        if (this.#tty) {
          this.#bar(`downloading ${p.file}`, p.loadedBytes, p.totalBytes, done, formatBytes);
        } else if (done && !this.#doneFiles.has(p.file)) {
          this.#doneFiles.add(p.file);
          this.#line(`downloaded ${p.file} (${formatBytes(p.totalBytes)})`);
        }
        return;
      }
      case "tensors":
        this.#step("loading tensors", p.loaded, p.total, `loaded ${p.total} tensors`);
        return;
      case "convert":
        this.#step(`converting to ${p.dtype}`, p.converted, p.total, `converted ${p.total} tensors to ${p.dtype}`);
        return;
    }
  };

  /** Clears a partly drawn bar (before an error message). */
  clear(): void {
    if (this.#tty && this.#drawn) Deno.stderr.writeSync(this.#enc.encode("\r\x1b[2K"));
    this.#drawn = false;
  }

  /**
   * One counted step of a phase: the bar, or once the phase is done the `summary` line with the time
   * since the previous phase ended (since the display was made, for the first).
   */
  #step(label: string, n: number, total: number, summary: string): void {
    const done = n >= total;
    if (this.#tty) this.#bar(label, n, total, done, String);
    else if (done) this.#line(`${summary} in ${(performance.now() - this.#phaseStarted).toFixed(0)} ms`);
    if (done) this.#phaseStarted = performance.now();
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
export const SAMPLING_FLAGS = [
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

/** The parseArgs declarations of the generating tools' flags: `--max-tokens` and the sampling flags. */
export const GENERATION_OPTIONS = { "max-tokens": { type: "string" }, ...SAMPLING_OPTIONS } as const;

/** Parses {@link GENERATION_OPTIONS} into generation options (`--max-tokens` defaults to 256). */
export function generationFlags(
  values: Partial<Record<keyof typeof GENERATION_OPTIONS, string>>,
): GenerateOptions & { maxTokens: number } {
  const maxTokens = numberFlag("max-tokens", values["max-tokens"], { integer: true, min: 0 }) ?? 256;
  return { maxTokens, ...samplingFlags(values) };
}

/** Turns a {@link SamplingOptionError} into a {@link CliError} that names the flag; other errors give undefined. */
export function samplingError(e: unknown): CliError | undefined {
  if (!(e instanceof SamplingOptionError)) return undefined;
  const flag = SAMPLING_FLAGS.find(([, option]) => option === e.option)?.[0];
  return new CliError(`Invalid ${flag ? `--${flag}` : e.option}: ${e.message}`);
}

/** Prompts shorter than this get their prefill rate with their token count: the rate of a few tokens says little. */
const SHORT_PROMPT_TOKENS = 8;

/**
 * The speeds of a generation for a statistics line: time to first token, prefill rate (with the
 * prompt's token count when it is short, none for an empty prompt) and decode rate.
 */
export function speedText(s: GenerationStats): string {
  const count = s.promptTokens < SHORT_PROMPT_TOKENS ? `${s.promptTokens}-token ` : "";
  const prefill = s.promptTokens > 0 ? `${count}prefill ${s.prefillTokensPerSecond.toFixed(1)} tok/s, ` : "";
  return `first token ${s.timeToFirstTokenMs.toFixed(0)} ms, ${prefill}decode ${
    s.decodeTokensPerSecond.toFixed(1)
  } tok/s`;
}

/** The `--version` line: `story 0.1.0 (@llm/engine, Deno 2.9.6)`. */
export function versionLine(tool: string): string {
  return `${tool} ${denoConfig.version} (${denoConfig.name}, Deno ${Deno.version.deno})`;
}

/** The flags every tool takes. */
export const TOOL_OPTIONS = {
  help: { type: "boolean", short: "h" },
  version: { type: "boolean" },
} as const;

/** What {@link parseToolArgs} gives for the flag declarations `O`: their values and the positionals. */
export type ToolArgs<O extends NonNullable<ParseArgsConfig["options"]>> = ReturnType<
  typeof parseArgs<{ args: string[]; strict: true; allowPositionals: boolean; options: O & typeof TOOL_OPTIONS }>
>;

/**
 * Parses `Deno.args` (strictly) with `options` plus `--help` and `--version`. For those two it
 * prints `help` or the {@link versionLine} and gives undefined: the tool has nothing more to do.
 */
export function parseToolArgs<O extends NonNullable<ParseArgsConfig["options"]>>(
  tool: string,
  help: string,
  options: O,
  allowPositionals = false,
): ToolArgs<O> | undefined {
  const parsed = parseArgs({
    args: Deno.args,
    strict: true,
    allowPositionals,
    options: { ...options, ...TOOL_OPTIONS },
  });
  const flags = parsed.values as { help?: boolean; version?: boolean };
  if (flags.help) stdout.line(help);
  else if (flags.version) stdout.line(versionLine(tool));
  else return parsed;
  return undefined;
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
 * Runs a tool's `main` with a {@link ProgressDisplay} for loading. A stdout that is closed or whose
 * reader has gone ({@link OutputClosedError}) ends the tool quietly with exit 0. A {@link CliError}
 * or a model-loading error prints one line (no stack) on stderr and exits 2 or 1; other errors also
 * print one line and exit 1 (with the stack when `LLM_DEBUG` is set).
 */
export async function runCli(tool: string, main: (progress: ProgressDisplay) => Promise<void>): Promise<void> {
  const progress = new ProgressDisplay();
  try {
    await main(progress);
  } catch (e) {
    progress.clear();
    if (e instanceof OutputClosedError) Deno.exit(0); // `| head` has all it wanted
    const err = parseArgsError(e) ?? e;
    const code = err instanceof CliError ? err.code : 1;
    const message = err instanceof Error ? err.message : String(err);
    console.error(`${tool}: ${message}`);
    if (!(err instanceof CliError) && !(err instanceof ModelNotFoundError) && readEnvVar("LLM_DEBUG")) {
      console.error((err as Error).stack);
    }
    Deno.exit(code);
  }
}

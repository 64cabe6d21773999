/**
 * Deno subprocesses for the tests of the tools and of what a fresh process sees (permissions, import
 * maps): run in the repository root, with `NO_COLOR`, stdin fed from a string.
 *
 * @module
 */

/** The repository root. */
export const ROOT: string = new URL("..", import.meta.url).pathname;

/** How a subprocess ended, with its output as text. */
export interface Run {
  /** The exit code. */
  code: number;
  /** Everything it wrote to stdout. */
  stdout: string;
  /** Everything it wrote to stderr. */
  stderr: string;
}

/** Starts `deno` with `args` in the repository root, its stdin fed with `stdin` and closed. */
export function spawnDeno(
  args: readonly string[],
  options: { stdin?: string; env?: Record<string, string> } = {},
): Deno.ChildProcess {
  const child = new Deno.Command(Deno.execPath(), {
    args: [...args],
    cwd: ROOT,
    stdin: options.stdin === undefined ? "null" : "piped",
    stdout: "piped",
    stderr: "piped",
    env: { NO_COLOR: "1", ...options.env },
  }).spawn();
  if (options.stdin !== undefined) {
    const writer = child.stdin.getWriter();
    // A child that exits without reading all of it closes the pipe: that is its business.
    writer.write(new TextEncoder().encode(options.stdin)).then(() => writer.close()).catch(() => {});
  }
  return child;
}

/** Runs `deno` with `args` (see {@link spawnDeno}) to the end. */
export async function runDeno(
  args: readonly string[],
  options: { stdin?: string; env?: Record<string, string> } = {},
): Promise<Run> {
  const out = await spawnDeno(args, options).output();
  const dec = new TextDecoder();
  return { code: out.code, stdout: dec.decode(out.stdout), stderr: dec.decode(out.stderr) };
}

/**
 * A real terminal for the tools' tests: a tmux session on a private socket, to type into
 * (`send-keys`, Ctrl-C included) and read back (`capture-pane`). The tests that need one are skipped
 * only when tmux is missing and `CI` is not set.
 *
 * @module
 */

import assert from "node:assert/strict";

async function hasTmux(): Promise<boolean> {
  try {
    return (await new Deno.Command("tmux", { args: ["-V"], stdout: "null", stderr: "null" }).output()).success;
  } catch {
    return false;
  }
}

/** Whether tmux can be run here. */
export const tmuxAvailable: boolean = await hasTmux();

/** Whether this is CI, where a missing tmux is an error rather than a skipped test. */
export const inCi: boolean = Deno.env.get("CI") !== undefined && Deno.env.get("CI") !== "false";

/** Quotes `args` for the shell of a tmux session. */
export function shellCommand(args: readonly string[]): string {
  return args.map((a) => `'${a.replaceAll("'", `'\\''`)}'`).join(" ");
}

/** One tmux server (its own socket) with one window named `name`. */
export class Terminal {
  readonly #socket: string;
  readonly #name: string;

  /**
   * A terminal that no session uses yet.
   *
   * @param name the session's name, also used in the socket's
   */
  constructor(name: string) {
    assert.ok(tmuxAvailable, "tmux is required in CI (apt-get install tmux)");
    this.#name = name;
    this.#socket = `${name}_${Deno.pid}`;
  }

  /** Runs a tmux command on this terminal's socket; returns its stdout. */
  async tmux(...args: string[]): Promise<string> {
    const out = await new Deno.Command("tmux", {
      args: ["-L", this.#socket, ...args],
      stdout: "piped",
      stderr: "piped",
    })
      .output();
    if (!out.success) throw new Error(`tmux ${args.join(" ")}: ${new TextDecoder().decode(out.stderr)}`);
    return new TextDecoder().decode(out.stdout);
  }

  /** Starts `command` (a shell line) in a 160×50 window in `cwd`; the window stays after it exits. */
  async start(command: string, cwd: string): Promise<void> {
    // The window is kept before the command starts: a command that ends at once would otherwise take the session,
    // and the tmux server, with it ("server exited unexpectedly"), leaving nothing to show why.
    await this.tmux("new-session", "-d", "-s", this.#name, "-x", "160", "-y", "50", "-c", cwd, "sleep 3600");
    await this.tmux("set-option", "-t", this.#name, "remain-on-exit", "on");
    await this.tmux("respawn-pane", "-k", "-t", this.#name, "-c", cwd, command);
  }

  /** Types `keys` (tmux key names, such as "Enter" or "C-c"). */
  async send(...keys: string[]): Promise<void> {
    await this.tmux("send-keys", "-t", this.#name, ...keys);
  }

  /** The window's text, with up to 200 lines of history. */
  pane(): Promise<string> {
    return this.tmux("capture-pane", "-p", "-J", "-t", this.#name, "-S", "-200");
  }

  /** `"0"` while the window's program runs, `"1 <status>"` once it has exited. */
  async state(): Promise<string> {
    return (await this.tmux("display", "-p", "-t", this.#name, "#{pane_dead} #{pane_dead_status}")).trim();
  }

  /** Waits until `ok` holds of the window's text; fails naming `what` and showing the text after `ms`. */
  async waitFor(what: string, ok: (text: string) => boolean, ms = 60_000): Promise<string> {
    const end = Date.now() + ms;
    let text = "";
    while (!ok(text = await this.pane())) {
      if (Date.now() > end) throw new Error(`Timed out waiting for ${what}; the terminal shows:\n${text}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    return text;
  }

  /** Ends the window's session. */
  async kill(): Promise<void> {
    await this.tmux("kill-session", "-t", this.#name);
  }

  /** Stops the tmux server and everything in it. */
  async close(): Promise<void> {
    await this.tmux("kill-server").catch(() => {});
  }
}

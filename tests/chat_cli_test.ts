/**
 * The terminal chat (`examples/chat.ts`) used as a person would: commands fed
 * through piped stdin, and an interactive session in a real terminal under
 * tmux (send-keys / capture-pane) for streaming, Ctrl-C and Ctrl-D.
 *
 * The tmux part is skipped only when tmux is missing and `CI` is not set.
 */

import assert from "node:assert/strict";
import { ChatSession } from "../models/chat/session.ts";
import { loadModel } from "../models/model.ts";
import { SHAPES, writeRandomModel } from "../examples/_random_model.ts";
import { MINUEZA_DIR, STORY_DIR } from "./helpers.ts";
import { ROOT, type Run, runDeno } from "./subprocess.ts";
import { inCi, shellCommand, Terminal, tmuxAvailable } from "./terminal.ts";

const CHAT = new URL("../examples/chat.ts", import.meta.url).pathname;

/** A chat template for the story model (which has none); the same as in chat_test.ts. */
const STORY_TEMPLATE = "{{ bos_token }}{% for m in messages %}" +
  "{% if m.role == 'system' %}{{ m.content }}\n" +
  "{% elif m.role == 'user' %}Question: {{ m.content }}\n" +
  "{% else %}Answer:{{ m.content }}\n{% endif %}" +
  "{% endfor %}{% if add_generation_prompt %}Answer:{% endif %}";

const DENO_ARGS = ["run", "--allow-read", "--allow-write", "--allow-env", "--allow-net", "--allow-ffi"];

function runChat(args: string[], stdin: string): Promise<Run> {
  return runDeno([...DENO_ARGS, CHAT, ...args], { stdin });
}

Deno.test("chat CLI: --help, bad flags, and a model without a template", async () => {
  const help = await runChat(["--help"], "");
  assert.equal(help.code, 0);
  for (const flag of ["--model", "--backend", "--template-file", "--max-tokens", "--temperature", "--seed"]) {
    assert.ok(help.stdout.includes(flag), `--help does not mention ${flag}`);
  }
  const bad = await runChat(["--temperature", "hot"], "");
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /Invalid --temperature "hot"/);
  const unknown = await runChat(["--bogus"], "");
  assert.equal(unknown.code, 2);
  const noTemplate = await runChat(["--model", STORY_DIR], "");
  assert.equal(noTemplate.code, 1);
  assert.match(noTemplate.stderr, /has no chat template/);
});

Deno.test("chat CLI: commands through piped stdin (answers, /save, /undo, /load, /system, /retry, /reset)", async () => {
  const dir = await Deno.makeTempDir({ prefix: "chat_cli_" });
  try {
    const template = `${dir}/story.jinja`;
    await Deno.writeTextFile(template, STORY_TEMPLATE);
    const session = `${dir}/s.chat`;
    const input = [
      "Who was Tom?",
      `/save ${session}`,
      "/undo",
      "/undo",
      `/load ${session}`,
      "What did he like?",
      "/system Be nice.",
      "/retry",
      "/reset",
      "/bogus",
      "/help",
      "",
    ].join("\n");
    const args = ["--model", STORY_DIR, "--template-file", template, "--max-tokens", "12", "--temperature", "0"];
    const r = await runChat([...args, "--stats"], input);
    assert.equal(r.code, 0, r.stderr);
    const out = r.stdout;

    // The first answer is the library's greedy answer.
    const model = await loadModel(STORY_DIR);
    try {
      const chat = new ChatSession(model, { template: STORY_TEMPLATE, maxTokens: 12, temperature: 0 });
      let expected = "";
      for await (const piece of chat.send("Who was Tom?")) expected += piece;
      chat.dispose();
      assert.ok(out.includes(`> ${expected}\n`), `answer ${JSON.stringify(expected)} not in ${out}`);
    } finally {
      await model.dispose();
    }

    assert.match(out, /Saved 2 messages and \d+ cached tokens to /);
    assert.match(out, /Removed the last exchange \(2 messages\)\./);
    assert.match(out, /Nothing to undo\./);
    assert.match(out, /Loaded 2 messages from /);
    const stats = [...out.matchAll(/\[(\d+) prompt tokens \((\d+) cached\), (\d+) generated/g)].map((m) =>
      m.slice(1).map(Number)
    );
    assert.equal(stats.length, 3, out);
    assert.equal(stats[0][1], 0);
    // The turn after /load reused the restored cache.
    assert.ok(stats[1][1] >= stats[0][0] - 1, `second turn: ${stats[1]}`);
    assert.match(out, /System prompt set\./);
    assert.match(out, /Conversation cleared\./);
    assert.match(out, /Unknown command \/bogus/);
    assert.match(out, /\/undo +take back/);
    const saved = await Deno.stat(session);
    assert.ok(saved.size > 1000);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test({
  name:
    "chat CLI: in a terminal (tmux) — streams, Ctrl-C stops the answer not the program, Ctrl-C twice or Ctrl-D exits",
  ignore: !tmuxAvailable && !inCi,
  async fn() {
    const term = new Terminal("chat");
    const dir = await Deno.makeTempDir({ prefix: "chat_tmux_" });
    const waitFor = (what: string, ok: (text: string) => boolean, ms?: number) => term.waitFor(what, ok, ms);
    const paneState = () => term.state();
    // tmux does not always record a pane's exit status, so the shell that runs the chat prints it.
    const waitForExit = async (what: string) => {
      const text = await waitFor(`${what} to exit`, (t) => /\[exited \d+\]/.test(t), 30_000);
      assert.match(text, /\[exited 0\]/, `${what}: the chat did not exit with status 0`);
    };
    const start = async () => {
      const cmd = shellCommand([
        Deno.execPath(),
        ...DENO_ARGS,
        CHAT,
        "--model",
        dir,
        "--max-tokens",
        "400",
        "--temperature",
        "0",
      ]) + '; echo "[exited $?]"';
      await term.start(cmd, ROOT);
      await waitFor("the banner", (t) => t.includes("Type /help"));
    };
    try {
      // A random-weight model of the Minueza chat shape, with its real tokenizer and ChatML template:
      // it rarely ends an answer by itself, so there is time to interrupt it.
      await writeRandomModel(dir, SHAPES["minueza-32m-shape"], { tokenizerFrom: MINUEZA_DIR, seed: 11, dtype: "f16" });
      await start();
      await term.send("Hello there", "Enter");
      // The answer streams: the text after the question grows while the program runs.
      const answerText = (t: string) => t.slice(t.indexOf("> Hello there") + "> Hello there".length).trim();
      const first = answerText(await waitFor("the answer to start", (t) => answerText(t).length >= 5));
      await waitFor("more of the answer", (t) => answerText(t).length > first.length + 5);
      await term.send("C-c");
      let text = await waitFor("the answer to stop", (t) => t.includes("[stopped]"));
      assert.ok(/\[stopped\]\n> $/.test(text.trimEnd() + " "), `no prompt after [stopped]:\n${text}`);
      assert.equal(await paneState(), "0", "the program exited on Ctrl-C during an answer");
      // Still alive and usable: the stopped answer is part of the conversation.
      await term.send("/undo", "Enter");
      await waitFor("/undo", (t) => t.includes("Removed the last exchange (2 messages)."));
      // One Ctrl-C at the prompt warns; a second one exits.
      await term.send("C-c");
      text = await waitFor("the exit hint", (t) => t.includes("(Ctrl-C again or Ctrl-D to exit)"));
      assert.equal(await paneState(), "0");
      await term.send("C-c");
      await waitForExit("Ctrl-C twice");
      await term.kill();

      // Ctrl-D at the prompt exits too.
      await start();
      await term.send("C-d");
      await waitForExit("Ctrl-D");
    } finally {
      await term.close();
      await Deno.remove(dir, { recursive: true });
    }
  },
});

/**
 * `deno task chat`: a terminal chat with a model, keeping its KV cache between
 * turns. Answers stream as they are generated; Ctrl-C stops the answer, a
 * second Ctrl-C at the prompt (or Ctrl-D) exits.
 *
 * ```sh
 * deno task chat --model Felladrin/Minueza-32M-UltraChat --system "You are a helpful assistant."
 * ```
 *
 * @module
 */

import {
  type ChatReply,
  ChatSession,
  type ChatSessionOptions,
  CONTEXT_POLICIES,
  type GenerateOptions,
  KV_DTYPES,
  resolveSampling,
  WEIGHT_DTYPES,
} from "../mod.ts";
import {
  choiceFlag,
  DEFAULT_CHAT_MODEL_ID,
  GENERATION_OPTIONS,
  generationFlags,
  LOAD_OPTIONS,
  loadCliModel,
  loadFlags,
  parseToolArgs,
  type ProgressDisplay,
  runCli,
  samplingError,
  speedText,
} from "./_cli.ts";
import { OutputClosedError, stdout } from "./_stdout.ts";

const HELP = `Usage: deno task chat [options]

Chats with a model in the terminal.

Options:
  --model SOURCE          a model folder, a name in LLM_MODELS_DIR, or a Hugging Face id
                          (default ${DEFAULT_CHAT_MODEL_ID}: LLM_MODELS_DIR, the Hugging Face cache,
                          then a download into the Hugging Face cache)
  --template-file FILE    Jinja chat template (for models without one, or to override theirs)
  --system TEXT           system prompt
  --load FILE             start from a saved session
  --backend NAME          ts, native or webgpu (default ts)
  --threads N             worker threads for backends that have them
  --context-length N      positions in the context (default: the model's, at most 4096)
  --context-policy P      when the context is full: ${CONTEXT_POLICIES.join(" or ")} (default drop-oldest)
  --dtype TYPE            weight dtype: ${WEIGHT_DTYPES.join(", ")} (default: as stored)
  --kv-dtype TYPE         KV cache dtype: ${KV_DTYPES.join(" or ")} (default f32)
  --max-tokens N          longest answer in tokens (default 256)
  --temperature T         sampling temperature, 0 for greedy (default 0.8)
  --top-k N, --top-p P, --min-p P, --repeat-penalty R
                          other sampling settings (defaults 40, 0.95, 0.05, 1)
  --seed N                random seed (default: random)
  --stats                 print token counts and speed after each answer
  -h, --help              show this help
  --version               show the version
`;

const COMMANDS = `Commands:
  /undo         take back the last question and its answer
  /retry        generate the last answer again
  /reset        start over (keeping the system prompt)
  /system TEXT  set the system prompt (/system alone removes it)
  /save FILE    save the session (conversation and KV cache) to FILE
  /load FILE    load a session saved with /save
  /help         show this list
Ctrl-C stops an answer; Ctrl-C twice at the prompt, or Ctrl-D, exits.`;

async function main(progress: ProgressDisplay): Promise<void> {
  const parsed = parseToolArgs("chat", HELP, {
    model: { type: "string", default: DEFAULT_CHAT_MODEL_ID },
    "template-file": { type: "string" },
    system: { type: "string" },
    load: { type: "string" },
    ...LOAD_OPTIONS,
    "context-policy": { type: "string" },
    ...GENERATION_OPTIONS,
    stats: { type: "boolean", default: false },
  });
  if (!parsed) return;
  const args = parsed.values;
  const contextPolicy = choiceFlag("context-policy", args["context-policy"], CONTEXT_POLICIES) ?? "drop-oldest";
  const load = loadFlags(args);
  const sampling: GenerateOptions = generationFlags(args);

  // A closed stdout (the reader has gone) throws OutputClosedError out of these: the chat ends quietly.
  const write = (s: string): void => stdout.writeSync(s);
  const say = (s: string): void => stdout.line(s);

  const template = args["template-file"] !== undefined ? await Deno.readTextFile(args["template-file"]) : undefined;
  const model = await loadCliModel(args.model, load, progress);
  let session: ChatSession;
  try {
    resolveSampling(sampling, model.config.vocabSize); // a bad combination fails here, naming its flag
    const options: ChatSessionOptions = { ...sampling, template, contextPolicy };
    session = args.load !== undefined
      ? await ChatSession.load(model, args.load, options)
      : new ChatSession(model, { ...options, system: args.system });
  } catch (e) {
    await model.dispose();
    throw samplingError(e) ?? e;
  }

  // Ctrl-C: stops the answer being generated; at the prompt, a second press in a row exits.
  let answering: AbortController | undefined;
  let interruptsAtPrompt = 0;
  let exiting = false;
  /** Frees the session and the model and exits, after writing `last` when stdout is still open. */
  async function exit(code = 0, last = ""): Promise<never> {
    try {
      if (last) stdout.writeSync(last);
    } catch (e) {
      if (!(e instanceof OutputClosedError)) throw e;
    }
    if (!exiting) {
      exiting = true;
      session.dispose();
      await model.dispose();
    }
    Deno.exit(code);
  }
  Deno.addSignalListener("SIGINT", () => {
    if (answering) {
      answering.abort(new DOMException("Stopped", "AbortError"));
      return;
    }
    if (++interruptsAtPrompt >= 2) {
      void exit(0, "\n");
      return;
    }
    try {
      write("\n(Ctrl-C again or Ctrl-D to exit)\n> ");
    } catch (e) {
      if (!(e instanceof OutputClosedError)) throw e;
      void exit(0); // nobody reads the chat any more
    }
  });

  async function answer(start: (opts: GenerateOptions) => ChatReply): Promise<void> {
    const ac = new AbortController();
    answering = ac;
    try {
      // With a signal, generation yields to the event loop between tokens: Ctrl-C (a signal event) gets in.
      const reply = start({ signal: ac.signal });
      for await (const piece of reply) write(piece);
      say("");
      if (args.stats) {
        const u = await reply.usage;
        say(
          `[${u.promptTokens} prompt tokens (${u.cachedTokens} cached), ${u.completionTokens} generated, ` +
            `${speedText(reply.stats)}${u.droppedMessages ? `, ${u.droppedMessages} old messages dropped` : ""}]`,
        );
      }
    } catch (e) {
      if (e instanceof OutputClosedError) throw e;
      if (ac.signal.aborted) {
        const last = session.messages.at(-1);
        say(last?.role === "assistant" ? "\n[stopped]" : "[stopped before the answer began: the message was not sent]");
      } else say(`\nError: ${(e as Error).message}`);
    } finally {
      answering = undefined;
    }
  }

  async function command(line: string): Promise<void> {
    const space = line.indexOf(" ");
    const name = space < 0 ? line : line.slice(0, space);
    const rest = space < 0 ? "" : line.slice(space + 1).trim();
    switch (name) {
      case "/help":
        say(COMMANDS);
        return;
      case "/undo": {
        const removed = session.undo();
        say(removed.length ? `Removed the last exchange (${removed.length} messages).` : "Nothing to undo.");
        return;
      }
      case "/retry":
        if (session.messages.at(-1)?.role !== "assistant") {
          say("Nothing to retry.");
          return;
        }
        await answer((o) => session.regenerate(o));
        return;
      case "/reset":
        session.reset();
        say("Conversation cleared.");
        return;
      case "/system":
        session.setSystem(rest === "" ? undefined : rest);
        say(rest === "" ? "System prompt removed." : "System prompt set.");
        return;
      case "/save":
        if (!rest) return say("Usage: /save FILE");
        try {
          await session.save(rest);
          say(`Saved ${session.messages.length} messages and ${session.cachedTokens.length} cached tokens to ${rest}.`);
        } catch (e) {
          say(`Error: ${(e as Error).message}`);
        }
        return;
      case "/load":
        if (!rest) return say("Usage: /load FILE");
        try {
          const loaded = await ChatSession.load(model, rest, { ...sampling, template, contextPolicy });
          session.dispose();
          session = loaded;
          say(`Loaded ${session.messages.length} messages from ${rest}.`);
        } catch (e) {
          say(`Error: ${(e as Error).message}`);
        }
        return;
      default:
        say(`Unknown command ${name}: type /help for the list.`);
    }
  }

  say(
    `Chatting with ${args.model} (context ${model.contextLength} tokens, loaded in ${model.loadMs.toFixed(0)} ms). ` +
      "Type /help for commands, Ctrl-D to exit.",
  );
  for (const m of session.messages) if (m.role !== "system") say(`${m.role === "user" ? ">" : ""} ${m.content}`.trim());
  const lines = Deno.stdin.readable.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  async function readLine(): Promise<string | undefined> {
    for (;;) {
      const nl = buffer.indexOf("\n");
      if (nl >= 0) {
        const line = buffer.slice(0, nl).replace(/\r$/, "");
        buffer = buffer.slice(nl + 1);
        return line;
      }
      const r = await lines.read();
      if (r.done) {
        if (buffer === "") return undefined;
        const line = buffer;
        buffer = "";
        return line;
      }
      buffer += r.value;
    }
  }

  for (;;) {
    write("> ");
    const line = await readLine();
    if (line === undefined) {
      say("");
      break;
    }
    interruptsAtPrompt = 0;
    const text = line.trim();
    if (text === "") continue;
    if (text.startsWith("/")) await command(text);
    else await answer((o) => session.send(text, o));
  }
  await exit(0);
}

if (import.meta.main) await runCli("chat", main);

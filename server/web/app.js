// The chat page: keeps the conversation in memory and streams each answer from
// /v1/chat/completions (server-sent events). No build step, no dependencies.
//
// Only answered turns enter the history sent back to the server: a turn stopped
// before its first token, one that failed, or an empty answer stays on the page,
// marked, but out of the conversation.

const $ = (id) => document.getElementById(id);
const log = $("log");
const input = $("input");
/** The conversation sent with each request; "New chat" replaces it with a new array. */
/** @type {{ role: string, content: string }[]} */
let messages = [];
/** @type {AbortController | undefined} */
let current;

function setState(state) {
  document.body.dataset.state = state;
  $("send").disabled = state !== "idle";
  $("stop").disabled = state !== "streaming";
}

function setStats(text) {
  $("stats").textContent = text;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  log.append(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

const KEY_ITEM = "llm-engine-api-key";

/** The headers of an API request: the API key, once the server has asked for one, for this tab. */
function apiHeaders(extra = {}) {
  const key = sessionStorage.getItem(KEY_ITEM);
  return key ? { ...extra, authorization: `Bearer ${key}` } : extra;
}

/** Lists the models; those the server cannot chat with (no chat template) are shown but cannot be chosen. */
async function loadModels() {
  let res = await fetch("/v1/models", { headers: apiHeaders() });
  // A server started with --api-key answers 401: ask for the key (twice at most) and keep it for this tab.
  for (let tries = 0; res.status === 401 && tries < 2; tries++) {
    const key = prompt(`${(await res.json()).error?.message ?? "This server needs an API key"}\n\nAPI key:`);
    if (!key) break;
    sessionStorage.setItem(KEY_ITEM, key.trim());
    res = await fetch("/v1/models", { headers: apiHeaders() });
  }
  if (!res.ok) throw new Error((await res.json()).error?.message ?? `HTTP ${res.status}`);
  const { data } = await res.json();
  const select = $("model");
  let first;
  for (const m of data) {
    const chat = m.capabilities?.chat_completions !== false;
    const option = new Option(chat ? m.id : `${m.id} (no chat template)`, m.id);
    if (!chat) {
      option.disabled = true;
      option.title = "This model has no chat template: it answers /v1/completions only";
    }
    select.append(option);
    first ??= chat ? m.id : undefined;
  }
  if (first === undefined) {
    bubble(
      "error",
      "No model on this server has a chat template: start the server with --template-file, or use /v1/completions",
    );
    setState("error");
    return;
  }
  select.value = first;
  setState("idle");
}

/** Yields the JSON payloads of a server-sent event stream. */
async function* events(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  const history = messages;
  const question = { role: "user", content: text };
  const asked = bubble("user", text);
  const out = bubble("assistant", "");
  out.classList.add("streaming");
  out.dataset.chunks = "0";
  setStats(""); // the last answer's numbers do not describe this one
  setState("streaming");
  current = new AbortController();
  const signal = current.signal;
  const system = $("system").value.trim();
  const turn = [...history, question];
  const body = {
    model: $("model").value,
    messages: system ? [{ role: "system", content: system }, ...turn] : turn,
    max_tokens: Number($("max-tokens").value) || 128,
    temperature: Number($("temperature").value),
    stream: true,
    stream_options: { include_usage: true },
  };
  let answer = "";
  let usage;
  let failure;
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: apiHeaders({ "content-type": "application/json" }),
      body: JSON.stringify(body),
      signal,
    });
    if (!res.ok) throw new Error((await res.json()).error?.message ?? `HTTP ${res.status}`);
    for await (const chunk of events(res.body)) {
      if (chunk.error) throw new Error(chunk.error.message);
      const piece = chunk.choices?.[0]?.delta?.content;
      if (piece) {
        answer += piece;
        out.textContent = answer.trimStart();
        out.dataset.chunks = String(Number(out.dataset.chunks) + 1);
        log.scrollTop = log.scrollHeight;
      }
      if (chunk.usage) usage = chunk.usage;
    }
  } catch (e) {
    if (e.name !== "AbortError") failure = e;
  }
  // "New chat" pressed meanwhile took this turn's bubbles away with the conversation.
  if (history === messages) endTurn({ question, answer, usage, failure, stopped: signal.aborted, asked, out });
  current = undefined;
  setState("idle");
  input.focus();
}

/**
 * Shows how a turn ended. Only an answered turn joins the conversation; a failed,
 * empty or unstarted one stays on the page, marked, and is never sent again.
 */
function endTurn({ question, answer, usage, failure, stopped, asked, out }) {
  out.classList.remove("streaming");
  const empty = answer.trim() === "";
  if (!failure && !empty) {
    messages.push(question, { role: "assistant", content: answer });
    setStats(stopped ? "Stopped" : usageLine(usage));
    return;
  }
  asked.classList.add("unanswered");
  asked.title = "Not sent again: this message got no answer";
  if (empty) out.remove();
  else {
    out.classList.add("failed");
    out.title = "Not sent again: this answer failed";
  }
  if (failure) bubble("error", String(failure.message ?? failure));
  else if (!stopped) bubble("note", "The model gave an empty answer");
  setStats(failure ? "" : stopped ? "Stopped before the first token" : usageLine(usage));
}

/** The stats line for a finished answer. */
function usageLine(u) {
  if (!u) return "";
  return `${u.prompt_tokens} prompt tokens (${
    u.prompt_tokens_details?.cached_tokens ?? 0
  } cached), ${u.completion_tokens} generated`;
}

$("form").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = input.value.trim();
  if (!text || document.body.dataset.state !== "idle") return;
  input.value = "";
  send(text);
});
input.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) {
    e.preventDefault();
    $("form").requestSubmit();
  }
});
$("stop").addEventListener("click", () => current?.abort());
$("clear").addEventListener("click", () => {
  current?.abort();
  messages = [];
  log.replaceChildren();
  setStats("");
});

loadModels().catch((e) => {
  bubble("error", `Cannot list models: ${e.message}`);
  setState("error");
});

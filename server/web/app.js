// The chat page: keeps the conversation in memory and streams each answer from
// /v1/chat/completions (server-sent events). No build step, no dependencies.

const $ = (id) => document.getElementById(id);
const log = $("log");
const input = $("input");
/** @type {{ role: string, content: string }[]} */
let messages = [];
/** @type {AbortController | undefined} */
let current;

function setState(state) {
  document.body.dataset.state = state;
  $("send").disabled = state !== "idle";
  $("stop").disabled = state !== "streaming";
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  div.textContent = text;
  log.append(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

async function loadModels() {
  const res = await fetch("/v1/models");
  const { data } = await res.json();
  for (const m of data) $("model").append(new Option(m.id, m.id));
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
  messages.push({ role: "user", content: text });
  bubble("user", text);
  const out = bubble("assistant", "");
  out.classList.add("streaming");
  out.dataset.chunks = "0";
  setState("streaming");
  current = new AbortController();
  const system = $("system").value.trim();
  const body = {
    model: $("model").value,
    messages: system ? [{ role: "system", content: system }, ...messages] : messages,
    max_tokens: Number($("max-tokens").value) || 128,
    temperature: Number($("temperature").value),
    stream: true,
    stream_options: { include_usage: true },
  };
  let answer = "";
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
      signal: current.signal,
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
      if (chunk.usage) {
        const u = chunk.usage;
        $("stats").textContent = `${u.prompt_tokens} prompt tokens (${
          u.prompt_tokens_details?.cached_tokens ?? 0
        } cached), ${u.completion_tokens} generated`;
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") bubble("error", String(e.message ?? e));
  } finally {
    out.classList.remove("streaming");
    messages.push({ role: "assistant", content: answer });
    current = undefined;
    setState("idle");
    input.focus();
  }
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
  $("stats").textContent = "";
});

loadModels().catch((e) => {
  bubble("error", `Cannot list models: ${e.message}`);
  setState("error");
});

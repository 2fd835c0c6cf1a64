// qwenkit web chat. It talks only to this server's OpenAI API: GET v1/models and
// POST v1/chat/completions (stream=true). Conversations, settings and the API key stay in localStorage.
// Model and user text reaches the page only through textContent or markdown-it with raw HTML off.
"use strict";

const STORE = {
  conversations: "qwenkit.conversations", current: "qwenkit.current", settings: "qwenkit.settings",
  key: "qwenkit.apiKey", theme: "qwenkit.theme",
};
const DEFAULT_SETTINGS = {
  model: "", system: "", temperature: "", top_p: "", max_tokens: "", thinking_budget: "", thinking: true, tools: "",
  tool_choice: "auto",
};
const $ = (id) => document.getElementById(id);

const state = {
  conversations: load(STORE.conversations, []),  // [{id, title, messages, updated}], newest first
  currentId: localStorage.getItem(STORE.current),
  settings: { ...DEFAULT_SETTINGS, ...load(STORE.settings, {}) },
  models: [],          // the cards of /v1/models
  controller: null,    // the AbortController of the reply being streamed
  streamingId: null,   // the conversation it belongs to
  attachments: [],     // data: URLs of the images for the next message
};

// ---------- storage ----------

function load(key, fallback) {
  try {
    const text = localStorage.getItem(key);
    return text === null ? fallback : JSON.parse(text);
  } catch {
    return fallback;  // a hand-edited or truncated entry must not break the page
  }
}

function saveConversations() {
  try {
    localStorage.setItem(STORE.conversations, JSON.stringify(state.conversations));
  } catch (err) {
    notice(`Could not save the conversations (${err.name}): the browser's storage may be full.`);
  }
  if (state.currentId) localStorage.setItem(STORE.current, state.currentId);
  else localStorage.removeItem(STORE.current);
}

function saveSettings() {
  localStorage.setItem(STORE.settings, JSON.stringify(state.settings));
}

function currentConversation() {
  return state.conversations.find((c) => c.id === state.currentId) || null;
}

function newId() {
  return Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
}

// ---------- theme ----------

const darkQuery = window.matchMedia("(prefers-color-scheme: dark)");

function applyTheme() {
  const stored = localStorage.getItem(STORE.theme);
  const dark = stored ? stored === "dark" : darkQuery.matches;
  document.documentElement.dataset.theme = dark ? "dark" : "light";
  $("hljs-light").disabled = dark;
  $("hljs-dark").disabled = !dark;
  $("theme-toggle").textContent = dark ? "Light" : "Dark";
}

// ---------- Markdown ----------

let markdownRenderer = null;

function markdown() {
  if (!markdownRenderer && window.markdownit) {
    markdownRenderer = window.markdownit({
      html: false,  // raw HTML in model output is shown as text, never parsed
      linkify: true,
      highlight(code, lang) {
        if (window.hljs && lang && hljs.getLanguage(lang)) {
          try {
            return hljs.highlight(code, { language: lang, ignoreIllegals: true }).value;
          } catch { /* fall through: markdown-it escapes the code itself */ }
        }
        return "";
      },
    });
    markdownRenderer.disable("image");  // model output must not make the browser fetch URLs
  }
  return markdownRenderer;
}

function renderMarkdown(el, text) {
  const md = markdown();
  if (!md) {
    el.textContent = text;
    return;
  }
  el.innerHTML = md.render(text);
  for (const a of el.querySelectorAll("a")) {
    a.target = "_blank";
    a.rel = "noopener noreferrer";
  }
  for (const pre of el.querySelectorAll("pre")) {
    const code = pre.querySelector("code");
    if (code) code.classList.add("hljs");
    const button = document.createElement("button");
    button.className = "copy-code";
    button.type = "button";
    button.textContent = "Copy";
    button.addEventListener("click", () => copyText((code || pre).textContent, button));
    pre.append(button);
  }
}

async function copyText(text, button) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // navigator.clipboard exists only in secure contexts (https, localhost); plain http on a LAN needs this
    const area = document.createElement("textarea");
    area.value = text;
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  if (button) {
    const label = button.textContent;
    button.textContent = "Copied";
    setTimeout(() => { button.textContent = label; }, 1200);
  }
}

// ---------- rendering ----------

function notice(text) {
  $("notice").textContent = text || "";
  $("notice").hidden = !text;
}

function renderConversationList() {
  const list = $("conversations");
  list.replaceChildren();
  for (const conv of state.conversations) {
    const li = document.createElement("li");
    li.dataset.id = conv.id;
    li.classList.toggle("current", conv.id === state.currentId);
    const title = document.createElement("span");
    title.className = "title";
    title.textContent = conv.title;
    title.title = conv.title;
    const rename = document.createElement("button");
    rename.className = "rename";
    rename.textContent = "✎";
    rename.title = "Rename";
    rename.setAttribute("aria-label", "Rename");
    const remove = document.createElement("button");
    remove.className = "delete";
    remove.textContent = "✕";
    remove.title = "Delete";
    remove.setAttribute("aria-label", "Delete");
    li.append(title, rename, remove);
    li.addEventListener("click", (event) => {
      if (event.target === li || event.target === title) switchTo(conv.id);
    });
    rename.addEventListener("click", () => startRename(li, conv));
    remove.addEventListener("click", () => deleteConversation(conv));
    list.append(li);
  }
}

function startRename(li, conv) {
  const input = document.createElement("input");
  input.className = "title-input";
  input.value = conv.title;
  li.querySelector(".title").replaceWith(input);
  input.focus();
  input.select();
  let done = false;
  const finish = (keep) => {
    if (done) return;
    done = true;
    const title = input.value.trim();
    if (keep && title) {
      conv.title = title;
      saveConversations();
    }
    renderConversationList();
  };
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter") finish(true);
    if (event.key === "Escape") finish(false);
  });
  input.addEventListener("blur", () => finish(true));
}

function deleteConversation(conv) {
  if (!window.confirm(`Delete the conversation "${conv.title}"?`)) return;
  if (state.controller && conv.id === state.streamingId) state.controller.abort();
  state.conversations = state.conversations.filter((c) => c !== conv);
  if (state.currentId === conv.id) state.currentId = state.conversations[0]?.id || null;
  saveConversations();
  renderAll();
}

function switchTo(id) {
  document.body.classList.remove("sidebar-open");
  if (id === state.currentId) return;
  state.currentId = id;
  saveConversations();
  renderAll();
}

function renderAll() {
  renderConversationList();
  renderMessages();
}

function renderMessages() {
  const box = $("messages");
  box.replaceChildren();
  const conv = currentConversation();
  if (!conv) return;
  conv.messages.forEach((msg, index) => box.append(messageElement(conv, msg, index)));
  box.scrollTop = box.scrollHeight;
}

function messageElement(conv, msg, index) {
  const el = $("message-template").content.firstElementChild.cloneNode(true);
  el.classList.add(msg.role);
  el.querySelector(".role").textContent = msg.role === "user" ? "You" : msg.model || "Assistant";
  const last = index === conv.messages.length - 1;
  el.querySelector(".edit").hidden = msg.role !== "user";
  el.querySelector(".regenerate").hidden = msg.role !== "assistant" || !last;
  el.querySelector(".copy-message").addEventListener("click", (event) => copyText(msg.content || "", event.target));
  el.querySelector(".edit").addEventListener("click", () => startEdit(el, conv, index));
  el.querySelector(".regenerate").addEventListener("click", () => regenerate(conv));
  const images = el.querySelector(".images");
  for (const url of msg.images || []) {
    const img = document.createElement("img");
    img.src = url;  // only data:image URLs that this page read from the user's files
    img.alt = "attached image";
    images.append(img);
  }
  fillMessage(el, msg, false);
  return el;
}

// Updates the parts of a message that streaming changes.
function fillMessage(el, msg, streaming) {
  el.classList.toggle("streaming", streaming);
  const content = el.querySelector(".content");
  if (msg.role === "user") content.textContent = msg.content;
  else renderMarkdown(content, msg.content || "");
  content.hidden = msg.role === "assistant" && !msg.content && !streaming;

  const details = el.querySelector(".reasoning");
  details.hidden = !msg.reasoning;
  if (msg.reasoning) {
    el.querySelector(".reasoning-text").textContent = msg.reasoning;
    // Open while the model is only thinking (and when thinking is all it did); collapsed once the answer
    // starts, and left as the user sets it after that.
    if (!el.dataset.reasoningSettled) {
      const answering = msg.content || (msg.tool_calls || []).length;
      details.open = !answering;
      if (answering) el.dataset.reasoningSettled = "1";
    }
  }

  const calls = el.querySelector(".tool-calls");
  calls.replaceChildren();
  for (const call of msg.tool_calls || []) {
    const box = document.createElement("div");
    box.className = "tool-call";
    const head = document.createElement("div");
    head.className = "tool-head";
    head.title = `tool call ${call.id || ""}`.trim();
    const label = document.createElement("span");
    label.className = "tool-label";
    label.textContent = "Tool call";
    const name = document.createElement("span");
    name.className = "tool-name";
    name.textContent = call.name;
    head.append(label, name);
    const args = document.createElement("pre");
    args.className = "tool-arguments";
    args.textContent = prettyJson(call.arguments);
    box.append(head, args);
    calls.append(box);
  }

  const error = el.querySelector(".error");
  error.hidden = !msg.error;
  error.textContent = msg.error || "";
  el.querySelector(".stats").textContent = statsText(msg);
}

function prettyJson(text) {
  try {
    return JSON.stringify(JSON.parse(text), null, 2);
  } catch {
    return text;  // still streaming, or not JSON: shown as it came
  }
}

function statsText(msg) {
  const s = msg.stats;
  if (!s) return "";
  const parts = [];
  if (msg.stopped) parts.push("stopped");
  if (s.tokens) parts.push(`${s.exact ? "" : "~"}${s.tokens} tokens`);
  if (s.tps) parts.push(`${s.tps.toFixed(1)} tok/s`);
  if (s.ttft !== undefined) parts.push(`first token ${s.ttft.toFixed(2)} s`);
  if (s.context && s.max_model_len) {
    parts.push(`context ${s.context} / ${s.max_model_len} (${((100 * s.context) / s.max_model_len).toFixed(1)}%)`);
  } else if (s.context) {
    parts.push(`context ${s.context} tokens`);
  }
  return parts.join(" · ");
}

function startEdit(el, conv, index) {
  if (state.controller) return;
  const msg = conv.messages[index];
  const content = el.querySelector(".content");
  const box = document.createElement("div");
  box.className = "edit-box";
  const area = document.createElement("textarea");
  area.value = msg.content;
  const row = document.createElement("div");
  row.className = "row end";
  const cancel = document.createElement("button");
  cancel.textContent = "Cancel";
  const save = document.createElement("button");
  save.className = "save-edit";
  save.textContent = "Send";
  row.append(cancel, save);
  box.append(area, row);
  content.replaceWith(box);
  area.focus();
  cancel.addEventListener("click", () => renderMessages());
  const submit = () => {
    const text = area.value.trim();
    if (!text) return;
    // The edited message replaces it and everything after it.
    conv.messages.splice(index, conv.messages.length - index, { ...msg, content: text });
    generate(conv);
  };
  save.addEventListener("click", submit);
  area.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      submit();
    }
    if (event.key === "Escape") renderMessages();
  });
}

function regenerate(conv) {
  if (state.controller) return;
  if (conv.messages.at(-1)?.role === "assistant") conv.messages.pop();
  generate(conv);
}

// ---------- the API ----------

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = localStorage.getItem(STORE.key);
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function apiError(response) {
  let message = `${response.status} ${response.statusText}`;
  try {
    const body = await response.json();
    if (body?.error?.message) message = body.error.message;
  } catch { /* not JSON: keep the status line */ }
  const err = new Error(message);
  err.status = response.status;
  return err;
}

async function* serverSentEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = block.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

async function loadModels() {
  let cards;
  try {
    const response = await fetch("v1/models", { headers: headers() });
    if (!response.ok) throw await apiError(response);
    cards = (await response.json()).data || [];
  } catch (err) {
    if (err.status === 401) askForKey(err.message);
    else notice(`Could not list the models: ${err.message}`);
    return;
  }
  notice("");
  state.models = cards;
  const select = $("model");
  select.replaceChildren();
  for (const card of cards) {
    const option = document.createElement("option");
    option.value = card.id;
    option.textContent = card.parent ? `${card.id} (adapter on ${card.parent})` : card.id;
    select.append(option);
  }
  if (cards.some((c) => c.id === state.settings.model)) select.value = state.settings.model;
  updateCapabilities();
}

function currentCard() {
  return state.models.find((m) => m.id === $("model").value);
}

// Cards may list "capabilities"; without the list, thinking stays offered (templates ignore the flag) and images do not.
function updateCapabilities() {
  const caps = currentCard()?.capabilities;
  const vision = Array.isArray(caps) && caps.includes("vision");
  $("attach").hidden = !vision;
  if (!vision) setAttachments([]);
  $("thinking-label").hidden = Array.isArray(caps) && !caps.includes("thinking");
}

function requestBody(messages) {
  const s = state.settings;
  const body = {
    model: $("model").value || undefined,
    messages: [],
    stream: true,
    stream_options: { include_usage: true },
  };
  if (s.system.trim()) body.messages.push({ role: "system", content: s.system.trim() });
  for (const m of messages) {
    if (m.role === "user") {
      body.messages.push({
        role: "user",
        content: m.images?.length
          ? [{ type: "text", text: m.content }, ...m.images.map((url) => ({ type: "image_url", image_url: { url } }))]
          : m.content,
      });
    } else if (m.content || m.tool_calls?.length) {  // failed replies are not sent back
      const out = { role: "assistant", content: m.content || "" };
      if (m.tool_calls?.length) {
        out.tool_calls = m.tool_calls.map((t) => ({ id: t.id, type: "function", function: { name: t.name, arguments: t.arguments } }));
      }
      body.messages.push(out);
    }
  }
  for (const name of ["temperature", "top_p", "max_tokens"]) {
    if (s[name] !== "" && s[name] !== null) body[name] = Number(s[name]);
  }
  if (!$("thinking-label").hidden) {
    body.chat_template_kwargs = { enable_thinking: !!s.thinking };
    if (s.thinking && s.thinking_budget !== "") body.thinking_budget = Number(s.thinking_budget);
  }
  if (s.tools.trim()) {
    try {
      body.tools = JSON.parse(s.tools);
    } catch (err) {
      throw new Error(`Settings → Tools is not valid JSON: ${err.message}`);
    }
    body.tool_choice = s.tool_choice;
  }
  return body;
}

async function generate(conv) {
  conv.updated = Date.now();
  saveConversations();  // the question is kept even if the page goes away mid-reply
  const reply = { role: "assistant", content: "", reasoning: "", tool_calls: [], model: $("model").value };
  conv.messages.push(reply);
  const box = $("messages");
  renderMessages();
  const controller = new AbortController();
  state.controller = controller;
  state.streamingId = conv.id;
  setBusy(true);
  const maxModelLen = currentCard()?.max_model_len;
  const started = performance.now();
  let first = null;
  let chunks = 0;
  let usage = null;
  let pending = false;
  const repaint = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      if (conv.id !== state.currentId) return;  // another conversation is on screen; this one renders when back
      const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
      fillMessage(box.lastElementChild, reply, state.controller === controller);
      if (atBottom) box.scrollTop = box.scrollHeight;
    });
  };
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody(conv.messages.slice(0, -1))), signal: controller.signal,
    });
    if (!response.ok) throw await apiError(response);
    for await (const event of serverSentEvents(response.body)) {
      if (event.error) throw new Error(event.error.message || "the server reported an error");
      if (event.usage) usage = event.usage;
      for (const choice of event.choices || []) {
        const d = choice.delta || {};
        if (d.reasoning_content) reply.reasoning += d.reasoning_content;
        if (d.content) reply.content += d.content;
        for (const call of d.tool_calls || []) {
          const t = (reply.tool_calls[call.index ?? 0] ||= { id: "", name: "", arguments: "" });
          if (call.id) t.id = call.id;
          if (call.function?.name) t.name += call.function.name;
          if (call.function?.arguments) t.arguments += call.function.arguments;
        }
        // The server's first chunk (the role) comes with the first token, even when the text is held back
        // (a tool call is sent once parsed), so it times the first token and starts the decode clock.
        first ??= performance.now();
        if (d.reasoning_content || d.content || d.tool_calls) chunks += 1;
        if (choice.finish_reason) reply.finish_reason = choice.finish_reason;
      }
      repaint();
    }
  } catch (err) {
    if (err.name === "AbortError") {
      reply.stopped = true;
    } else {
      reply.error = err.message;
      if (err.status === 401) askForKey(err.message);
    }
  } finally {
    const ended = performance.now();
    reply.tool_calls = reply.tool_calls.filter(Boolean);
    const tokens = usage?.completion_tokens ?? chunks;
    reply.stats = {
      tokens,
      exact: !!usage,
      ttft: first === null ? undefined : (first - started) / 1000,
      // decode speed: the tokens after the first over the time since the first
      tps: first !== null && tokens > 1 && ended > first ? ((tokens - 1) * 1000) / (ended - first) : undefined,
      context: usage?.total_tokens,
      max_model_len: maxModelLen,
    };
    state.controller = null;
    state.streamingId = null;
    conv.updated = Date.now();
    saveConversations();
    setBusy(false);
    if (conv.id === state.currentId) renderMessages();
    if (document.activeElement === document.body) $("input").focus();  // e.g. after Stop, which is now hidden
  }
}

function setBusy(busy) {
  document.body.classList.toggle("busy", busy);
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

function send() {
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  let conv = currentConversation();
  if (!conv) {
    conv = { id: newId(), title: text.replace(/\s+/g, " ").slice(0, 48), messages: [], updated: Date.now() };
    state.conversations.unshift(conv);
    state.currentId = conv.id;
  }
  const msg = { role: "user", content: text };
  if (state.attachments.length) msg.images = state.attachments;
  conv.messages.push(msg);
  $("input").value = "";
  setAttachments([]);
  renderConversationList();
  generate(conv);
}

// ---------- API key ----------

function askForKey(message) {
  const dialog = $("key-dialog");
  const hadKey = !!localStorage.getItem(STORE.key);
  $("key-error").textContent = hadKey ? message : "";
  $("key-error").hidden = !hadKey;
  $("key-input").value = "";
  if (!dialog.open) dialog.showModal();
}

// ---------- images ----------

function setAttachments(urls) {
  state.attachments = urls;
  const box = $("attachments");
  box.replaceChildren();
  for (const url of urls) {
    const img = document.createElement("img");
    img.src = url;
    img.alt = "attachment (click to remove)";
    img.title = "Click to remove";
    img.addEventListener("click", () => setAttachments(state.attachments.filter((u) => u !== url)));
    box.append(img);
  }
  box.hidden = urls.length === 0;
}

function readImage(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// ---------- wiring ----------

function bindSettings() {
  const s = state.settings;
  for (const name of ["system", "temperature", "top_p", "max_tokens", "thinking_budget", "tools", "tool_choice"]) {
    const input = $(name);
    input.value = s[name];
    const update = () => {
      s[name] = input.value;
      saveSettings();
      if (name === "tools") checkTools();
    };
    input.addEventListener("input", update);
    input.addEventListener("change", update);
  }
  $("thinking").checked = !!s.thinking;
  $("thinking").addEventListener("change", () => {
    s.thinking = $("thinking").checked;
    saveSettings();
  });
  $("model").addEventListener("change", () => {
    s.model = $("model").value;
    saveSettings();
    updateCapabilities();
  });
  checkTools();
}

function checkTools() {
  const text = state.settings.tools.trim();
  let problem = "";
  if (text) {
    try {
      if (!Array.isArray(JSON.parse(text))) problem = "Tools must be a JSON array.";
    } catch (err) {
      problem = `Tools: ${err.message}`;
    }
  }
  $("settings-error").textContent = problem;
  $("settings-error").hidden = !problem;
}

function init() {
  applyTheme();
  darkQuery.addEventListener("change", applyTheme);
  $("theme-toggle").addEventListener("click", () => {
    const dark = document.documentElement.dataset.theme === "dark";
    localStorage.setItem(STORE.theme, dark ? "light" : "dark");
    applyTheme();
  });
  $("new-chat").addEventListener("click", () => {
    document.body.classList.remove("sidebar-open");
    state.currentId = null;
    saveConversations();
    renderAll();
    $("input").focus();
  });
  $("sidebar-toggle").addEventListener("click", () => document.body.classList.toggle("sidebar-open"));
  document.querySelector("main").addEventListener("click", (event) => {
    if (event.target.id !== "sidebar-toggle") document.body.classList.remove("sidebar-open");
  });
  $("settings-button").addEventListener("click", () => {
    const panel = $("settings");
    panel.hidden = !panel.hidden;
    $("settings-button").setAttribute("aria-expanded", String(!panel.hidden));
  });
  $("key-button").addEventListener("click", () => {
    $("key-error").hidden = true;
    $("key-input").value = localStorage.getItem(STORE.key) || "";
    $("key-dialog").showModal();
  });
  $("key-cancel").addEventListener("click", () => $("key-dialog").close("cancel"));
  $("key-dialog").addEventListener("close", () => {
    if ($("key-dialog").returnValue !== "save") return;
    const key = $("key-input").value.trim();
    if (key) localStorage.setItem(STORE.key, key);
    else localStorage.removeItem(STORE.key);
    loadModels();
  });
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    send();
  });
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && state.controller) state.controller.abort();
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("attach").addEventListener("click", () => $("file").click());
  $("file").addEventListener("change", async () => {
    const urls = await Promise.all([...$("file").files].filter((f) => f.type.startsWith("image/")).map(readImage));
    $("file").value = "";
    setAttachments([...state.attachments, ...urls]);
  });
  bindSettings();
  if (!currentConversation()) state.currentId = null;
  renderAll();
  loadModels();
}

init();

// Pollen's page: a chat that streams from /v1/chat/completions, and a swarm view
// that polls /api/swarm. No framework, nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
let model = null;
let history = [];
let controller = null;

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// Reads server-sent events from a fetch response; calls onData with each `data:` payload.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let idx;
    while ((idx = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, idx);
      buffer = buffer.slice(idx + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (data && onData(data) === false) return;
    }
  }
}

async function ask(question) {
  if (model === null) await refreshSwarm();
  history.push({ role: "user", content: question });
  addMessage("user", question);
  const out = addMessage("assistant", "");
  out.dataset.state = "streaming";
  setBusy(true);
  controller = new AbortController();
  const started = performance.now();
  let firstAt = null, pieces = 0;
  const body = {
    model,
    messages: history,
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: Number($("max-tokens").value) || 128,
    temperature: Number($("temperature").value) || 0,
  };
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
      signal: controller.signal,
    });
    if (!res.ok) {
      const err = await res.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || res.statusText);
    }
    let usage = null;
    await readEvents(res, (data) => {
      if (data === "[DONE]") return false;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        if (firstAt === null) firstAt = performance.now();
        pieces++;
        out.textContent += delta.content;
        $("log").scrollTop = $("log").scrollHeight;
      }
      return true;
    });
    history.push({ role: "assistant", content: out.textContent });
    const secs = (performance.now() - started) / 1000;
    const ttft = firstAt === null ? 0 : (firstAt - started) / 1000;
    $("chat-status").textContent = usage
      ? `${usage.completion_tokens} tokens in ${secs.toFixed(1)} s (first after ${ttft.toFixed(2)} s)`
      : `${pieces} pieces in ${secs.toFixed(1)} s`;
  } catch (e) {
    if (e.name === "AbortError") {
      history.push({ role: "assistant", content: out.textContent });
      $("chat-status").textContent = "stopped";
    } else {
      history.pop();
      out.className = "msg error";
      out.textContent = "Error: " + e.message;
    }
  } finally {
    out.dataset.state = "done";
    controller = null;
    setBusy(false);
  }
}

function shortPeer(p) {
  return p.length > 16 ? p.slice(0, 8) + "…" + p.slice(-6) : p;
}

function renderSwarm(view) {
  $("model").textContent = `${view.model} (${view.mode})`;
  const root = $("models");
  root.textContent = "";
  if (view.error) {
    const p = document.createElement("p");
    p.className = "msg error";
    p.textContent = view.error;
    root.appendChild(p);
  }
  for (const m of view.models || []) {
    const box = document.createElement("div");
    box.className = "model";
    box.dataset.modelId = m.id;
    const title = document.createElement("h3");
    const all = m.servers || [];
    // The client routes only through servers of its own model and compute mode.
    const own = m.id === view.model_id;
    const mine = own ? all.filter((s) => s.compute === view.compute).length : all.length;
    const others = all.length === mine ? "" : ` (${all.length - mine} of other modes)`;
    title.textContent = `${m.name || m.id} · ${m.num_blocks} blocks · ${mine} servers${others}`;
    box.appendChild(title);
    if (view.mode === "local") {
      const p = document.createElement("p");
      p.className = "muted";
      p.textContent = "Every block runs in this process (--local).";
      box.appendChild(p);
      root.appendChild(box);
      continue;
    }
    const bar = document.createElement("div");
    bar.className = "bar";
    (m.coverage || []).forEach((count, i) => {
      const cell = document.createElement("div");
      cell.className = "cell c" + Math.min(count, 3);
      cell.dataset.count = String(count);
      const which = own ? ` computing ${view.compute}` : "";
      cell.title = `block ${i}: ${count} server${count === 1 ? "" : "s"}${which}`;
      bar.appendChild(cell);
    });
    box.appendChild(bar);
    const table = document.createElement("table");
    table.innerHTML = "<thead><tr><th>peer</th><th>blocks</th><th>compute</th><th>tokens/s</th><th>free sessions</th><th>reachability</th></tr></thead>";
    const tbody = document.createElement("tbody");
    const sorted = [...(m.servers || [])].sort((a, b) => a.blocks[0] - b.blocks[0]);
    for (const s of sorted) {
      const tr = document.createElement("tr");
      const cells = [
        [shortPeer(s.peer), "peer"],
        [`${s.blocks[0]}:${s.blocks[1]}`, ""],
        [s.compute === undefined ? "?" : String(s.compute), ""],
        [Number(s.throughput).toFixed(1), ""],
        [String(s.free_sessions), ""],
        [s.reachability, "reach-" + s.reachability],
      ];
      for (const [text, cls] of cells) {
        const td = document.createElement("td");
        td.textContent = text;
        if (cls) td.className = cls;
        tr.appendChild(td);
      }
      tr.title = s.peer;
      if (own && s.compute !== view.compute) {
        tr.className = "other-mode";
        tr.title += ` computes ${s.compute}; this client routes only through ${view.compute}`;
      }
      tbody.appendChild(tr);
    }
    table.appendChild(tbody);
    box.appendChild(table);
    root.appendChild(box);
  }
  $("legend-mode").textContent = view.compute
    ? `· servers computing ${view.compute}, this client's mode`
    : "";
  $("swarm-updated").textContent = "updated " + new Date().toLocaleTimeString();
}

async function refreshSwarm() {
  try {
    const res = await fetch("/api/swarm");
    const view = await res.json();
    if (model === null) model = view.model;
    renderSwarm(view);
  } catch (e) {
    $("swarm-updated").textContent = "cannot reach the API: " + e.message;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("ask").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const q = $("question").value.trim();
    if (!q || controller) return;
    $("question").value = "";
    ask(q);
  });
  $("question").addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey) {
      ev.preventDefault();
      $("ask").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("reset").addEventListener("click", () => {
    history = [];
    $("log").textContent = "";
    $("chat-status").textContent = "";
  });
  refreshSwarm();
  setInterval(refreshSwarm, 1000);
});

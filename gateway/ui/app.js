// The manager's page: `status` rendered, refreshed when the manager's events (forwarded by the gateway as
// server-sent events) say something changed, and on each heartbeat. Its one timer watches the stream itself: the
// gateway sends something at least every two heartbeat intervals (an event, or `link` with state "down" while the
// manager is silent), so 2.5 intervals of silence (10 s at least) mean the stream is dead, and the page opens a new
// one.
"use strict";
const $ = (selector) => document.querySelector(selector);
const esc = (text) => String(text ?? "").replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
const mb = (bytes) => (bytes == null ? "-" : bytes >= 1e9 ? `${(bytes / 1e9).toFixed(2)} GB` : `${(bytes / 1e6).toFixed(1)} MB`);
const ago = (s) => (s == null ? "-" : s < 60 ? `${Math.round(s)}s` : s < 3600 ? `${Math.round(s / 60)}m` : `${(s / 3600).toFixed(1)}h`);
const pulls = new Map(); // model -> the last model.pull event
let status = null;
let pending = null;
let events = null; // the EventSource
let heartbeatS = 5; // the manager's heartbeat interval, as the gateway's `link` messages say
let lastHeard = Date.now();

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error?.message || body.error || `${response.status}`);
  return body;
}

async function refresh() {
  pending = null;
  try {
    status = await api("/ui/api/status");
    render();
  } catch (error) {
    $("#manager").textContent = `manager unreachable: ${error.message}`;
  }
}

function soon() {
  if (pending === null) pending = setTimeout(refresh, 60);
}

function render() {
  const m = status.manager;
  $("#manager").textContent = `manager ${m.version}, pid ${m.pid}, up ${ago(m.uptime_s)}, ${m.workers} workers · devices ${status.devices.mode}`;
  $("#devices").innerHTML = status.devices.list.map(deviceRow).join("");
  $("#models tbody").innerHTML = status.models.map(modelRow).join("");
  for (const pull of status.pulls || []) if (!pulls.has(pull.model)) pulls.set(pull.model, pull);
  renderPulls();
}

function deviceRow(d) {
  const total = d.total_bytes || 1;
  const pct = (bytes) => `${Math.max(0, (100 * bytes) / total).toFixed(2)}%`;
  const budget = d.budget_bytes ? `<span class="budget" style="left:${pct(d.budget_bytes)}" title="budget ${mb(d.budget_bytes)}"></span>` : "";
  return `<div class="device" data-device="${esc(d.id)}">
    <div><b>${esc(d.id)}</b> ${esc(d.name)}</div>
    <div class="bar"><span class="others" style="width:${pct(d.used_by_others_bytes)}"></span><span class="booked" style="width:${pct(d.reserved_bytes)}"></span>${budget}</div>
    <div>${mb(d.reserved_bytes)} booked, ${mb(d.free_bytes)} free of ${mb(d.total_bytes)} · ${d.models} models</div></div>`;
}

function modelRow(x) {
  const size = x.size_bytes ? `${mb(x.size_bytes)}${x.measured_bytes ? "" : " (est.)"}` : x.estimated_bytes ? `~${mb(x.estimated_bytes)}` : "-";
  const waits = Object.entries(x.waits || {}).map(([cls, w]) => `${cls} waited ${Math.round(w.mean_ms)} ms on average`).join(", ");
  const classes = Object.entries(x.queued_by_class || {}).map(([cls, n]) => `${n} ${cls}`).join(" + ");
  const estimate = x.estimated_bytes ? `estimated ${mb(x.estimated_bytes)}` : "";
  const conversations = x.kv_cache ? x.kv_cache.conversations : "-";
  const rate = x.batching ? x.batching.tokens_per_s?.toFixed(0) : "-";
  const loaded = x.state === "ready" || x.state === "loading";
  const variant = x.variant || x.quantization || (x.kind === "llm" ? "-" : x.kind);
  return `<tr data-model="${esc(x.name)}">
    <td class="name">${esc(x.name)} <small>${esc(x.kind)}</small></td>
    <td><span class="state ${esc(x.state)}" title="${esc(x.waiting_for || x.last_error?.message || "")}">${esc(x.state)}</span></td>
    <td>${esc(x.device || "-")}</td><td>${esc(variant)}</td><td title="${esc(estimate)}">${size}</td>
    <td>${x.in_flight}/${x.parallel}</td><td title="${esc(waits)}">${x.queued ? esc(classes) : 0}</td><td>${rate ?? "-"}</td>
    <td>${conversations}</td><td>${ago(x.idle_s)} / ${x.pinned ? "pinned" : ago(x.ttl_left_s)}</td>
    <td><button data-action="${loaded ? "unload" : "load"}" data-model="${esc(x.name)}">${loaded ? "Unload" : "Load"}</button>
      <button data-action="${x.pinned ? "unpin" : "pin"}" data-model="${esc(x.name)}" class="${x.pinned ? "on" : ""}">Pin</button></td></tr>`;
}

function renderPulls() {
  $("#pulls").innerHTML = [...pulls.values()].map((p) => {
    const share = p.total ? (100 * (p.completed || 0)) / p.total : 0;
    const what = p.error ? `<span class="error">${esc(p.error.message)}</span>` : `${esc(p.status)} ${mb(p.completed)} / ${mb(p.total)}`;
    return `<div class="pull" data-model="${esc(p.model)}"><b>${esc(p.model)}</b> ${what}
      <div class="progress"><div style="width:${share.toFixed(1)}%"></div></div></div>`;
  }).join("") || "<p class=legend>none</p>";
}

function logEvent(topic, body) {
  if (topic === "model.pull" && body.status === "fit") {
    body = { ...body, device: null, status: body.fits ? `fits on ${body.device}${body.evicts?.length ? `, evicting ${body.evicts.join(", ")}` : ""}` : `fits nowhere: ${body.reason}` };
  }
  const why = body.reason || body.error?.message || body.error || body.status || (body.pinned !== undefined ? (body.pinned ? "pinned" : "unpinned") : "");
  const where = body.device ? ` on ${body.device}` : "";
  const item = document.createElement("li");
  item.innerHTML = `<time>${new Date((body.time || Date.now() / 1000) * 1000).toLocaleTimeString()}</time><b>${esc(topic)}</b> ${esc(body.model || "")}${esc(where)} ${esc(why)}`;
  const log = $("#log");
  log.prepend(item);
  while (log.children.length > 200) log.lastChild.remove();
}

function showLink(up, why) {
  $("#live").className = up ? "live" : "live off";
  $("#live").textContent = up ? "live" : why;
}

function listen() {
  if (events) events.close();
  lastHeard = Date.now();
  events = new EventSource("/ui/api/events");
  const on = (topic, handle) => events.addEventListener(topic, (e) => { lastHeard = Date.now(); handle(e); });
  events.onerror = () => showLink(false, "reconnecting");
  on("link", (e) => {
    const body = JSON.parse(e.data);
    heartbeatS = body.heartbeat_s || heartbeatS;
    if (body.state === "up") {
      showLink(true);
      soon();
    } else {
      showLink(false, "manager unreachable");
    }
  });
  on("manager.heartbeat", () => { showLink(true); soon(); });
  for (const topic of ["model.loaded", "model.unloaded", "model.failed", "model.added", "model.removed", "model.pinned"]) {
    on(topic, (e) => { logEvent(topic, JSON.parse(e.data)); soon(); });
  }
  on("request.shed", (e) => {
    const body = JSON.parse(e.data);
    logEvent("request.shed", { ...body, reason: `${body.refused} refused: ${body.reason}` });
  });
  on("model.pull", (e) => {
    const body = JSON.parse(e.data);
    const last = pulls.get(body.model);
    pulls.set(body.model, body);
    if (!last || last.status !== body.status || body.error) logEvent("model.pull", body);
    renderPulls();
  });
}

function watchdog() {
  // At least 10 s: a busy gateway is not a dead one, and each new stream is a new subscription.
  if (Date.now() - lastHeard > Math.max(2500 * heartbeatS, 10000)) {
    showLink(false, "manager unreachable");
    listen(); // a stream that failed for good (the gateway answered an error) is not retried by the browser
  }
  setTimeout(watchdog, Math.min(1000, 250 * heartbeatS));
}

document.addEventListener("click", async (e) => {
  const button = e.target.closest("button[data-action]");
  if (!button) return;
  button.disabled = true;
  try {
    await api(`/ui/api/models/${button.dataset.action}/${encodeURIComponent(button.dataset.model)}`, { method: "POST" });
  } catch (error) {
    logEvent("error", { model: button.dataset.model, reason: error.message });
  } finally {
    button.disabled = false;
    soon();
  }
});

$("#pull-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("#pull-error").textContent = "";
  try {
    await api("/ui/api/pull", { method: "POST", body: JSON.stringify({ ref: $("#pull-ref").value.trim() }) });
    $("#pull-ref").value = "";
  } catch (error) {
    $("#pull-error").textContent = error.message;
  }
});

listen();
refresh();
watchdog();

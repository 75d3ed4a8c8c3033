// keyturn dashboard: reads the admin API with the operator's token and
// redraws every few seconds. Plain DOM, no framework; text goes in through
// textContent only, so nothing the server returns is ever parsed as HTML.
"use strict";

const REFRESH_MS = 5000;
const TOKEN_KEY = "keyturn.token";
let timer = null;

// --------------------------------------------------------------- the token

// A token in the URL fragment (#token=...) is never sent to the server;
// keep it for this tab and drop it from the address bar and history.
function takeFragmentToken() {
  const m = /(?:^#|&)token=([^&]+)/.exec(location.hash);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
}

function token() {
  return sessionStorage.getItem(TOKEN_KEY);
}

// ---------------------------------------------------------------- the API

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function get(path) {
  const resp = await fetch(path, {
    headers: { Authorization: "Bearer " + token() },
    cache: "no-store",
    credentials: "omit",
  });
  let body = null;
  try {
    body = await resp.json();
  } catch (e) {
    body = null;
  }
  if (!resp.ok) {
    const why = body && body.error ? body.error : resp.statusText;
    throw new ApiError(resp.status, why);
  }
  return body;
}

// A route the server may lack (no scheduler, an older server) reads as null.
async function maybe(path) {
  try {
    return await get(path);
  } catch (e) {
    if (e.status === 404 || e.status === 501) return null;
    throw e;
  }
}

// ------------------------------------------------------------- formatting

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function row(cells, attrs) {
  const tr = document.createElement("tr");
  for (const [k, v] of Object.entries(attrs || {})) tr.dataset[k] = v;
  for (const c of cells) {
    const td = c instanceof Node ? wrap(c) : el("td", c);
    tr.appendChild(td);
  }
  return tr;
}

function wrap(node) {
  if (node.tagName === "TD") return node;
  const td = document.createElement("td");
  td.appendChild(node);
  return td;
}

// A cell with a field name (and the raw number behind a formatted one)
// that tests and users' scripts can find.
function field(name, text, value) {
  const td = el("td", text);
  td.dataset.field = name;
  if (value !== undefined && value !== null) td.dataset.value = value;
  return td;
}

function bytes(n) {
  if (n === null || n === undefined) return "-";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return (i === 0 ? v : v.toFixed(1)) + " " + units[i];
}

function duration(secs) {
  if (secs === null || secs === undefined) return "-";
  const neg = secs < 0;
  let s = Math.abs(Math.round(secs));
  const d = Math.floor(s / 86400);
  s -= d * 86400;
  const h = Math.floor(s / 3600);
  s -= h * 3600;
  const m = Math.floor(s / 60);
  s -= m * 60;
  let out;
  if (d > 0) out = d + "d " + h + "h";
  else if (h > 0) out = h + "h " + m + "m";
  else if (m > 0) out = m + "m " + s + "s";
  else out = s + "s";
  return neg ? "-" + out : out;
}

function when(unix) {
  if (unix === null || unix === undefined) return "-";
  return new Date(unix * 1000).toISOString().replace(".000Z", "Z");
}

function progressBar(percent, label) {
  const p = document.createElement("progress");
  p.max = 100;
  p.value = percent;
  const td = document.createElement("td");
  td.dataset.field = "progress";
  td.appendChild(p);
  td.appendChild(el("span", label, "progress-label"));
  return td;
}

// ---------------------------------------------------------------- drawing

function drawScheduler(health, status) {
  const dl = document.getElementById("scheduler");
  dl.replaceChildren();
  const add = (name, value) => {
    const dt = el("dt", name);
    const dd = el("dd", value);
    dd.dataset.field = name.toLowerCase().replace(/ /g, "_");
    dl.append(dt, dd);
  };
  if (!health) {
    add("Scheduler", "not available on this server");
    return;
  }
  const s = health.scheduler || {};
  add("Scheduler", !s.up ? "down" : s.paused ? "paused" : "running");
  add("Queued", s.queued ?? 0);
  add("Running", s.running ?? 0);
  add("Failed", s.failed ?? 0);
  if (status && status.awaiting_approval !== undefined) {
    add("Awaiting approval", status.awaiting_approval);
  }
  if (status && status.threat && status.threat.level !== undefined) {
    add("Threat level", status.threat.level);
  }
  add("Next rotation in", duration(health.next_rotation_in_secs));
  const problems = document.getElementById("problems");
  problems.replaceChildren(...(health.problems || []).map((p) => el("li", p)));
}

function drawZones(rotations) {
  const body = document.getElementById("zones");
  body.replaceChildren();
  for (const r of rotations) {
    const migrating = r.phase === "migrating" || r.phase === "grace";
    const done = migrating ? r.migrated_blocks : r.staged_blocks;
    const total = migrating ? r.migrated_blocks + r.remaining_blocks : r.content_blocks;
    const what = migrating ? "migrated" : "staged";
    const label =
      r.phase === "idle"
        ? "-"
        : r.progress_percent.toFixed(1) + "% " + what + " (" + done + "/" + total + " blocks)";
    const errors = field("errors", r.errors);
    if (r.errors > 0) errors.className = "bad";
    if (r.last_error) errors.title = r.last_error;
    const phase = field("phase", r.phase + (r.emergency ? " (emergency)" : ""));
    phase.className = "phase-" + r.phase;
    const tr = row(
      [
        field("zone", r.zone),
        phase,
        field("active_version", "v" + r.active_version),
        field("next_version", r.next_version ? "v" + r.next_version : "-"),
        r.phase === "idle" ? field("progress", "-") : progressBar(r.progress_percent, label),
        field(
          "rate",
          r.rate_bytes_per_sec > 0 ? bytes(r.rate_bytes_per_sec) + "/s" : "-",
          r.rate_bytes_per_sec,
        ),
        field("eta", r.eta_secs === null || r.eta_secs === undefined ? "-" : duration(r.eta_secs), r.eta_secs),
        field("flip_at", when(r.flipped_unix ?? r.flip_at_unix)),
        field("staging_used", bytes(r.staging_used_bytes), r.staging_used_bytes),
        field("staging_free", bytes(r.staging_free_bytes), r.staging_free_bytes),
        field("unstaged_writes", r.unstaged_writes),
        errors,
      ],
      { zone: r.zone },
    );
    body.appendChild(tr);
  }
}

function drawBlocks(rotations) {
  const box = document.getElementById("blocks");
  box.replaceChildren();
  for (const r of rotations) {
    const fig = el("figure");
    fig.dataset.zone = r.zone;
    fig.appendChild(el("figcaption", r.zone + ": " + r.content_blocks + " content blocks"));
    const bar = el("div", null, "stack");
    const legend = el("ul", null, "legend");
    const total = r.keys.reduce((a, k) => a + k.blocks, 0);
    r.keys.forEach((k, i) => {
      const part = el("span", null, "part c" + (i % 6));
      // Setting style through the DOM is allowed by the page's CSP.
      part.style.width = (total > 0 ? (100 * k.blocks) / total : 0) + "%";
      part.title = "v" + k.version + ": " + k.blocks + " blocks";
      bar.appendChild(part);
      const li = el("li", "v" + k.version + " " + k.state + ": " + k.blocks + " blocks");
      li.className = "c" + (i % 6);
      li.dataset.version = k.version;
      li.dataset.blocks = k.blocks;
      legend.appendChild(li);
    });
    fig.append(bar, legend);
    box.appendChild(fig);
  }
}

function drawKeys(health) {
  const body = document.getElementById("keys");
  body.replaceChildren();
  for (const k of (health && health.keys) || []) {
    const meter = document.createElement("meter");
    meter.min = 0;
    meter.max = 1.5;
    meter.low = 1.0;
    meter.high = 1.25;
    meter.optimum = 0;
    const used = k.age_secs !== null && k.cryptoperiod_secs > 0 ? k.age_secs / k.cryptoperiod_secs : 0;
    meter.value = Math.min(used, 1.5);
    const usedCell = document.createElement("td");
    usedCell.append(meter, el("span", (100 * used).toFixed(0) + "%"));
    const state = field("state", k.state);
    state.className = "state-" + k.state;
    body.appendChild(
      row(
        [
          field("zone", k.zone),
          field("purpose", k.purpose),
          field("version", k.version === null || k.version === undefined ? "-" : "v" + k.version),
          state,
          field("age", duration(k.age_secs), k.age_secs),
          field("cryptoperiod", duration(k.cryptoperiod_secs), k.cryptoperiod_secs),
          usedCell,
          field("due_in", duration(k.due_in_secs), k.due_in_secs),
        ],
        { zone: k.zone, purpose: k.purpose },
      ),
    );
  }
}

function drawJobs(schedule) {
  const body = document.getElementById("jobs");
  body.replaceChildren();
  const jobs = (schedule && schedule.jobs) || [];
  if (jobs.length === 0) {
    const td = el("td", schedule ? "no rotation queued" : "no scheduler");
    td.colSpan = 9;
    body.appendChild(row([td]));
  }
  for (const j of jobs) {
    body.appendChild(
      row(
        [
          j.priority,
          j.zone,
          j.kind,
          j.state,
          j.urgency,
          when(j.flip_at_unix ?? j.at_unix ?? j.next_try_unix),
          j.attempts,
          j.reason || "",
          j.last_error || "",
        ],
        { zone: j.zone },
      ),
    );
  }
}

function drawAudit(audit) {
  const body = document.getElementById("audit");
  body.replaceChildren();
  const records = (audit && audit.records) || [];
  for (const a of records.slice().reverse()) {
    const outcome = el("td", a.outcome);
    if (a.outcome !== "ok") outcome.className = "bad";
    body.appendChild(row([a.id, a.time, a.actor || "", a.action, a.zone || "", outcome]));
  }
}

function showError(message) {
  const p = document.getElementById("error");
  p.textContent = message;
  p.hidden = !message;
}

function setStatus(text, cls) {
  const s = document.getElementById("status");
  s.textContent = text;
  s.className = "badge " + (cls || "");
}

// ----------------------------------------------------------------- the loop

async function refresh() {
  clearTimeout(timer);
  if (!token()) {
    document.getElementById("main").hidden = true;
    document.getElementById("login").hidden = false;
    document.getElementById("logout").hidden = true;
    setStatus("not connected");
    showError("Enter an API token to see the pool (a viewer token is enough: keyturn token create --role viewer).");
    return;
  }
  try {
    const zones = await get("/api/v1/zones");
    const [health, status, schedule, audit, ...rotations] = await Promise.all([
      maybe("/api/v1/key-rotation/health"),
      maybe("/api/v1/key-rotation/scheduler/status"),
      maybe("/api/v1/key-rotation/schedule"),
      maybe("/api/v1/audit/recent?limit=20"),
      ...zones.map((z) => get("/api/v1/zones/" + encodeURIComponent(z) + "/rotation")),
    ]);
    drawScheduler(health, status);
    drawZones(rotations);
    drawBlocks(rotations);
    drawKeys(health);
    drawJobs(schedule);
    drawAudit(audit);
    const ok = !health || health.status === "ok";
    setStatus(ok ? "ok" : "degraded", ok ? "good" : "warn");
    document.getElementById("updated").textContent = "updated " + new Date().toISOString();
    document.getElementById("main").hidden = false;
    document.getElementById("login").hidden = true;
    document.getElementById("logout").hidden = false;
    showError("");
  } catch (e) {
    if (e.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      document.getElementById("main").hidden = true;
      document.getElementById("login").hidden = false;
      document.getElementById("logout").hidden = true;
      setStatus("not connected", "bad");
      showError("The server refused the token (401): " + e.message);
      return;
    }
    setStatus("error", "bad");
    showError(
      e.status === 403
        ? "This token may not read the dashboard's routes (403): " + e.message
        : "Cannot read the API: " + e.message,
    );
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  takeFragmentToken();
  document.getElementById("login").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const input = document.getElementById("token");
    const t = input.value.trim();
    input.value = "";
    if (t) sessionStorage.setItem(TOKEN_KEY, t);
    refresh();
  });
  document.getElementById("logout").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    refresh();
  });
  refresh();
});

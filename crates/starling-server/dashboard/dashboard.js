// Starling's operator dashboard. It reads the public JSON API (`/v1/tasks`, a task's `rounds`
// and `privacy`) and `/metrics` every POLL_MS, and redraws only the parts whose data changed.
// The charts are SVG drawn here (no library). With the admin token (kept in sessionStorage,
// sent only in the X-Starling-Admin-Token header) it rolls a task back, pauses and resumes it,
// and lists and revokes its devices.
//
// Tests read the charts through data attributes: each chart's <svg data-points="N"> (and
// data-points-<series>), each point <circle data-series data-round data-value>.

const POLL_MS = 2000;
const TOKEN_KEY = "starling-admin-token";
const RECENT_ROUNDS = 20;
const SVG_NS = "http://www.w3.org/2000/svg";
const ADMIN_HEADER = "X-Starling-Admin-Token";

const $ = (id) => document.getElementById(id);

const state = {
  tasks: [],
  selected: null,
  // The last text drawn per part (tasks, a task's card, rounds, refusals...).
  drawn: new Map(),
  rounds: null,
  privacy: null,
  lastOk: null,
  timer: null,
  polling: false,
  again: false,
  // Why the device list is not polled: "missing" (no endpoint), "refused" (the token), or null.
  devicesStopped: null,
  devicesTask: null,
  // The device whose revoke button waits for its confirming click: {task, id, until}.
  confirming: null,
};

// ---- formatting -----------------------------------------------------------------------------

const integer = new Intl.NumberFormat(undefined, { maximumFractionDigits: 0 });
const significant = new Intl.NumberFormat(undefined, { maximumSignificantDigits: 4 });

function count(n) {
  return n == null ? "–" : integer.format(n);
}

/** A loss, an ε: four significant digits, or scientific when very small or large. */
function num(v) {
  if (v == null || Number.isNaN(v)) return "–";
  if (!Number.isFinite(v)) return v > 0 ? "∞" : "−∞";
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(2);
  return significant.format(v);
}

function pct(v) {
  return v == null ? "–" : `${(v * 100).toFixed(1)} %`;
}

function clock(ms) {
  if (!ms) return "–";
  const d = new Date(ms);
  const today = new Date().toDateString() === d.toDateString();
  return today ? d.toLocaleTimeString() : d.toLocaleString();
}

function duration(ms) {
  if (ms == null || ms < 0) return "–";
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.floor(s % 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

// ---- DOM helpers -----------------------------------------------------------------------------

/** An element with attributes (`class`, `data-*`, anything) and children (nodes or text). */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  el.append(...children.flat().filter((c) => c != null));
  return el;
}

function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  el.append(...children.flat().filter((c) => c != null));
  return el;
}

function setAttrs(el, attrs) {
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null || v === false) continue;
    el.setAttribute(k, v === true ? "" : String(v));
  }
}

/** Whether `text` differs from what part `key` last drew; remembers it. */
function changed(key, text) {
  if (state.drawn.get(key) === text) return false;
  state.drawn.set(key, text);
  return true;
}

// ---- the API ---------------------------------------------------------------------------------

/** A request; network failures throw, HTTP errors come back with their parsed error. */
async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, { cache: "no-store", ...options });
  } catch (e) {
    throw new Unreachable(e);
  }
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  return { ok: response.ok, status: response.status, text, body };
}

/** The `{error: {code, message}}` of a failed answer, or one made up from its status. */
function errorOf(r) {
  const e = r.body && r.body.error;
  if (e && e.code) return { code: String(e.code), message: String(e.message || "") };
  return { code: `http_${r.status}`, message: (r.text || "").slice(0, 200) || `HTTP ${r.status}` };
}

class ServerError extends Error {
  constructor(what, error) {
    super(`${what}: ${error.code}: ${error.message}`);
  }
}

/** A request that got no answer at all (the server is down, or the network). */
class Unreachable extends Error {
  constructor(cause) {
    super(`the server does not answer (${cause && cause.message ? cause.message : cause})`);
  }
}

const taskPath = (name) => `/v1/tasks/${encodeURIComponent(name)}`;
const adminPath = (name) => `/v1/admin/tasks/${encodeURIComponent(name)}`;

// ---- polling ---------------------------------------------------------------------------------

async function poll() {
  if (state.polling) {
    state.again = true;
    return;
  }
  state.polling = true;
  clearTimeout(state.timer);
  try {
    // A hidden tab reads nothing; it polls again as soon as it is shown.
    if (document.visibilityState === "hidden") return;
    const tasks = await api("/v1/tasks");
    if (!tasks.ok) throw new ServerError("GET /v1/tasks", errorOf(tasks));
    state.tasks = tasks.body;
    drawTasks(tasks.text);
    const task = selectedTask();
    const [rounds, metrics, privacy] = await Promise.all([
      task ? api(`${taskPath(task.name)}/rounds`) : null,
      api("/metrics"),
      task && task.privacy ? api(`${taskPath(task.name)}/privacy`) : null,
    ]);
    if (rounds) {
      if (!rounds.ok) throw new ServerError("the round history", errorOf(rounds));
      state.rounds = rounds.body;
      if (changed("rounds", `${task.name}\n${rounds.text}`)) drawHistory();
    }
    if (metrics.ok) drawRefusals(metrics.text);
    drawPrivacy(task, privacy && privacy.ok ? privacy : null);
    await pollDevices(task);
    connected();
  } catch (e) {
    disconnected(e);
  } finally {
    state.polling = false;
    if (state.again) {
      state.again = false;
      state.timer = setTimeout(poll, 0);
    } else {
      state.timer = setTimeout(poll, POLL_MS);
    }
  }
}

function connected() {
  state.lastOk = Date.now();
  const conn = $("conn");
  conn.textContent = "live";
  conn.className = "pill ok";
  conn.dataset.state = "ok";
  const t = $("updated");
  t.textContent = new Date(state.lastOk).toLocaleTimeString();
  t.dateTime = new Date(state.lastOk).toISOString();
  $("banner").hidden = true;
  document.body.dataset.ready = "true";
}

function disconnected(e) {
  const conn = $("conn");
  conn.textContent = e instanceof Unreachable ? "unreachable" : "error";
  conn.className = "pill bad";
  conn.dataset.state = "down";
  const banner = $("banner");
  const since = state.lastOk
    ? `The data shown is from ${new Date(state.lastOk).toLocaleTimeString()}.`
    : "Nothing could be read yet.";
  const retry = `Retrying every ${POLL_MS / 1000} s.`;
  if (e instanceof ServerError || e instanceof Unreachable) {
    banner.textContent = `Cannot read the server: ${e.message}. ${since} ${retry}`;
  } else {
    console.error(e);
    banner.textContent = `The dashboard could not show the server's answer (${e && e.message ? e.message : e}). ${since} ${retry}`;
  }
  banner.hidden = false;
}

// ---- tasks -----------------------------------------------------------------------------------

function selectedTask() {
  return state.tasks.find((t) => t.name === state.selected) || state.tasks[0] || null;
}

function drawTasks(text) {
  const box = $("tasks");
  if (!state.tasks.find((t) => t.name === state.selected)) {
    const fromHash = new URLSearchParams(location.hash.slice(1)).get("task");
    const pick = state.tasks.find((t) => t.name === fromHash) || state.tasks[0];
    state.selected = pick ? pick.name : null;
  }
  if (changed("tasks-list", state.tasks.map((t) => t.name).join("\n"))) {
    box.replaceChildren();
    if (state.tasks.length === 0) box.append(h("p", { class: "muted" }, "This server hosts no task."));
    const select = $("task-select");
    select.replaceChildren(...state.tasks.map((t) => h("option", { value: t.name }, t.name)));
    $("task-picker").hidden = state.tasks.length < 2;
    for (const t of state.tasks) state.drawn.delete(`task:${t.name}`);
  }
  $("task-select").value = state.selected || "";
  if (!changed("tasks", text)) {
    tickDeadlines();
    return;
  }
  for (const t of state.tasks) {
    const key = `task:${t.name}`;
    const json = JSON.stringify(t);
    let card = box.querySelector(`[data-task="${CSS.escape(t.name)}"]`);
    if (card && !changed(key, json)) continue;
    state.drawn.set(key, json);
    const fresh = taskCard(t);
    if (card) card.replaceWith(fresh);
    else box.append(fresh);
  }
  tickDeadlines();
  drawSelection();
}

function modelText(t) {
  const spec = t.spec || {};
  return String(spec.name || "custom");
}

function inputsText(t) {
  const spec = t.spec || {};
  return Array.isArray(spec.input_shape) ? spec.input_shape.join("×") : count(spec.inputs);
}

function taskCard(t) {
  const id = `task-${t.name.replace(/[^A-Za-z0-9_-]/g, "_")}`;
  const status = String(t.status || "unknown");
  const facts = [
    ["Model", modelText(t)],
    ["Inputs", inputsText(t)],
    ["Parameters", count(t.parameter_count)],
    ["Mode", t.mode === "buffered" && t.buffered ? `buffered (${t.buffered.buffer} per step)` : String(t.mode)],
    ["Version", count(t.version)],
  ];
  return h(
    "article",
    { class: "card task", "data-task": t.name, "data-status": status, "data-version": t.version, "aria-labelledby": `${id}-title` },
    h("div", { class: "task-head" },
      h("h3", { id: `${id}-title` }, t.name),
      h("span", { class: `pill status status-${status}` }, status)),
    h("div", { class: "task-body" },
      h("dl", { class: "facts" }, facts.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v)))),
      h("div", { class: "task-now" },
        openRound(t),
        t.privacy ? privacyMeter(t) : null,
        t.stopped_reason ? h("p", { class: "note" }, `Stopped: ${t.stopped_reason}`) : null)),
    state.tasks.length > 1
      ? h("button", { type: "button", class: "secondary show-rounds", "data-show": t.name }, "Show its rounds")
      : null,
  );
}

function openRound(t) {
  const r = t.round;
  if (!r) return h("p", { class: "muted" }, "No round is open.");
  const buffered = t.mode === "buffered";
  const label = buffered ? `Buffer ${r.round}` : `Round ${r.round}`;
  const kind = r.kind === "evaluation" ? "evaluation" : "training";
  const goal = Math.max(1, r.goal || 0);
  const what = kind === "evaluation" ? "reports" : "updates";
  return h("div", { class: "round", "data-round": r.round, "data-kind": kind },
    h("p", { class: "round-line" },
      h("strong", {}, label), ` · ${kind} · `,
      h("span", { class: "round-count" }, `${count(r.updates)} of ${count(r.goal)} ${what}`)),
    h("progress", {
      class: "round-progress",
      max: goal,
      value: Math.min(r.updates || 0, goal),
      "data-updates": r.updates,
      "data-goal": r.goal,
      "aria-label": `${label}: ${r.updates} of ${r.goal} ${what}`,
    }),
    h("p", { class: "round-more muted" },
      buffered
        ? `${count(r.assigned)} devices training`
        : `${count(r.assigned)} assigned, at least ${count(r.min)} needed`,
      r.deadline_ms ? h("span", { class: "deadline", "data-deadline-ms": r.deadline_ms }, "") : null),
  );
}

function privacyMeter(t) {
  const budget = t.privacy.budget || {};
  const spent = t.privacy.epsilon_spent || 0;
  return h("div", { class: "privacy-line" },
    h("label", {},
      `ε spent ${num(spent)} of ${num(budget.epsilon)} (δ ${num(budget.delta)})`,
      h("meter", { min: 0, max: budget.epsilon || 1, value: spent, optimum: 0, high: (budget.epsilon || 1) * 0.8, "data-epsilon": spent })));
}

/** The open rounds' deadlines, counted down against this browser's clock. */
function tickDeadlines() {
  for (const el of document.querySelectorAll(".deadline[data-deadline-ms]")) {
    const left = Number(el.dataset.deadlineMs) - Date.now();
    el.textContent = left > 0 ? `; closes in ${duration(left)}` : "; closing";
  }
}

function select(name) {
  if (!name || name === state.selected) return;
  state.selected = name;
  history.replaceState(null, "", `#task=${encodeURIComponent(name)}`);
  state.rounds = null;
  state.devicesStopped = null;
  drawSelection();
  poll();
}

function drawSelection() {
  const t = selectedTask();
  $("history-task").textContent = t ? t.name : "–";
  $("admin-task").textContent = t ? t.name : "–";
  $("task-select").value = t ? t.name : "";
  for (const card of document.querySelectorAll(".task")) {
    card.classList.toggle("selected", state.tasks.length > 1 && t && card.dataset.task === t.name);
  }
  const status = t ? t.status : null;
  $("pause").disabled = !t || status !== "training";
  $("resume").disabled = !t || status !== "paused";
}

// ---- round history ---------------------------------------------------------------------------

function drawHistory() {
  const body = state.rounds;
  const records = (body && body.rounds) || [];
  $("history-empty").hidden = records.length > 0;
  $("charts").hidden = records.length === 0;
  drawCharts();
  const rows = records.slice(-RECENT_ROUNDS).reverse().map((r) => {
    const status = String(r.status);
    const note = r.reason ? h("span", { class: "reason" }, ` (${r.reason})`) : null;
    return h("tr", { "data-round": r.round, "data-status": status },
      h("td", {}, String(r.round)),
      h("td", {}, r.kind),
      h("td", {}, h("span", { class: `pill status-${status}` }, status), note),
      h("td", {}, r.version == null ? "–" : String(r.version)),
      h("td", { class: "num" }, count(r.participants)),
      h("td", { class: "num" }, count(r.examples)),
      h("td", { class: "num" }, num(r.mean_loss)),
      h("td", { class: "num" }, pct(r.mean_accuracy)),
      h("td", {}, clock(r.ended_at_ms)),
      h("td", { class: "num" }, duration(r.ended_at_ms - r.started_at_ms)));
  });
  $("rounds-body").replaceChildren(...rows);
  if (rows.length === 0) {
    $("rounds-body").append(h("tr", {}, h("td", { colspan: 10, class: "muted" }, "None yet.")));
  }
}

function drawCharts() {
  const records = (state.rounds && state.rounds.rounds) || [];
  if (records.length === 0) return;
  const trained = records.filter((r) => r.kind === "training" && r.status === "committed");
  const evaluated = records.filter((r) => r.status === "evaluated");
  const series = (field) => [
    { key: "training", label: "training", points: points(trained, field) },
    { key: "evaluation", label: "evaluation", points: points(evaluated, field) },
  ];
  const loss = series("mean_loss");
  const anyLoss = loss.some((x) => x.points.length > 0);
  $("loss-none").hidden = anyLoss || records.length === 0;
  $("loss-chart").hidden = !anyLoss && records.length > 0;
  lineChart($("loss-chart"), {
    id: "loss",
    title: "Mean loss per round",
    what: "mean loss",
    series: loss,
    format: num,
  });
  const accuracy = series("mean_accuracy");
  const anyAccuracy = accuracy.some((x) => x.points.length > 0);
  $("accuracy-none").hidden = anyAccuracy || records.length === 0;
  $("accuracy-chart").hidden = !anyAccuracy;
  if (anyAccuracy) {
    lineChart($("accuracy-chart"), {
      id: "accuracy",
      title: "Mean accuracy per round",
      what: "mean accuracy",
      series: accuracy,
      format: pct,
      clamp: [0, 1],
    });
  }
  barChart($("participants-chart"), {
    id: "participants",
    title: "Participants per round",
    what: "participants",
    series: [
      { key: "training", label: "committed", points: points(trained, "participants") },
      { key: "evaluation", label: "evaluated", points: points(evaluated, "participants") },
      { key: "abandoned", label: "abandoned", points: points(records.filter((r) => r.status === "abandoned"), "participants") },
    ],
    format: count,
    integer: true,
  });
}

function points(records, field) {
  return records.filter((r) => r[field] != null).map((r) => ({ x: r.round, y: r[field] }));
}

// ---- charts ----------------------------------------------------------------------------------

/** About `n` round tick values covering [lo, hi]. */
function ticks(lo, hi, n) {
  const span = hi - lo || Math.abs(hi) || 1;
  const raw = span / n;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((f) => f * mag).find((s) => span / s <= n) || 10 * mag;
  const first = Math.floor(lo / step) * step;
  const out = [];
  for (let v = first; v <= hi + step * 1e-9; v += step) out.push(Number(v.toPrecision(12)));
  if (out[out.length - 1] < hi) out.push(Number((out[out.length - 1] + step).toPrecision(12)));
  return out;
}

/** The frame shared by the charts: size, scales and axes, from the points of every series. */
function frame(host, spec, { bars = false } = {}) {
  const width = Math.max(240, Math.floor(host.clientWidth || host.parentElement.clientWidth || 480));
  const height = width < 520 ? 170 : 210;
  const m = { top: 10, right: 14, bottom: 32, left: 52 };
  const all = spec.series.flatMap((x) => x.points);
  const xs = all.map((p) => p.x);
  let x0 = xs.length ? Math.min(...xs) : 0;
  let x1 = xs.length ? Math.max(...xs) : 1;
  if (bars) {
    x0 -= 0.5;
    x1 += 0.5;
  } else if (x0 === x1) {
    x0 -= 1;
    x1 += 1;
  }
  const ys = all.map((p) => p.y).filter(Number.isFinite);
  let [y0, y1] = spec.domain || [ys.length ? Math.min(...ys) : 0, ys.length ? Math.max(...ys) : 1];
  if (bars) y0 = 0;
  if (!spec.domain) {
    const pad = (y1 - y0) * 0.08 || Math.abs(y1) * 0.1 || 0.05;
    if (!bars) y0 -= pad;
    y1 += pad;
  }
  const [lo, hi] = spec.clamp || [-Infinity, Infinity];
  const clamp = (v) => Math.min(hi, Math.max(lo, v));
  [y0, y1] = [clamp(y0), clamp(y1)];
  const yTicks = ticks(y0, y1, height < 200 ? 3 : 4).filter((v) => !spec.integer || Number.isInteger(v));
  if (!spec.domain) {
    y0 = clamp(Math.min(y0, yTicks[0]));
    y1 = clamp(Math.max(y1, yTicks[yTicks.length - 1]));
  }
  const pw = width - m.left - m.right;
  const ph = height - m.top - m.bottom;
  const sx = (x) => m.left + ((x - x0) / (x1 - x0)) * pw;
  const sy = (y) => m.top + ph - ((y - y0) / (y1 - y0 || 1)) * ph;
  const xTicks = ticks(Math.ceil(x0), Math.floor(x1), Math.max(2, Math.floor(pw / 50)))
    .filter((v) => Number.isInteger(v) && v >= x0 && v <= x1);

  const counts = Object.fromEntries(spec.series.map((x) => [`data-points-${x.key}`, x.points.length]));
  const desc = describe(spec);
  const svg = s("svg", {
    class: "plot",
    id: `${spec.id}-svg`,
    width,
    height,
    viewBox: `0 0 ${width} ${height}`,
    role: "img",
    "aria-labelledby": `${spec.id}-title ${spec.id}-desc`,
    "data-points": all.length,
    ...counts,
  },
  s("title", { id: `${spec.id}-title` }, spec.title),
  s("desc", { id: `${spec.id}-desc` }, desc));
  const axes = s("g", { class: "axes", "aria-hidden": "true" });
  for (const v of yTicks.filter((v) => v >= y0 - 1e-12 && v <= y1 + 1e-12)) {
    axes.append(
      s("line", { class: "grid", x1: m.left, x2: width - m.right, y1: sy(v), y2: sy(v) }),
      s("text", { class: "tick", x: m.left - 6, y: sy(v), "text-anchor": "end", "dominant-baseline": "middle" }, spec.format(v)));
  }
  for (const v of xTicks) {
    axes.append(
      s("line", { class: "axis", x1: sx(v), x2: sx(v), y1: m.top + ph, y2: m.top + ph + 4 }),
      s("text", { class: "tick", x: sx(v), y: m.top + ph + 16, "text-anchor": "middle" }, String(v)));
  }
  axes.append(
    s("line", { class: "axis", x1: m.left, x2: width - m.right, y1: m.top + ph, y2: m.top + ph }),
    s("text", { class: "label", x: width - m.right, y: height - 2, "text-anchor": "end" }, "round"));
  svg.append(axes);
  return { svg, sx, sy, y0, pw, x0, x1 };
}

/** The chart in words, for screen readers. */
function describe(spec) {
  const parts = spec.series.map((x) => {
    const p = x.points;
    if (p.length === 0) return `no ${x.label} rounds`;
    const first = p[0];
    const last = p[p.length - 1];
    return p.length === 1
      ? `1 ${x.label} round: round ${first.x}, ${spec.format(first.y)}`
      : `${p.length} ${x.label} rounds, from ${spec.format(first.y)} at round ${first.x} to ${spec.format(last.y)} at round ${last.x}`;
  });
  return `${spec.what}: ${parts.join("; ")}.`;
}

function lineChart(host, spec) {
  const { svg, sx, sy, pw, x0, x1 } = frame(host, spec);
  const density = spec.series.reduce((n, x) => n + x.points.length, 0) / Math.max(1, pw);
  const r = density > 0.25 ? 2 : density > 0.1 ? 3 : 4;
  for (const series of spec.series) {
    if (series.points.length === 0) continue;
    const g = s("g", { class: `series s-${series.key}`, "data-series": series.key, "data-points": series.points.length });
    if (series.points.length > 1) {
      g.append(s("polyline", {
        class: "line",
        points: series.points.map((p) => `${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join(" "),
      }));
    }
    for (const p of series.points) {
      g.append(s("circle", {
        class: "point",
        cx: sx(p.x).toFixed(1),
        cy: sy(p.y).toFixed(1),
        r,
        "data-series": series.key,
        "data-round": p.x,
        "data-value": p.y,
      }, s("title", {}, `Round ${p.x} (${series.label}): ${spec.format(p.y)}`)));
    }
    svg.append(g);
  }
  host.dataset.range = `${x0}-${x1}`;
  host.replaceChildren(svg);
}

function barChart(host, spec) {
  const { svg, sx, sy, pw, x0, x1 } = frame(host, spec, { bars: true });
  const slot = pw / Math.max(1, x1 - x0);
  const w = Math.max(1, Math.min(18, slot * 0.7));
  for (const series of spec.series) {
    if (series.points.length === 0) continue;
    const g = s("g", { class: `series s-${series.key}`, "data-series": series.key, "data-points": series.points.length });
    for (const p of series.points) {
      const top = sy(p.y);
      g.append(s("rect", {
        class: "bar",
        x: (sx(p.x) - w / 2).toFixed(1),
        y: top.toFixed(1),
        width: w.toFixed(1),
        height: Math.max(0, sy(0) - top).toFixed(1),
        "data-series": series.key,
        "data-round": p.x,
        "data-value": p.y,
      }, s("title", {}, `Round ${p.x} (${series.label}): ${spec.format(p.y)}`)));
    }
    svg.append(g);
  }
  host.replaceChildren(svg);
}

// ---- privacy ---------------------------------------------------------------------------------

function drawPrivacy(task, answer) {
  const card = $("privacy-card");
  if (!task || !task.privacy) {
    card.hidden = true;
    return;
  }
  card.hidden = false;
  if (!answer || !changed("privacy", `${task.name}\n${answer.text}`)) return;
  const p = answer.body;
  state.privacy = p;
  const budget = p.budget || {};
  const spent = p.epsilon_spent || 0;
  const facts = [
    ["ε spent", `${num(spent)} of ${num(budget.epsilon)}`],
    ["δ", num(budget.delta)],
    ["Mechanism", String(p.mechanism)],
    ["Clip", num(p.clip)],
    ["Noise multiplier", num(p.noise_multiplier)],
    ["Sampling rate", num(p.sampling_rate)],
  ];
  $("privacy-body").replaceChildren(
    h("dl", { class: "facts" }, facts.map(([k, v]) => h("div", {}, h("dt", {}, k), h("dd", {}, v)))),
    h("label", { class: "meter-line" }, `Budget used: ${pct(budget.epsilon ? spent / budget.epsilon : 0)}`,
      h("meter", { id: "privacy-spent", min: 0, max: budget.epsilon || 1, value: spent, optimum: 0, high: (budget.epsilon || 1) * 0.8, "data-epsilon": spent })),
    ...(p.status === "stopped"
      ? [h("p", { class: "note" }, `Training stopped: ${p.stopped_reason || "the budget is spent"}.`)]
      : []),
    h("p", { class: "muted chart-caption" }, "ε spent after each committed round, against the budget:"),
  );
  const ledger = (p.ledger || []).map((e) => ({ x: e.round, y: e.epsilon }));
  lineChart($("epsilon-chart"), {
    id: "epsilon",
    title: "ε spent after each committed round",
    what: "ε spent",
    series: [{ key: "training", label: "committed", points: ledger }],
    format: num,
    domain: [0, Math.max(budget.epsilon || 0, ...ledger.map((e) => e.y), 1e-9)],
  });
}

// ---- refused updates -------------------------------------------------------------------------

/** `starling_updates_total{outcome="..."} n` lines, and the rounds counters, of /metrics. */
function parseMetrics(text) {
  const updates = new Map();
  const rounds = new Map();
  for (const line of text.split("\n")) {
    const m = /^(starling_updates_total|starling_rounds_total)\{outcome="([^"]*)"\}\s+(\S+)/.exec(line);
    if (!m) continue;
    (m[1] === "starling_updates_total" ? updates : rounds).set(m[2], Number(m[3]));
  }
  return { updates, rounds };
}

function drawRefusals(text) {
  const { updates, rounds } = parseMetrics(text);
  const key = JSON.stringify([[...updates], [...rounds]]);
  if (!changed("refusals", key)) return;
  const refused = [...updates]
    .filter(([code]) => code !== "accepted" && code !== "client_disconnected")
    .filter(([, n]) => n > 0)
    .sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
  const total = refused.reduce((n, [, c]) => n + c, 0);
  $("update-totals").textContent =
    `Since the server started: ${count(updates.get("accepted") || 0)} updates accepted, ` +
    `${count(total)} refused, ${count(updates.get("client_disconnected") || 0)} cut off by their client; ` +
    `${count(rounds.get("committed") || 0)} rounds committed, ${count(rounds.get("abandoned") || 0)} abandoned (all tasks).`;
  const box = $("refusals");
  if (refused.length === 0) {
    box.replaceChildren(h("p", { class: "muted", id: "no-refusals" }, "No update has been refused."));
    return;
  }
  const most = refused[0][1];
  const table = h("table", { class: "data refusals", id: "refusals-table" },
    h("caption", { class: "visually-hidden" }, "Refused updates by error code"),
    h("thead", {}, h("tr", {},
      h("th", { scope: "col" }, "Code"),
      h("th", { scope: "col", class: "num" }, "Refused"),
      h("th", { scope: "col", class: "bar-col" }, h("span", { class: "visually-hidden" }, "Share")))),
    h("tbody", {}, refused.map(([code, n]) => h("tr", { "data-code": code, "data-count": n },
      h("th", { scope: "row" }, h("code", {}, code)),
      h("td", { class: "num" }, count(n)),
      h("td", { class: "bar-col" },
        s("svg", { class: "hbar", viewBox: "0 0 100 10", preserveAspectRatio: "none", "aria-hidden": "true" },
          s("rect", { x: 0, y: 0, width: Math.max(1, (100 * n) / most).toFixed(1), height: 10 })))))));
  box.replaceChildren(table);
}

// ---- admin -----------------------------------------------------------------------------------

function token() {
  return sessionStorage.getItem(TOKEN_KEY) || "";
}

function drawTokenState() {
  $("token-state").textContent = token()
    ? "A token is set for this tab (kept in session storage, never in the address)."
    : "No token set: the admin actions need the server's admin_token.";
}

/** Shows an admin action's outcome: `ok` text, or an error's code and message. */
function result(outcome) {
  const el = $("admin-result");
  delete el.dataset.code;
  delete el.dataset.ok;
  delete el.dataset.version;
  if (outcome.version != null) el.dataset.version = outcome.version;
  if (outcome.error) {
    el.className = "result err";
    el.dataset.code = outcome.error.code;
    el.replaceChildren(h("code", {}, outcome.error.code), `: ${outcome.error.message}`);
  } else {
    el.className = "result ok";
    el.dataset.ok = "true";
    el.textContent = outcome.ok;
  }
}

/** An admin request with the token; network failures become an error outcome. */
async function admin(path, body) {
  if (!token()) return { error: { code: "no_token", message: "enter the admin token first" } };
  const headers = { [ADMIN_HEADER]: token() };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  try {
    const r = await api(path, { method: "POST", headers, body: body === undefined ? undefined : JSON.stringify(body) });
    return r.ok ? { answer: r.body } : { error: errorOf(r), status: r.status };
  } catch (e) {
    return { error: { code: "unreachable", message: e.message } };
  }
}

async function rollback(event) {
  event.preventDefault();
  const t = selectedTask();
  const version = Number($("rollback-version").value);
  if (!t || !Number.isInteger(version) || version < 0) {
    result({ error: { code: "bad_request", message: "enter a version number" } });
    return;
  }
  $("rollback").disabled = true;
  const r = await admin(`${adminPath(t.name)}/rollback`, { version });
  $("rollback").disabled = false;
  if (r.error) {
    result(r);
  } else {
    result({
      ok: `${t.name}: version ${r.answer.restored} restored as version ${r.answer.version}.`,
      version: r.answer.version,
    });
    poll();
  }
}

async function pauseOrResume(action) {
  const t = selectedTask();
  if (!t) return;
  const r = await admin(`${adminPath(t.name)}/${action}`);
  if (r.error) {
    result(r);
    return;
  }
  result({ ok: `${t.name}: ${action === "pause" ? "paused" : "resumed"}; status ${r.answer && r.answer.status}.` });
  poll();
}

async function pollDevices(task) {
  const box = $("devices");
  if (!task || !token()) {
    if (changed("devices", "none")) box.replaceChildren(h("p", { class: "muted" }, "Enter the admin token to list the task's devices."));
    return;
  }
  if (state.devicesTask !== task.name) {
    state.devicesTask = task.name;
    state.devicesStopped = null;
  }
  if (state.devicesStopped) return;
  let r;
  try {
    r = await api(`${adminPath(task.name)}/devices`, { headers: { [ADMIN_HEADER]: token() } });
  } catch {
    return; // the poll's own requests report an unreachable server
  }
  if (r.ok) {
    if (changed("devices", `${task.name}\n${r.text}`)) {
      drawDevices(task.name, (r.body && r.body.devices) || [], r.body && r.body.admission);
    }
    return;
  }
  const error = errorOf(r);
  if (r.status === 404 && error.code !== "unknown_task") {
    state.devicesStopped = "missing";
    state.drawn.set("devices", "missing");
    box.replaceChildren(h("p", { class: "muted", id: "devices-unavailable" }, "The device list is not available on this server."));
    return;
  }
  state.devicesStopped = "refused";
  state.drawn.set("devices", "refused");
  box.replaceChildren(h("p", { class: "result err", "data-code": error.code }, h("code", {}, error.code), `: ${error.message}`));
}

function drawDevices(task, devices, admission) {
  const box = $("devices");
  if (admission === "open") {
    box.replaceChildren(h("p", { class: "muted", id: "devices-open" },
      "This task is open to any device, so it has no enrolled devices to list."));
    return;
  }
  if (devices.length === 0) {
    box.replaceChildren(h("p", { class: "muted", id: "devices-empty" }, "No device has enrolled in this task."));
    return;
  }
  const table = h("table", { class: "data", id: "devices-table" },
    h("thead", {}, h("tr", {},
      ["Device", "Label", "Enrolled", "Last seen", "Check-ins", "Status", "Action"]
        .map((c, i) => h("th", { scope: "col", class: i === 4 ? "num" : null }, c)))),
    h("tbody", {}, devices.map((d) => {
      const revoked = d.revoked_at_ms != null;
      const confirming = isConfirming(task, d.id);
      const button = h("button", {
        type: "button",
        class: "danger",
        "data-revoke": d.id,
        "data-confirm": confirming,
        disabled: revoked,
        "aria-label": `${confirming ? "Confirm: revoke" : "Revoke"} device ${d.label || d.id}`,
      }, confirming ? "Confirm revoke" : "Revoke");
      button.addEventListener("click", () => revoke(task, d.id));
      return h("tr", { "data-device": d.id, "data-revoked": revoked },
        h("td", {}, h("code", { class: "id" }, d.id)),
        h("td", {}, d.label || "–"),
        h("td", {}, clock(d.enrolled_at_ms)),
        h("td", {}, d.last_seen_ms == null ? "never" : clock(d.last_seen_ms)),
        h("td", { class: "num" }, count(d.check_ins)),
        h("td", {}, revoked ? `revoked ${clock(d.revoked_at_ms)}` : "active"),
        h("td", {}, button));
    })));
  box.replaceChildren(h("div", { class: "table-wrap" }, table));
}

/** Whether the revoke button of `id` waits for its confirming click. */
function isConfirming(task, id) {
  const c = state.confirming;
  return Boolean(c && c.task === task && c.id === id && c.until > Date.now());
}

/** Revokes after a second click on the same device's button within five seconds (the list
 * may be redrawn in between; the button keeps its state). */
async function revoke(task, id) {
  const button = () => document.querySelector(`#devices-table button[data-revoke="${CSS.escape(id)}"]`);
  if (!isConfirming(task, id)) {
    state.confirming = { task, id, until: Date.now() + 5000 };
    const b = button();
    if (b) {
      b.textContent = "Confirm revoke";
      b.dataset.confirm = "";
    }
    setTimeout(() => {
      if (isConfirming(task, id)) return;
      const b = button();
      if (b && b.textContent === "Confirm revoke") {
        b.textContent = "Revoke";
        delete b.dataset.confirm;
      }
    }, 5100);
    return;
  }
  state.confirming = null;
  const b = button();
  if (b) b.disabled = true;
  const r = await admin(`${adminPath(task)}/devices/${encodeURIComponent(id)}/revoke`);
  if (r.error) {
    const again = button();
    if (again) {
      again.disabled = false;
      again.textContent = "Revoke";
      delete again.dataset.confirm;
    }
    result(r);
    return;
  }
  result({ ok: `${task}: device ${id} revoked.` });
  state.drawn.delete("devices");
  poll();
}

// ---- start -----------------------------------------------------------------------------------

function start() {
  $("poll-secs").textContent = String(POLL_MS / 1000);
  drawTokenState();
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const value = $("token").value.trim();
    if (!value) {
      result({ error: { code: "no_token", message: "type the token first (Forget clears it)" } });
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, value);
    $("token").value = "";
    state.devicesStopped = null;
    state.drawn.delete("devices");
    drawTokenState();
    result({ ok: "Token set." });
    poll();
  });
  $("forget-token").addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN_KEY);
    $("token").value = "";
    state.drawn.delete("devices");
    drawTokenState();
    result({ ok: "Token forgotten." });
    poll();
  });
  $("rollback-form").addEventListener("submit", rollback);
  $("pause").addEventListener("click", () => pauseOrResume("pause"));
  $("resume").addEventListener("click", () => pauseOrResume("resume"));
  $("task-select").addEventListener("change", (e) => select(e.target.value));
  $("tasks").addEventListener("click", (e) => {
    const b = e.target.closest("[data-show]");
    if (b) {
      select(b.dataset.show);
      $("history").scrollIntoView({ behavior: "smooth", block: "start" });
    }
  });
  // Redraw the charts at the new width (they are drawn at their size, so text stays legible).
  let width = 0;
  new ResizeObserver(() => {
    const w = $("loss-chart").clientWidth;
    if (w !== width && state.rounds) {
      width = w;
      requestAnimationFrame(drawCharts);
    }
  }).observe($("loss-chart"));
  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") poll();
  });
  poll();
}

start();

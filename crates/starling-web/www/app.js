// Starling's device app: shows the task and its global model, takes the person's data
// points (typed, pasted or loaded from a file on the device), trains on them here in
// WebAssembly built from starling-core, and contributes the update to the round. The data
// points never leave this page; only the encoded update is uploaded (in a secure round only
// masked, through secure.js and its own module, loaded for secure rounds only).
import init, { WebModel } from "./starling_web.js";
import { runJob } from "./job.js";

const $ = (id) => document.getElementById(id);

const state = {
  tasks: [],
  task: null, // name
  info: null, // GET /v1/tasks/{task}
  model: null, // WebModel of the current version
  modelBytes: null, // its checkpoint, for the worker
  busy: false,
  waiting: null, // {round, baseVersion} after an accepted update
  lastTrained: null, // parameters trained here (trial run)
  online: null,
  assignment: null, // the open round's assignment, kept until its update is accepted
};

// A random id this browser keeps: the server gives one device at most one assignment per
// round, so pressing Contribute twice does not count the same data twice.
function deviceId() {
  let id = null;
  try {
    id = localStorage.getItem("starling-device");
  } catch (_) {}
  if (!id) {
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    id = "web-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
    try {
      localStorage.setItem("starling-device", id);
    } catch (_) {}
  }
  return id;
}

// ---- enrollment -------------------------------------------------------------------------

// An enrolled task admits devices with a credential only. The operator hands out a link to
// this page ending in `#enroll=<secret>` (the fragment never reaches any server's logs);
// the page presents the secret once, keeps the credential it gets in this browser's storage,
// and forgets the secret.
const credentialKey = (task) => `starling-credential:${task}`;

function credential(task) {
  try {
    return localStorage.getItem(credentialKey(task));
  } catch (_) {
    return null;
  }
}

// The Authorization header of `task`'s requests, when this browser holds a credential.
function authHeaders(task) {
  const c = credential(task);
  return c ? { authorization: `Bearer ${c}` } : {};
}

function enrollmentSecret() {
  const hash = new URLSearchParams(location.hash.replace(/^#/, ""));
  return hash.get("enroll");
}

// Enrolls in the current task when the page was opened with an enrollment link and holds no
// credential for the task yet; removes the secret from the address bar either way.
async function enrollFromLink() {
  const secret = enrollmentSecret();
  if (!secret) return;
  history.replaceState(null, "", location.pathname + location.search);
  if (credential(state.task)) {
    $("enrollment").textContent = `This browser is already enrolled in ${state.task}.`;
    return;
  }
  const answer = await (
    await api(`/v1/tasks/${encodeURIComponent(state.task)}/enroll`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ secret, label: "browser" }),
    })
  ).json();
  try {
    localStorage.setItem(credentialKey(state.task), answer.credential);
  } catch (_) {
    throw new Error("this browser does not let the page keep its credential (storage is off)");
  }
  document.body.dataset.enrolled = answer.device;
  showEnrollment();
}

function showEnrollment() {
  const el = $("enrollment");
  if (!state.info || state.info.admission !== "enrolled") {
    el.hidden = true;
    return;
  }
  el.hidden = false;
  el.textContent = credential(state.task)
    ? `This browser is enrolled in ${state.task}: it contributes with its own credential.`
    : `${state.task} takes enrolled devices only: open the enrollment link its operator ` +
      "gave you.";
}

// ---- talking to the server ------------------------------------------------------------

class Unreachable extends Error {}

class Refused extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path, options = {}) {
  let resp;
  try {
    resp = await fetch(path, { cache: "no-store", ...options });
  } catch (e) {
    setOnline(false);
    throw new Unreachable("cannot reach the server");
  }
  if (!resp.ok) {
    let code = `http_${resp.status}`;
    let message = resp.statusText || `HTTP ${resp.status}`;
    try {
      const body = await resp.json();
      code = body.error.code;
      message = body.error.message;
    } catch (_) {
      if (resp.status >= 500) {
        setOnline(false);
        throw new Unreachable(`the server answered ${resp.status}`);
      }
    }
    setOnline(true);
    throw new Refused(resp.status, code, message);
  }
  setOnline(true);
  return resp;
}

function setOnline(online) {
  if (state.online === online) return;
  state.online = online;
  const pill = $("conn");
  pill.textContent = online ? "online" : "server unreachable";
  pill.className = online ? "pill ok" : "pill bad";
  if (online) {
    hideBanner("offline");
  } else {
    showBanner(
      "offline",
      "The server cannot be reached. Check your connection; your data stays here and " +
        "the page retries on its own.",
    );
  }
}

function showBanner(kind, text) {
  const b = $("banner");
  b.dataset.kind = kind;
  b.textContent = text;
  b.hidden = false;
}

function hideBanner(kind) {
  const b = $("banner");
  if (!kind || b.dataset.kind === kind) b.hidden = true;
}

function setStatus(text, kind = "info") {
  const s = $("status");
  s.textContent = text;
  s.className = `status ${kind}`;
}

// ---- training, in a worker when the browser has module workers -------------------------

let worker = null;
let workerFailed = false;
let jobCounter = 0;
const jobs = new Map();

function startWorker() {
  try {
    worker = new Worker(new URL("./worker.js", import.meta.url), { type: "module" });
  } catch (_) {
    workerFailed = true;
    return;
  }
  worker.onmessage = (event) => {
    const msg = event.data;
    const job = jobs.get(msg.id);
    if (!job) return;
    if (msg.type === "progress") {
      job.onProgress(msg.step, msg.total, msg.loss);
    } else if (msg.type === "done") {
      jobs.delete(msg.id);
      job.resolve(msg.result);
    } else if (msg.type === "error") {
      jobs.delete(msg.id);
      job.reject(new Error(msg.message));
    }
  };
  worker.onerror = () => {
    // The worker could not load (old browser): train on the page instead.
    workerFailed = true;
    worker = null;
    for (const [id, job] of jobs) {
      jobs.delete(id);
      runHere(job.job, job.onProgress).then(job.resolve, job.reject);
    }
  };
}

async function runHere(job, onProgress) {
  return runJob(WebModel, job, onProgress);
}

function train(job, onProgress) {
  if (!worker || workerFailed) return runHere(job, onProgress);
  return new Promise((resolve, reject) => {
    const id = ++jobCounter;
    jobs.set(id, { job, onProgress, resolve, reject });
    // A copy of the checkpoint: the page keeps its own.
    worker.postMessage({ id, job: { ...job, checkpoint: job.checkpoint.slice() } });
  });
}

// ---- the task and its model -----------------------------------------------------------

function fmt(v) {
  if (!Number.isFinite(v)) return String(v);
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(3);
  return v.toFixed(4);
}

function isLine(model) {
  if (!model || model.inputs !== 1 || model.targetWidth !== 1) return false;
  const names = model.parameterNames();
  return names.length === 2 && model.parameterShape(0).join("x") === "1x1";
}

async function loadTasks() {
  const tasks = await (await api("/v1/tasks")).json();
  state.tasks = tasks;
  const select = $("task");
  select.replaceChildren(
    ...tasks.map((t) => {
      const o = document.createElement("option");
      o.value = t.name;
      o.textContent = `${t.name} (${t.spec.name})`;
      return o;
    }),
  );
  $("task-picker").hidden = tasks.length < 2;
  const wanted = new URLSearchParams(location.search).get("task");
  const pick = tasks.find((t) => t.name === wanted) || tasks[0];
  if (!pick) throw new Error("the server hosts no task");
  select.value = pick.name;
  await selectTask(pick.name);
}

async function selectTask(name) {
  state.task = name;
  state.model = null;
  state.lastTrained = null;
  state.waiting = null;
  $("task-name").textContent = name;
  await refreshInfo();
  await loadModel();
  buildPointForm();
  checkData();
  showEnrollment();
}

async function refreshInfo() {
  const info = await (await api(`/v1/tasks/${encodeURIComponent(state.task)}`)).json();
  const previous = state.info;
  state.info = info;
  const r = info.round;
  $("round").textContent = `${r.round} · ${r.updates}/${r.goal} updates`;
  $("plan").textContent =
    `Plan: ${info.plan.epochs} epoch(s), batches of ${info.plan.batch_size}, ` +
    `learning rate ${Number(info.plan.learning_rate.toPrecision(6))}` +
    (info.plan.partial_work ? "; stops early to meet a round's deadline." : ".");
  if (previous && previous.version !== info.version) await loadModel();
  if (state.waiting) checkCommitted();
}

async function loadModel() {
  const resp = await api(`/v1/tasks/${encodeURIComponent(state.task)}/model`);
  const bytes = new Uint8Array(await resp.arrayBuffer());
  const model = new WebModel(bytes);
  if (state.model) state.model.free();
  state.model = model;
  state.modelBytes = bytes;
  renderModel();
}

function renderModel() {
  const m = state.model;
  $("version").textContent = String(m.version);
  $("version").dataset.version = String(m.version);
  const table = $("params");
  const rows = m.parameterNames().map((name, i) => {
    const values = Array.from(m.parameterValues(i));
    const shape = Array.from(m.parameterShape(i));
    const tr = document.createElement("tr");
    const th = document.createElement("th");
    th.textContent = name;
    const td = document.createElement("td");
    td.dataset.param = name;
    td.dataset.values = values.length <= 64 ? JSON.stringify(values) : "";
    const shown = values.slice(0, 6).map(fmt).join(", ");
    td.textContent =
      values.length === 1 ? shown : `[${shown}${values.length > 6 ? ", …" : ""}]`;
    const small = document.createElement("small");
    small.textContent = ` ${shape.join("×")}`;
    th.append(small);
    tr.append(th, td);
    return tr;
  });
  table.replaceChildren(...rows);
  const formula = $("formula");
  if (isLine(m)) {
    const w = m.parameterValues(0)[0];
    const b = m.parameterValues(1)[0];
    formula.textContent = `y = ${fmt(w)} · x + ${fmt(b)}`;
    formula.hidden = false;
  } else {
    formula.textContent = `${m.modelName}: ${m.inputs} input(s)`;
    formula.hidden = false;
  }
  drawPlot();
}

// ---- the person's data ----------------------------------------------------------------

function columnNames() {
  const m = state.model;
  if (!m) return [];
  const xs =
    m.inputs === 1 ? ["x"] : Array.from({ length: m.inputs }, (_, i) => `x${i + 1}`);
  const target = state.info && state.info.spec.loss === "softmax_cross_entropy" ? "class" : "y";
  const ys =
    m.targetWidth === 1 ? [target] : Array.from({ length: m.targetWidth }, (_, i) => `y${i + 1}`);
  return xs.concat(ys);
}

function buildPointForm() {
  const names = columnNames();
  const fields = $("point-fields");
  // Point-by-point entry makes sense for a few columns; wider data comes as CSV.
  $("point-form").hidden = names.length > 6;
  fields.replaceChildren(
    ...names.map((name, i) => {
      const label = document.createElement("label");
      label.className = "field";
      label.textContent = name;
      const input = document.createElement("input");
      input.type = "text";
      input.inputMode = "decimal";
      input.id = `col${i}`;
      input.name = name;
      input.placeholder = "0.0";
      input.enterKeyHint = i + 1 < names.length ? "next" : "done";
      label.append(input);
      return label;
    }),
  );
  $("csv").placeholder = `${names.join(",")}\n1.0,3.1\n2.0,4.9`;
}

function addPoint(event) {
  event.preventDefault();
  const inputs = Array.from($("point-fields").querySelectorAll("input"));
  const values = inputs.map((i) => i.value.trim().replace(",", "."));
  const bad = inputs.findIndex((_, i) => values[i] === "" || !Number.isFinite(Number(values[i])));
  if (bad >= 0) {
    setDataStatus(`Enter a number for ${inputs[bad].name}.`, "error");
    inputs[bad].focus();
    return;
  }
  const csv = $("csv");
  const text = csv.value;
  csv.value = text + (text === "" || text.endsWith("\n") ? "" : "\n") + values.join(",") + "\n";
  inputs.forEach((i) => (i.value = ""));
  inputs[0].focus();
  checkData();
}

function setDataStatus(text, kind) {
  const s = $("data-status");
  s.textContent = text;
  s.className = `note ${kind}`;
}

// Parses the data with the core's CSV reader and checks it against the model. Returns the
// parsed points for the plot, or null (with the reason shown) when they cannot be used.
function checkData() {
  if (!state.model) return null;
  let data;
  try {
    data = state.model.checkData($("csv").value);
  } catch (e) {
    setDataStatus(`Your data can't be used yet: ${e.message}.`, "error");
    drawPlot(null);
    return null;
  }
  const points = { n: data.examples, xs: data.features(), ys: data.targets() };
  data.free();
  setDataStatus(
    `${points.n} point${points.n === 1 ? "" : "s"} ready — they stay on this device.`,
    "ok",
  );
  drawPlot(points);
  return points;
}

function loadFile() {
  const file = $("file").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    $("csv").value = String(reader.result);
    checkData();
    $("file").value = "";
  };
  reader.onerror = () => setDataStatus(`Cannot read ${file.name}.`, "error");
  reader.readAsText(file);
}

function examplePoints() {
  // A few noisy points of y = 2x + 1, for trying the app out.
  const rows = [];
  for (let i = 0; i < 8; i++) {
    const x = Math.round((Math.random() * 4 - 2) * 100) / 100;
    const y = Math.round((2 * x + 1 + (Math.random() - 0.5) * 0.4) * 100) / 100;
    rows.push(`${x},${y}`);
  }
  $("csv").value = `x,y\n${rows.join("\n")}\n`;
  checkData();
}

// ---- plot (one input, one target) -----------------------------------------------------

let lastPoints = null;

function drawPlot(points) {
  if (points !== undefined) lastPoints = points;
  const canvas = $("plot");
  const m = state.model;
  if (!m || !isLine(m)) {
    canvas.hidden = true;
    return;
  }
  canvas.hidden = false;
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 300;
  const height = Math.round(width * 0.6);
  canvas.width = width * ratio;
  canvas.height = height * ratio;
  canvas.style.height = `${height}px`;
  const ctx = canvas.getContext("2d");
  ctx.scale(ratio, ratio);
  ctx.clearRect(0, 0, width, height);
  const xs = lastPoints ? Array.from(lastPoints.xs) : [];
  const ys = lastPoints ? Array.from(lastPoints.ys) : [];
  const w = m.parameterValues(0)[0];
  const b = m.parameterValues(1)[0];
  const lines = [{ w, b, color: "#1d4e89", dash: [] }];
  if (state.lastTrained) {
    lines.push({ w: state.lastTrained.W, b: state.lastTrained.b, color: "#d9822b", dash: [6, 4] });
  }
  let x0 = Math.min(-2, ...xs);
  let x1 = Math.max(2, ...xs);
  const lineYs = lines.flatMap((l) => [l.w * x0 + l.b, l.w * x1 + l.b]);
  let y0 = Math.min(...ys, ...lineYs);
  let y1 = Math.max(...ys, ...lineYs);
  if (y1 - y0 < 1e-6) {
    y0 -= 1;
    y1 += 1;
  }
  const pad = 0.08;
  [x0, x1] = [x0 - (x1 - x0) * pad, x1 + (x1 - x0) * pad];
  [y0, y1] = [y0 - (y1 - y0) * pad, y1 + (y1 - y0) * pad];
  const px = (x) => ((x - x0) / (x1 - x0)) * width;
  const py = (y) => height - ((y - y0) / (y1 - y0)) * height;
  ctx.strokeStyle = "#c9d2e0";
  ctx.lineWidth = 1;
  ctx.beginPath();
  ctx.moveTo(px(0), 0);
  ctx.lineTo(px(0), height);
  ctx.moveTo(0, py(0));
  ctx.lineTo(width, py(0));
  ctx.stroke();
  for (const l of lines) {
    ctx.strokeStyle = l.color;
    ctx.setLineDash(l.dash);
    ctx.lineWidth = 2;
    ctx.beginPath();
    ctx.moveTo(px(x0), py(l.w * x0 + l.b));
    ctx.lineTo(px(x1), py(l.w * x1 + l.b));
    ctx.stroke();
  }
  ctx.setLineDash([]);
  ctx.fillStyle = "#2a9d8f";
  xs.forEach((x, i) => {
    ctx.beginPath();
    ctx.arc(px(x), py(ys[i]), 4, 0, Math.PI * 2);
    ctx.fill();
  });
}

// ---- train and contribute -------------------------------------------------------------

function setBusy(busy) {
  state.busy = busy;
  for (const id of ["train", "contribute", "add-point", "clear", "example"]) $(id).disabled = busy;
}

function showTraining(result) {
  $("loss-before").textContent = fmt(result.lossBefore);
  $("loss-after").textContent = fmt(result.lossAfter);
  $("loss-after").dataset.loss = String(result.lossAfter);
}

function progressTo(step, total) {
  $("progress").max = total;
  $("progress").value = step;
}

async function trialRun() {
  if (state.busy || !state.model) return;
  if (!checkData()) {
    setStatus("Add some usable data points first (see the message above).", "error");
    return;
  }
  setBusy(true);
  progressTo(0, 1);
  setStatus("Training on this device…");
  try {
    const result = await train(
      {
        checkpoint: state.modelBytes,
        csv: $("csv").value,
        plan: JSON.stringify(state.info.plan),
      },
      progressTo,
    );
    showTraining(result);
    const p = result.parameters;
    const names = Object.keys(p);
    $("local-params").textContent = names
      .map((n) => `${n} = ${p[n].length === 1 ? fmt(p[n][0]) : `[${p[n].slice(0, 3).map(fmt).join(", ")}…]`}`)
      .join(", ");
    state.lastTrained = isLine(state.model) ? { W: p[names[0]][0], b: p[names[1]][0] } : null;
    drawPlot();
    setStatus(
      `Trained on ${result.examples} point(s) in ${result.steps} step(s). ` +
        "Nothing was sent. Press “Contribute update” to share the update.",
      "ok",
    );
  } catch (e) {
    setStatus(`Training failed: ${e.message}`, "error");
  } finally {
    setBusy(false);
  }
}

async function contribute() {
  if (state.busy || !state.model) return;
  if (!checkData()) {
    setStatus("Add some usable data points first (see the message above).", "error");
    return;
  }
  setBusy(true);
  progressTo(0, 1);
  try {
    const task = encodeURIComponent(state.task);
    let answer = state.assignment;
    if (!answer || answer.task !== state.task || answer.round !== state.info.round.round) {
      setStatus("Asking the server for a place in the round…");
      answer = await (
        await api(`/v1/tasks/${task}/checkin`, {
          method: "POST",
          headers: { "content-type": "application/json", ...authHeaders(state.task) },
          body: JSON.stringify({ device: deviceId() }),
        })
      ).json();
      if (answer.status !== "assigned") {
        const secs = Math.ceil(answer.retry_after_secs || 1);
        setStatus(
          `No place in this round right now (${answer.reason}). Try again in about ${secs} s.`,
          "warn",
        );
        return;
      }
      answer.task = state.task;
      // The deadline counts from now: with partial work, training stops in time to upload.
      answer.checkedInAt = Date.now();
      state.assignment = answer;
    }
    if (state.model.version !== answer.base_version) await loadModel();
    if (state.model.version !== answer.base_version) {
      state.assignment = null;
      setStatus("The model changed while checking in. Press Contribute again.", "warn");
      return;
    }
    if (answer.kind === "evaluation") {
      await reportEvaluation(answer);
      return;
    }
    setStatus(`Training for round ${answer.round} on this device…`);
    const result = await train(
      {
        checkpoint: state.modelBytes,
        csv: $("csv").value,
        plan: JSON.stringify(answer.plan),
        baseVersion: answer.base_version,
        token: answer.token,
        checkedInAt: answer.checkedInAt,
        deadlineSecs: answer.deadline_secs,
      },
      progressTo,
    );
    showTraining(result);
    // Partial work: training stopped early so the update still makes the round's deadline.
    const partial =
      result.steps < result.plannedSteps
        ? ` (trained ${result.steps} of ${result.plannedSteps} steps on ${result.examples} ` +
          "point(s), stopped early to meet the round's deadline)"
        : "";
    $("status").dataset.steps = String(result.steps);
    $("status").dataset.plannedSteps = String(result.plannedSteps);
    if (answer.secure) {
      await secureContribution(answer, result, partial);
      return;
    }
    setStatus(`Sending the update (${result.update.length} bytes, no data points)${partial}…`);
    const receipt = await (
      await api(answer.upload_url, {
        method: "POST",
        headers: {
          "content-type": "application/octet-stream",
          "X-Starling-Token": answer.token,
          ...authHeaders(state.task),
        },
        body: result.update,
      })
    ).json();
    state.assignment = null;
    // The round the update went into: in buffered mode, the buffer being filled when it
    // arrived, which may be later than the assignment's.
    state.waiting = { round: receipt.round, baseVersion: answer.base_version };
    $("status").dataset.accepted = String(receipt.round);
    setStatus(
      `✓ The server accepted your update${partial}: ${receipt.updates_in_round} of ` +
        `${state.info.round.goal} in round ${receipt.round}. Waiting for the round to commit…`,
      "ok",
    );
    await refreshInfo();
  } catch (e) {
    setStatus(explain(e), e instanceof Unreachable ? "error" : "warn");
  } finally {
    setBusy(false);
  }
}

// A secure round (the check-in answer carries `secure`): the update goes out only masked,
// through the round's four steps in secure.js, which brings secure aggregation's own
// WebAssembly module; both are loaded now, for secure rounds only, so the main module stays
// small.
async function secureContribution(answer, result, partial) {
  const status = $("status");
  status.dataset.secure = "loading";
  setStatus("Secure round: loading secure aggregation…");
  let secure;
  try {
    secure = await import("./secure.js");
  } catch (e) {
    state.assignment = null;
    status.dataset.secure = "failed";
    throw new Error(`secure aggregation could not be loaded (${e.message})`);
  }
  const m = state.model;
  const layout = m.parameterNames().map((name, i) => [name, Array.from(m.parameterShape(i))]);
  try {
    await secure.runSecureRound(
      { answer, headers: authHeaders(state.task), Refused, Unreachable, setOnline },
      result.update,
      layout,
      (step, text) => {
        status.dataset.secure = step;
        setStatus(text);
      },
    );
  } catch (e) {
    // The round's secrets went with the failed step: this assignment cannot go on.
    state.assignment = null;
    status.dataset.secure = "failed";
    if (e instanceof Refused) throw e;
    // Keys may be out already: "nothing was sent" (explain's word for Unreachable) may be
    // untrue here.
    const why = e instanceof Unreachable ? "the server could not be reached" : e.message;
    throw new Error(`the secure round could not go on (${why}); press Contribute again`);
  }
  state.assignment = null;
  state.waiting = { round: answer.round, baseVersion: answer.base_version };
  status.dataset.accepted = String(answer.round);
  setStatus(
    `✓ Your update went into secure round ${answer.round} masked${partial}: the server ` +
      "sees only the sum of all devices' updates. Waiting for the round to commit…",
    "ok",
  );
  await refreshInfo();
}

// An evaluation round: score the round's model on the points and send only the count, the
// mean loss and the mean accuracy.
async function reportEvaluation(answer) {
  setStatus(`Scoring the model for evaluation round ${answer.round} on this device…`);
  const score = await train(
    { checkpoint: state.modelBytes, csv: $("csv").value, evaluate: true },
    () => {},
  );
  const report = {
    base_version: answer.base_version,
    examples: score.examples,
    loss: score.loss,
  };
  if (score.accuracy !== null) report.accuracy = score.accuracy;
  setStatus("Sending the score (no data points)…");
  const receipt = await (
    await api(answer.upload_url, {
      method: "POST",
      headers: {
        "content-type": "application/json",
        "X-Starling-Token": answer.token,
        ...authHeaders(state.task),
      },
      body: JSON.stringify(report),
    })
  ).json();
  state.assignment = null;
  $("status").dataset.evaluated = String(receipt.round);
  setStatus(
    `✓ Round ${receipt.round} was an evaluation round: your score of version ` +
      `${answer.base_version} (loss ${fmt(score.loss)} on ${score.examples} point(s)) was ` +
      "counted. Nothing was trained; press Contribute again for the next round.",
    "ok",
  );
}

function explain(e) {
  if (e instanceof Unreachable) {
    return "Cannot reach the server, so nothing was sent. Check the connection and try again.";
  }
  if (e instanceof Refused) {
    switch (e.code) {
      case "too_stale":
        state.assignment = null;
        return (
          "The model moved on too far while this device trained, so the update was not " +
          "counted. Press Contribute again to train on the new model."
        );
      case "round_closed":
      case "stale_version":
      case "wrong_round_kind":
        state.assignment = null;
        return (
          "The round closed before your update arrived, so it was not counted. " +
          "Press Contribute again to train on the new model."
        );
      case "invalid_token":
        state.assignment = null;
        return "The assignment expired before the update arrived. Press Contribute again.";
      case "duplicate_update":
        return "This update was already counted.";
      case "not_in_cohort":
      case "wrong_phase":
      case "duplicate_message":
        state.assignment = null;
        return (
          "The secure round went on without this device (it missed a step: " +
          `${e.message}), so the update was not counted. Press Contribute again for the ` +
          "next round."
        );
      case "missing_credential":
        return (
          `${state.task} takes enrolled devices only: open the enrollment link its operator ` +
          "gave you, then press Contribute again."
        );
      case "invalid_credential":
      case "revoked_credential":
        try {
          localStorage.removeItem(credentialKey(state.task));
        } catch (_) {}
        state.assignment = null;
        return (
          "The server no longer accepts this browser's credential " +
          `(${e.message}). Ask the operator for a new enrollment link.`
        );
      case "enrollment_refused":
        return `The enrollment link was refused: ${e.message}`;
      case "rate_limited":
        return `The server asks this device to slow down: ${e.message}`;
      default:
        return `The server refused the update: ${e.message}`;
    }
  }
  return `Something went wrong: ${e.message}`;
}

function checkCommitted() {
  const w = state.waiting;
  const info = state.info;
  if (!w || !info) return;
  // The update's round is over once a later one is open; it committed if the model moved.
  if (info.round.round <= w.round) return;
  if (info.version > w.baseVersion) {
    state.waiting = null;
    const p = info.parameters;
    const shown = p
      ? Object.entries(p)
          .filter(([, v]) => typeof v === "number")
          .map(([n, v]) => `${n} = ${fmt(v)}`)
          .join(", ")
      : "";
    $("status").dataset.committed = String(info.version);
    setStatus(
      `✓ Round ${w.round} committed: the global model is now version ${info.version}` +
        (shown ? ` (${shown}).` : "."),
      "ok",
    );
  } else {
    state.waiting = null;
    setStatus(
      `Round ${w.round} ended without enough updates before its deadline, so the model ` +
        "is unchanged. You can contribute to the next round.",
      "warn",
    );
  }
}

// ---- start ----------------------------------------------------------------------------

async function poll() {
  try {
    if (state.task) await refreshInfo();
    else await loadTasks();
  } catch (e) {
    if (!(e instanceof Unreachable)) console.warn(e);
  }
  setTimeout(poll, state.waiting ? 700 : 3000);
}

async function main() {
  $("point-form").addEventListener("submit", addPoint);
  $("csv").addEventListener("input", () => checkData());
  $("file").addEventListener("change", loadFile);
  $("example").addEventListener("click", examplePoints);
  $("clear").addEventListener("click", () => {
    $("csv").value = "";
    state.lastTrained = null;
    checkData();
  });
  $("train").addEventListener("click", trialRun);
  $("contribute").addEventListener("click", contribute);
  $("task").addEventListener("change", (e) => selectTask(e.target.value).catch(report));
  window.addEventListener("resize", () => drawPlot());

  await init();
  startWorker();
  try {
    await loadTasks();
    await enrollFromLink();
  } catch (e) {
    if (e instanceof Refused) setStatus(explain(e), "warn");
    else report(e);
  }
  document.body.dataset.ready = "true";
  setTimeout(poll, 3000);

  if ("serviceWorker" in navigator && window.isSecureContext) {
    navigator.serviceWorker.register("/app/sw.js", { scope: "/app/" }).catch(() => {});
  }
}

function report(e) {
  if (e instanceof Unreachable) return; // the banner says it
  showBanner("error", `Cannot load the task: ${e.message}`);
}

// For tests and the curious: train on given CSV text with a plan (JSON), on the current
// model or on a given checkpoint (an array of bytes), exactly as the Train button does.
window.starling = {
  async train(csv, plan, checkpointBytes) {
    const checkpoint = checkpointBytes ? Uint8Array.from(checkpointBytes) : state.modelBytes;
    const r = await train({ checkpoint, csv, plan }, () => {});
    return { parameters: r.parameters, lossBefore: r.lossBefore, lossAfter: r.lossAfter };
  },
};

main();

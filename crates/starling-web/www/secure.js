// A secure round's four steps (secure aggregation, SecAgg+), loaded by app.js only when a
// check-in answer carries `secure`, together with its own WebAssembly module
// (starling_web_secure.js, built from crates/starling-web-secure): the same calls, in the
// same order and with the same retries as `starling device` (starling-client's secure.rs).
// The update leaves this page only masked; the round's secrets come from
// crypto.getRandomValues and stay in the module's memory until the round's part is done.
import init, { SecureDevice } from "./starling_web_secure.js";

const ready = init();

// A request is tried this many times while it fails in a way worth repeating.
const TRIES = 20;
// Refusals worth repeating (the server's own trouble), as ErrorCode::is_retryable says.
const RETRYABLE = new Set(["busy", "rate_limited", "unavailable", "internal", "request_timeout"]);

const sleep = (secs) => new Promise((resolve) => setTimeout(resolve, secs * 1000));

// ctx = { answer, headers, Refused, Unreachable, setOnline }. One call, repeated while it
// fails in a way worth repeating (unreachable, 5xx, 408, 429, a retryable code), after the
// server's Retry-After (or a second, at most 30). A repeated message answered
// duplicate_message was taken by an earlier try. Returns the response (null for such a
// duplicate).
async function send(ctx, method, step, body, contentType) {
  const url = `${ctx.answer.secure.secure_url}/${step}`;
  const headers = { "X-Starling-Token": ctx.answer.token, ...ctx.headers };
  if (contentType) headers["content-type"] = contentType;
  for (let tries = 1; ; tries++) {
    let failure;
    let wait = 1;
    let resp = null;
    try {
      resp = await fetch(url, { method, cache: "no-store", headers, body });
    } catch (_) {
      ctx.setOnline(false);
      failure = new ctx.Unreachable("cannot reach the server");
    }
    if (resp && resp.ok) {
      ctx.setOnline(true);
      return resp;
    }
    let retryable = true;
    if (resp) {
      let code = `http_${resp.status}`;
      let message = resp.statusText || `HTTP ${resp.status}`;
      try {
        const e = (await resp.json()).error;
        code = e.code;
        message = e.message;
      } catch (_) {}
      ctx.setOnline(resp.status < 500);
      retryable =
        resp.status >= 500 || resp.status === 408 || resp.status === 429 || RETRYABLE.has(code);
      const after = parseFloat(resp.headers.get("retry-after"));
      if (Number.isFinite(after) && after >= 0) wait = after;
      failure =
        resp.status >= 500 && !RETRYABLE.has(code)
          ? new ctx.Unreachable(`the server answered ${resp.status}`)
          : new ctx.Refused(resp.status, code, message);
      // Not worth repeating, and not after a first try: a message taken by an earlier try.
      if (tries > 1 && code === "duplicate_message") return null;
    }
    if (!(retryable && tries < TRIES)) throw failure;
    await sleep(Math.min(wait, 30));
  }
}

// Asks until the step's answer is ready (HTTP 200), waiting as each 202 "wait" says.
async function poll(ctx, step) {
  for (;;) {
    const resp = await send(ctx, "GET", step);
    const text = await resp.text();
    if (resp.status === 202) {
      let w = null;
      try {
        w = JSON.parse(text);
      } catch (_) {}
      if (w && w.status === "wait") {
        const secs = Number.isFinite(w.retry_after_secs)
          ? Math.min(Math.max(w.retry_after_secs, 0), 60)
          : 1;
        await sleep(secs);
        continue;
      }
    }
    return text;
  }
}

// Takes part in the secure round of `ctx.answer` with `update` (the main module's encoded
// update, wiped here once encoded) for a model of `layout` ([[name, [dims…]], …]);
// `onStep(step, text)` tells the person where the round is. Resolves once this device's
// unmasking shares are in.
export async function runSecureRound(ctx, update, layout, onStep) {
  onStep("loading", "Secure round: preparing secure aggregation…");
  await ready;
  const seed = crypto.getRandomValues(new Uint8Array(32));
  let device;
  try {
    device = new SecureDevice(
      JSON.stringify(ctx.answer.secure),
      ctx.answer.round,
      JSON.stringify(layout),
      update,
      seed,
    );
  } finally {
    seed.fill(0);
    update.fill(0);
  }
  try {
    onStep("keys", "Secure round: sharing keys…");
    await send(ctx, "POST", "keys", device.keys(), "application/json");
    onStep("wait-keys", "Secure round: waiting for the other devices' keys…");
    const keys = await poll(ctx, "keys");
    onStep("shares", "Secure round: sending encrypted key shares to neighbours…");
    await send(ctx, "POST", "shares", device.shares(keys), "application/json");
    onStep("wait-shares", "Secure round: waiting for the neighbours' key shares…");
    const envelopes = await poll(ctx, "shares");
    onStep("input", "Secure round: sending the masked update…");
    await send(ctx, "POST", "input", device.maskedInput(envelopes), "application/octet-stream");
    onStep("wait-survivors", "Secure round: waiting for the other devices' masked updates…");
    const survivors = await poll(ctx, "survivors");
    onStep("unmask", "Secure round: helping the server remove the masks from the sum…");
    await send(ctx, "POST", "unmask", device.unmask(survivors), "application/json");
    onStep("done", "Secure round: this device's part is done.");
  } finally {
    device.free();
  }
}

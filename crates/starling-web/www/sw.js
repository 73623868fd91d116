// Lets the installed app open without a connection: the app's own files are fetched from
// the network first and served from the cache only when the network fails. The API (/v1)
// is never cached, so the model and rounds are always current.
const CACHE = "starling-app-v1";
const SHELL = [
  "/app/",
  "/app/app.js",
  "/app/job.js",
  "/app/worker.js",
  "/app/style.css",
  "/app/starling_web.js",
  "/app/starling_web_bg.wasm",
  "/app/manifest.webmanifest",
  "/app/icon.svg",
  "/app/icon-192.png",
];

self.addEventListener("install", (event) => {
  event.waitUntil(
    caches
      .open(CACHE)
      .then((c) => c.addAll(SHELL))
      .then(() => self.skipWaiting()),
  );
});

self.addEventListener("activate", (event) => {
  event.waitUntil(
    caches
      .keys()
      .then((keys) => Promise.all(keys.filter((k) => k !== CACHE).map((k) => caches.delete(k))))
      .then(() => self.clients.claim()),
  );
});

self.addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== "GET" || url.origin !== self.location.origin) return;
  if (!url.pathname.startsWith("/app")) return;
  event.respondWith(
    fetch(event.request)
      .then((resp) => {
        if (resp.ok) {
          const copy = resp.clone();
          caches.open(CACHE).then((c) => c.put(event.request, copy));
        }
        return resp;
      })
      .catch(() => caches.match(event.request)),
  );
});

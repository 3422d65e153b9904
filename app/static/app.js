// The page's behaviour: calls this service's own API and shows every answer, errors included.
"use strict";

const $ = (id) => document.getElementById(id);
const SAMPLE_COUNT = 16;
const SAMPLE_ROW = 8;
const INTERP_STEPS = 12;
const NEIGHBOURS = 8;
const METRICS_POLL_MS = 2000;
const WINDOW_POLLS = 15; // quantiles over the last 30 s of requests
const CHART_POINTS = 60;
// Routes of the page itself and of monitoring, left out of the "all API routes" line.
const NOT_API = new Set(["/", "/static", "/metrics", "/healthz", "/readyz", "unmatched"]);

const KEY_STORAGE = "vae-api-key"; // sessionStorage: this tab only, gone when it closes

let models = [];
const BLANK_IMAGE = $("recon-image").src; // the page's black placeholder

// ---- talking to the API --------------------------------------------------------------------

class ApiError extends Error {}

function detailText(detail) {
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    // FastAPI's validation errors: one entry per invalid value.
    return detail.map((e) => `${(e.loc || []).join(".")}: ${e.msg}`).join("; ");
  }
  return JSON.stringify(detail);
}

// fetch() that throws ApiError with the server's own message for any non-2xx answer.
async function api(path, { params = {}, withModel = true, ...options } = {}) {
  const url = new URL(path, document.baseURI);
  const model = $("model").value;
  if (withModel && model) url.searchParams.set("model", model);
  for (const [key, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== "") url.searchParams.set(key, value);
  }
  const headers = new Headers(options.headers || {});
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (key) headers.set("Authorization", `Bearer ${key}`);
  let response;
  try {
    response = await fetch(url, { ...options, headers });
  } catch (err) {
    throw new ApiError(`${path}: the server could not be reached (${err.message})`);
  }
  if (response.status === 401) {
    // The server has API keys on: ask for one (a stored key that stopped working included).
    $("key-form").hidden = false;
    $("api-key").focus();
    throw new ApiError(`${path}: this server needs an API key; enter yours above`);
  }
  if (!response.ok) {
    let detail = response.statusText || "error";
    try {
      detail = detailText((await response.json()).detail);
    } catch {
      // Not JSON (a proxy's error page, say): keep the status text.
    }
    throw new ApiError(`${path} answered ${response.status}: ${detail}`);
  }
  return response;
}

function showError(element, err) {
  element.textContent = err instanceof Error ? err.message : String(err);
  element.hidden = false;
}

function clearError(element) {
  element.textContent = "";
  element.hidden = true;
}

// Runs `work` with `button` disabled; any error lands in `errorBox`.
async function guarded(button, errorBox, work) {
  clearError(errorBox);
  if (button) button.disabled = true;
  try {
    await work();
  } catch (err) {
    showError(errorBox, err);
  } finally {
    if (button) button.disabled = false;
  }
}

const pngData = (base64) => `data:image/png;base64,${base64}`;

function currentCard() {
  return models.find((m) => m.name === $("model").value) || models[0];
}

// ---- models ---------------------------------------------------------------------------------

function fillDigits(select, withAny) {
  select.replaceChildren();
  if (withAny) select.add(new Option("any", ""));
  for (let d = 0; d <= 9; d++) select.add(new Option(String(d), String(d)));
}

function describeModel() {
  const card = currentCard();
  if (!card) return;
  const parts = [
    card.architecture,
    card.conditional ? "conditional" : "unconditional",
    `latent ${card.latent_dim}`,
    card.device,
  ];
  if (card.index) parts.push(`index ${card.index.size} images`);
  $("model-info").textContent = parts.join(" · ");
  // Unconditional models take no digit: sampling draws any digit, interpolation random latents.
  $("sample-digit").disabled = !card.conditional;
  $("interp-from").disabled = !card.conditional;
  $("interp-to").disabled = !card.conditional;
  $("neighbours-note").textContent = card.index
    ? `(${card.index.distance} distance, ${card.index.search})`
    : "(this model has no latent index)";
}

async function loadModels() {
  const body = await (await api("models", { withModel: false })).json();
  models = body.models;
  const select = $("model");
  select.replaceChildren(...models.map((m) => new Option(m.name, m.name)));
  select.value = body.default;
  describeModel();
}

// ---- sampling -------------------------------------------------------------------------------

async function sample() {
  const response = await api("sample", {
    method: "POST",
    params: {
      n: SAMPLE_COUNT,
      nrow: SAMPLE_ROW,
      digit: $("sample-digit").disabled ? "" : $("sample-digit").value,
      seed: $("sample-seed").value.trim(),
      prior: $("sample-prior").value,
    },
  });
  const image = $("sample-image");
  const old = image.src;
  image.src = URL.createObjectURL(await response.blob());
  if (old.startsWith("blob:")) URL.revokeObjectURL(old);
  image.hidden = false;
  const prior = response.headers.get("X-Prior");
  $("sample-caption").textContent =
    `seed ${response.headers.get("X-Seed")}` + (prior ? ` · ${prior} prior` : "");
}

// ---- interpolation --------------------------------------------------------------------------

// A seeded normal draw (mulberry32 + Box-Muller), for the latent ends of unconditional models.
function normals(count, seed) {
  let state = seed >>> 0;
  const uniform = () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return Array.from({ length: count }, () =>
    Math.sqrt(-2 * Math.log(1 - uniform())) * Math.cos(2 * Math.PI * uniform()),
  );
}

let frames = [];

function showFrame(index) {
  if (!frames.length) return;
  const frame = $("interp-frame");
  frame.src = pngData(frames[index]);
  frame.hidden = false;
  $("interp-index").textContent = `${index + 1} / ${frames.length}`;
  $("interp-strip").querySelectorAll("img").forEach((img, i) => {
    img.classList.toggle("current", i === index);
  });
}

async function interpolate() {
  const card = currentCard();
  const seedText = $("interp-seed").value.trim();
  const seed = seedText === "" ? null : Number(seedText);
  let start;
  let end;
  if (card.conditional) {
    start = { digit: Number($("interp-from").value) };
    end = { digit: Number($("interp-to").value) };
  } else {
    const base = Number.isInteger(seed) ? seed : 0;
    start = { z: normals(card.latent_dim, base * 2 + 1) };
    end = { z: normals(card.latent_dim, base * 2 + 2) };
  }
  const response = await api("interpolate", {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "application/json" },
    body: JSON.stringify({ start, end, steps: INTERP_STEPS, seed }),
  });
  frames = (await response.json()).images;
  $("interp-strip").replaceChildren(
    ...frames.map((data, i) => {
      const img = new Image(28, 28);
      img.src = pngData(data);
      img.alt = "";
      img.addEventListener("click", () => {
        $("interp-slider").value = String(i);
        showFrame(i);
      });
      return img;
    }),
  );
  const slider = $("interp-slider");
  slider.max = String(frames.length - 1);
  slider.disabled = false;
  slider.value = "0";
  showFrame(0);
}

// ---- drawing pad ----------------------------------------------------------------------------

const pad = $("pad");
const ink = pad.getContext("2d");
let drawing = false;
let hasInk = false;

function clearPad() {
  ink.fillStyle = "#000";
  ink.fillRect(0, 0, pad.width, pad.height);
  hasInk = false;
}

function padPoint(event) {
  const box = pad.getBoundingClientRect();
  return [
    ((event.clientX - box.left) * pad.width) / box.width,
    ((event.clientY - box.top) * pad.height) / box.height,
  ];
}

function startStroke(event) {
  event.preventDefault();
  pad.setPointerCapture(event.pointerId);
  drawing = true;
  hasInk = true;
  const [x, y] = padPoint(event);
  ink.beginPath();
  ink.moveTo(x, y);
  ink.lineTo(x + 0.01, y);
  ink.stroke();
}

function continueStroke(event) {
  if (!drawing) return;
  const [x, y] = padPoint(event);
  ink.lineTo(x, y);
  ink.stroke();
}

function endStroke() {
  if (!drawing) return;
  drawing = false;
  drawnDigit().then(analyse, (err) => showError($("draw-error"), err));
}

// MNIST's own preprocessing: the ink's bounding box scaled to fit 20x20, then placed in a
// 28x28 frame with its centre of mass at the centre. Without it a digit drawn across the
// pad is far larger than any the model saw.
function drawnDigit() {
  const { data, width, height } = ink.getImageData(0, 0, pad.width, pad.height);
  let [left, top, right, bottom] = [width, height, -1, -1];
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      if (data[(y * width + x) * 4] > 0) {
        left = Math.min(left, x);
        right = Math.max(right, x);
        top = Math.min(top, y);
        bottom = Math.max(bottom, y);
      }
    }
  }
  const digit = document.createElement("canvas");
  digit.width = digit.height = 28;
  const out = digit.getContext("2d");
  out.fillStyle = "#000";
  out.fillRect(0, 0, 28, 28);
  if (right >= 0) {
    const scale = 20 / Math.max(right - left + 1, bottom - top + 1);
    const w = Math.max(1, Math.round((right - left + 1) * scale));
    const h = Math.max(1, Math.round((bottom - top + 1) * scale));
    const box = document.createElement("canvas");
    box.width = w;
    box.height = h;
    const boxInk = box.getContext("2d");
    boxInk.imageSmoothingQuality = "high";
    boxInk.drawImage(pad, left, top, right - left + 1, bottom - top + 1, 0, 0, w, h);
    const pixels = boxInk.getImageData(0, 0, w, h).data;
    let [mass, cx, cy] = [0, 0, 0];
    for (let y = 0; y < h; y++) {
      for (let x = 0; x < w; x++) {
        const v = pixels[(y * w + x) * 4];
        mass += v;
        cx += v * (x + 0.5);
        cy += v * (y + 0.5);
      }
    }
    const [mx, my] = mass > 0 ? [cx / mass, cy / mass] : [w / 2, h / 2];
    out.drawImage(box, Math.round(14 - mx), Math.round(14 - my));
  }
  return new Promise((resolve, reject) => {
    digit.toBlob((blob) => (blob ? resolve(blob) : reject(new Error("could not encode the drawing"))), "image/png");
  });
}

// ---- analysis: reconstruction, anomaly score, neighbours -------------------------------------

function setText(id, text, className = "") {
  const element = $(id);
  element.textContent = text;
  element.className = className;
}

async function analyse(blob, invert = false) {
  const errorBox = $("draw-error");
  clearError(errorBox);
  const input = $("input-image");
  const old = input.src;
  input.src = URL.createObjectURL(blob);
  if (old.startsWith("blob:")) URL.revokeObjectURL(old);
  // Nothing from an earlier input (or model) stays on screen beside the new answers.
  for (const id of ["predicted-digit", "anomaly-score", "recon-error"]) setText(id, "…");
  for (const id of ["recon-image", "heatmap-image"]) $(id).src = BLANK_IMAGE;
  $("neighbours").replaceChildren();
  const form = () => {
    const body = new FormData();
    body.append("file", blob, "digit.png");
    return body;
  };
  const post = (path, params) =>
    api(path, {
      method: "POST",
      params: { ...params, invert: invert ? "true" : "" },
      headers: { Accept: "application/json" },
      body: form(),
    }).then((r) => r.json());
  // All three at once; each shows what it got, and every failure is reported.
  const results = await Promise.allSettled([
    post("reconstruct", {}).then(showReconstruction),
    post("anomaly-score", { heatmap: "true" }).then(showAnomaly),
    post("similar", { k: NEIGHBOURS }).then(showNeighbours),
  ]);
  const failures = results.filter((r) => r.status === "rejected").map((r) => r.reason.message);
  if (failures.length) showError(errorBox, failures.join("\n"));
}

function showReconstruction(body) {
  const item = body.items[0];
  $("recon-image").src = pngData(item.image);
  setText("recon-error", `${item.error.toFixed(4)} mean squared pixel error`);
}

function showDigit(digit, probability) {
  if (digit === null || digit === undefined) {
    setText("predicted-digit", "– (unconditional model)");
  } else {
    setText("predicted-digit", `${digit} (${(100 * probability).toFixed(1)}%)`);
  }
}

function showAnomaly(body) {
  const item = body.items[0];
  $("heatmap-image").src = pngData(item.heatmap);
  const percentile = item.percentile === null ? "" : `, percentile ${item.percentile.toFixed(1)}`;
  const verdict = item.is_anomaly ? "anomalous" : "normal";
  setText(
    "anomaly-score",
    `${item.score.toFixed(2)} — ${verdict} (threshold ${body.threshold.toFixed(2)}${percentile})`,
    item.is_anomaly ? "anomalous" : "",
  );
  showDigit(item.digit, item.digit_probability);
}

function showNeighbours(body) {
  const item = body.items[0];
  showDigit(item.digit, item.digit_probability);
  $("neighbours").replaceChildren(
    ...item.neighbours.map((n) => {
      const li = document.createElement("li");
      const img = new Image(56, 56);
      img.src = pngData(n.image);
      img.alt = `training image ${n.index}, digit ${n.label}`;
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = String(n.label);
      li.append(img, label, ` ${n.distance.toFixed(3)}`);
      return li;
    }),
  );
}

// ---- latency from /metrics -------------------------------------------------------------------

const HISTOGRAM = "vae_request_duration_seconds_bucket";
const snapshots = []; // the parsed buckets of the last WINDOW_POLLS + 1 polls
const history = []; // [p50, p99] of all API routes at each poll, for the chart

// Cumulative bucket counts per route from Prometheus text: Map(route -> Map(le -> count)).
function parseBuckets(text) {
  const byRoute = new Map();
  for (const line of text.split("\n")) {
    if (!line.startsWith(`${HISTOGRAM}{`)) continue;
    const close = line.lastIndexOf("}");
    const labels = {};
    for (const m of line.slice(HISTOGRAM.length + 1, close).matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) {
      labels[m[1]] = m[2];
    }
    const count = Number(line.slice(close + 1).trim().split(/\s+/)[0]);
    const le = labels.le === "+Inf" ? Infinity : Number(labels.le);
    const route = labels.route || "unmatched";
    if (!byRoute.has(route)) byRoute.set(route, new Map());
    const buckets = byRoute.get(route);
    // Summed over method and status: the page shows latency per route.
    buckets.set(le, (buckets.get(le) || 0) + count);
  }
  return byRoute;
}

// Buckets of `now` less those of `before`: the requests in between. A count that went down
// means the server restarted (counters start at 0 again): all of it is new.
function delta(now, before) {
  const out = new Map();
  for (const [le, count] of now) {
    const change = count - ((before && before.get(le)) || 0);
    out.set(le, change < 0 ? count : change);
  }
  return out;
}

function addInto(total, buckets) {
  for (const [le, count] of buckets) total.set(le, (total.get(le) || 0) + count);
}

// Prometheus' histogram_quantile: linear interpolation inside the bucket holding the rank.
function quantile(q, buckets) {
  const bounds = [...buckets.keys()].sort((a, b) => a - b);
  const total = buckets.get(Infinity) || 0;
  if (total <= 0) return null;
  const rank = q * total;
  let lower = 0;
  let below = 0;
  for (const le of bounds) {
    const count = buckets.get(le);
    if (count >= rank) {
      if (le === Infinity) return lower; // past the last finite bucket: its bound is all we know
      const inBucket = count - below;
      return inBucket > 0 ? lower + ((le - lower) * (rank - below)) / inBucket : le;
    }
    lower = le;
    below = count;
  }
  return lower;
}

const ms = (seconds) => (seconds === null ? "–" : `${(seconds * 1000).toFixed(seconds < 0.01 ? 2 : 1)} ms`);

function latencyRow(route, buckets, total = false) {
  const row = document.createElement("tr");
  if (total) row.className = "total";
  const count = buckets.get(Infinity) || 0;
  for (const text of [route, String(count), ms(quantile(0.5, buckets)), ms(quantile(0.99, buckets))]) {
    const cell = document.createElement("td");
    cell.textContent = text;
    row.append(cell);
  }
  return row;
}

async function pollMetrics() {
  const errorBox = $("latency-error");
  try {
    const text = await (await api("metrics", { withModel: false })).text();
    clearError(errorBox);
    const now = parseBuckets(text);
    snapshots.push(now);
    if (snapshots.length > WINDOW_POLLS + 1) snapshots.shift();
    if (snapshots.length < 2) return;
    const before = snapshots[0];
    const rows = [];
    const all = new Map();
    for (const route of [...now.keys()].sort()) {
      if (NOT_API.has(route)) continue;
      const recent = delta(now.get(route), before.get(route));
      if (!recent.get(Infinity)) continue;
      addInto(all, recent);
      rows.push(latencyRow(route, recent));
    }
    if (rows.length) {
      $("latency-rows").replaceChildren(latencyRow("all API routes", all, true), ...rows);
    } else {
      const cell = document.createElement("td");
      cell.colSpan = 4;
      cell.className = "muted";
      cell.textContent = "no API requests in the last 30 s";
      $("latency-rows").replaceChildren(document.createElement("tr"));
      $("latency-rows").firstChild.append(cell);
    }
    history.push([quantile(0.5, all), quantile(0.99, all)]);
    if (history.length > CHART_POINTS) history.shift();
    drawChart();
  } catch (err) {
    showError(errorBox, err);
  }
}

function drawChart() {
  const chart = $("latency-chart");
  const g = chart.getContext("2d");
  const [w, h, pad] = [chart.width, chart.height, 22];
  g.clearRect(0, 0, w, h);
  const values = history.flat().filter((v) => v !== null);
  const top = Math.max(0.001, ...values) * 1.15;
  g.fillStyle = "#5d6677";
  g.font = "11px system-ui, sans-serif";
  g.fillText(ms(top), 4, 12);
  g.fillText("0", 4, h - 4);
  g.strokeStyle = "#d9dde5";
  g.beginPath();
  g.moveTo(pad + 20, h - pad / 2);
  g.lineTo(w - 4, h - pad / 2);
  g.stroke();
  const styles = getComputedStyle(document.documentElement);
  [0, 1].forEach((series) => {
    g.strokeStyle = styles.getPropertyValue(series ? "--p99" : "--p50").trim();
    g.lineWidth = 2;
    g.beginPath();
    let drawingLine = false;
    history.forEach((point, i) => {
      const v = point[series];
      if (v === null) {
        drawingLine = false;
        return;
      }
      const x = pad + 20 + ((w - pad - 24) * i) / (CHART_POINTS - 1);
      const y = h - pad / 2 - ((h - pad) * v) / top;
      if (drawingLine) g.lineTo(x, y);
      else g.moveTo(x, y);
      drawingLine = true;
    });
    g.stroke();
  });
}

// ---- wiring ---------------------------------------------------------------------------------

function wire() {
  fillDigits($("sample-digit"), true);
  fillDigits($("interp-from"), false);
  fillDigits($("interp-to"), false);
  $("interp-from").value = "1";
  $("interp-to").value = "7";

  $("model").addEventListener("change", describeModel);
  $("sample-form").addEventListener("submit", (event) => {
    event.preventDefault();
    guarded($("sample-button"), $("sample-error"), sample);
  });
  $("interp-form").addEventListener("submit", (event) => {
    event.preventDefault();
    guarded($("interp-button"), $("interp-error"), interpolate);
  });
  $("interp-slider").addEventListener("input", (event) => showFrame(Number(event.target.value)));

  clearPad();
  ink.strokeStyle = "#fff";
  ink.lineWidth = 20;
  ink.lineCap = "round";
  ink.lineJoin = "round";
  pad.addEventListener("pointerdown", startStroke);
  pad.addEventListener("pointermove", continueStroke);
  pad.addEventListener("pointerup", endStroke);
  pad.addEventListener("pointercancel", endStroke);
  pad.addEventListener("keydown", (event) => {
    if (event.key === "Delete" || event.key === "Backspace") {
      event.preventDefault();
      clearPad();
    }
  });
  $("pad-clear").addEventListener("click", clearPad);
  $("upload").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) analyse(file, $("upload-invert").checked);
  });

  // A grid as soon as the page opens (or a key is entered): the models, then one sample.
  const start = () =>
    guarded(null, $("global-error"), async () => {
      await loadModels();
      await guarded(null, $("sample-error"), sample);
    });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    $("api-key").value = "";
    $("key-form").hidden = true;
    start();
  });
  start();
  pollMetrics();
  setInterval(pollMetrics, METRICS_POLL_MS);
}

wire();

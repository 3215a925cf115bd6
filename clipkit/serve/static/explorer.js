// clipkit explorer: search, map and zero-shot view over the service's own JSON API. Plain JS, no build, no CDN.
const $ = (id) => document.getElementById(id);
const MAX_DRAWN = 100000; // beyond this many points the map draws a fixed random sample
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
  "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1",
  "#636363", "#6baed6", "#fd8d3c", "#74c476", "#9e9ac8", "#969696", "#9ecae1", "#fdae6b", "#a1d99b", "#bcbddc",
  "#d9d9d9"];

const state = { key: sessionStorage.getItem("clipkit-api-key"), map: null, view: { x: 0, y: 0, scale: 1 },
  highlight: new Set(), selected: null, colorBy: null, zeroshot: null, drawn: null, imageCache: new Map() };

function setStatus(text) { $("status").textContent = text || ""; }

async function api(path, body) {
  for (let attempt = 0; attempt < 2; attempt++) {
    const headers = {};
    if (state.key) headers["Authorization"] = `Bearer ${state.key}`;
    const init = body === undefined ? { headers } : { method: "POST", headers: { ...headers,
      "Content-Type": "application/json" }, body: JSON.stringify(body) };
    const r = await fetch(path, init);
    if (r.status === 401 && attempt === 0) {
      const key = window.prompt("This service needs its API key:");
      if (!key) break;
      state.key = key;
      sessionStorage.setItem("clipkit-api-key", key);
      continue;
    }
    if (!r.ok) {
      let message = `${r.status}`;
      try { message = (await r.json()).error.message; } catch (e) { /* not JSON */ }
      throw new Error(message);
    }
    return path.startsWith("/images/") ? r.blob() : r.json();
  }
  throw new Error("no API key given");
}

async function imageURL(id) { // <img> cannot send the key: fetch with it and show a blob URL
  if (!state.imageCache.has(id)) {
    state.imageCache.set(id, api(`/images/${id}`).then((blob) => URL.createObjectURL(blob)));
  }
  return state.imageCache.get(id);
}

function decode(b64, Type) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Type(bytes.buffer);
}

// ---- results grid ----------------------------------------------------------------------------------------------
function card(item) {
  const div = document.createElement("div");
  div.className = "result";
  div.dataset.id = item.id;
  const img = document.createElement("img");
  img.className = "result-image";
  img.alt = item.caption || "";
  imageURL(item.id).then((u) => { img.src = u; }).catch((e) => setStatus(e.message));
  const cap = document.createElement("div");
  cap.textContent = item.caption || "";
  const sim = document.createElement("div");
  sim.className = "sim";
  sim.textContent = `#${item.id} · ${item.similarity.toFixed(3)}`;
  div.append(img, cap, sim);
  div.addEventListener("click", () => moreLikeThis(item.id));
  return div;
}

function showResults(title, items) {
  $("results-title").textContent = title;
  $("results").replaceChildren(...items.map(card));
  state.highlight = new Set(items.map((x) => x.id));
  draw();
}

async function searchText(text) {
  setStatus("");
  const items = await api("/knn-service", { text, modality: "image", num_images: 24, deduplicate: false });
  showResults(`results for “${text}”`, items);
}

async function searchImage(file) {
  const b64 = await new Promise((resolve) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.split(",")[1]);
    reader.readAsDataURL(file);
  });
  const items = await api("/knn-service", { image: b64, modality: "image", num_images: 24, deduplicate: false });
  showResults(`results for ${file.name}`, items);
}

async function moreLikeThis(id) {
  const res = await api("/explorer/neighbors", { id, k: 24 });
  showResults(`more like #${id}`, res.image);
}

async function showNeighbors(id) {
  state.selected = id;
  const res = await api("/explorer/neighbors", { id, k: 8 });
  $("neighbor-images").replaceChildren(...res.image.map(card));
  $("neighbor-texts").replaceChildren(...res.text.map((t) => {
    const li = document.createElement("li");
    li.className = "neighbor-text";
    li.textContent = `${t.caption} (${t.similarity.toFixed(3)})`;
    return li;
  }));
  draw();
}

// ---- map -------------------------------------------------------------------------------------------------------
const canvas = $("map");
const ctx = canvas.getContext("2d");

function toScreen(x, y) {
  const { view } = state;
  const pad = 12, w = canvas.width - 2 * pad, h = canvas.height - 2 * pad;
  return [pad + (x * w - view.x) * view.scale, pad + ((1 - y) * h - view.y) * view.scale];
}

function pointColor(i) {
  if (state.zeroshot) return PALETTE[state.zeroshot[i] % PALETTE.length];
  const col = state.colorBy && state.map.columns[state.colorBy];
  if (!col) return "#4a78b5";
  const code = col.codesArray[i];
  return code === 65535 ? "#bbb" : PALETTE[code % PALETTE.length];
}

function draw() {
  if (!state.map) return;
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const { xy } = state.map;
  const r = Math.max(1.5, Math.min(4, 3 * Math.sqrt(state.view.scale)));
  for (const i of state.drawn) {
    const [sx, sy] = toScreen(xy[2 * i], xy[2 * i + 1]);
    if (sx < -5 || sy < -5 || sx > canvas.width + 5 || sy > canvas.height + 5) continue;
    ctx.fillStyle = pointColor(i);
    ctx.globalAlpha = state.highlight.size ? 0.35 : 0.85;
    ctx.fillRect(sx - r / 2, sy - r / 2, r, r);
  }
  ctx.globalAlpha = 1;
  for (const i of state.highlight) { // a query's top results, wherever they lie
    const [sx, sy] = toScreen(xy[2 * i], xy[2 * i + 1]);
    ctx.strokeStyle = "#000"; ctx.lineWidth = 1.5;
    ctx.beginPath(); ctx.arc(sx, sy, r + 3, 0, 2 * Math.PI); ctx.stroke();
  }
  if (state.selected !== null) {
    const [sx, sy] = toScreen(xy[2 * state.selected], xy[2 * state.selected + 1]);
    ctx.strokeStyle = "#d00"; ctx.lineWidth = 2;
    ctx.beginPath(); ctx.arc(sx, sy, r + 6, 0, 2 * Math.PI); ctx.stroke();
  }
}

function nearestPoint(mx, my, radius = 8) {
  let best = null, bestD = radius * radius;
  const { xy } = state.map;
  for (const i of state.drawn) {
    const [sx, sy] = toScreen(xy[2 * i], xy[2 * i + 1]);
    const d = (sx - mx) ** 2 + (sy - my) ** 2;
    if (d < bestD) { bestD = d; best = i; }
  }
  return best;
}

function legend() {
  const names = state.zeroshot ? state.zeroshotNames : (state.map.columns[state.colorBy] || {}).labels || [];
  $("legend").replaceChildren(...names.map((name, i) => {
    const s = document.createElement("span");
    const dot = document.createElement("i");
    dot.style.background = PALETTE[i % PALETTE.length];
    s.append(dot, name);
    return s;
  }));
}

let drag = null;
canvas.addEventListener("mousedown", (e) => { drag = { x: e.offsetX, y: e.offsetY, moved: false }; });
window.addEventListener("mouseup", (e) => {
  if (drag && !drag.moved && e.target === canvas) {
    const i = nearestPoint(e.offsetX, e.offsetY);
    if (i !== null) showNeighbors(i).catch((err) => setStatus(err.message));
  }
  drag = null; canvas.classList.remove("dragging");
});
canvas.addEventListener("mousemove", async (e) => {
  if (drag) {
    const dx = e.offsetX - drag.x, dy = e.offsetY - drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 2) { drag.moved = true; canvas.classList.add("dragging"); }
    state.view.x -= dx / state.view.scale; state.view.y -= dy / state.view.scale;
    drag.x = e.offsetX; drag.y = e.offsetY;
    draw();
    return;
  }
  const i = state.map && nearestPoint(e.offsetX, e.offsetY);
  const tip = $("tooltip");
  if (i === null || i === undefined) { tip.hidden = true; return; }
  tip.hidden = false;
  tip.style.left = `${e.offsetX + 16}px`; tip.style.top = `${e.offsetY + 40}px`;
  tip.dataset.id = i;
  const [meta] = await api("/metadata", { ids: [i] });
  if (tip.dataset.id !== String(i)) return;
  tip.querySelector(".caption").textContent = `#${i} ${meta.metadata.caption || ""}`;
  tip.querySelector("img").src = await imageURL(i);
});
canvas.addEventListener("mouseleave", () => { $("tooltip").hidden = true; });
canvas.addEventListener("wheel", (e) => {
  e.preventDefault();
  const factor = e.deltaY < 0 ? 1.25 : 0.8;
  const { view } = state;
  // zoom about the cursor: the map point under it stays put
  view.x += e.offsetX / view.scale - e.offsetX / (view.scale * factor);
  view.y += e.offsetY / view.scale - e.offsetY / (view.scale * factor);
  view.scale *= factor;
  draw();
}, { passive: false });

// ---- zero-shot view ----------------------------------------------------------------------------------------------
async function runZeroshot() {
  const classnames = $("classnames").value.split("\n").map((s) => s.trim()).filter(Boolean);
  const label = $("label-column").value || null;
  const res = await api("/explorer/zeroshot", { classnames, label_column: label });
  state.zeroshot = decode(res.pred, Uint16Array);
  state.zeroshotNames = res.classnames;
  legend(); draw();
  const out = $("zeroshot-result");
  out.replaceChildren();
  if (res.confusion) {
    const p = document.createElement("p");
    p.textContent = `accuracy ${(100 * res.accuracy).toFixed(1)}% on ${res.labelled} labelled images`;
    const table = document.createElement("table");
    table.className = "confusion";
    const head = table.insertRow();
    head.insertCell().textContent = "true \\ predicted";
    for (const n of res.classnames) { const th = document.createElement("th"); th.textContent = n; head.append(th); }
    res.confusion.forEach((row, i) => {
      const tr = table.insertRow();
      const th = document.createElement("th"); th.className = "row"; th.textContent = res.classnames[i]; tr.append(th);
      const total = row.reduce((a, b) => a + b, 0) || 1;
      row.forEach((v, j) => {
        const td = tr.insertCell(); td.textContent = v || "";
        td.style.background = `rgba(${i === j ? "40,140,60" : "200,40,40"},${v / total})`;
      });
    });
    out.append(p, table);
  }
}

// ---- start -------------------------------------------------------------------------------------------------------
async function start() {
  const health = await (await fetch("/health")).json();
  if (health.auth_required && !state.key) { // ask before the first call, so no request is refused
    state.key = window.prompt("This service needs its API key:") || null;
    if (state.key) sessionStorage.setItem("clipkit-api-key", state.key);
  }
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const file = $("image-file").files[0];
    const job = file ? searchImage(file) : searchText($("query").value.trim());
    $("image-file").value = "";
    job.catch((err) => setStatus(err.message));
  });
  document.body.addEventListener("dragover", (e) => e.preventDefault());
  document.body.addEventListener("drop", (e) => {
    e.preventDefault();
    const file = e.dataTransfer.files[0];
    if (file) searchImage(file).catch((err) => setStatus(err.message));
  });
  $("zeroshot-run").addEventListener("click", () => runZeroshot().catch((err) => setStatus(err.message)));
  $("classnames-file").addEventListener("change", async (e) => {
    const f = e.target.files[0];
    if (f) $("classnames").value = await f.text();
  });
  $("color-by").addEventListener("change", (e) => { state.colorBy = e.target.value; state.zeroshot = null; legend();
    draw(); });
  try {
    const map = await api("/explorer/map");
    map.xy = decode(map.xy, Float32Array);
    for (const col of Object.values(map.columns)) col.codesArray = decode(col.codes, Uint16Array);
    state.map = map;
    $("index-name").textContent = `${map.index} · ${map.count} images`;
    const ids = Array.from({ length: map.count }, (_, i) => i);
    if (ids.length > MAX_DRAWN) { // a fixed random sample keeps panning smooth
      for (let i = ids.length - 1; i > 0; i--) { const j = Math.floor(Math.random() * (i + 1)); [ids[i], ids[j]] = [ids[j], ids[i]]; }
      ids.length = MAX_DRAWN;
    }
    state.drawn = ids;
    $("map-info").textContent = `${map.method} of the image embeddings${map.count > MAX_DRAWN ? `, ${MAX_DRAWN} drawn` : ""}`;
    const names = Object.keys(map.columns);
    $("color-by").replaceChildren(...["(none)", ...names].map((n) => new Option(n, n === "(none)" ? "" : n)));
    $("label-column").append(...names.map((n) => new Option(n, n)));
    state.colorBy = names.includes("class") ? "class" : names[0] || null;
    if (state.colorBy) $("color-by").value = state.colorBy;
    legend(); draw();
  } catch (err) {
    setStatus(`map: ${err.message}`);
  }
  window.explorer = { state, toScreen, ready: true }; // for the browser tests
}

start();

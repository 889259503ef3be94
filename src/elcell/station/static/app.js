// elcell inspection station: plain JavaScript, no build step, nothing fetched from elsewhere.
"use strict";

const API = "/api/v1";
const $ = (id) => document.getElementById(id);
const state = { model: null, labels: [], review: null, ticked: new Set(), busy: false, poll: null };
const FLAG_RANK = { defect: 0, review: 1, queued: 2, ok: 3 };

// One id per tab, kept across reloads (sessionStorage): the review cell this tab
// holds comes back to it after a reload, and is returned when the tab closes.
function session() {
  let id = sessionStorage.getItem("elcell-session");
  if (!id) {
    id = Array.from(crypto.getRandomValues(new Uint8Array(12)), (b) => b.toString(16).padStart(2, "0")).join("");
    sessionStorage.setItem("elcell-session", id);
  }
  return id;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== null && value !== undefined) node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

// ------------------------------------------------------------------ talking to the service
function headers() {
  const token = sessionStorage.getItem("elcell-token");
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  if (response.status === 401) {
    $("token-form").hidden = false;
    throw new Error("this station needs a token: enter it at the top");
  }
  if (!response.ok) {
    let detail = response.statusText;
    try { detail = (await response.json()).detail; } catch (e) { /* not JSON */ }
    if (response.status === 503) detail += " (the station is busy)";
    const error = new Error(detail);
    error.status = response.status;
    throw error;
  }
  return response;
}

const json = async (path, options) => (await api(path, options)).json();

// Images come through fetch too, so that a token travels with them.
// The last one asked for wins: a slow heatmap never replaces a view chosen after it.
async function show(img, url) {
  if (!url) return;
  img.dataset.want = url;
  try {
    const blob = await (await api(url)).blob();
    if (img.dataset.want !== url) return;
    if (img.dataset.url) URL.revokeObjectURL(img.dataset.url);
    img.dataset.url = URL.createObjectURL(blob);
    img.src = img.dataset.url;
    img.dataset.src = url;
  } catch (err) { img.alt = String(err.message || err); }
}

function say(text, error = false) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
}

// ------------------------------------------------------------------ model and uploads
async function loadModel() {
  try {
    state.model = await json(`${API}/model`);
  } catch (err) {
    $("model-info").textContent = String(err.message || err);
    return;
  }
  const m = state.model;
  state.labels = m.labels;
  const bands = m.labels.map((l) => `${l} ≥ ${m.thresholds[l]} (review ≥ ${m.review_thresholds[l]})`).join(", ");
  $("model-info").textContent = `${m.model} · ${m.size} px · ${bands} · elcell ${m.version}`;
  $("review-panel").hidden = !m.review;
  if (m.review) { nextReview(); pollReview(); }
}

function worst(decisions) {
  const values = Object.values(decisions || {});
  return values.includes("defect") ? "defect" : values.includes("review") ? "review" : "ok";
}

function labelRows(probs, decisions) {
  return state.labels.map((label) => el("div", { class: "label-row" },
    el("span", { class: "label" }, label),
    el("span", {}, (probs[label] ?? 0).toFixed(3)),
    el("span", { class: `decision ${decisions[label]}`, "data-label": label }, decisions[label]),
    el("span", { class: "bar" }, el("i", { style: `width:${(100 * (probs[label] || 0)).toFixed(1)}%` }))));
}

function flagOf(cell) {
  const flag = worst(cell.decisions);
  return flag === "ok" && cell.review ? "queued" : flag;
}

function cellCard(cell, file) {
  if (cell.error) {
    const card = el("div", { class: "card failed", "data-name": cell.name, "data-flag": "failed" },
      el("div", { class: "name" }, cell.name), el("div", { class: "error-text" }, cell.error));
    if (file && isModuleError(cell.error)) card.append(moduleOffer(file));
    return card;
  }
  const flag = flagOf(cell);
  const img = el("img", { alt: cell.name });
  show(img, cell.image);
  const tabs = el("div", { class: "tabs" });
  const views = [["cell", cell.image], ...state.labels.map((l) => [l, cell.overlays[l]])];
  for (const [name, url] of views) {
    const button = el("button", { type: "button", class: name === "cell" ? "on" : "", "data-view": name,
      onclick: (event) => {
        event.stopPropagation();
        tabs.querySelectorAll("button").forEach((b) => b.classList.remove("on"));
        button.classList.add("on");
        show(img, url);
      } }, name);
    tabs.append(button);
  }
  const card = el("div", { class: `card flag-${flag}`, "data-name": cell.name, "data-flag": flag,
    onclick: () => enlarge(cell.name, cell) },
    img, el("div", { class: "name" }, cell.name), ...labelRows(cell.probs, cell.decisions), tabs);
  if (cell.review) card.append(el("div", { class: "muted queued" }, "in the review queue"));
  // the overlay to show when heatmaps are asked for: the surest of the flagged labels, else the likeliest
  const ranked = state.labels.slice().sort((a, b) => cell.probs[b] - cell.probs[a]);
  const flagged = ranked.filter((l) => cell.decisions[l] !== "ok");
  const label = flagged[0] || ranked[0];
  card.heatmap = { label, url: cell.overlays[label], img, tabs, flagged: flagged.length > 0 };
  return card;
}

// Flagged cells first, then those queued for review, then the rest (each group newest first).
function sortCards() {
  const results = $("results");
  const cards = [...results.children];
  cards.sort((a, b) => (FLAG_RANK[a.dataset.flag] ?? -1) - (FLAG_RANK[b.dataset.flag] ?? -1));
  results.replaceChildren(...cards);
}

// Heatmaps cost a model pass each: asked for the flagged cells (or all, with the
// toggle), one after the other, with progress in the status line.
async function heatmaps(cards) {
  const all = $("heat-all").checked;
  const wanted = cards.filter((card) => card.heatmap && (all || card.heatmap.flagged));
  for (const [k, card] of wanted.entries()) {
    $("progress").textContent = `heatmaps: ${k + 1} of ${wanted.length}…`;
    const { label, url, img, tabs } = card.heatmap;
    tabs.querySelectorAll("button").forEach((b) => b.classList.toggle("on", b.dataset.view === label));
    await show(img, url);
    card.dataset.heatmap = label;
  }
  $("progress").textContent = wanted.length ? `heatmaps: ${wanted.length} drawn` +
    (all ? "" : " (flagged cells; tick \u201cheatmaps for every cell\u201d for all)") : "";
}

function isModuleError(text) { return /photo of a whole module/.test(text || ""); }

function moduleOffer(file) {
  return el("button", { type: "button", class: "offer", onclick: (event) => {
    event.stopPropagation();
    $("mode-module").checked = true;
    upload([file]);
  } }, `Inspect ${file.name} as a module (grid ${$("grid").value})`);
}

function checkGrid() {
  const text = $("grid").value;
  const found = /^\s*(\d{1,4})\s*[xX×*]\s*(\d{1,4})\s*$/.exec(text);
  if (!found) throw new Error(`the grid "${text}" is not rows x columns; type it as the module appears in the photo, e.g. 6x10`);
  if (Number(found[1]) < 1 || Number(found[2]) < 1) throw new Error(`the grid "${text}" has no cells; a module has at least 1 row and 1 column, e.g. 6x10`);
}

async function upload(files) {
  if (!files.length) return;
  if (state.busy) {
    say("still scoring the previous upload: drop these again when it is done", true);
    return;
  }
  const module = $("mode-module").checked;
  const form = new FormData();
  state.busy = true;
  if (document.activeElement === $("grid")) $("grid").blur();  // the grid is set: keys review again
  let cards = [];
  try {
    if (module) {
      if (files.length > 1) throw new Error("a module is one photo: drop one file, or switch to Cells");
      checkGrid();
      form.append("file", files[0]);
      form.append("grid", $("grid").value);
      say(`inspecting ${files[0].name} (${$("grid").value})…`);
      const answer = await json(`${API}/modules`, { method: "POST", body: form });
      showModule(answer);
      say(`${answer.name}: grade ${answer.grade} in ${answer.seconds.toFixed(2)} s`);
    } else {
      for (const file of files) form.append("files", file);
      say(`scoring ${files.length} cell${files.length > 1 ? "s" : ""}…`);
      const answer = await json(`${API}/cells?heatmaps=none`, { method: "POST", body: form });
      cards = answer.cells.map((cell, i) => cellCard(cell, files[i]));
      $("results").prepend(...cards);
      sortCards();
      const failed = answer.cells.filter((c) => c.error).length;
      say(`scored ${answer.cells.length - failed} cell(s)` + (failed ? `, ${failed} could not be read` : ""), failed > 0);
    }
  } catch (err) {
    say(String(err.message || err), true);
    if (!module && files.length === 1 && isModuleError(err.message)) $("status").append(" ", moduleOffer(files[0]));
  } finally {
    state.busy = false;
  }
  refreshReview().catch(() => {});  // the counter after every upload (the poll retries on failure)
  await heatmaps(cards);  // after: a next upload need not wait for them
}

// ------------------------------------------------------------------ modules
function showModule(module) {
  $("module-result").hidden = false;
  $("module-grade").textContent = module.grade;
  $("module-name").textContent = `${module.name} (${module.grid})`;
  $("module-rule").textContent = module.rule;
  const c = module.counts;
  $("module-counts").textContent = `defect cells ${c.defect_cells} · review cells ${c.review_cells} · ` +
    `dark area ${(100 * c.dark_area).toFixed(1)} %`;
  show($("module-map"), module.map);
  const [width, height] = module.map_size;
  const layer = $("map-cells");
  layer.replaceChildren();
  for (const cell of module.cells) {
    const [x0, y0, x1, y1] = cell.map_box;
    const name = `${module.name} r${cell.row} c${cell.col}`;
    layer.append(el("button", {
      class: "map-cell", type: "button", title: `${name}: ${worst(cell.decisions)}`,
      "data-row": cell.row, "data-col": cell.col, "data-flag": worst(cell.decisions),
      style: `left:${100 * x0 / width}%;top:${100 * y0 / height}%;width:${100 * (x1 - x0) / width}%;height:${100 * (y1 - y0) / height}%`,
      onclick: () => enlarge(name, { ...cell, overlays: overlaysOf(cell.id) }, cell.dark_area),
    }));
  }
  $("module-result").scrollIntoView({ behavior: "smooth", block: "start" });
}

function overlaysOf(id) {
  return Object.fromEntries(state.labels.map((l) => [l, `${API}/results/${id}/overlay/${l}.png`]));
}

// ------------------------------------------------------------------ enlarging a cell
function enlarge(title, cell, dark) {
  const figures = el("div", { class: "enlarged" });
  const views = [["cell", cell.image], ...state.labels.map((l) => [`${l}: ${cell.decisions[l]}`, cell.overlays[l]])];
  for (const [caption, url] of views) {
    const img = el("img", { alt: caption });
    show(img, url);
    figures.append(el("figure", {}, img, el("figcaption", {}, caption)));
  }
  const extra = dark === undefined ? [] : [el("div", { class: "muted" }, `dark area ${(100 * dark).toFixed(1)} %`)];
  $("modal-title").textContent = title;
  $("modal-body").replaceChildren(figures, ...labelRows(cell.probs, cell.decisions), ...extra);
  $("modal").hidden = false;
  $("modal-close").focus();
}

function closeModal() { $("modal").hidden = true; }

// ------------------------------------------------------------------ the review loop
function counts(status) {
  $("review-count").textContent = `${status.waiting} waiting · ${status.answered} answered`;
}

function showReview(item) {
  state.review = item;
  state.ticked.clear();
  $("review-item").hidden = !item;
  $("review-empty").hidden = !!item;
  if (!item) return;
  const flagged = state.labels.filter((l) => item.decisions[l] !== "ok")
    .sort((a, b) => item.probs[b] - item.probs[a]);
  show($("review-image"), flagged.length ? item.overlays[flagged[0]] : item.image);
  $("review-name").textContent = item.name;
  $("review-reason").textContent = `why: ${item.reason}`;
  $("review-probs").replaceChildren(...labelRows(item.probs, item.decisions));
  const buttons = state.labels.map((label, i) => el("button", {
    type: "button", "data-label": label, onclick: () => answer([label]) }, el("kbd", {}, String(i + 1)), label));
  buttons.push(el("button", { type: "button", class: "ok", "data-label": "ok", onclick: () => answer([]) },
    el("kbd", {}, "0"), "ok"));
  buttons.push(el("button", { type: "button", "data-label": "skip", onclick: skip }, el("kbd", {}, "S"), "skip"));
  $("review-buttons").replaceChildren(...buttons);
}

async function nextReview() {
  try {
    const next = await json(`${API}/review/next?session=${session()}`);
    counts(next);
    showReview(next.item);
  } catch (err) {
    saved(String(err.message || err), true);
  }
}

async function refreshReview() {
  if (!state.model || !state.model.review) return;
  const status = await json(`${API}/review?session=${session()}`);
  counts(status);
  if (!state.review && status.waiting > 0) await nextReview();
}

// The page notices new work (and a restarted station) without a reload: it polls,
// backing off while the station does not answer, and never stops.
function pollReview(delay = 4000) {
  clearTimeout(state.poll);
  state.poll = setTimeout(async () => {
    try {
      await refreshReview();
      $("review-offline").hidden = true;
      pollReview(4000);
    } catch (err) {
      $("review-offline").hidden = false;
      $("review-offline").textContent = `the station does not answer (${err.message || err}); trying again`;
      pollReview(Math.min(2 * delay, 30000));
    }
  }, delay);
}

function saved(text, error = false) {
  $("review-saved").textContent = text;
  $("review-saved").className = error ? "error" : "muted";
}

async function answer(present) {
  const item = state.review;
  if (!item) return;
  state.review = null;
  const labels = Object.fromEntries(state.labels.map((l) => [l, present.includes(l) ? 1 : 0]));
  const said = present.length ? present.join(" + ") : "ok";
  try {
    const done = await json(`${API}/review/${item.id}`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ labels }) });
    const before = done.replaced ? Object.keys(done.replaced).filter((l) => done.replaced[l]).join(" + ") || "ok" : "";
    saved(`${item.name}: ${said} → ${done.path} (` + (done.same ? "answered so before, nothing changed" :
      before ? `replaced the earlier answer ${before}` : `row ${done.rows} of labels.csv`) + ")");
  } catch (err) {
    saved(`${item.name}: ${said} not saved: ${err.message || err}`, true);
  }
  nextReview();
}

async function skip() {
  const item = state.review;
  if (!item) return;
  state.review = null;
  try { await json(`${API}/review/${item.id}/skip`, { method: "POST" }); } catch (err) { /* gone already */ }
  nextReview();
}

// Keys answer wherever focus is, except while the operator types text.
function typing(target) {
  if (!target || !target.tagName) return false;
  if (target.isContentEditable || target.tagName === "TEXTAREA") return true;
  const textual = ["text", "search", "email", "url", "tel", "password", "number"];
  return target.tagName === "INPUT" && textual.includes((target.getAttribute("type") || "text").toLowerCase());
}

function onKey(event) {
  if (!$("modal").hidden && event.key === "Escape") { closeModal(); return; }
  if (typing(event.target)) {
    if (event.key === "Escape" || (event.key === "Enter" && event.target === $("grid"))) event.target.blur();
    return;
  }
  if (!state.review || event.ctrlKey || event.metaKey || event.altKey) return;
  const digit = /^(?:Digit|Numpad)([0-9])$/.exec(event.code);
  const number = digit ? Number(digit[1]) : null;
  if (number && number <= state.labels.length) {
    const label = state.labels[number - 1];
    if (event.shiftKey) {
      state.ticked.has(label) ? state.ticked.delete(label) : state.ticked.add(label);
      document.querySelector(`#review-buttons button[data-label="${label}"]`).classList.toggle("ticked");
    } else {
      answer([label]);
    }
  } else if (number === 0 || event.code === "KeyO") {
    answer([]);
  } else if ((event.code === "Enter" || event.code === "NumpadEnter") && state.ticked.size) {
    answer([...state.ticked]);
  } else if (event.code === "KeyS") {
    skip();
  } else {
    return;
  }
  event.preventDefault();
}

// A closing or reloading tab returns its cell at once (a reload gets it back: same session).
function release() {
  if (!state.review) return;
  fetch(`${API}/review/release?session=${session()}`, { method: "POST", keepalive: true, headers: headers() })
    .catch(() => {});
}

// ------------------------------------------------------------------ wiring
function init() {
  const drop = $("drop");
  $("files").addEventListener("change", (event) => { upload([...event.target.files]); event.target.value = ""; });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (event) => upload([...event.dataTransfer.files]));
  $("modal-close").addEventListener("click", closeModal);
  $("modal").addEventListener("click", (event) => { if (event.target === $("modal")) closeModal(); });
  document.addEventListener("keydown", onKey);
  window.addEventListener("pagehide", release);
  $("grid").addEventListener("change", () => $("grid").blur());
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem("elcell-token", $("token").value.trim());
    $("token-form").hidden = true;
    loadModel();
  });
  loadModel();
}

init();

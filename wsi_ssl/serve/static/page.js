// The page of `wsi-ssl serve`: a deep-zoom viewer (OpenSeadragon over the server's DZI tiles),
// box search from any zoom, results side by side, accept/reject into the archive's label files.
"use strict";
const $ = (id) => document.getElementById(id);
const CLICK_PX = 5;  // a press that moves less than this (screen px) is a click, not a drag
const state = {
  slides: [], current: null, viewer: null, lastBox: null, answer: null, mark: null,
  labels: { accepted: [], rejected: [] }, slideSeq: 0, searchSeq: 0, indexSeq: 0, drawing: false, drag: null,
  layers: null, minis: [], shown: "",
};
const LAYERS = ["qc", "annotations", "attention"];
window.wsi = state;  // for tests and the console

// the status line; an error is brought into view when the page has scrolled it away (narrow windows)
function setStatus(text, error = false, show = error) {
  $("status").textContent = text;
  $("status").className = error ? "error" : "";
  if (show) reveal($("status"));
}

// narrow windows: the status line and the viewer below it scrolled into view when ``el``'s top
// lies outside the window
function reveal(el) {
  const top = el.getBoundingClientRect().top;
  if (top < 0 || top >= window.innerHeight) $("status").scrollIntoView({ block: "start" });
}

// the server's reason why the picture at ``url`` failed (null: it draws it now)
async function reasonOf(url) {
  let response;
  try {
    response = await fetch(url);
  } catch (err) {
    return "the server did not answer";
  }
  if (response.ok) return null;
  try {
    const answer = await response.json();
    if (answer && answer.error) return answer.error;
  } catch (err) { /* no JSON: its status */ }
  return `${response.status} ${response.statusText}`;
}

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  };
  const response = await fetch(path, options);
  let answer = null;
  try {
    answer = await response.json();
  } catch (err) {
    if (response.ok) throw new Error(`${path}: the server sent no JSON`);
  }
  if (!response.ok) throw new Error((answer && answer.error) || `${response.status} ${response.statusText}`);
  return answer;
}

// make ``el`` act like a button: clicked, or focused with Tab and pressed with Enter or Space
function activate(el, fn) {
  el.tabIndex = 0;
  el.onclick = fn;
  el.onkeydown = (e) => {
    if ((e.key === "Enter" || e.key === " ") && e.target === el) { e.preventDefault(); fn(); }
  };
}

// the slide list again from the server (slides indexed since the page was opened appear)
async function refreshSlides() {
  try {
    state.slides = await api(withIndex("/api/slides"));
  } catch (err) {
    return setStatus(err.message, true);
  }
  renderSlideList();
  if (document.body.dataset.state === "empty" && state.slides.length) {
    openSlide(state.slides[0].slide_id);  // slides added to an empty index since
  }
}

// the slide list, filtered; the keyboard focus stays on the slide it was on
function renderSlideList() {
  const needle = $("filter").value.toLowerCase();
  const list = $("slides");
  const focused = list.contains(document.activeElement) ? document.activeElement.dataset.slide : null;
  list.replaceChildren();
  for (const s of state.slides) {
    if (needle && !s.name.toLowerCase().includes(needle) && !s.slide_id.startsWith(needle)) continue;
    const li = document.createElement("li");
    li.textContent = s.name;
    li.dataset.slide = s.slide_id;
    const small = document.createElement("small");
    small.textContent = `${s.slide_id} · ${s.n_tiles} tiles`;
    li.append(small);
    if (state.current && state.current.slide_id === s.slide_id) li.className = "active";
    activate(li, () => openSlide(s.slide_id));
    list.append(li);
    if (s.slide_id === focused) li.focus();
  }
}

// a slide's file name, with a short id when another slide the page knows has the same name
function slideName(slideId, name, others = []) {
  const ids = new Set([slideId]);
  for (const s of [...state.slides, ...others]) if (s.name === name) ids.add(s.slide_id);
  return ids.size > 1 ? `${name} (${slideId.slice(0, 8)})` : name;
}

// -- the viewer --------------------------------------------------------------------------------
function makeViewer() {
  state.viewer = OpenSeadragon({
    element: $("viewer"),
    prefixUrl: "/static/vendor/openseadragon/images/",
    drawer: "canvas",
    showNavigator: true,
    navigatorPosition: "BOTTOM_RIGHT",
    maxZoomPixelRatio: 2,
    visibilityRatio: 0.5,
    animationTime: 0.4,
    gestureSettingsMouse: { clickToZoom: false },
  });
  state.viewer.addHandler("open", onOpen);
  // the view stays fitted (the whole slide, or a hit's surroundings) until the user pans or
  // zooms: when the viewer's size changes (controls and status lines wrapping), it is fitted
  // again after OpenSeadragon's own resize, which keeps the width and would crop the height
  state.viewer.addHandler("resize", () => { state.refit = !!state.fit; });
  state.viewer.addHandler("viewport-change", () => {
    if (!state.refit) return;
    state.refit = false;
    state.viewer.viewport.fitBounds(state.fit, true);
  });
  state.viewer.addHandler("open-failed", (e) => setStatus(`the slide could not be opened: ${e.message}`, true));
  state.viewer.addHandler("tile-load-failed", async (e) => {  // the server's reason, once a slide
    const seq = state.slideSeq;
    if (state.tilesFailed === seq) return;
    state.tilesFailed = seq;
    const why = await reasonOf(e.tile.getUrl());
    if (why && seq === state.slideSeq) setStatus(why, true);
  });
  const el = $("viewer");
  for (const type of ["pointerdown", "wheel", "keydown"]) {
    el.addEventListener(type, (e) => { if (!state.drawing && !e.shiftKey) state.fit = null; }, true);
  }
  el.addEventListener("pointerdown", startDrag, true);
  window.addEventListener("pointermove", moveDrag);
  window.addEventListener("pointerup", endDrag);
}

function imageRect(box) {
  return state.viewer.viewport.imageToViewportRectangle(box[0], box[1], box[2], box[3]);
}

function overlay(box, cls) {
  const div = document.createElement("div");
  div.className = "box " + cls;
  state.viewer.addOverlay({ element: div, location: imageRect(box) });
}

// the query box, the matched tiles and hits on this slide, and the labelled regions
function redrawOverlays() {
  const v = state.viewer, cur = state.current;
  if (!v || !cur || !v.world.getItemCount()) return;
  v.clearOverlays();
  const id = cur.slide_id;
  if ($("concept").checked && state.labels.accepted.some((r) => r.label === $("label").value)) {
    const img = document.createElement("img");
    img.className = "concept";
    img.alt = "";
    const params = new URLSearchParams({ label: $("label").value,
      n: `${state.labels.accepted.length}.${state.labels.rejected.length}` });
    img.src = withIndex(`/api/slides/${id}/concept.png?${params}`, cur.index);
    img.onerror = () => overlayFailed(img.src, "concept map");
    v.addOverlay({ element: img, location: imageRect([0, 0, cur.dimensions[0], cur.dimensions[1]]) });
  }
  for (const name of LAYERS) {
    if (!$(`layer-${name}`).checked || $(`layer-${name}`).disabled) continue;
    const img = document.createElement("img");
    img.className = "layer " + name;
    img.alt = "";
    img.src = withIndex(`/api/slides/${id}/layers/${name}.png`, cur.index);
    img.onerror = () => overlayFailed(img.src, `${name} layer`);
    v.addOverlay({ element: img, location: imageRect([0, 0, cur.dimensions[0], cur.dimensions[1]]) });
  }
  for (const r of state.labels.accepted) if (r.slide === id) overlay([r.x, r.y, r.w, r.h], "accepted");
  for (const r of state.labels.rejected) if (r.slide === id) overlay([r.x, r.y, r.w, r.h], "rejected");
  const a = state.answer;
  if (a) {
    for (const hit of a.hits) {
      if (hit.slide_id !== id || !hit.box) continue;
      overlay(hit.tile_box || hit.box, hit.tile_box ? "hit tile" : "hit");
    }
  }
  if (state.mark) overlay(state.mark, "hit");
  if (state.lastBox && a && a.query.slide_id === id) overlay(a.query.box || state.lastBox, "query");
}

// a picture over the slide failed: the server's reason in the status line
async function overlayFailed(url, what) {
  const why = await reasonOf(url);
  setStatus(why ? `${what}: ${why}` : `the ${what} could not be drawn`, true);
}

function onOpen() {
  const seq = state.slideSeq;
  const cur = state.current;
  const vp = state.viewer.viewport;
  if (state.mark) {
    const [x, y, w, h] = state.mark;
    state.fit = imageRect([x - w, y - h, 3 * w, 3 * h]);
  } else {
    state.fit = vp.getHomeBounds();
  }
  vp.fitBounds(state.fit, true);
  redrawOverlays();
  if (seq === state.slideSeq) {
    setStatus(`${cur.name}: ${cur.dimensions.join(" × ")} px at ${cur.mpp.toFixed(3)} µm/px, ` +
      `${cur.n_tiles} tiles (pictures from the ${cur.source === "slide" ? "slide file" : "stored tiles"}). ` +
      "Drag to pan, scroll to zoom; draw a box (button or Shift+drag) to search.");
    document.body.dataset.state = "ready";
  }
}

// open a slide of ``index`` (default: the one picked; a hit's: the index that found it)
async function openSlide(slideId, mark = null, index = indexParam().index) {
  const seq = ++state.slideSeq;
  let details;
  try {
    details = await api(withIndex(`/api/slides/${encodeURIComponent(slideId)}`, index));
  } catch (err) {
    if (seq === state.slideSeq) setStatus(err.message, true);
    return;
  }
  if (seq !== state.slideSeq) return;
  document.body.dataset.state = "opening";
  state.current = { ...details, index };
  state.mark = mark;
  state.layers = null;
  renderSlideList();
  loadLayers(details.slide_id, seq);
  setStatus(`opening ${details.name}…`);
  reveal($("viewer"));  // a hit or a listed slide clicked below it (narrow windows)
  state.viewer.open(details.dzi);
}

// -- drawing a box -----------------------------------------------------------------------------
function setDrawing(on) {
  state.drawing = on;
  $("draw").setAttribute("aria-pressed", String(on));
  $("viewer").classList.toggle("drawing", on);
}

function local(e) {
  const r = $("viewer").getBoundingClientRect();
  return { x: Math.min(Math.max(e.clientX - r.left, 0), r.width), y: Math.min(Math.max(e.clientY - r.top, 0), r.height) };
}

function startDrag(e) {
  if (e.button !== 0 || !state.current || !(state.drawing || e.shiftKey)) return;
  if (e.target.closest && e.target.closest(".navigator")) return;
  e.preventDefault();
  e.stopPropagation();
  state.viewer.setMouseNavEnabled(false);
  const rubber = document.createElement("div");
  rubber.id = "rubber";
  $("viewer").append(rubber);
  state.drag = { start: local(e), rubber };
  moveDrag(e);
}

function moveDrag(e) {
  const d = state.drag;
  if (!d) return;
  const p = local(e);
  Object.assign(d.rubber.style, {
    left: Math.min(p.x, d.start.x) + "px", top: Math.min(p.y, d.start.y) + "px",
    width: Math.abs(p.x - d.start.x) + "px", height: Math.abs(p.y - d.start.y) + "px",
  });
}

// Escape leaves drawing mode and drops a box being drawn
function cancelDrawing(e) {
  if (e.key !== "Escape") return;
  if (state.drag) {
    state.drag.rubber.remove();
    state.drag = null;
    state.viewer.setMouseNavEnabled(true);
  }
  setDrawing(false);
}

function endDrag(e) {
  const d = state.drag;
  if (!d) return;
  state.drag = null;
  d.rubber.remove();
  state.viewer.setMouseNavEnabled(true);
  setDrawing(false);
  search(queryBox(d.start, local(e)));
}

// a click asks about the tile under the pointer; a drag about the box drawn, each side at least
// one tile, about the same centre (level-0 px)
function queryBox(start, end) {
  const vp = state.viewer.viewport, OSD = OpenSeadragon;
  const a = vp.viewerElementToImageCoordinates(new OSD.Point(start.x, start.y));
  const b = vp.viewerElementToImageCoordinates(new OSD.Point(end.x, end.y));
  const t = state.current.tile_size_level0;
  if (Math.abs(end.x - start.x) < CLICK_PX && Math.abs(end.y - start.y) < CLICK_PX) {
    return [a.x - t / 2, a.y - t / 2, t, t].map(Math.round);
  }
  return atLeastOneTile([Math.min(a.x, b.x), Math.min(a.y, b.y), Math.abs(b.x - a.x), Math.abs(b.y - a.y)]);
}

// the box widened about its centre to at least one tile each side, rounded (level-0 px)
function atLeastOneTile([x, y, w, h]) {
  const t = state.current.tile_size_level0;
  if (w < t) { x -= (t - w) / 2; w = t; }
  if (h < t) { y -= (t - h) / 2; h = t; }
  return [x, y, w, h].map(Math.round);
}

// the part of the slide in view, as a query box: a search without a pointer (pan and zoom the
// viewer with the keys, then "search the view")
function viewBox() {
  const vp = state.viewer.viewport, [width, height] = state.current.dimensions;
  const r = vp.viewportToImageRectangle(vp.getBounds(true));
  const [x0, y0] = [Math.max(r.x, 0), Math.max(r.y, 0)];
  const [x1, y1] = [Math.min(r.x + r.width, width), Math.min(r.y + r.height, height)];
  return atLeastOneTile([x0, y0, x1 - x0, y1 - y0]);
}

// -- searching and results -----------------------------------------------------------------------
async function search(box) {
  const seq = ++state.searchSeq;
  const cur = state.current;
  document.body.dataset.state = "searching";
  setStatus("searching…");
  [state.lastSlide, state.lastBox] = [cur.slide_id, box];  // asked again when a setting changes
  let answer;
  try {
    answer = await api("/api/search", {  // in the index the open slide was opened from
      slide: cur.slide_id, box, k: resultCount(),
      mode: $("mode").value, exclude_self: $("exclude-self").checked, ...filters(), index: cur.index,
    });
  } catch (err) {
    return searchFailed(seq, err);
  }
  if (seq !== state.searchSeq) return;
  const shown = `${answer.mode} like the box drawn on ${cur.name}`;
  showAnswer(answer, shown, `${answer.hits.length} ${answer.mode} in ${(1000 * answer.seconds).toFixed(1)} ms ` +
    `(index ${answer.index.name}, ${answer.index.n_vectors} tiles). Click a result to open it; ✓ / ✗ to label it.`);
  redrawOverlays();  // state.lastBox stays the box drawn: a tile search answers with its centre tile
}

// the "results" box: a whole number from 1 to 100 (or an error saying so)
function resultCount() {
  const el = $("k"), k = Number(el.value);
  if (el.value.trim() === "" || !Number.isInteger(k) || k < Number(el.min) || k > Number(el.max)) {
    throw new Error(`results: a whole number from ${el.min} to ${el.max}, not "${el.value}"`);
  }
  return k;
}

// a search failed: its reason shown, and no results of an earlier question left on screen
function searchFailed(seq, err) {
  if (seq !== state.searchSeq) return;
  clearResults();
  document.body.dataset.state = "ready";
  setStatus(err.message, true);
}

// no results or slide ranking on screen, and none of a search still under way to come
function clearResults() {
  state.searchSeq++;
  for (const v of state.minis) v.destroy();
  state.minis = [];
  state.answer = null;
  $("results").replaceChildren();
  renderRanking([], null);
  redrawOverlays();
}

// ``answer`` in the results panel (``shown``: what it is, said when a setting changed after it
// cannot ask it again); ``heading``: [title, meta] of its card when it has no query picture
function showAnswer(answer, shown, message, heading = null) {
  for (const v of state.minis) v.destroy();
  state.minis = [];
  state.answer = answer;
  state.shown = shown;
  state.mark = null;
  const results = $("results");
  const q = answer.query;
  results.replaceChildren();
  if (q.image) {
    results.append(card(q.image, `query: ${q.slide_name}`,
      `${q.n_tiles} tile(s), ${q.size_um.map((v) => v.toFixed(0)).join(" × ")} µm`, "query"));
  } else if (heading) {
    results.append(card(null, heading[0], heading[1], "query heading"));
  }
  for (const hit of answer.hits) results.append(hitCard(hit, answer.mode));
  renderRanking(answer.slides || [], answer.index.name);
  const known = new Set(state.slides.map((s) => s.slide_id));
  if (answer.hits.some((h) => !known.has(h.slide_id))) refreshSlides();  // indexed since
  setStatus(message);
  document.body.dataset.state = "results";
  // below the viewer in a narrow window: the results panel brought into view
  if (results.getBoundingClientRect().top >= window.innerHeight) $("side").scrollIntoView({ block: "start" });
}

// a result card: its picture (none: ``imageUrl`` null), title and one line of details
function card(imageUrl, title, meta, cls) {
  const div = document.createElement("div");
  div.className = "card" + (cls ? " " + cls : "");
  if (imageUrl) {
    const img = document.createElement("img");
    img.src = imageUrl;
    img.alt = title;
    img.onerror = async () => cardNote(div, await reasonOf(img.src) || "the picture could not be drawn");
    div.append(img);
  }
  const text = document.createElement("div");
  const t = document.createElement("div");
  t.className = "title";
  t.textContent = t.title = title;
  const m = document.createElement("div");
  m.className = "meta";
  m.textContent = meta;
  text.append(t, m);
  div.append(text);
  return div;
}

// a line under a card's title: why its picture, viewer or label failed
function cardNote(div, text) {
  let note = div.querySelector(".note.error");
  if (!note) {
    note = document.createElement("div");
    note.className = "note error";
    div.lastChild.append(note);
  }
  note.textContent = text;
}

function hitCard(hit, mode) {
  const meta = mode === "regions"
    ? `score ${hit.score.toFixed(2)} · ${hit.n_tiles} tiles · covers ${(100 * hit.coverage).toFixed(0)}%`
    : mode === "slides" ? `score ${hit.score.toFixed(3)} · ${hit.n_hits} hits` : `similarity ${hit.score.toFixed(3)}`;
  const all = state.answer ? [...state.answer.hits, ...(state.answer.slides || [])] : [];
  const div = card(hit.image, `#${hit.rank} ${slideName(hit.slide_id, hit.name, all)}`, meta, "hit");
  if (hit.label) {
    const tag = document.createElement("span");
    tag.className = "label";
    tag.textContent = hit.label;
    div.lastChild.firstChild.prepend(tag, " ");
  }
  if (hit.note) {  // its slide was re-tiled after indexing
    const note = document.createElement("div");
    note.className = "note";
    note.textContent = hit.note;
    div.lastChild.append(note);
  }
  const box = hit.tile_box || hit.box;
  div.dataset.slide = hit.slide_id;
  const index = state.answer.index.name;
  activate(div, () => openSlide(hit.slide_id, box, index));
  if (box) {
    const verdict = document.createElement("div");
    verdict.className = "verdict";
    const zoom = document.createElement("button");
    zoom.type = "button";
    zoom.className = "zoom";
    zoom.textContent = "viewer";
    zoom.title = "pan and zoom this hit here (its matched tiles outlined)";
    zoom.onclick = (e) => { e.stopPropagation(); zoom.disabled = true; miniViewer(hit, box, div.querySelector("img"), index); };
    verdict.append(zoom);
    for (const [name, text] of [["accept", "✓ accept"], ["reject", "✗ reject"]]) {
      const b = document.createElement("button");
      b.type = "button";
      b.className = name;
      b.textContent = text;
      b.onclick = (e) => { e.stopPropagation(); judge(hit, box, name, div, index); };
      verdict.append(b);
    }
    div.lastChild.append(verdict);
  }
  return div;
}

// a small deep-zoom viewer of a hit in place of its picture: the hit's slide fitted to twice the
// hit's box, its matched tiles (or the hit itself) outlined
async function miniViewer(hit, box, img, index) {
  let details;
  try {
    details = await api(withIndex(`/api/slides/${encodeURIComponent(hit.slide_id)}`, index));
  } catch (err) {
    cardNote(img.closest(".card"), err.message);
    return setStatus(err.message, true, false);
  }
  const el = document.createElement("div");
  el.className = "mini";
  el.addEventListener("click", (e) => e.stopPropagation());
  img.replaceWith(el);
  const v = OpenSeadragon({
    element: el, tileSources: details.dzi, prefixUrl: "/static/vendor/openseadragon/images/",
    drawer: "canvas", showNavigationControl: false, maxZoomPixelRatio: 2, visibilityRatio: 0.5,
    animationTime: 0, gestureSettingsMouse: { clickToZoom: false },
  });
  v.addHandler("open", () => {
    const vp = v.viewport, [x, y, w, h] = box;
    const rect = (b) => vp.imageToViewportRectangle(b[0], b[1], b[2], b[3]);
    vp.fitBounds(rect([x - w / 2, y - h / 2, 2 * w, 2 * h]), true);
    for (const t of hit.tile_boxes || [box]) {
      const d = document.createElement("div");
      d.className = "box tile";
      v.addOverlay({ element: d, location: rect(t) });
    }
  });
  state.minis.push(v);
}

async function judge(hit, box, verdict, div, index) {
  try {
    state.labels = await api("/api/labels", {
      slide: hit.slide_id, box, label: $("label").value, verdict, index,
    });
  } catch (err) {
    cardNote(div, err.message);  // beside the button pressed: the status line may be off screen
    return setStatus(err.message, true, false);
  }
  div.querySelector(".note.error")?.remove();
  div.classList.toggle("accepted", verdict === "accept");
  div.classList.toggle("rejected", verdict === "reject");
  const done = { accept: "accepted", reject: "rejected", clear: "cleared" }[verdict];
  setStatus(`${done} as ${$("label").value}: #${hit.rank} ${slideName(hit.slide_id, hit.name)}`);  // replaces any error
  showLabelInfo();
  redrawOverlays();
}

function showLabelInfo() {
  const a = state.labels.accepted.length, r = state.labels.rejected.length;
  $("label-info").textContent = `${a} accepted, ${r} rejected · saved in labels/regions.csv and labels/geojson/`;
}

async function moreLikeThese() {
  const seq = ++state.searchSeq;
  document.body.dataset.state = "searching";
  setStatus("searching with every accepted region…");
  try {
    const answer = await api("/api/labels/more", {
      label: $("label").value, k: resultCount(), ...indexParam(),
    });
    if (seq !== state.searchSeq) return;
    delete answer.query.image;
    state.lastBox = null;
    const skipped = answer.query.skipped ? ` (${answer.query.skipped} region(s) skipped: their ` +
      `slides left index ${answer.index.name} or were re-tiled)` : "";
    const shown = `tiles like the ${answer.query.regions} accepted region(s) labelled ${$("label").value}`;
    showAnswer(answer, shown, `${answer.hits.length} ${shown}${skipped}, outside every labelled region.`,
      [`more like these: ${shown}`, "found tile by tile; the “show” menu applies to the next box you draw"]);
    redrawOverlays();
  } catch (err) {
    searchFailed(seq, err);
  }
}

// -- filters, layers, ranking, picture upload ------------------------------------------------------
// the index picked in the index menu, when the page offers one
function indexParam() {
  return $("index-choice").hidden || !$("index").value ? {} : { index: $("index").value };
}

// ``path`` naming ``index`` (default: the one picked in the menu): slides and their pictures
// are looked up there
function withIndex(path, index = indexParam().index) {
  if (!index) return path;
  return `${path}${path.includes("?") ? "&" : "?"}index=${encodeURIComponent(index)}`;
}

function filters() {
  const out = indexParam();
  if ($("label-filter").value) out.labels = [$("label-filter").value];
  return out;
}

function fillChoices(info) {
  const indexes = (info.indexes || []).filter((i) => !i.error);
  $("index").replaceChildren(...indexes.map((i) => {
    const o = document.createElement("option");
    o.value = i.name;
    o.textContent = `${i.name} (${i.encoder_id}, ${i.kind}, ${i.n_vectors} tiles)`;
    o.selected = i.name === info.name;
    return o;
  }));
  $("index-choice").hidden = indexes.length < 2;
  for (const label of info.labels || []) {
    const o = document.createElement("option");
    o.value = o.textContent = label;
    $("label-filter").append(o);
  }
  $("label-choice").hidden = !(info.labels || []).length;
}

async function loadLayers(slideId, seq) {
  let info;
  try {
    info = await api(withIndex(`/api/slides/${encodeURIComponent(slideId)}/layers`, state.current.index));
  } catch (err) {
    info = { qc: null, annotations: null, mil: null };
  }
  if (seq !== state.slideSeq) return;
  state.layers = info;
  const has = { qc: !!info.qc, annotations: !!info.annotations, attention: !!(info.mil && info.mil.attention) };
  for (const name of LAYERS) $(`layer-${name}`).disabled = !has[name];
  const notes = [];
  if (info.qc) notes.push(`QC: ${info.qc.flagged} of ${info.qc.n_tiles} tiles flagged (red)`);
  if (info.annotations) notes.push("classes: " + info.annotations.classes.map((c) => c.name).join(", "));
  if (info.mil) {
    const p = Object.entries(info.mil.probabilities).map(([c, v]) => `${c} ${v.toFixed(2)}`).join(", ");
    notes.push(`MIL: ${info.mil.predicted} (${p})`);
  }
  $("layer-info").textContent = notes.join(" · ");
  const stops = (info.attention_colours || []).map(([r, g, b, a]) => `rgba(${r}, ${g}, ${b}, ${a / 255})`);
  $("attention-legend").querySelector(".ramp").style.backgroundImage =
    stops.length ? `linear-gradient(to right, ${stops.join(", ")})` : "";
  showLegend();
  redrawOverlays();
}

// the attention layer's legend (its colours from least to most attended) while the layer is shown
function showLegend() {
  const on = $("layer-attention");
  $("attention-legend").hidden = !on.checked || on.disabled;
}

function renderRanking(slides, index) {
  const list = $("slide-ranking");
  list.replaceChildren();
  for (const s of slides) {
    const li = document.createElement("li");
    li.dataset.slide = s.slide_id;
    li.textContent = `${slideName(s.slide_id, s.name, slides)}${s.label ? " [" + s.label + "]" : ""}: score ${s.score.toFixed(3)}, ${s.n_hits} hits`;
    activate(li, () => openSlide(s.slide_id, null, index));
    list.append(li);
  }
}

async function searchPicture() {
  const file = $("upload").files[0];
  if (!file) return;
  const seq = ++state.searchSeq;
  document.body.dataset.state = "searching";
  setStatus(`searching with ${file.name}…`);
  const f = filters();
  try {
    const params = new URLSearchParams({ k: String(resultCount()), mode: $("mode").value });
    if (f.index) params.set("index", f.index);
    if (f.labels) params.set("labels", f.labels.join(","));
    const response = await fetch(`/api/search/image?${params}`, {
      method: "POST", headers: { "Content-Type": file.type || "application/octet-stream" }, body: file,
    });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || `${response.status}`);
    if (seq !== state.searchSeq) return;
    state.lastBox = null;
    const shown = `${answer.mode} like ${file.name}`;
    showAnswer(answer, shown, `${answer.hits.length} ${shown} ` +
      `(${answer.query.n_tiles} tile(s)) in ${(1000 * answer.seconds).toFixed(1)} ms.`);
    redrawOverlays();
  } catch (err) {
    searchFailed(seq, err);
  } finally {
    $("upload").value = "";
  }
}

// the last search again (its box on the open slide) after a setting changed; results it cannot
// ask again (more like these, a picture, a box on another slide) stay, and the status line says so
function searchAgain(e) {
  if (state.current && state.lastBox && state.lastSlide === state.current.slide_id) return search(state.lastBox);
  if (!state.answer || !e) return;
  const mode = $("mode");
  const what = e.target === mode
    ? `show “${mode.options[mode.selectedIndex].text}”: draw a box to search with it`
    : "the new setting applies to the next search";
  setStatus(`${what}; the results shown are still the ${state.shown}.`);
}

function showIndexInfo(info) {
  $("index-info").textContent = `index ${info.name}: ${info.kind}, ${info.n_vectors} tiles ` +
    `from ${info.n_slides} slides, encoder ${info.encoder_id}`;
}

function showEmpty(name) {
  state.current = null;
  state.viewer.close();
  document.body.dataset.state = "empty";
  const other = $("index-choice").hidden ? "." : "; or pick another index above.";
  setStatus(`Index ${name} holds no slide. Add some with \`wsi-ssl index ROOT --add --name ${name}\` ` +
    `(after tiling and embedding them into ROOT): they appear when you come back to this window${other}`, true);
}

// another index picked: the results and slide ranking of the last one cleared at once (their
// hits belong to that one), its summary in the header, its slides in the list; the open slide
// stays open (its last search run again) when that index holds it, else its first slide opens.
// Every call about the open slide then names the picked index (``state.current.index``).
async function switchIndex() {
  const seq = ++state.slideSeq, pick = ++state.indexSeq;
  state.mark = null;
  clearResults();
  let info, list;
  try {
    [info, list] = await Promise.all([api(withIndex("/api/index")), api(withIndex("/api/slides"))]);
  } catch (err) {
    if (pick === state.indexSeq) setStatus(err.message, true);
    return;
  }
  if (pick !== state.indexSeq) return;
  showIndexInfo(info);
  state.slides = list;
  renderSlideList();
  if (seq !== state.slideSeq) return;  // a slide of the list was opened meanwhile
  const cur = state.current;
  if (cur && list.some((s) => s.slide_id === cur.slide_id)) {
    cur.index = indexParam().index;
    loadLayers(cur.slide_id, seq);
    redrawOverlays();
    if (document.body.dataset.state !== "opening") document.body.dataset.state = "ready";
    searchAgain();
  } else if (list.length) {
    openSlide(list[0].slide_id);
  } else {
    showEmpty(info.name);
  }
}

function start() {
  const header = document.querySelector("header");
  new ResizeObserver(() => {  // the narrow layout's viewer takes the height below the header
    document.documentElement.style.setProperty("--header-h", `${header.offsetHeight}px`);
  }).observe(header);
  makeViewer();
  for (const name of LAYERS) $(`layer-${name}`).addEventListener("change", redrawOverlays);
  $("layer-attention").addEventListener("change", showLegend);
  $("upload").addEventListener("change", searchPicture);
  $("filter").addEventListener("input", renderSlideList);
  window.addEventListener("keydown", cancelDrawing);
  window.addEventListener("focus", refreshSlides);
  $("draw").addEventListener("click", () => setDrawing(!state.drawing));
  $("search-view").addEventListener("click", () => { if (state.current) search(viewBox()); });
  $("more").addEventListener("click", moreLikeThese);
  $("concept").addEventListener("change", redrawOverlays);
  $("label").addEventListener("change", redrawOverlays);
  $("index").addEventListener("change", switchIndex);
  for (const id of ["mode", "exclude-self", "k", "label-filter"]) $(id).addEventListener("change", searchAgain);
  (async () => {
    try {
      const [info, list, labels] = await Promise.all([api("/api/index"), api("/api/slides"), api("/api/labels")]);
      showIndexInfo(info);
      fillChoices(info);
      state.slides = list;
      state.labels = labels;
      showLabelInfo();
      renderSlideList();
      if (list.length) {
        openSlide(list[0].slide_id);
      } else {
        showEmpty(info.name);
      }
    } catch (err) {
      setStatus(err.message, true);
    }
  })();
}

document.addEventListener("DOMContentLoaded", start);

// Attractions page: plain JS, no build step. The token comes from the URL fragment (#token=…), is kept
// in sessionStorage and sent as a bearer header; images are fetched with it and shown as blob URLs.
"use strict";

const TOKEN_KEY = "landmarks.token";
const PAGE = 60;
const COVER_SIDE = 480;
const TILE_SIDE = 360;

const $ = (id) => document.getElementById(id);
const state = { user: null, cities: [], landmarks: new Map(), album: null, loadSeq: 0 };
const blobs = { covers: new Set(), album: new Set(), viewer: new Set() };

function readToken() {
  const params = new URLSearchParams(location.hash.slice(1));
  const token = params.get("token");
  if (token) {
    sessionStorage.setItem(TOKEN_KEY, token);
    // Keep the token out of the address bar, history and screenshots.
    history.replaceState(null, "", location.pathname + location.search);
  }
  return sessionStorage.getItem(TOKEN_KEY);
}
const token = readToken();

class ApiError extends Error {
  constructor(status, body) {
    const detail = body && body.detail;
    super(typeof detail === "string" ? detail : (body && body.error) || `HTTP ${status}`);
    this.status = status;
  }
}

async function api(path, init = {}) {
  const headers = new Headers(init.headers || {});
  if (token) headers.set("Authorization", `Bearer ${token}`);
  const response = await fetch(path, { ...init, headers });
  if (!response.ok) {
    let body = null;
    try { body = await response.json(); } catch (_) { /* not JSON */ }
    throw new ApiError(response.status, body);
  }
  return response;
}
const getJson = async (path) => (await api(path)).json();

async function blobUrl(path, bucket) {
  const url = URL.createObjectURL(await (await api(path)).blob());
  blobs[bucket].add(url);
  return url;
}

function forget(bucket) {
  for (const url of blobs[bucket]) URL.revokeObjectURL(url);
  blobs[bucket].clear();
}

// Lazy images: fetched (with the bearer header) when they come near the viewport.
const lazy = new IntersectionObserver((entries) => {
  for (const entry of entries) {
    if (!entry.isIntersecting) continue;
    lazy.unobserve(entry.target);
    const img = entry.target;
    blobUrl(img.dataset.src, img.dataset.bucket).then((url) => {
      img.onload = () => img.classList.add("loaded");
      img.src = url;
    }).catch(() => img.closest(".thumb")?.classList.add("broken"));
  }
}, { rootMargin: "400px 0px" });

function lazyImg(src, alt, bucket) {
  const img = document.createElement("img");
  img.dataset.bucket = bucket;
  img.loading = "lazy";
  img.decoding = "async";
  img.alt = alt;
  img.dataset.src = src;
  lazy.observe(img);
  return img;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

const plural = (n, one, many) => `${n.toLocaleString()} ${n === 1 ? one : many}`;
const withSide = (url, side) => `${url}${url.includes("?") ? "&" : "?"}max_side=${side}`;

function setStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text || "";
  status.hidden = !text;
  status.classList.toggle("error", isError);
}

function explain(error) {
  if (error.status === 401) return `Not signed in: open this page with #token=… (${error.message}).`;
  if (error.status === 403) return `Not allowed: ${error.message}`;
  return `Something went wrong: ${error.message}`;
}

// ---- the Attractions album: cities, each a grid of landmark cards
function renderAttractions() {
  const root = $("attractions");
  const fragment = document.createDocumentFragment();
  for (const city of state.cities) {
    const section = el("section", "city");
    section.dataset.country = city.country;
    section.dataset.city = city.city;
    section.append(el("h2", null, city.city));
    section.append(el("p", "meta",
      `${city.country} · ${plural(city.landmark_count, "landmark", "landmarks")} · ${plural(city.photo_count, "photo", "photos")}`));
    const grid = el("div", "grid");
    for (const lm of city.landmarks) {
      state.landmarks.set(String(lm.landmark_id), lm);
      const card = el("button", "card");
      card.type = "button";
      card.dataset.landmarkId = lm.landmark_id;
      card.dataset.name = lm.name;
      card.dataset.count = lm.photo_count;
      const thumb = el("div", "thumb");
      thumb.append(lazyImg(withSide(lm.cover_url, COVER_SIDE), lm.name, "covers"));
      thumb.append(el("span", "count", lm.photo_count.toLocaleString()));
      const name = el("div", "name", lm.name);
      card.append(thumb, name);
      grid.append(card);
    }
    section.append(grid);
    fragment.append(section);
  }
  root.replaceChildren(fragment);
}

async function loadAttractions() {
  setStatus("Loading…");
  const me = await getJson("/v1/me");
  state.user = me.user;
  const data = await getJson(`/v1/users/${encodeURIComponent(state.user)}/attractions`);
  state.cities = data.cities;
  const landmarks = data.cities.reduce((n, c) => n + c.landmarks.length, 0);
  $("subtitle").textContent = landmarks
    ? `${plural(landmarks, "landmark", "landmarks")} in ${plural(data.cities.length, "city", "cities")}`
    : "";
  renderAttractions();
  setStatus(landmarks ? "" : "No landmarks recognised in your photos yet.");
}

// ---- one landmark's album: a photo grid, paged by cursor
function showAttractions() {
  state.album = null;
  state.loadSeq += 1;
  $("album").hidden = true;
  $("attractions").hidden = false;
  $("back").hidden = true;
  $("title").textContent = "Attractions";
  $("grid").replaceChildren();
  forget("album");
  const landmarks = state.landmarks.size;
  $("subtitle").textContent = landmarks
    ? `${plural(landmarks, "landmark", "landmarks")} in ${plural(state.cities.length, "city", "cities")}` : "";
  setStatus(state.cities.length || !state.user ? "" : "No landmarks recognised in your photos yet.");
}

function openAlbum(landmarkId, push = true) {
  const lm = state.landmarks.get(String(landmarkId));
  if (!lm) return showAttractions();
  if (push) history.pushState({ landmark: lm.landmark_id }, "", `#landmark=${lm.landmark_id}`);
  state.album = { landmark: lm, cursor: null, done: false };
  $("attractions").hidden = true;
  $("album").hidden = false;
  $("back").hidden = false;
  $("title").textContent = lm.name;
  $("subtitle").textContent = `${lm.city}, ${lm.country} · ${plural(lm.photo_count, "photo", "photos")}`;
  $("grid").replaceChildren();
  forget("album");
  window.scrollTo(0, 0);
  loadMore();
}

async function loadMore() {
  const album = state.album;
  if (!album || album.done || album.loading) return;
  album.loading = true;
  const seq = state.loadSeq;
  const more = $("more");
  more.disabled = true;
  setStatus($("grid").childElementCount ? "" : "Loading photos…");
  try {
    let path = `/v1/users/${encodeURIComponent(state.user)}/landmarks/${album.landmark.landmark_id}/photos?limit=${PAGE}`;
    if (album.cursor) path += `&cursor=${encodeURIComponent(album.cursor)}`;
    const page = await getJson(path);
    if (seq !== state.loadSeq || state.album !== album) return;  // the user went elsewhere
    const fragment = document.createDocumentFragment();
    for (const photo of page.photos) {
      const tile = el("button", "tile");
      tile.type = "button";
      tile.dataset.photoId = photo.photo_id;
      tile.dataset.image = photo.image_url;
      tile.dataset.heatmap = photo.heatmap_url;
      tile.dataset.uploaded = photo.uploaded_at;
      const thumb = el("div", "thumb");
      thumb.append(lazyImg(withSide(photo.image_url, TILE_SIDE), `${album.landmark.name}, ${photo.uploaded_at.slice(0, 10)}`, "album"));
      tile.append(thumb);
      fragment.append(tile);
    }
    $("grid").append(fragment);
    album.cursor = page.next_cursor;
    album.done = !page.next_cursor;
    more.hidden = album.done;
    setStatus($("grid").childElementCount ? "" : "This album is empty.");
  } catch (error) {
    setStatus(explain(error), true);
  } finally {
    album.loading = false;
    more.disabled = false;
  }
}

// ---- the viewer: one photo, large, with the class activation map on demand
let viewerSeq = 0;
async function showInViewer() {
  const viewer = $("viewer");
  const kind = $("heatmap-toggle").checked ? "heatmap" : "image";
  const path = viewer.dataset[kind];
  const seq = ++viewerSeq;
  const img = $("viewer-img");
  $("viewer-status").textContent = kind === "heatmap" ? "Computing heatmap…" : "Loading…";
  try {
    const url = await blobUrl(path, "viewer");
    if (seq !== viewerSeq) return URL.revokeObjectURL(url);
    img.onload = () => { if (seq === viewerSeq) $("viewer-status").textContent = ""; };
    img.src = url;
    img.dataset.kind = kind;
  } catch (error) {
    if (seq === viewerSeq) $("viewer-status").textContent = explain(error);
  }
}

function openViewer(tile) {
  const viewer = $("viewer");
  viewer.dataset.image = tile.dataset.image;
  viewer.dataset.heatmap = tile.dataset.heatmap;
  viewer.dataset.photoId = tile.dataset.photoId;
  $("viewer-caption").textContent = `${state.album.landmark.name} · ${new Date(tile.dataset.uploaded).toLocaleString()}`;
  $("heatmap-toggle").checked = false;
  $("viewer-img").removeAttribute("src");
  viewer.hidden = false;
  $("viewer-close").focus();
  showInViewer();
}

function closeViewer() {
  viewerSeq += 1;
  $("viewer").hidden = true;
  $("viewer-img").removeAttribute("src");
  forget("viewer");
}

// ---- wiring
document.addEventListener("DOMContentLoaded", () => {
  $("attractions").addEventListener("click", (event) => {
    const card = event.target.closest(".card");
    if (card) openAlbum(card.dataset.landmarkId);
  });
  $("grid").addEventListener("click", (event) => {
    const tile = event.target.closest(".tile");
    if (tile) openViewer(tile);
  });
  $("more").addEventListener("click", loadMore);
  $("back").addEventListener("click", () => history.length > 1 && history.state ? history.back() : showAttractions());
  $("heatmap-toggle").addEventListener("change", showInViewer);
  $("viewer-close").addEventListener("click", closeViewer);
  document.addEventListener("keydown", (event) => { if (event.key === "Escape" && !$("viewer").hidden) closeViewer(); });
  window.addEventListener("popstate", (event) => {
    closeViewer();
    if (event.state && event.state.landmark) openAlbum(event.state.landmark, false);
    else showAttractions();
  });
  loadAttractions().then(() => {
    const match = location.hash.match(/^#landmark=(\d+)$/);
    if (match) openAlbum(match[1], false);
  }).catch((error) => setStatus(explain(error), true));
});

"use strict";
// The report page's script. The first part (decoding, fusion, scoring, the URL fragment, shell
// quoting) touches no page element, so tests run it in node as well as in the browser; the
// second part drives the page. Maps keyed by label ids or branch names are Map objects, never
// plain objects, so a name such as "toString" or "__proto__" is only ever a key.

function base64Bytes(b64) {
  const text = atob(b64), out = new Uint8Array(text.length);
  for (let i = 0; i < text.length; i++) out[i] = text.charCodeAt(i);
  return out;
}

// The embedded arrays: the truth, and each branch's probabilities exactly as Python held them
// (float32 or float64, little-endian; a row of NaN: the branch had no input for that image).
function tunerModel(data) {
  const n = data.n, l = data.labels.length, branches = data.branches;
  const probs = new Map(), avail = new Map(), float32 = new Map();
  for (const b of branches) {
    float32.set(b, data.probs[b].dtype === "f4");
    const raw = base64Bytes(data.probs[b].data), view = new DataView(raw.buffer);
    const f4 = data.probs[b].dtype === "f4", values = new Float64Array(n * l), known = new Uint8Array(n);
    for (let k = 0; k < n * l; k++) values[k] = f4 ? view.getFloat32(4 * k, true) : view.getFloat64(8 * k, true);
    for (let i = 0; i < n; i++) {
      known[i] = 1;
      for (let j = 0; j < l; j++) if (Number.isNaN(values[i * l + j])) { known[i] = 0; break; }
    }
    probs.set(b, values);
    avail.set(b, known);
  }
  return {n, l, branches, labels: data.labels.map((label) => ({id: String(label.id), name: label.name})),
          y: base64Bytes(data.y), probs, avail, float32};
}

// pipeline.fusion.weighted_average, in the same order of operations, so the sums are the same
// doubles. Its weighted sum is in float64; its plain sum (the fallback for an image whose
// branches all have weight 0) keeps the probabilities' dtype, float32 until a float64 branch
// comes, so here each step of it is rounded to float32 while every branch so far was float32.
function fuse(model, weights) {
  const {n, l, branches, probs, avail, float32} = model, out = new Float64Array(n * l);
  for (let i = 0; i < n; i++) {
    let wsum = 0, count = 0;
    for (const b of branches) { if (avail.get(b)[i]) { wsum += weights.get(b) || 0; count += 1; } }
    for (let j = 0; j < l; j++) {
      let total = 0, plain = 0, single = true;
      for (const b of branches) {
        single = single && float32.get(b);
        if (!avail.get(b)[i]) continue;
        total += (weights.get(b) || 0) * probs.get(b)[i * l + j];
        plain = single ? Math.fround(plain + probs.get(b)[i * l + j]) : plain + probs.get(b)[i * l + j];
      }
      out[i * l + j] = wsum === 0 ? plain / Math.max(count, 1) : total / wsum;
    }
  }
  return out;
}

// pipeline.metrics.binarize: >= threshold, and an empty row gets its argmax (the first on ties).
function binarize(model, fused, thresholds) {
  const {n, l} = model, pred = new Uint8Array(n * l);
  for (let i = 0; i < n; i++) {
    let any = false, best = 0;
    for (let j = 0; j < l; j++) {
      const p = fused[i * l + j];
      if (p >= thresholds[j]) { pred[i * l + j] = 1; any = true; }
      if (p > fused[i * l + best]) best = j;
    }
    if (!any) pred[i * l + best] = 1;
  }
  return pred;
}

// pipeline.metrics.samples_f1, and per-label precision, recall and F1 with 0/0 scored as 0.
function score(model, pred) {
  const {n, l, y} = model;
  let sum = 0;
  const tp = new Array(l).fill(0), fp = new Array(l).fill(0), fn = new Array(l).fill(0);
  for (let i = 0; i < n; i++) {
    let t = 0, both = 0, p = 0;
    for (let j = 0; j < l; j++) {
      const truth = y[i * l + j], q = pred[i * l + j];
      t += truth; p += q; both += truth & q;
      if (truth && q) tp[j]++; else if (q) fp[j]++; else if (truth) fn[j]++;
    }
    sum += 2 * both / Math.max(t + p, 1);
  }
  const labels = [];
  for (let j = 0; j < l; j++) {
    const precision = tp[j] + fp[j] ? tp[j] / (tp[j] + fp[j]) : 0;
    const recall = tp[j] + fn[j] ? tp[j] / (tp[j] + fn[j]) : 0;
    const denom = 2 * tp[j] + fp[j] + fn[j];
    labels.push({precision, recall, f1: denom ? 2 * tp[j] / denom : 0, support: tp[j] + fn[j]});
  }
  return {samples: sum / n, labels};
}

// The per-label thresholds of the settings, in label order; a label without one uses the global one.
function thresholdsOf(model, state) {
  return model.labels.map((label) => state.perLabel.has(label.id) ? state.perLabel.get(label.id) : state.threshold);
}

function samplesF1(model, state) {
  return score(model, binarize(model, fuse(model, state.weights), thresholdsOf(model, state))).samples;
}

// The settings a fusion.json (as Python wrote it) holds, as the tuner's state.
function savedState(model, fusion) {
  const own = (object, key) => object !== null && Object.prototype.hasOwnProperty.call(object, key);
  const perLabel = new Map();
  for (const label of model.labels) {
    if (own(fusion.per_label_thresholds, label.id)) perLabel.set(label.id, fusion.per_label_thresholds[label.id]);
  }
  return {weights: new Map(model.branches.map((b) => [b, own(fusion.weights, b) ? fusion.weights[b] : 0])),
          threshold: fusion.threshold, perLabel};
}

// A decimal number as a person types it; anything else (text, "", hex, Infinity) is refused.
function parseNumber(text, what) {
  if (!/^\s*[-+]?(\d+\.?\d*|\.\d+)(e[-+]?\d+)?\s*$/i.test(text)) {
    throw new Error(what + ": " + JSON.stringify(text) + " is not a number");
  }
  return Number(text);
}

function pairs(text, what) {
  return text.split(",").filter(Boolean).map((part) => {
    const at = part.indexOf(":");
    if (at < 0) throw new Error(what + ": " + JSON.stringify(part) + " is not name:value");
    return [part.slice(0, at), part.slice(at + 1)];
  });
}

// The settings a URL fragment (without its "#") asks for, starting from ``state``; an unknown
// branch or label id, or a value that is not a number, throws an Error naming it.
function parseFragment(fragment, model, state) {
  const params = new URLSearchParams(fragment);
  const next = {weights: new Map(state.weights), threshold: state.threshold, perLabel: new Map(state.perLabel)};
  if (params.has("w")) {
    for (const [b, w] of pairs(params.get("w"), "fragment w")) {
      if (!model.branches.includes(b)) {
        throw new Error("fragment w: " + b + " is not one of the branches " + model.branches.join(", "));
      }
      next.weights.set(b, parseNumber(w, "fragment w, weight of " + b));
    }
  }
  if (params.has("t")) next.threshold = parseNumber(params.get("t"), "fragment t");
  if (params.has("pl")) {
    next.perLabel = new Map();
    const ids = model.labels.map((label) => label.id);
    for (const [id, t] of pairs(params.get("pl"), "fragment pl")) {
      if (!ids.includes(id)) {
        throw new Error("fragment pl: " + JSON.stringify(id) + " is not a label id of this page (ids: " +
                        ids.join(", ") + ")");
      }
      next.perLabel.set(id, parseNumber(t, "fragment pl, threshold of label " + id));
    }
  }
  return next;
}

// Why the settings cannot be scored ("" when they can).
function settingsProblem(model, state) {
  for (const b of model.branches) {
    const w = state.weights.get(b);
    if (!Number.isFinite(w) || w < 0) return "the weight of " + b + " must be a number >= 0, not " + w;
  }
  if (!model.branches.some((b) => state.weights.get(b) > 0)) {
    return "every weight is 0; give at least one branch a weight > 0";
  }
  const inRange = (t) => t > 0 && t < 1;
  if (!inRange(state.threshold)) return "the global threshold must be between 0 and 1, not " + state.threshold;
  for (const label of model.labels) {
    const t = state.perLabel.get(label.id);
    if (t !== undefined && !inRange(t)) {
      return "the threshold of " + label.name + " (id " + label.id + ") must be between 0 and 1, not " + t;
    }
  }
  return "";
}

// Python's shlex.quote: a word bash reads back as itself, whatever it holds.
function shellQuote(word) {
  if (word === "") return "''";
  if (/^[\w@%+=:,./-]+$/.test(word)) return word;
  return "'" + word.replace(/'/g, "'\"'\"'") + "'";
}

if (typeof module !== "undefined") {
  module.exports = {tunerModel, fuse, binarize, score, thresholdsOf, samplesF1, savedState, parseFragment,
                    settingsProblem, shellQuote};
}

// --- the page ----------------------------------------------------------------------------

function startPage() {
  function pageError(message) {
    const box = document.getElementById("page-error");
    box.hidden = false;
    box.textContent = "This page failed: " + message;
  }
  window.addEventListener("error", (event) => pageError(event.message));

  // Thumbnails are stored once per image and shared by every gallery that shows it.
  const thumbs = new Map(Object.entries(JSON.parse(document.getElementById("thumbs").textContent)));
  for (const img of document.querySelectorAll("img[data-thumb]")) {
    img.src = "data:image/jpeg;base64," + thumbs.get(img.dataset.thumb);
  }

  const data = JSON.parse(document.getElementById("report-data").textContent);
  const model = tunerModel(data), saved = data.fusion;
  let state = savedState(model, saved);

  const weightsBox = document.getElementById("weights"), table = document.getElementById("pl-table");
  const controls = new Map();
  for (const b of model.branches) {
    const row = document.createElement("p");
    row.append("weight of ", document.createElement("b"), " ", document.createElement("input"), " ",
               document.createElement("span"));
    row.querySelector("b").textContent = b;
    const range = row.querySelector("input");
    Object.assign(range, {type: "range", min: "0", max: "1", step: "0.01", id: "w-" + b});
    range.addEventListener("input", () => { state.weights.set(b, Number(range.value)); update(); });
    controls.set(b, [range, row.querySelector("span")]);
    weightsBox.appendChild(row);
  }
  const tRange = document.getElementById("t-range");
  tRange.addEventListener("input", () => { state.threshold = Number(tRange.value); update(); });
  const cells = model.labels.map((label) => {
    const row = table.insertRow();
    row.insertCell().textContent = label.name;
    row.insertCell().textContent = label.id;
    const input = document.createElement("input");
    Object.assign(input, {type: "number", min: "0.01", max: "0.99", step: "0.01", className: "thr"});
    input.addEventListener("change", () => {
      if (input.value === "") state.perLabel.delete(label.id); else state.perLabel.set(label.id, Number(input.value));
      update();
    });
    row.insertCell().appendChild(input);
    return {input, stats: [row.insertCell(), row.insertCell(), row.insertCell(), row.insertCell()]};
  });
  document.getElementById("clear-pl").addEventListener("click", () => { state.perLabel = new Map(); update(); });
  document.getElementById("restore").addEventListener("click", () => { state = savedState(model, saved); update(); });
  document.getElementById("saved-f1").textContent =
    data.fused_samples_f1 === null ? "n/a" : data.fused_samples_f1.toFixed(4) + " (metrics.json)";
  document.getElementById("target").textContent = data.target;
  document.getElementById("command").textContent = data.command;  // quoted by Python's shlex.join

  function update() {
    for (const b of model.branches) {
      const [range, text] = controls.get(b);
      range.value = state.weights.get(b);
      text.textContent = state.weights.get(b);
    }
    tRange.value = state.threshold;
    document.getElementById("t-value").textContent = state.threshold;
    model.labels.forEach((label, j) => {
      cells[j].input.value = state.perLabel.has(label.id) ? state.perLabel.get(label.id) : "";
      cells[j].input.placeholder = state.threshold;
    });
    const problem = settingsProblem(model, state), f1 = document.getElementById("tuner-f1");
    document.getElementById("tuner-error").textContent = problem;
    if (problem) { f1.textContent = "—"; f1.dataset.value = ""; return; }
    const result = score(model, binarize(model, fuse(model, state.weights), thresholdsOf(model, state)));
    f1.textContent = result.samples.toFixed(4);
    f1.dataset.value = String(result.samples);
    let macro = 0;
    result.labels.forEach((m, j) => {
      [m.precision.toFixed(3), m.recall.toFixed(3), m.f1.toFixed(3), m.support].forEach((v, k) => {
        cells[j].stats[k].textContent = v;
      });
      macro += m.f1;
    });
    document.getElementById("tuner-macro").textContent = (macro / model.l).toFixed(4);
    const fusion = Object.assign({}, saved, {
      method: "weighted", stacker: null, weights: Object.fromEntries(state.weights), threshold: state.threshold,
      per_label_thresholds: Object.fromEntries(state.perLabel),
      val_samples_f1: Number(result.samples.toFixed(5)), cv_samples_f1: {},
      tuned_on: {by: "report.html tuner", n_images: model.n, source: data.source},
    });
    // Arrays of numbers (the label ids) on one line each, so the file reads at a glance.
    const text = JSON.stringify(fusion, null, 2).replace(
      /\[\s+(-?[\d.e+-]+(?:,\s+-?[\d.e+-]+)*)\s+\]/g, (_, inner) => "[" + inner.split(/,\s+/).join(", ") + "]") + "\n";
    document.getElementById("fusion-json").textContent = text;
    document.getElementById("download").href = "data:application/json;charset=utf-8," + encodeURIComponent(text);
    const weights = model.branches.map((b) => b + "=" + state.weights.get(b)).join(",");
    document.getElementById("oneoff").textContent = data.command + " " +
      ["--fusion-weights", weights, "--threshold", String(state.threshold)].map(shellQuote).join(" ");
    const fragment = "w=" + model.branches.map((b) => b + ":" + state.weights.get(b)).join(",") +
      "&t=" + state.threshold + "&pl=" + [...state.perLabel].map(([id, t]) => id + ":" + t).join(",");
    history.replaceState(null, "", "#" + fragment);
  }

  // A fragment that cannot be used leaves the settings in use, and says why beside the score.
  function fromFragment() {
    let bad = "";
    try {
      state = parseFragment(location.hash.slice(1), model, savedState(model, saved));
    } catch (err) {
      state = savedState(model, saved);
      bad = err.message;
    }
    update();
    // After update(), which shows the settings' own problem: the fragment's error must stay in view.
    if (bad) document.getElementById("tuner-error").textContent = bad;
  }
  fromFragment();
  window.addEventListener("hashchange", fromFragment);
}

if (typeof document !== "undefined") startPage();

// Live progress and the final summary of the FP8 Scaled convert nodes, shown on the node itself.
//
// The Python side (nodes/host.py, nodes/conversion.py) sends three namespaced events:
//   fp8_scaled.progress {node, tensor, index, total, quantized, kept, elapsed, eta (null: no basis
//                        yet), share (of the work done, 0..1; null: nothing to round), error, working,
//                        cancelling} after each finished tensor, and every half second while one
//                        is rounded (working: true, with method, step, steps, unit, tensor_seconds);
//                        once with cancelling: true as soon as a Cancel reaches the conversion
//   fp8_scaled.done     {node, output, bytes_in, bytes_out, quantized, kept, mean_error, errors, worst,
//                        fallbacks, seconds, preset}
//   fp8_scaled.error    {node, cancelled, message}
// Each is written into a read-only text box that this extension adds to the converting node. The
// report nodes (Inspect, Save FP8 Calibration) show their text output in the same kind of box.
// Plain ES module, no build step: ComfyUI serves it from WEB_DIRECTORY.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const NODE_TYPES = new Set(["FP8ScaledConvertModel", "FP8ScaledConvertFile"]);
const REPORT_TYPES = new Set(["FP8ScaledInspect", "FP8ScaledSaveCalibration"]);
const WIDGET = "fp8_status";
const LINES = 14; // height of the status box in text lines (the final summary has 13 or 14)
const REPORT_WIDTH = 760; // Inspect's per-layer lines are up to about 100 characters wide

const pct = (x) => `${(100 * (Number(x) || 0)).toFixed(3)}%`;

function size(bytes) {
  const n = Number(bytes) || 0;
  if (n >= 2 ** 30) return `${(n / 2 ** 30).toFixed(2)} GiB`;
  if (n >= 2 ** 20) return `${(n / 2 ** 20).toFixed(1)} MiB`;
  return `${(n / 2 ** 10).toFixed(1)} KiB`;
}

function duration(seconds) {
  const s = Math.max(0, Math.round(Number(seconds) || 0));
  if (s < 60) return `${s}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m ${String(s % 60).padStart(2, "0")}s`;
  return `${Math.floor(m / 60)}h ${String(m % 60).padStart(2, "0")}m`;
}

function bar(done, total, width = 24) {
  const filled = total > 0 ? Math.round((width * done) / total) : 0;
  return `[${"#".repeat(filled)}${"-".repeat(width - filled)}]`;
}

// The tensor line: the one being rounded and how far it got, or the last one finished.
function tensorLine(d) {
  if (!d.working) return `last      ${d.tensor}`;
  const steps = Number(d.steps) || 0;
  const share = steps ? ` ${Math.floor((100 * (Number(d.step) || 0)) / steps)}%` : "";
  return `current   ${d.tensor}  (${d.method}${share}, ${duration(d.tensor_seconds)})`;
}

export function progressText(d) {
  const total = Number(d.total) || 0;
  const index = Number(d.index) || 0;
  // The bar and its percent: the share of the work done (a large weight counts more than a bias);
  // with nothing to round (share null), the tensors written.
  const done = d.share == null ? (total ? index / total : 0) : Number(d.share);
  const percent = Math.floor(100 * done);
  if (d.cancelling) {
    return [`Cancelling… ${bar(done, 1)} ${percent}%`, d.tensor ? `stopping  ${d.tensor}` : ""].join("\n");
  }
  return [
    `Converting to FP8 scaled… ${bar(done, 1)} ${percent}%`,
    `tensors   ${index} / ${total}  (${d.quantized} quantized, ${d.kept} kept)`,
    tensorLine(d),
    // The engine's ETA, from the quantized work done so far; null until some is done.
    `elapsed   ${duration(d.elapsed)}   ETA ${d.eta == null ? "estimating…" : duration(d.eta)}`,
    `error     ${d.quantized ? `${pct(d.error)} running mean (relative)` : "-"}`,
  ].join("\n");
}

export function doneText(d) {
  const output = String(d.output ?? "");
  const cut = Math.max(output.lastIndexOf("/"), output.lastIndexOf("\\"));
  const [folder, file] = cut >= 0 ? [output.slice(0, cut), output.slice(cut + 1)] : [".", output];
  const ratio = d.bytes_in ? ` (${((100 * d.bytes_out) / d.bytes_in).toFixed(1)}%)` : "";
  const lines = [
    `Done in ${duration(d.seconds)} (preset ${d.preset})`,
    `saved     ${file}`,
    `in        ${folder}`,
    `size      ${size(d.bytes_in)} -> ${size(d.bytes_out)}${ratio}`,
    `layers    ${d.quantized} quantized, ${d.kept} kept`,
  ];
  // Learned and calibrated layers are measured on their outputs, round-to-nearest on the weight:
  // one line per measure, never one mixed mean.
  for (const e of d.errors ?? []) lines.push(`error     ${e.measure} (${e.layers} layers): mean ${pct(e.mean)}`);
  if (d.fallbacks)
    lines.push(`rounding  ${d.fallbacks} kept round-to-nearest (lower output error on held-out inputs)`);
  if (d.worst?.length) {
    lines.push("worst layers:");
    for (const [name, error, measure] of d.worst) lines.push(`  ${pct(error)} ${measure ?? ""}  ${name}`);
  }
  return lines.join("\n");
}

export function errorText(d) {
  return d.cancelled
    ? "Cancelled: nothing was saved (the partial file was removed)."
    : `Conversion failed: ${String(d.message || "unknown error").trim()}\nNothing was saved.`;
}

// The node of an execution id: "12", or "5:12" for a node inside subgraph node 5.
function findNode(id) {
  let graph = app.rootGraph ?? app.graph;
  const path = String(id ?? "").split(":").filter(Boolean);
  if (!graph || !path.length) return null;
  for (const part of path.slice(0, -1)) {
    graph = (graph.getNodeById(Number(part)) ?? graph.getNodeById(part))?.subgraph;
    if (!graph) return null;
  }
  const last = path[path.length - 1];
  return graph.getNodeById(Number(last)) ?? graph.getNodeById(last) ?? null;
}

function statusWidget(node) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (widget) return widget;
  const box = document.createElement("textarea");
  box.readOnly = true;
  box.spellcheck = false;
  box.rows = LINES;
  box.className = "comfy-multiline-input fp8-scaled-status";
  Object.assign(box.style, {
    fontFamily: "ui-monospace, SFMono-Regular, Menlo, Consolas, monospace",
    fontSize: "11px",
    lineHeight: "1.35",
    whiteSpace: "pre-wrap",
    overflowWrap: "anywhere",
    overflow: "auto",
    resize: "none",
    width: "100%",
    boxSizing: "border-box",
  });
  widget = node.addDOMWidget(WIDGET, "fp8_status", box, {
    serialize: false, // never part of the saved workflow nor of the queued prompt
    hideOnZoom: false,
    getValue: () => box.value,
    setValue: (v) => (box.value = v ?? ""),
    getMinHeight: () => LINES * 15 + 16,
  });
  widget.serialize = false;
  widget.element = widget.element ?? box;
  // Make room for the box once; keep a size the user chose if it is larger.
  const wanted = node.computeSize?.();
  const width = REPORT_TYPES.has(typeOf(node)) ? REPORT_WIDTH : 360;
  if (wanted) node.setSize([Math.max(node.size[0], wanted[0], width), Math.max(node.size[1], wanted[1])]);
  return widget;
}

const typeOf = (node) => node?.comfyClass ?? node?.type;
const isConverter = (node) => NODE_TYPES.has(typeOf(node));

function show(id, text, state) {
  const node = findNode(id);
  // Not ours: e.g. another workflow tab is open, where the id names another node.
  if (!(isConverter(node) || REPORT_TYPES.has(typeOf(node))) || typeof node.addDOMWidget !== "function") return;
  const widget = statusWidget(node);
  widget.value = text;
  if (widget.element) {
    widget.element.dataset.state = state; // running | cancelling | cancelled | done | error
    widget.element.style.color = state === "error" ? "#ff8080" : state === "done" ? "#9fe09f" : "";
  }
  node.setDirtyCanvas?.(true, true);
  (app.rootGraph ?? app.graph)?.setDirtyCanvas?.(true, true);
}

const converted = new Set(); // nodes that sent "done" in the running prompt
// A cancelled run often stops within a tenth of a second: "Cancelling…" stays up at least this long,
// so that it can be read before "Cancelled" replaces it.
const CANCELLING_MS = 700;
const cancelling = new Map(); // node id -> when "Cancelling…" was first shown
const pending = new Map(); // node id -> the timer that will show "Cancelled"

function showProgress(detail) {
  const id = String(detail.node);
  clearTimeout(pending.get(id)); // a new run's progress: the old run's "Cancelled" is stale
  pending.delete(id);
  if (detail.cancelling && !cancelling.has(id)) cancelling.set(id, performance.now());
  show(detail.node, progressText(detail), detail.cancelling ? "cancelling" : "running");
}

function showError(detail) {
  const id = String(detail.node);
  const since = cancelling.get(id);
  cancelling.delete(id);
  const state = detail.cancelled ? "cancelled" : "error";
  const wait = since === undefined ? 0 : Math.max(0, since + CANCELLING_MS - performance.now());
  const shown = () => {
    pending.delete(id);
    show(detail.node, errorText(detail), state);
  };
  if (wait > 0) pending.set(id, setTimeout(shown, wait));
  else shown();
}

app.registerExtension({
  name: "fp8_scaled.status",
  setup() {
    api.addEventListener("execution_start", () => converted.clear());
    api.addEventListener("fp8_scaled.progress", ({ detail }) => showProgress(detail));
    api.addEventListener("fp8_scaled.done", ({ detail }) => {
      converted.add(String(detail.node));
      show(detail.node, doneText(detail), "done");
    });
    api.addEventListener("fp8_scaled.error", ({ detail }) => showError(detail));
    // Errors raised before the conversion starts (a bad filename_prefix, a missing file) come
    // only as ComfyUI's own execution_error: show them on our nodes too.
    api.addEventListener("execution_error", ({ detail }) => {
      if (!isConverter(findNode(detail?.node_id))) return; // the report nodes: ComfyUI's own error dialog
      show(detail.node_id, errorText({ cancelled: false, message: detail.exception_message }), "error");
    });
    // The report nodes' text output, and a converter's cached result (same inputs as a previous
    // run), which sends no conversion events, only the node's text output.
    api.addEventListener("executed", ({ detail }) => {
      const text = detail?.output?.text;
      if (!text?.length || converted.has(String(detail.node))) return;
      const report = [].concat(text).join("\n");
      const cached = isConverter(findNode(detail.node)) ? "Cached result (inputs unchanged, nothing converted again):\n" : "";
      show(detail.node, cached + report, "done");
    });
  },
});

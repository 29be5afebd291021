// The predict page of serve.py. Every string that comes from data (file names, class
// names, errors) reaches the page as text (textContent, or attributes set through the
// DOM), never as HTML: a file or class name is the dataset maker's, not ours.
"use strict";
const $ = (id) => document.getElementById(id);
let lastFiles = [];

function element(tag, text, className) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (className) e.className = className;
  return e;
}

fetch("/api/health").then((r) => r.json()).then((h) => {
  $("model").textContent = `${h.model} of ${h.run}: ${h.task}, classes ${h.classes.join(", ")}; ` +
    `backbone ${h.backbone}, ${h.image_size} px` + (h.unfamiliar ? "; flags unfamiliar photos" : "");
});

async function send(files, format) {
  const form = new FormData();
  for (const f of files) form.append("files", f, f.name);
  return fetch("/api/predict" + (format ? "?format=" + format : ""), {method: "POST", body: form});
}

function resultRow(p, file) {
  const row = element("div", undefined, "row");
  row.dataset.name = p.name;
  const img = document.createElement("img");
  img.alt = p.name;
  img.src = URL.createObjectURL(file);
  const text = element("div");
  const line = element("div", `${p.name}: `);
  line.appendChild(element("span", String(p.top_class), "top"));
  if (p.unfamiliar) {
    line.appendChild(document.createTextNode(" "));
    line.appendChild(element("span", `unfamiliar (score ${p.unfamiliar_score.toFixed(2)})`, "flag"));
  }
  const table = document.createElement("table");
  for (const [c, v] of Object.entries(p.probabilities)) {
    const tr = document.createElement("tr");
    tr.appendChild(element("td", c));
    tr.appendChild(element("td", v.toFixed(4), "prob"));
    table.appendChild(tr);
  }
  const why = element("button", "Where it looked", "why");
  why.addEventListener("click", () => showHeatmap(why, file, row));
  text.appendChild(line);
  text.appendChild(table);
  text.appendChild(why);
  row.appendChild(img);
  row.appendChild(text);
  return row;
}

// The heatmap of the predicted class (/api/explain: a PNG), shown beside the photo.
async function showHeatmap(button, file, row) {
  button.disabled = true;
  const form = new FormData();
  form.append("files", file, file.name);
  const response = await fetch("/api/explain", {method: "POST", body: form});
  if (!response.ok) {
    const body = await response.json();
    row.appendChild(element("span", body.error, "err"));
    return;
  }
  const heat = document.createElement("img");
  heat.className = "heatmap";
  heat.alt = `where the model looked: ${file.name}`;
  heat.src = URL.createObjectURL(await response.blob());
  row.appendChild(heat);
}

async function predict(files) {
  if (!files.length) return;
  lastFiles = Array.from(files);
  $("status").textContent = `Predicting ${files.length} photo(s)…`;
  const response = await send(lastFiles);
  const body = await response.json();
  if (!response.ok) {
    $("status").replaceChildren(element("span", body.error, "err"));
    return;
  }
  $("status").textContent = `${body.predictions.length} photo(s) predicted.`;
  $("csv").disabled = false;
  $("results").replaceChildren(...body.predictions.map((p, i) => resultRow(p, lastFiles[i])));
}

$("pick").addEventListener("change", (e) => predict(e.target.files));
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault(); drop.classList.remove("over"); predict(e.dataTransfer.files);
});
$("csv").addEventListener("click", async () => {
  const response = await send(lastFiles, "csv");
  const link = document.createElement("a");
  link.href = URL.createObjectURL(await response.blob());
  link.download = "predictions.csv";
  link.click();
});

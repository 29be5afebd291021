// The label page of serve.py. Class names and file names come from the dataset: they
// reach the page as text only (textContent), never as HTML. Every change carries the
// page's own token (X-Page-Token, from the page the server sent), which a script on
// another page cannot read.
"use strict";
const $ = (id) => document.getElementById(id);
const pageToken = document.querySelector('meta[name="page-token"]').content;
let items = [], classes = [], position = 0, history = [], emptyNote = "";

async function load() {
  const q = await (await fetch("/api/queue")).json();
  items = q.items; classes = q.classes; emptyNote = q.empty;
  $("buttons").replaceChildren(...classes.map((c, i) => {
    const b = document.createElement("button");
    b.dataset.label = c;
    b.textContent = c;
    if (i < 9) {
      const key = document.createElement("kbd");
      key.textContent = String(i + 1);
      b.append(" ", key);
    }
    b.addEventListener("click", () => give(c));
    return b;
  }));
  position = nextOpen(0); show();
}
function nextOpen(from) {
  for (let i = from; i < items.length; i++) if (!items[i].answer) return i;
  return items.length;
}
function show() {
  const answered = items.filter((i) => i.answer).length;
  $("counter").textContent = `${answered} of ${items.length} answered`;
  const done = position >= items.length;
  $("card").hidden = done; $("finished").hidden = !done || !items.length;
  if (!items.length) $("counter").textContent = "The queue is empty. " + emptyNote;
  if (done) { if (items.length) showLabels(); return; }
  const item = items[position];
  $("name").textContent = item.name;
  $("source").textContent = item.source === "suspect" ? "(suspect label)" : "(picked to label next)";
  $("note").textContent = item.note;
  $("photo").src = "/image/" + encodeURIComponent(item.id);
}
async function change(url, method, body) {
  const headers = {"X-Page-Token": pageToken};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  return fetch(url, {method, headers, body: body === undefined ? undefined : JSON.stringify(body)});
}
async function give(label) {
  if (position >= items.length) return;
  const item = items[position];
  const r = await change("/api/labels", "POST", {id: item.id, label});
  if (!r.ok) { $("note").textContent = (await r.json()).error; return; }
  item.answer = label; history.push(position); position = nextOpen(position + 1); show();
}
async function showLabels() {
  // A labels CSV: the rows to append to it. Class folders: the one command that moves
  // each photo into its class folder (run in the data folder).
  const r = await fetch("/api/labels");
  const text = r.headers.get("content-type").includes("json") ? (await r.json()).command
                                                              : await r.text();
  $("apply").textContent = text; $("apply").hidden = !text;
}
function skip() { if (position < items.length) { position = position + 1; show(); } }
async function undo() {
  if (!history.length) return;
  const back = history.pop(), item = items[back];
  const r = await change("/api/labels/" + encodeURIComponent(item.id), "DELETE");
  if (r.ok) { item.answer = null; position = back; show(); }
}
$("skip").addEventListener("click", skip); $("undo").addEventListener("click", undo);
document.addEventListener("keydown", (e) => {
  if (e.key >= "1" && e.key <= "9" && Number(e.key) <= classes.length) give(classes[Number(e.key) - 1]);
  else if (e.key === "s") skip();
  else if (e.key === "u") undo();
});
load();

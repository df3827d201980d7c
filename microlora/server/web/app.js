// microlora's web page: everything goes through the HTTP API with the key the user pasted, so
// the page shows exactly what that key may see. Text from the server is only ever set as
// textContent, never parsed as HTML (the key sits in session storage: nothing may run).
"use strict";

const KEY = "microlora.key";
const POLL_MS = 400;
const $ = (id) => document.getElementById(id);
let session = 0; // bumped when the key changes: work begun under the old key stops

class ApiError extends Error {}

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

async function api(path, options = {}) {
  const mine = session;
  const headers = { Authorization: `Bearer ${sessionStorage.getItem(KEY)}`, ...options.headers };
  const r = await fetch(path, { ...options, headers });
  if (r.status === 401) {
    if (mine === session) signOut("The server refused this key: paste a valid one.");
    throw new ApiError("invalid API key");
  }
  if (!r.ok) throw new ApiError(await errorOf(r));
  return r;
}

async function errorOf(r) {
  try {
    return (await r.json()).error.message;
  } catch {
    return `${r.status} ${r.statusText}`;
  }
}

// -- the key ---------------------------------------------------------------------------------

function signOut(message = "") {
  session += 1;
  sessionStorage.removeItem(KEY);
  $("uploads").replaceChildren();
  $("answers").replaceChildren();
  $("corpora-list")?.remove();
  for (const old of [...$("documents").tBodies]) old.remove();
  $("app").hidden = $("who").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message;
  $("key").value = "";
  $("key").focus();
}

async function enter() {
  $("login").hidden = true;
  try {
    await loadNamespaces();
  } catch (e) {
    if (!(e instanceof ApiError) || e.message !== "invalid API key") signOut(e.message);
    return;
  }
  $("app").hidden = $("who").hidden = false;
  await loadDocuments();
}

// -- corpora ---------------------------------------------------------------------------------

async function loadNamespaces() {
  const mine = session;
  const body = await (await api("/v1/namespaces")).json();
  if (mine !== session) return; // asked with the key before this one
  $("user").textContent = body.user;
  const checked = new Map(
    [...document.querySelectorAll("#corpora input")].map((box) => [box.value, box.checked]));
  const list = el("div", { id: "corpora-list" });
  for (const ns of body.data) {
    const own = ns.kind === "own";
    const box = el("input", { type: "checkbox", value: ns.id, disabled: own,
                              checked: own || (checked.get(ns.id) ?? true) });
    const name = own ? `your documents (${ns.id})` : ns.id;
    list.append(el("label", { className: `corpus ${ns.kind}` }, box, ` ${name} `,
                   el("small", { textContent: plural(ns.atoms, "atom") })));
  }
  $("corpora-list")?.remove();
  $("corpora").append(list);
}

function chosenCorpora() {
  return [...document.querySelectorAll("#corpora label.shared input:checked")]
    .map((box) => box.value);
}

// -- documents -------------------------------------------------------------------------------

async function loadDocuments() {
  const mine = session;
  let docs;
  try {
    docs = (await (await api("/v1/documents")).json()).data;
    $("docs-error").textContent = "";
  } catch (e) {
    $("docs-error").textContent = e.message;
    return;
  }
  if (mine !== session) return;
  const table = $("documents");
  for (const old of [...table.tBodies]) old.remove();
  for (const doc of docs) {
    const actions = el("td", { className: "actions" });
    const group = el("tbody", { className: "document" },
                     el("tr", {}, el("td", { textContent: doc.id }),
                        el("td", { className: "num", textContent: doc.atoms }), actions));
    group.dataset.id = doc.id;
    showForget(group, actions, doc);
    table.append(group);
  }
  $("no-documents").hidden = docs.length > 0;
}

function showForget(group, cell, doc) {
  const forget = el("button", { type: "button", className: "forget", textContent: "Forget" });
  forget.onclick = () => confirmForget(group, forget, doc);
  group.querySelector("tr.confirm")?.remove();
  cell.replaceChildren(forget);
}

// Forgetting cannot be undone: it asks first, on a row of its own under the document's.
function confirmForget(group, forget, doc) {
  const yes = el("button", { type: "button", className: "confirm danger",
                             textContent: "Yes, forget it" });
  const no = el("button", { type: "button", className: "cancel", textContent: "Cancel" });
  const cell = el("td", { colSpan: 3 }, el("span", { className: "question",
    textContent: `Forget ${doc.id} and its ${plural(doc.atoms, "atom")} (adapters, text, ` +
                 "embeddings)? " }), yes, no);
  forget.disabled = true;
  group.append(el("tr", { className: "confirm" }, cell));
  no.onclick = () => showForget(group, forget.parentElement, doc);
  yes.onclick = async () => {
    yes.disabled = no.disabled = true;
    try {
      await api(`/v1/documents/${encodeURIComponent(doc.id)}`, { method: "DELETE" });
    } catch (e) {
      cell.replaceChildren(el("span", { className: "error", textContent: e.message }));
      return;
    }
    await Promise.all([loadDocuments(), loadNamespaces()]);
  };
}

function plural(n, noun) {
  return `${n} ${noun}${n === 1 ? "" : "s"}`;
}

// -- uploads: one request and one job per file, so each file gets its own progress or error --

function upload(files) {
  for (const file of files) uploadOne(file);
}

async function uploadOne(file) {
  const mine = session;
  const status = el("span", { className: "status", textContent: "uploading…" });
  const bar = el("progress", { max: 1, value: 0 });
  const item = el("li", { className: "upload" }, el("b", { textContent: file.name }), " ", bar,
                  " ", status);
  $("uploads").prepend(item);
  const form = new FormData();
  form.append("file", file, file.name);
  let job;
  try {
    job = (await (await api("/v1/documents", { method: "POST", body: form })).json()).job;
  } catch (e) {
    return failed(item, status, e.message);
  }
  const seen = { t: 0, done: 0 }; // when progress was first seen, to estimate the rest
  while (mine === session) {
    showJob(job, bar, status, seen);
    if (job.status === "done") {
      item.classList.add("done");
      await Promise.all([loadDocuments(), loadNamespaces()]);
      return;
    }
    if (["failed", "cancelled", "interrupted"].includes(job.status)) {
      return failed(item, status, job.error);
    }
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
    try {
      job = await (await api(`/v1/jobs/${encodeURIComponent(job.id)}`)).json();
    } catch (e) {
      return failed(item, status, e.message);
    }
  }
}

function showJob(job, bar, status, seen) {
  const { atoms_done: done, atoms_total: total } = job;
  if (total) {
    bar.max = total;
    bar.value = done;
  }
  if (job.status === "done") {
    bar.max = bar.value = 1;
    status.textContent = `done: ${plural(job.trained, "atom")} trained, ` +
      `${job.already_compiled} already compiled`;
  } else if (job.status === "running" && total) {
    const now = performance.now();
    if (!seen.t) Object.assign(seen, { t: now, done });
    const rate = (done - seen.done) / ((now - seen.t) / 1000); // atoms a second
    const eta = rate > 0 ? `, about ${Math.ceil((total - done) / rate)} s left` : "";
    status.textContent = `compiling: ${done} / ${total} atoms${eta}`;
  } else {
    status.textContent = job.status === "running" ? "reading…" : job.status;
  }
}

function failed(item, status, message) {
  item.classList.add("failed");
  status.textContent = "";
  item.querySelector("progress").remove();
  item.append(el("div", { className: "error", textContent: message }));
}

// -- asking: the answer streams in (server-sent events), its atoms arrive with the last chunk --

async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question || $("ask-button").disabled) return; // one question at a time
  const mine = session;
  const text = el("p", { className: "text" });
  const sources = el("ol", { className: "sources" });
  const card = el("article", { className: "answer" }, el("h3", { textContent: question }),
                  el("div", { className: "body" }, text, sources));
  card.dataset.mode = $("mode").value;
  $("answers").prepend(card);
  const body = { model: "microlora", stream: true, mode: $("mode").value,
                 namespaces: chosenCorpora(),
                 messages: [{ role: "user", content: question }] };
  if ($("k").value) body.k = Number($("k").value);
  $("ask-button").disabled = true;
  try {
    const r = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body),
                                                  headers: { "Content-Type": "application/json" } });
    for await (const data of events(r)) {
      if (mine !== session) return;
      if (data.error) throw new ApiError(data.error.message);
      const choice = data.choices[0];
      if (choice?.delta?.content) text.textContent += choice.delta.content;
      if (choice?.atoms) showSources(sources, choice.atoms);
    }
    if (!text.textContent.trim()) text.append(el("span", { className: "hint",
      textContent: "(the model answered nothing)" }));
    card.classList.add("complete");
  } catch (e) {
    card.classList.add("failed");
    card.append(el("p", { className: "error", textContent: e.message }));
  } finally {
    $("ask-button").disabled = false;
  }
}

async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!line.startsWith("data: ")) continue;
      if (line === "data: [DONE]") return;
      yield JSON.parse(line.slice(6));
    }
  }
}

function showSources(list, atoms) {
  if (!atoms.length) {
    list.replaceChildren(el("li", { className: "hint", textContent: "no atoms used" }));
    return;
  }
  list.replaceChildren(...atoms.map((atom) => {
    const item = el("li", { className: "source" },
      el("div", { className: "meta" },
         el("span", { className: "score", textContent: `score ${atom.score.toFixed(3)}` }),
         el("span", { className: "weight", textContent: `weight ${atom.weight.toFixed(2)}` }),
         el("span", { className: "namespace", textContent: atom.namespace })),
      el("div", { className: "citation", textContent: atom.citation }),
      el("blockquote", { textContent: atom.text }));
    item.dataset.page = atom.page ?? "";
    item.dataset.source = atom.source;
    item.dataset.namespace = atom.namespace;
    return item;
  }));
}

// -- wiring ----------------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("key").value.trim());
    session += 1;
    enter();
  });
  $("sign-out").onclick = () => signOut();
  $("ask-form").addEventListener("submit", ask);
  $("question").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("ask-form").requestSubmit();
    }
  });
  $("files").addEventListener("change", () => {
    upload($("files").files);
    $("files").value = "";
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => {
    event.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    upload(event.dataTransfer.files);
  });
  if (sessionStorage.getItem(KEY)) enter();
  else signOut();
});

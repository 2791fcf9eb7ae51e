// fastrlhf rank: the ranking page. Model text is only ever set through textContent, never as HTML.
"use strict";

const params = new URLSearchParams(location.search);
const TASK = params.get("task") || "";
const TOKEN = params.get("token") || "";
const LETTERS = "ABCDEFGHIJKLMNOP";
const NAME_KEY = "fastrlhf-rank-labeler";

const state = {
  labeler: params.get("labeler") || localStorage.getItem(NAME_KEY) || "",
  flags: [], // [[id, label], ...]
  item: null, // {item_id, prompt, responses (in shown order)}
  tiers: [], // [[position, ...], ...], best tier first; a tier of two or more is a tie group
  ratings: {}, // position -> 1..7
  marks: {}, // position -> Set of flag ids
  busy: false,
};

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else if (key.startsWith("data-") || key.startsWith("aria-") || key === "role") node.setAttribute(key, value);
    else node[key] = value;
  }
  for (const child of children) node.append(child);
  return node;
}

function say(message, kind = "info") {
  const box = $("status");
  box.textContent = message;
  box.dataset.kind = kind;
  box.hidden = !message;
}

async function api(path, body) {
  const init = { headers: { "X-Rank-Task": TASK, "X-Rank-Token": TOKEN }, cache: "no-store" };
  if (body !== undefined) {
    init.method = "POST";
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw Object.assign(new Error("The server cannot be reached. Nothing of this item is lost: " +
      "once it runs again, press the button again (or reopen the URL it prints)."), { code: "offline" });
  }
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = data.code === "refused"
      ? data.error + ". (Was the server restarted? It prints a new URL.)"
      : data.error || `HTTP ${response.status}`;
    throw Object.assign(new Error(message), { code: data.code || "error", status: response.status });
  }
  return data;
}

// ------------------------------------------------------------------------------------------ tier edits

function tierOf(pos) {
  return state.tiers.findIndex((tier) => tier.includes(pos));
}

function takeOut(pos) {
  const t = tierOf(pos);
  state.tiers[t].splice(state.tiers[t].indexOf(pos), 1);
  if (state.tiers[t].length === 0) state.tiers.splice(t, 1);
}

/** Move one step: out of its tie group first, otherwise past the whole neighbouring tier. */
function moveStep(pos, dir) {
  const t = tierOf(pos);
  if (state.tiers[t].length > 1) {
    takeOut(pos);
    state.tiers.splice(dir < 0 ? t : t + 1, 0, [pos]);
  } else if (t + dir >= 0 && t + dir < state.tiers.length) {
    state.tiers.splice(t, 1);
    state.tiers.splice(t + dir, 0, [pos]);
  }
}

/** Tie with the tier above, or, already tied, leave the group (to just below it). */
function toggleTie(pos) {
  const t = tierOf(pos);
  if (state.tiers[t].length > 1) {
    takeOut(pos);
    state.tiers.splice(t + 1, 0, [pos]);
  } else if (t > 0) {
    state.tiers.splice(t, 1);
    state.tiers[t - 1].push(pos);
  }
}

/** Drop ``pos`` before, after, or into (a tie with) the tier of ``target``. */
function place(pos, target, where) {
  if (pos === target) return;
  takeOut(pos);
  const t = tierOf(target);
  if (where === "join") state.tiers[t].push(pos);
  else state.tiers.splice(where === "before" ? t : t + 1, 0, [pos]);
}

function unchanged() {
  return state.tiers.every((tier, i) => tier.length === 1 && tier[0] === i);
}

// ------------------------------------------------------------------------------------------ rendering

function renderPrompt(prompt) {
  const box = $("prompt");
  box.replaceChildren();
  if (typeof prompt === "string") {
    box.append(el("div", { class: "text", text: prompt }));
    return;
  }
  for (const message of prompt) {
    box.append(el("div", { class: "message" }, [
      el("span", { class: "role", text: message.role }),
      el("div", { class: "text", text: message.content }),
    ]));
  }
}

function ratingControl(pos) {
  const group = el("div", { class: "rating", role: "group", "aria-label": "rating 1 to 7" }, [
    el("span", { class: "muted", text: "rating" }),
  ]);
  for (let value = 1; value <= 7; value++) {
    const button = el("button", {
      type: "button", class: state.ratings[pos] === value ? "on" : "", text: String(value),
      title: value === 1 ? "1: worst" : value === 7 ? "7: best" : String(value),
      "aria-pressed": String(state.ratings[pos] === value),
    });
    button.addEventListener("click", () => {
      if (state.ratings[pos] === value) delete state.ratings[pos];
      else state.ratings[pos] = value;
      render(pos);
    });
    group.append(button);
  }
  return group;
}

function flagControl(pos) {
  const marked = state.marks[pos] || new Set();
  const details = el("details", { class: "flags" }, [
    el("summary", { text: marked.size ? `flags (${marked.size})` : "flags" }),
  ]);
  details.open = marked.size > 0;
  for (const [id, label] of state.flags) {
    const box = el("input", { type: "checkbox", checked: marked.has(id), "data-flag": id });
    box.addEventListener("change", () => {
      const set = state.marks[pos] || (state.marks[pos] = new Set());
      if (box.checked) set.add(id);
      else set.delete(id);
      render(pos);
    });
    details.append(el("label", {}, [box, el("span", { text: label })]));
  }
  return details;
}

function card(pos, tierIndex, tierSize) {
  const letter = LETTERS[pos];
  const up = el("button", { type: "button", class: "icon", text: "▲", title: "move up", "aria-label": "move up" });
  const down = el("button", { type: "button", class: "icon", text: "▼", title: "move down", "aria-label": "move down" });
  const tie = el("button", {
    type: "button", class: "tie",
    text: tierSize > 1 ? "untie" : "= tie with above",
    title: tierSize > 1 ? "leave this tie group" : "equal to the response above",
  });
  tie.disabled = tierSize === 1 && tierIndex === 0;
  up.addEventListener("click", () => { moveStep(pos, -1); render(pos); });
  down.addEventListener("click", () => { moveStep(pos, 1); render(pos); });
  tie.addEventListener("click", () => { toggleTie(pos); render(pos); });
  const node = el("article", {
    class: "card", tabIndex: 0, draggable: true, "data-pos": String(pos),
    "aria-label": `Response ${letter}, rank ${tierIndex + 1}${tierSize > 1 ? " (tied)" : ""}`,
  }, [
    el("div", { class: "card-head" }, [
      el("span", { class: "handle", text: "⠿", title: "drag to move", "aria-hidden": "true" }),
      el("span", { class: "letter", text: `Response ${letter}` }),
      el("span", { class: "spacer" }),
      up, down, tie,
    ]),
    el("div", { class: "text response", text: state.item.responses[pos] }),
    el("div", { class: "card-foot" }, [ratingControl(pos), flagControl(pos)]),
  ]);
  node.addEventListener("keydown", (event) => onCardKey(event, pos));
  node.addEventListener("dragstart", (event) => {
    event.dataTransfer.setData("text/plain", String(pos));
    event.dataTransfer.effectAllowed = "move";
    node.classList.add("dragging");
  });
  node.addEventListener("dragend", () => node.classList.remove("dragging"));
  node.addEventListener("dragover", (event) => {
    event.preventDefault();
    clearDropMarks();
    node.classList.add(`drop-${dropZone(event, node)}`);
  });
  node.addEventListener("dragleave", () => clearDropMarks(node));
  node.addEventListener("drop", (event) => {
    event.preventDefault();
    const from = Number(event.dataTransfer.getData("text/plain"));
    const where = dropZone(event, node);
    clearDropMarks();
    if (Number.isInteger(from) && from !== pos) {
      place(from, pos, where);
      render(from);
    }
  });
  return node;
}

/** Upper third of a card: insert before its tier; lower third: after; the middle: tie with it. */
function dropZone(event, node) {
  const rect = node.getBoundingClientRect();
  const y = (event.clientY - rect.top) / Math.max(rect.height, 1);
  return y < 1 / 3 ? "before" : y > 2 / 3 ? "after" : "join";
}

function clearDropMarks(only) {
  for (const node of only ? [only] : document.querySelectorAll(".card")) {
    node.classList.remove("drop-before", "drop-after", "drop-join");
  }
}

function render(focusPos) {
  const list = $("tiers");
  list.replaceChildren();
  state.tiers.forEach((tier, t) => {
    const cards = el("div", { class: "tier-cards" }, tier.map((pos) => card(pos, t, tier.length)));
    list.append(el("li", { class: tier.length > 1 ? "tier tied" : "tier", "data-tier": String(t) }, [
      el("div", { class: "tier-rank", text: String(t + 1), title: tier.length > 1 ? "tied" : "" }, []),
      cards,
    ]));
  });
  if (focusPos !== undefined) {
    const target = list.querySelector(`.card[data-pos="${focusPos}"]`);
    if (target && document.activeElement?.closest?.(".rating, .flags") == null) target.focus();
  }
}

function onCardKey(event, pos) {
  if (event.target.closest("button, input, summary, textarea")) return; // their own keys
  const cards = [...document.querySelectorAll("#tiers .card")];
  const at = cards.findIndex((node) => Number(node.dataset.pos) === pos);
  const key = event.key;
  if ((key === "ArrowUp" || key === "ArrowDown") && (event.shiftKey || event.altKey)) {
    moveStep(pos, key === "ArrowUp" ? -1 : 1);
    render(pos);
  } else if (key === "ArrowUp" || key === "k") {
    cards[Math.max(at - 1, 0)].focus();
  } else if (key === "ArrowDown" || key === "j") {
    cards[Math.min(at + 1, cards.length - 1)].focus();
  } else if (key === "t" || key === "T" || key === "=") {
    toggleTie(pos);
    render(pos);
  } else if (key >= "1" && key <= "7") {
    state.ratings[pos] = Number(key);
    render(pos);
  } else if (key === "0") {
    delete state.ratings[pos];
    render(pos);
  } else {
    return;
  }
  event.preventDefault();
}

// ------------------------------------------------------------------------------------------ flow

function show(section) {
  for (const id of ["login", "work", "done"]) $(id).hidden = id !== section;
}

function showProgress(progress) {
  $("progress").textContent = `${progress.done} submitted · ${progress.remaining} left`;
}

async function loadNext() {
  say("");
  const data = await api(`/api/next?labeler=${encodeURIComponent(state.labeler)}`);
  showProgress(data.progress);
  if (!data.item) {
    state.item = null;
    $("work").dataset.item = "";
    $("done-text").textContent = `You submitted ${data.progress.done} item(s). Thank you! ` +
      "You can close this page; the rankings are saved.";
    show("done");
    return;
  }
  state.item = data.item;
  $("work").dataset.item = data.item.item_id;
  state.tiers = data.item.responses.map((_, pos) => [pos]);
  state.ratings = {};
  state.marks = {};
  $("comment").value = "";
  renderPrompt(data.item.prompt);
  render();
  show("work");
  window.scrollTo(0, 0);
}

async function send(status, confirmed = false) {
  if (state.busy || !state.item) return;
  const flags = {};
  for (const [pos, set] of Object.entries(state.marks)) if (set.size) flags[pos] = [...set];
  const body = {
    labeler: state.labeler, item_id: state.item.item_id, status,
    tiers: status === "ranked" ? state.tiers : [],
    ratings: state.ratings, flags, comment: $("comment").value,
    unchanged_order_confirmed: confirmed,
  };
  state.busy = true;
  try {
    await api("/api/submit", body);
    await loadNext();
  } catch (err) {
    if (err.code === "already_submitted") await loadNext().catch((e) => say(e.message, "error"));
    else say(err.message, "error");
  } finally {
    state.busy = false;
  }
}

function submitRanking() {
  if (unchanged()) $("unchanged").showModal();
  else send("ranked");
}

async function start() {
  if (!TASK || !TOKEN) {
    say("This page needs the URL that `fastrlhf rank` printed (it carries the task and its token).", "error");
    return;
  }
  try {
    const task = await api("/api/task");
    state.flags = task.flags;
  } catch (err) {
    say(err.message, "error");
    return;
  }
  if (!state.labeler) {
    show("login");
    $("labeler-name").focus();
    return;
  }
  $("who").textContent = `labeler: ${state.labeler}`;
  $("change-labeler").hidden = false;
  await loadNext().catch((err) => say(err.message, "error"));
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const name = $("labeler-name").value.trim();
    if (!/^[\p{L}\p{N}_.@ -]{1,64}$/u.test(name)) {
      say("A name of letters, digits, spaces and _ . @ - (at most 64).", "error");
      return;
    }
    state.labeler = name;
    localStorage.setItem(NAME_KEY, name);
    start();
  });
  $("change-labeler").addEventListener("click", () => {
    localStorage.removeItem(NAME_KEY);
    state.labeler = "";
    $("who").textContent = "";
    $("change-labeler").hidden = true;
    $("labeler-name").value = "";
    show("login");
  });
  $("submit").addEventListener("click", submitRanking);
  $("cannot-rank").addEventListener("click", () => send("cannot_rank"));
  $("skip").addEventListener("click", () => send("skipped"));
  $("unchanged-back").addEventListener("click", () => $("unchanged").close());
  $("unchanged-submit").addEventListener("click", () => {
    $("unchanged").close();
    send("ranked", true);
  });
  document.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey) && !$("work").hidden) {
      event.preventDefault();
      submitRanking();
    }
  });
  start();
});

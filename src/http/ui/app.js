// The cairn dashboard: a hash-routed page over the HTTP API, in plain
// JavaScript. Every value shown comes from /api/ and enters the page as
// text (textContent), never as markup.

const REFRESH_MS = 2000;
const SAMPLES = 150; // queue samples kept: five minutes at one per refresh
const TOKEN_KEY = "cairn.token";
const MAX_LANES = 200; // timeline lanes drawn for one run

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  generation: 0, // bumped on every navigation; stale answers are dropped
  timer: null,
  shown: null, // JSON of what the data area shows, to skip idle redraws
  samples: new Map(), // queue -> [{at, ready, in_flight, delayed, age}]
};

// ---- the API ---------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(path, { method = "GET", body } = {}) {
  const headers = { Authorization: `Bearer ${state.token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(`/api${path}`, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    cache: "no-store",
  });
  let data = null;
  try {
    data = await res.json();
  } catch {
    // an empty or non-JSON body: keep null
  }
  if (res.status === 401) {
    signOut("That token was refused.");
    throw new ApiError(401, "signed out");
  }
  if (!res.ok) {
    throw new ApiError(res.status, (data && data.error) || res.statusText);
  }
  return data;
}

// ---- building the page -----------------------------------------------------

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key === "class") el.className = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

const svgNs = "http://www.w3.org/2000/svg";
function svg(tag, attrs = {}) {
  const el = document.createElementNS(svgNs, tag);
  for (const [key, value] of Object.entries(attrs)) el.setAttribute(key, String(value));
  return el;
}

function table(columns, rows, { empty = "Nothing here.", rowLink } = {}) {
  if (rows.length === 0) return h("p", { class: "empty" }, empty);
  return h(
    "table",
    {},
    h("thead", {}, h("tr", {}, columns.map(([title]) => h("th", {}, title)))),
    h(
      "tbody",
      {},
      rows.map((row) => {
        const tr = h("tr", {}, columns.map(([, cell]) => h("td", {}, cell(row))));
        if (rowLink) {
          tr.classList.add("link");
          tr.dataset.href = rowLink(row);
          tr.addEventListener("click", (e) => {
            if (!(e.target instanceof HTMLAnchorElement)) location.hash = tr.dataset.href;
          });
        }
        return tr;
      }),
    ),
  );
}

function badge(status) {
  return h("span", { class: `badge ${status}` }, status);
}

function runLink(id) {
  return h("a", { href: `#/runs/${encodeURIComponent(id)}`, class: "mono" }, shortId(id));
}

function shortId(id) {
  return String(id).slice(0, 8);
}

function json(value) {
  return h("pre", { class: "json" }, JSON.stringify(value, null, 2));
}

function when(iso) {
  if (!iso) return "—";
  const t = new Date(iso);
  return h("time", { datetime: iso, title: t.toLocaleString() }, ago(t));
}

function ago(t) {
  const s = (Date.now() - t.getTime()) / 1000;
  if (s < 0) return `in ${span(-s)}`;
  if (s < 1) return "just now";
  return `${span(s)} ago`;
}

function span(seconds) {
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${seconds.toFixed(seconds < 10 ? 1 : 0)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
  return `${Math.floor(seconds / 86400)} d ${Math.round((seconds % 86400) / 3600)} h`;
}

function between(from, to) {
  if (!from) return "—";
  const end = to ? new Date(to) : new Date();
  return span((end - new Date(from)) / 1000) + (to ? "" : " so far");
}

function notice(text, kind = "info") {
  const box = document.getElementById("notice");
  box.textContent = text;
  box.className = kind;
  box.hidden = false;
  clearTimeout(notice.timer);
  notice.timer = setTimeout(() => (box.hidden = true), 6000);
}

// An action button: runs `act`, says what came of it, refreshes the page.
function action(label, act, { confirmText, kind = "" } = {}) {
  return h(
    "button",
    {
      type: "button",
      class: kind,
      onclick: async (e) => {
        if (confirmText && !confirm(confirmText)) return;
        const button = e.currentTarget;
        button.disabled = true;
        try {
          notice(await act(), "ok");
        } catch (err) {
          if (err.status !== 401) notice(err.message, "error");
        } finally {
          button.disabled = false;
          state.shown = null;
          refresh();
        }
      },
    },
    label,
  );
}

// ---- pages -----------------------------------------------------------------

const STATUSES = ["pending", "running", "sleeping", "waiting", "completed", "failed", "cancelled"];
const SINCE = [
  ["", "any time"],
  ["900", "last 15 min"],
  ["3600", "last hour"],
  ["86400", "last day"],
  ["604800", "last week"],
];

const pages = {
  runs: {
    title: "Runs",
    controls(params) {
      const field = (name, options) =>
        h(
          "select",
          {
            name,
            onchange: (e) => {
              const next = new URLSearchParams(params);
              if (e.target.value) next.set(name, e.target.value);
              else next.delete(name);
              location.hash = `#/runs?${next}`;
            },
          },
          options.map(([value, label]) =>
            h("option", { value, selected: (params.get(name) || "") === value }, label),
          ),
        );
      const workflows = field("workflow", [["", "all workflows"]]);
      api("/workflows")
        .then((list) => {
          for (const w of list) {
            workflows.append(h("option", { value: w.name, selected: params.get("workflow") === w.name }, w.name));
          }
        })
        .catch(() => {});
      return h(
        "form",
        { class: "filters", onsubmit: (e) => e.preventDefault() },
        workflows,
        field("status", [["", "any status"], ...STATUSES.map((s) => [s, s])]),
        field("since", SINCE),
        field("limit", [["", "100 runs"], ["500", "500 runs"], ["1000", "1000 runs"]]),
      );
    },
    async load(params) {
      const q = new URLSearchParams();
      for (const key of ["workflow", "status", "limit"]) if (params.get(key)) q.set(key, params.get(key));
      if (params.get("since")) {
        q.set("since", new Date(Date.now() - Number(params.get("since")) * 1000).toISOString());
      }
      return api(`/runs?${q}`);
    },
    render(runs) {
      return table(
        [
          ["Run", (r) => runLink(r.id)],
          ["Workflow", (r) => r.workflow],
          ["Status", (r) => badge(r.status)],
          ["Started", (r) => when(r.created_at)],
          ["Took", (r) => (r.finished_at ? between(r.created_at, r.finished_at) : "—")],
          ["Parent", (r) => (r.parent_run ? runLink(r.parent_run) : "")],
          ["Error", (r) => h("span", { class: "error-text" }, r.error || "")],
        ],
        runs,
        { empty: "No runs match.", rowLink: (r) => `#/runs/${r.id}` },
      );
    },
  },

  run: {
    title: "Run",
    async load(params, id) {
      const [run, history, steps] = await Promise.all([
        api(`/runs/${encodeURIComponent(id)}`),
        api(`/runs/${encodeURIComponent(id)}/history`),
        api(`/runs/${encodeURIComponent(id)}/steps`),
      ]);
      return { run, history, steps };
    },
    render({ run, history, steps }) {
      const active = !["completed", "failed", "cancelled"].includes(run.status);
      const facts = [
        ["Workflow", h("a", { href: `#/runs?workflow=${encodeURIComponent(run.workflow)}` }, run.workflow)],
        ["Status", badge(run.status)],
        ["Created", when(run.created_at)],
        ["Started", when(run.started_at)],
        ["Finished", when(run.finished_at)],
        ["Duration", between(run.started_at || run.created_at, run.finished_at)],
        ["Queue", run.queue || "—"],
        ["Priority", run.priority],
        run.idempotency_key && ["Idempotency key", run.idempotency_key],
        run.wake_at && ["Wakes", when(run.wake_at)],
        run.parent_run && ["Parent", h("span", {}, runLink(run.parent_run), ` at step ${run.parent_step || "?"}`)],
        run.children.length > 0 && ["Children", run.children.map((c) => [runLink(c), " "])],
      ].filter(Boolean);
      return h(
        "div",
        { class: "run" },
        h(
          "div",
          { class: "title" },
          h("h1", {}, run.workflow, " ", h("span", { class: "mono muted" }, run.id)),
          h(
            "div",
            { class: "actions" },
            active &&
              action("Cancel", () => api(`/runs/${run.id}/cancel`, { method: "POST" }).then(() => "Cancelled."), {
                confirmText: "Cancel this run (and its children)?",
                kind: "danger",
              }),
            ["failed", "cancelled"].includes(run.status) &&
              action("Retry", () =>
                api(`/runs/${run.id}/retry`, { method: "POST" }).then((r) =>
                  r.retried ? "Retried: it picks up from its last completed step." : "Nothing to retry.",
                ),
              ),
          ),
        ),
        h("dl", { class: "facts" }, facts.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
        run.error && h("section", {}, h("h2", {}, "Error"), h("pre", { class: "error-text" }, run.error)),
        h("section", {}, h("h2", {}, "Timeline"), timeline(run, history)),
        h("section", {}, h("h2", {}, "Steps"), stepsTable(steps)),
        h(
          "section",
          { class: "io" },
          h("div", {}, h("h2", {}, "Input"), json(run.input)),
          h("div", {}, h("h2", {}, "Output"), run.output === null ? h("p", { class: "empty" }, "None yet.") : json(run.output)),
        ),
        h("section", {}, h("h2", {}, "History"), historyTable(history)),
      );
    },
  },

  workflows: {
    title: "Workflows",
    load: () => api("/workflows"),
    render: (list) =>
      table(
        [
          ["Name", (w) => h("a", { href: `#/runs?workflow=${encodeURIComponent(w.name)}` }, w.name)],
          ["Kind", (w) => w.kind],
          ["Queue", (w) => w.queue || "—"],
          ["Active", (w) => w.active],
          ["Failed", (w) => (w.failed ? h("a", { href: `#/runs?workflow=${encodeURIComponent(w.name)}&status=failed`, class: "error-text" }, w.failed) : 0)],
          ["Completed", (w) => w.completed],
          ["Registered", (w) => when(w.registered_at)],
        ],
        list,
        { empty: "No workflow is registered yet: a worker registers its workflows when it starts." },
      ),
  },

  queues: {
    title: "Queues",
    async load() {
      const queues = await api("/queues");
      const at = Date.now();
      for (const q of queues) {
        const list = state.samples.get(q.queue) || [];
        list.push({ at, ready: q.ready, in_flight: q.in_flight, delayed: q.delayed, age: q.oldest_ready_age });
        if (list.length > SAMPLES) list.shift();
        state.samples.set(q.queue, list);
      }
      return queues;
    },
    render: (queues) =>
      h(
        "div",
        {},
        table(
          [
            ["Queue", (q) => h("strong", {}, q.queue)],
            ["Ready", (q) => q.ready],
            ["Delayed", (q) => q.delayed],
            ["In flight", (q) => q.in_flight],
            ["Dead", (q) => (q.dead ? h("a", { href: `#/dead?queue=${encodeURIComponent(q.queue)}`, class: "error-text" }, q.dead) : 0)],
            ["Oldest ready", (q) => (q.ready ? span(q.oldest_ready_age) : "—")],
            [
              "Depth over time",
              (q) => sparkline(state.samples.get(q.queue) || [], [["in_flight", "in-flight"], ["ready", "ready"]], (n) => `${n} jobs`),
            ],
            ["Age over time", (q) => sparkline(state.samples.get(q.queue) || [], [["age", "age"]], span)],
          ],
          queues,
          { empty: "No queue yet." },
        ),
        h("p", { class: "muted" }, "Sampled every 2 s while this page is open, over the last five minutes: depth ready (blue) and in flight (grey), and the oldest ready job's age (amber)."),
      ),
  },

  dead: {
    title: "Dead letters",
    load: (params) => {
      const q = new URLSearchParams();
      if (params.get("queue")) q.set("queue", params.get("queue"));
      return api(`/dead?${q}`);
    },
    render(list, params) {
      const queues = [...new Set(list.map((d) => d.queue))];
      return h(
        "div",
        {},
        h(
          "div",
          { class: "actions" },
          queues.map((queue) =>
            action(`Requeue all in ${queue}`, () =>
              api(`/dead/${encodeURIComponent(queue)}/requeue`, { method: "POST" }).then(
                (r) => `Requeued ${r.requeued} job(s) in ${queue}` + (r.skipped ? `; ${r.skipped} step job(s) skipped (retry their runs)` : "") + ".",
              ),
              { confirmText: `Requeue every dead job in ${queue}?` },
            ),
          ),
          params.get("queue") && h("a", { href: "#/dead" }, "all queues"),
        ),
        table(
          [
            ["Job", (d) => h("span", { class: "mono" }, d.id)],
            ["Queue", (d) => d.queue],
            ["Task", (d) => d.task],
            ["Attempts", (d) => d.attempts],
            ["Last error", (d) => h("span", { class: "error-text" }, d.last_error || "")],
            ["Died", (d) => when(d.died_at)],
            ["Run", (d) => (d.run_id ? runLink(d.run_id) : "")],
            ["Payload", (d) => h("details", {}, h("summary", {}, "show"), json(d.payload))],
            [
              "",
              (d) =>
                action("Requeue", () =>
                  api(`/dead/${encodeURIComponent(d.queue)}/requeue`, { method: "POST", body: { id: d.id } }).then(
                    () => `Requeued job ${d.id}.`,
                  ),
                ),
            ],
          ],
          list,
          { empty: "No dead letters." },
        ),
      );
    },
  },

  workers: {
    title: "Workers",
    load: () => api("/workers"),
    render: (list) =>
      table(
        [
          ["Worker", (w) => h("span", { class: "mono", title: w.id }, shortId(w.id))],
          ["Host", (w) => `${w.host} (pid ${w.pid})`],
          ["State", (w) => badge(w.alive ? "alive" : "lost")],
          ["Queues", (w) => w.queues.join(", ")],
          ["Handlers", (w) => h("span", { class: "muted" }, w.handlers.join(", "))],
          ["Concurrency", (w) => w.concurrency],
          ["Up since", (w) => when(w.started_at)],
          ["Seen", (w) => when(w.seen_at)],
        ],
        list,
        { empty: "No worker has announced itself." },
      ),
  },

  health: {
    title: "Health",
    load: () => api("/doctor"),
    render: (checks) =>
      h(
        "div",
        {},
        table(
          [
            ["", (c) => badge(c.status)],
            ["Check", (c) => h("strong", {}, c.name)],
            ["Found", (c) => c.detail],
          ],
          checks,
        ),
        h("p", { class: "muted" }, "The same as `cairn doctor`: ages over 5 minutes are reported."),
      ),
  },

  schedules: {
    title: "Schedules",
    load: () => api("/schedules"),
    render: (list) =>
      table(
        [
          ["Name", (s) => h("strong", {}, s.name)],
          ["Cron", (s) => h("span", { class: "mono" }, `${s.cron} (${s.timezone})`)],
          ["Starts", (s) => (s.workflow ? `workflow ${s.workflow}` : `task ${s.task} on ${s.queue}`)],
          ["State", (s) => badge(s.paused ? "paused" : "active")],
          ["Next", (s) => when(s.next_fire)],
          ["Last", (s) => when(s.last_fire)],
          ["Last run", (s) => (s.last_run ? runLink(s.last_run) : "")],
        ],
        list,
        { empty: "No schedules." },
      ),
  },
};

// A step attempt, wait or call on a time axis from the run's creation to its
// end (or now).
function timeline(run, history) {
  const t0 = new Date(run.created_at).getTime();
  const all = history.filter((e) => e.step && e.at);
  // A map over thousands of elements would draw thousands of lanes.
  const bars = all.slice(0, MAX_LANES);
  const marks = history.filter((e) => !e.step && ["signal", "suspended", "resumed", "failed", "retried", "cancelled"].includes(e.event));
  const ends = [Date.now()];
  if (run.finished_at) ends[0] = new Date(run.finished_at).getTime();
  for (const e of bars) if (e.ended_at) ends.push(new Date(e.ended_at).getTime());
  const t1 = Math.max(...ends, t0 + 1);
  const pos = (iso) => ((new Date(iso).getTime() - t0) / (t1 - t0)) * 100;
  if (bars.length === 0) return h("p", { class: "empty" }, "No step has run yet.");
  return h(
    "div",
    { class: "timeline" },
    h("div", { class: "axis" }, h("span", {}, "0"), h("span", {}, span((t1 - t0) / 1000))),
    bars.map((e) => {
      const left = pos(e.at);
      const right = e.ended_at ? pos(e.ended_at) : 100;
      const took = between(e.at, e.ended_at);
      const label = `${e.step}${e.attempt > 1 ? ` (attempt ${e.attempt})` : ""}`;
      const bar = h("div", { class: `bar ${e.outcome || "running"} ${e.event}`, title: `${e.event} ${label}: ${e.outcome || "running"}, ${took}${e.error ? `\n${e.error}` : ""}` });
      bar.style.left = `${left}%`;
      bar.style.width = `${Math.max(right - left, 0.4)}%`;
      return h(
        "div",
        { class: "lane" },
        h("span", { class: "label" }, e.event === "attempt" || e.step.startsWith(e.event) ? "" : h("span", { class: "kind" }, `${e.event} `), label),
        h("span", { class: "track" }, bar),
        h("span", { class: "took" }, `${took} · ${e.outcome || "running"}`),
      );
    }),
    all.length > bars.length &&
      h("p", { class: "muted" }, `The first ${MAX_LANES} of ${all.length} attempts; the history below has them all.`),
    marks.length > 0 &&
      h(
        "div",
        { class: "lane marks" },
        h("span", { class: "label muted" }, "events"),
        h(
          "span",
          { class: "track" },
          marks.map((e) => {
            const m = h("span", { class: `mark ${e.event}`, title: `${e.event} ${new Date(e.at).toLocaleTimeString()}${e.detail ? " " + JSON.stringify(e.detail) : ""}` });
            m.style.left = `${pos(e.at)}%`;
            return m;
          }),
        ),
        h("span", { class: "took" }, ""),
      ),
  );
}

function stepsTable(steps) {
  return table(
    [
      ["#", (s) => s.seq],
      ["Step", (s) => h("strong", {}, s.key)],
      ["Kind", (s) => s.kind],
      ["Status", (s) => badge(s.status)],
      ["Attempts", (s) => s.attempts],
      ["Took", (s) => between(s.started_at, s.finished_at)],
      ["Output", (s) => (s.output === null ? (s.error ? h("span", { class: "error-text" }, s.error) : "—") : h("details", {}, h("summary", {}, preview(s.output)), json(s.output)))],
    ],
    steps,
    { empty: "No steps yet." },
  );
}

function preview(value) {
  const text = JSON.stringify(value);
  return text.length > 60 ? `${text.slice(0, 57)}…` : text;
}

function historyTable(history) {
  return table(
    [
      ["At", (e) => h("time", { datetime: e.at }, new Date(e.at).toLocaleTimeString())],
      ["Event", (e) => e.event],
      ["Step", (e) => e.step || ""],
      ["Attempt", (e) => e.attempt || ""],
      ["Outcome", (e) => (e.outcome ? badge(e.outcome) : "")],
      ["Took", (e) => (e.ended_at ? between(e.at, e.ended_at) : "")],
      ["Detail", (e) => h("span", { class: e.error ? "error-text" : "muted" }, e.error || (e.detail ? JSON.stringify(e.detail) : ""))],
    ],
    history,
  );
}

// Lines over the samples kept for a queue: `fields` as [field, class],
// on one scale; `describe` says what the peak was.
function sparkline(samples, fields, describe) {
  const w = 160;
  const hgt = 28;
  const box = svg("svg", { viewBox: `0 0 ${w} ${hgt}`, width: w, height: hgt, class: "spark" });
  if (samples.length < 2) return box;
  const top = Math.max(1e-9, ...samples.flatMap((s) => fields.map(([f]) => s[f])));
  for (const [field, cls] of fields) {
    const pts = samples.map((s, i) => `${((i / (samples.length - 1)) * w).toFixed(1)},${(hgt - 1 - (s[field] / top) * (hgt - 2)).toFixed(1)}`);
    box.append(svg("polyline", { points: pts.join(" "), class: cls }));
  }
  const title = svg("title");
  title.textContent = `peak ${describe(top)} over ${span((samples.at(-1).at - samples[0].at) / 1000)}`;
  box.append(title);
  return box;
}

// ---- routing and refresh ---------------------------------------------------

function route() {
  const [path, query = ""] = location.hash.replace(/^#/, "").split("?");
  const parts = path.split("/").filter(Boolean);
  const params = new URLSearchParams(query);
  if (parts[0] === "runs" && parts[1]) return { name: "run", params, id: decodeURIComponent(parts[1]) };
  if (pages[parts[0]]) return { name: parts[0], params };
  return { name: "runs", params };
}

function navigate() {
  if (!state.token) return showSignIn();
  const { name, params, id } = route();
  const page = pages[name];
  state.generation += 1;
  state.shown = null;
  document.title = `${page.title} · cairn`;
  for (const a of document.querySelectorAll("nav a")) {
    a.classList.toggle("here", a.dataset.page === (name === "run" ? "runs" : name));
  }
  const main = document.getElementById("page");
  main.replaceChildren(
    h("div", { class: "page-head" }, name === "run" ? null : h("h1", {}, page.title), page.controls ? page.controls(params) : null),
    h("div", { id: "data", "data-page": name }, h("p", { class: "empty" }, "Loading…")),
  );
  state.route = { page, params, id, name };
  refresh();
}

async function refresh() {
  clearTimeout(state.timer);
  if (!state.token || !state.route) return;
  const generation = state.generation;
  const { page, params, id } = state.route;
  const live = document.getElementById("live");
  try {
    const data = await page.load(params, id);
    if (generation !== state.generation) return;
    const key = JSON.stringify(data);
    if (key !== state.shown) {
      state.shown = key;
      const area = document.getElementById("data");
      area.replaceChildren(page.render(data, params));
      area.dataset.loaded = String(Date.now());
    }
    live.textContent = "live";
    live.className = "live on";
  } catch (err) {
    if (generation !== state.generation || err.status === 401) return;
    live.textContent = "offline";
    live.className = "live off";
    if (state.shown === null) {
      document.getElementById("data").replaceChildren(h("p", { class: "error-text" }, err.message));
      state.shown = "error";
    }
  }
  if (generation === state.generation) state.timer = setTimeout(refresh, REFRESH_MS);
}

// ---- the token -------------------------------------------------------------

function showSignIn(message = "") {
  clearTimeout(state.timer);
  state.route = null;
  document.getElementById("page").replaceChildren();
  document.getElementById("signout").hidden = true;
  const form = document.getElementById("signin");
  form.hidden = false;
  document.getElementById("signin-error").textContent = message;
  document.getElementById("token").focus();
}

function signOut(message = "") {
  state.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  showSignIn(message);
}

function signIn(token) {
  state.token = token;
  sessionStorage.setItem(TOKEN_KEY, token);
  document.getElementById("signin").hidden = true;
  document.getElementById("signout").hidden = false;
  navigate();
}

// A token handed over in the address (`/#token=…`, for a script or a
// bookmark) is kept for this tab and taken out of the address at once.
function takeHandedToken() {
  const handed = location.hash.match(/^#token=([^&]+)/);
  if (!handed) return false;
  history.replaceState(null, "", `${location.pathname}#/runs`);
  signIn(decodeURIComponent(handed[1]));
  return true;
}

function start() {
  document.getElementById("signin").addEventListener("submit", (e) => {
    e.preventDefault();
    const token = document.getElementById("token").value.trim();
    if (token) signIn(token);
  });
  document.getElementById("signout").addEventListener("click", () => signOut());
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refresh();
  });
  window.addEventListener("hashchange", () => takeHandedToken() || navigate());
  if (takeHandedToken()) return;
  if (state.token) signIn(state.token);
  else showSignIn();
}

start();

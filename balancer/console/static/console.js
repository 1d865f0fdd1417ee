/* balancer console: live regions, token sign-in, actions, migration events. No dependencies.
 *
 * - Elements with data-part="NAME" are refreshed from /ui/part/NAME (htmx-style: the server
 *   renders the HTML, we swap it in) every 0.5 s and after every change; the server answers
 *   304 when the fragment's ETag did not change.
 * - The API token lives in sessionStorage (this tab, until it closes) and is sent as
 *   "Authorization: Bearer"; no cookie is ever set, so other sites cannot act for the user.
 * - Buttons with data-post / data-delete call the JSON API; the answer is announced in #status.
 * - /ui/events (server-sent events) drives the "Migrations in flight" table on every page.
 */
(() => {
  "use strict";
  const KEY = "balancer.token";
  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
  const token = () => sessionStorage.getItem(KEY);

  // -- status line -----------------------------------------------------------------------
  function say(msg, kind = "info") {
    const el = $("#status");
    if (!el) return;
    el.textContent = msg;
    el.className = "status " + kind;
  }

  function describe(data, status) {
    if (data && Array.isArray(data.detail)) {
      return data.detail.map((d) => d.msg + (d.loc && d.loc.length ? " (" + d.loc.join(".") + ")" : "")).join("; ");
    }
    if (data && typeof data.detail === "string") return data.detail;
    return "HTTP " + status;
  }

  async function api(method, path, body, tok = token()) {
    const headers = { Accept: "application/json" };
    if (tok) headers.Authorization = "Bearer " + tok;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let r;
    try {
      r = await fetch(path, {
        method, headers, credentials: "omit", cache: "no-store",
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (e) {
      return { ok: false, status: 0, data: null, msg: "the service did not answer: " + e.message };
    }
    let data = null;
    try { data = await r.json(); } catch (e) { data = null; }
    return { ok: r.ok, status: r.status, data, msg: r.ok ? "" : describe(data, r.status) };
  }

  function refused(res, what) {
    let hint = "";
    if (res.status === 401) hint = token() ? " — the token was not accepted; sign in again" : " — sign in with the API token first";
    if (res.status === 403) hint = " — the server has no API token configured";
    say("Refused: " + what + ": " + res.msg + " (HTTP " + res.status + ")" + hint, "error");
  }

  // -- live regions --------------------------------------------------------------------------
  const parts = new Map();

  function editing(el) {
    const a = document.activeElement;
    return a && el.contains(a) && /^(INPUT|SELECT|TEXTAREA)$/.test(a.tagName);
  }

  function focusKey(el) {
    const a = document.activeElement;
    if (!a || !el.contains(a)) return null;
    if (a.id) return "#" + CSS.escape(a.id);
    for (const attr of ["data-post", "data-delete", "data-host", "data-ids", "href"]) {
      const v = a.getAttribute(attr);
      if (v) return a.tagName.toLowerCase() + "[" + attr + '="' + CSS.escape(v) + '"]';
    }
    return null;
  }

  // Replace only what changed: top-level children whose HTML differs, and inside a list that
  // kept its length (the host tiles) only the items that differ. A 5,000-tile page whose
  // summary changed swaps one small section instead of rebuilding every tile.
  function patch(el, html) {
    const tpl = document.createElement("template");
    tpl.innerHTML = html;
    const fresh = Array.from(tpl.content.children);
    const old = Array.from(el.children);
    if (fresh.length !== old.length) {
      el.replaceChildren(tpl.content);
      return;
    }
    fresh.forEach((node, i) => {
      const cur = old[i];
      if (cur.isEqualNode(node)) return;
      const a = cur.querySelector("ul.tiles"), b = node.querySelector("ul.tiles");
      if (a && b && a.children.length === b.children.length && cur.firstElementChild
          && cur.firstElementChild.isEqualNode(node.firstElementChild)) {
        const bs = b.children;
        Array.from(a.children).forEach((li, j) => { if (!li.isEqualNode(bs[j])) li.replaceWith(bs[j].cloneNode(true)); });
      } else {
        cur.replaceWith(node);
      }
    });
  }

  function swap(el, html) {
    const key = focusKey(el);
    if (el.dataset.patch !== undefined) patch(el, html); else el.innerHTML = html;
    if (key) {
      const again = $(key, el);
      if (again) again.focus({ preventScroll: true });
    }
    el.dispatchEvent(new CustomEvent("console:swapped", { bubbles: true }));
  }

  async function refresh(el) {
    const st = parts.get(el);
    if (st.busy) { st.again = true; return; }
    st.busy = true;
    const t0 = performance.now();
    let took = 0;
    try {
      const q = el.dataset.query ? "?" + el.dataset.query : "";
      const headers = st.etag ? { "If-None-Match": st.etag } : {};
      const r = await fetch("/ui/part/" + el.dataset.part + q, { headers, cache: "no-store", credentials: "omit" });
      const html = await r.text(); // read even a 304's empty body, so the request completes
      took = performance.now() - t0;
      if (r.status === 200) {
        if (editing(el)) {
          st.etag = null; // keep what the user is typing into; try again later
        } else {
          st.etag = r.headers.get("ETag");
          swap(el, html);
        }
      }
      el.removeAttribute("data-error");
    } catch (e) {
      el.setAttribute("data-error", "1");
    } finally {
      // Poll every 0.5 s; back off when the server is slow to answer (not when our own
      // swap was slow: an unchanged fragment costs a 304 and no DOM work).
      st.every = Math.max(500, Math.min(3000, 2 * took));
      st.busy = false;
      if (st.again) { st.again = false; refresh(el); }
    }
  }

  function refreshAll() { parts.forEach((_, el) => refresh(el)); }

  function startParts() {
    $$("[data-part]").forEach((el) => {
      parts.set(el, { etag: el.dataset.etag || null, busy: false, again: false, every: 1000, next: 0 });
    });
    if (!parts.size) return;
    setInterval(() => {
      if (document.hidden) return;
      const now = performance.now();
      parts.forEach((st, el) => {
        if (now >= st.next && !st.busy) { st.next = now + st.every; refresh(el); }
      });
    }, 250);
  }

  // -- sign-in --------------------------------------------------------------------------------
  function showWho() {
    const t = token();
    $("#who").textContent = t ? "signed in" : "read-only";
    $("#who").className = "who " + (t ? "in" : "out");
    $("#token-input").hidden = !!t;
    $("#sign-in").hidden = !!t;
    $("#sign-out").hidden = !t;
  }

  function startLogin() {
    const form = $("#login");
    if (!form) return;
    showWho();
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const input = $("#token-input");
      const t = input.value.trim();
      if (!t) { say("Type the API token to sign in.", "error"); input.focus(); return; }
      const res = await api("GET", "/v1/auth", undefined, t);
      if (res.ok) {
        sessionStorage.setItem(KEY, t);
        input.value = "";
        showWho();
        say("Signed in for this browser tab (the token is forgotten when the tab closes).", "ok");
        $("#sign-out").focus();
      } else {
        refused(res, "sign-in");
        input.select();
      }
    });
    $("#sign-out").addEventListener("click", () => {
      sessionStorage.removeItem(KEY);
      showWho();
      say("Signed out.", "info");
      $("#token-input").focus();
    });
  }

  // -- actions --------------------------------------------------------------------------------
  async function act(btn, method, path) {
    if (btn.dataset.confirm && !window.confirm(btn.dataset.confirm)) return;
    const label = btn.textContent;
    btn.disabled = true;
    btn.setAttribute("aria-busy", "true");
    btn.textContent = "Working…";
    say(label + "…", "info");
    const res = await api(method, path);
    btn.disabled = false;
    btn.removeAttribute("aria-busy");
    btn.textContent = label;
    if (res.ok) {
      let msg = btn.dataset.done || "Done.";
      const rec = res.data && res.data.recommendation;
      if (rec && rec.state && rec.state !== "applied" && method === "POST" && /apply$/.test(path)) {
        msg = "The move of " + rec.vm + " " + rec.state + (rec.detail ? ": " + rec.detail : "");
        say(msg, "error");
      } else {
        say(msg, "ok");
      }
    } else {
      refused(res, label.toLowerCase());
    }
    refreshAll();
    return res;
  }

  async function applyWave(btn) {
    const ids = btn.dataset.ids.split(",").filter(Boolean);
    const label = btn.textContent;
    btn.disabled = true;
    let done = 0;
    for (const id of ids) {
      btn.textContent = "Applying " + (done + 1) + " of " + ids.length + "…";
      say("Wave " + btn.dataset.wave + ": applying " + (done + 1) + " of " + ids.length + "…", "info");
      const res = await api("POST", "/v1/recommendations/" + id + "/apply");
      if (!res.ok) {
        refused(res, "apply (wave " + btn.dataset.wave + ", " + done + " of " + ids.length + " applied)");
        btn.disabled = false;
        btn.textContent = label;
        refreshAll();
        return;
      }
      done += 1;
      refreshAll();
    }
    say("Wave " + btn.dataset.wave + ": " + done + " of " + ids.length + " applied.", "ok");
    btn.disabled = false;
    btn.textContent = label;
  }

  function startActions() {
    document.addEventListener("click", (ev) => {
      const btn = ev.target.closest("button");
      if (!btn || btn.disabled) return;
      if (btn.dataset.post) { ev.preventDefault(); act(btn, "POST", btn.dataset.post); }
      else if (btn.dataset.delete) { ev.preventDefault(); act(btn, "DELETE", btn.dataset.delete); }
      else if (btn.classList.contains("apply-wave")) { ev.preventDefault(); applyWave(btn); }
    });
    document.addEventListener("submit", async (ev) => {
      const form = ev.target;
      if (form.id === "cluster-form") {
        ev.preventDefault();
        const f = new FormData(form);
        const budget = f.get("max_migrations");
        const res = await api("PUT", "/v1/automation", {
          automation: f.get("automation"), threshold: Number(f.get("threshold")),
          max_migrations: budget === "" ? null : Number(budget),
        });
        if (res.ok) say("Cluster settings saved: " + res.data.automation + ", threshold " + res.data.threshold + ".", "ok");
        else refused(res, "save cluster settings");
        document.activeElement.blur();
        refreshAll();
      } else if (form.id === "override-form") {
        ev.preventDefault();
        const f = new FormData(form);
        const vm = String(f.get("vm")).trim();
        const res = await api("PUT", "/v1/automation/vms/" + encodeURIComponent(vm), { level: f.get("level") });
        if (res.ok) say(vm + " is now " + f.get("level") + ".", "ok");
        else refused(res, "set the override of " + vm);
        document.activeElement.blur();
        refreshAll();
      }
    });
  }

  // -- migrations in flight (server-sent events) ---------------------------------------------
  const fmt = (x, d = 0) => (x === null || x === undefined ? null : Number(x).toFixed(d));

  function cell(text) { const td = document.createElement("td"); td.textContent = text; return td; }

  function flightRow(e) {
    const tr = document.createElement("tr");
    tr.dataset.key = e.key;
    tr.dataset.vm = e.vm;
    tr.className = "k-" + e.kind;
    tr.append(cell(e.vm), cell(e.source + " → " + e.target));
    const td = document.createElement("td");
    const bar = document.createElement("progress");
    bar.max = 100;
    bar.value = e.percent || 0;
    bar.setAttribute("aria-label", e.vm + " progress");
    const pc = document.createElement("span");
    pc.className = "pc";
    const ended = e.kind === "end" || e.kind === "skip";
    pc.textContent = ended ? e.state : (e.percent !== undefined && e.percent !== null ? fmt(e.percent) + "%" : e.kind);
    td.append(bar, " ", pc);
    tr.append(td);
    tr.append(cell(e.total_mb ? fmt(e.transferred_mb) + " / " + fmt(e.total_mb) + " MiB" : "–"));
    tr.append(cell(e.rate_mbps ? fmt(e.rate_mbps) + " Mbit/s" : "–"));
    tr.append(cell(e.dirty_rate_mbps !== undefined && e.dirty_rate_mbps !== null ? fmt(e.dirty_rate_mbps) + " Mbit/s" : "not reported"));
    tr.append(cell(e.downtime_ms !== undefined && e.downtime_ms !== null ? fmt(e.downtime_ms) + " ms" : "not reported"));
    tr.append(cell(String(e.attempt || 1)));
    return tr;
  }

  function flightCount() {
    const body = $("#inflight tbody");
    const n = $$("tr:not(.done)", body).length;
    $("#flight-count").textContent = String(n);
    $("#flight-empty").hidden = body.children.length > 0;
  }

  function onMigration(e) {
    const body = $("#inflight tbody");
    const old = $('tr[data-key="' + CSS.escape(e.key) + '"]', body);
    if (e.kind === "end" || e.kind === "skip") {
      if (old) {
        const row = flightRow(e);
        row.classList.add("done", e.state);
        old.replaceWith(row);
        setTimeout(() => { row.remove(); flightCount(); }, 1500);
      }
      refreshAll();
    } else {
      const row = flightRow(e);
      if (old) old.replaceWith(row); else body.append(row);
      if (e.kind === "start" && !e.replay) refreshAll();
    }
    flightCount();
  }

  function startEvents() {
    if (!$("#inflight") || !window.EventSource) return;
    const es = new EventSource("/ui/events");
    es.addEventListener("open", () => {
      // The server sends what is in flight right after (re)connecting.
      $$("#inflight tbody tr:not(.done)").forEach((tr) => tr.remove());
      flightCount();
    });
    es.addEventListener("migration", (m) => {
      try { onMigration(JSON.parse(m.data)); } catch (e) { /* a malformed event is skipped */ }
    });
  }

  // -- what-if ---------------------------------------------------------------------------------
  function frontierPoints(fr) {
    if (!Array.isArray(fr)) return [];
    return fr.map((p) => ({
      migrations: p.migrations ?? p.max_migrations ?? p.moves ?? null,
      imbalance: p.imbalance ?? (p.after && p.after.imbalance) ?? null,
      moved: p.moved_mem_mb ?? p.moved_mb ?? null,
    })).filter((p) => p.migrations !== null && p.imbalance !== null);
  }

  function showPlan(d) {
    const sec = $("#whatif-result");
    sec.hidden = false;
    const e = d.efficacy || {};
    const b = e.before || {}, a = e.after || {};
    const dl = $("#wi-summary");
    dl.innerHTML = "";
    const items = [
      ["Imbalance before", fmt(b.imbalance, 4)], ["Imbalance after", fmt(a.imbalance, 4)],
      ["Migrations", String(e.migrations ?? (d.migrations || []).length)],
      ["Memory moved", e.moved_mem_mb !== undefined ? fmt(e.moved_mem_mb / 1024, 1) + " GiB" : "–"],
      ["Solver", d.solver ? d.solver.status + ", " + fmt(d.solver.seconds, 2) + " s" : "–"],
    ];
    for (const [k, v] of items) {
      const div = document.createElement("div");
      const dt = document.createElement("dt"); dt.textContent = k;
      const dd = document.createElement("dd"); dd.textContent = v;
      div.append(dt, dd); dl.append(div);
    }
    const body = $("#wi-moves tbody");
    body.innerHTML = "";
    for (const m of d.migrations || []) {
      const tr = document.createElement("tr");
      tr.dataset.vm = m.vm;
      tr.append(cell(m.vm), cell(m.from), cell(m.to), cell(m.reason),
                cell(m.gain !== undefined ? fmt(m.gain, 4) : "–"), cell(fmt((m.mem_mb || 0) / 1024, 1) + " GiB"));
      body.append(tr);
    }
    if (!body.children.length) {
      const tr = document.createElement("tr");
      const td = cell("No moves: nothing worth moving at this threshold and budget.");
      td.colSpan = 6; td.className = "empty"; tr.append(td); body.append(tr);
    }
    const pts = frontierPoints(d.frontier);
    $("#wi-frontier").hidden = pts.length < 2;
    $("#wi-nofrontier").hidden = pts.length >= 2;
    if (pts.length >= 2) {
      const s = $("#wi-slider");
      s.max = String(pts.length - 1);
      const cur = pts.findIndex((p) => p.migrations === (e.migrations ?? -1));
      s.value = String(cur >= 0 ? cur : pts.length - 1);
      s._points = pts;
      s.dispatchEvent(new Event("input"));
    }
  }

  async function runWhatIf(extra) {
    const f = new FormData($("#whatif-form"));
    const budget = f.get("max_migrations");
    const body = {
      threshold: Number(f.get("threshold")),
      max_migrations: budget === "" ? null : Number(budget),
      time_limit_s: f.get("time_limit_s") === "" ? null : Number(f.get("time_limit_s")),
      ...extra,
    };
    const sec = $("#whatif-result");
    sec.setAttribute("aria-busy", "true");
    $("#wi-run").disabled = true;
    say("Solving…", "info");
    const res = await api("POST", "/v1/whatif/current", body);
    $("#wi-run").disabled = false;
    sec.setAttribute("aria-busy", "false");
    if (!res.ok) { refused(res, "what-if"); return; }
    say("Plan ready: " + (res.data.migrations || []).length + " moves.", "ok");
    showPlan(res.data);
  }

  function startWhatIf() {
    const form = $("#whatif-form");
    if (!form) return;
    form.addEventListener("submit", (ev) => { ev.preventDefault(); runWhatIf({}); });
    const s = $("#wi-slider");
    s.addEventListener("input", () => {
      const p = (s._points || [])[Number(s.value)];
      if (!p) return;
      const text = p.migrations + " migrations → imbalance " + fmt(p.imbalance, 4) + (p.moved !== null ? ", " + fmt(p.moved / 1024, 1) + " GiB moved" : "");
      $("#wi-point").textContent = text;
      s.setAttribute("aria-valuetext", text);
    });
    $("#wi-use-point").addEventListener("click", () => {
      const p = (s._points || [])[Number(s.value)];
      if (!p) return;
      $("#wi-budget").value = String(p.migrations);
      runWhatIf({ max_migrations: p.migrations });
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    startLogin();
    startActions();
    startParts();
    startEvents();
    startWhatIf();
    document.documentElement.dataset.ready = "1";
  });
})();

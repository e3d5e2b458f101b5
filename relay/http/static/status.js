// The status page's refresh: fetch /api/status every few seconds and redraw the sections in
// place, draw the queue-age chart, and show times in the viewer's time zone. Served as a
// same-origin file because the page's Content-Security-Policy allows no inline script. Every
// text goes in with textContent: recipients and error texts are whatever a device or an
// upstream server sent.
"use strict";

(function () {
  const zone = Intl.DateTimeFormat().resolvedOptions().timeZone || "local time";
  const pad = (n) => String(n).padStart(2, "0");
  let refreshSeconds = 5;

  // "2026-12-02 20:48:55 UTC+05:30": the viewer's wall clock, with the offset that applied
  // at that instant (summer time included), so nobody wonders which zone a time is in.
  function localTime(unix) {
    const d = new Date(unix * 1000);
    const offset = -d.getTimezoneOffset();
    const sign = offset < 0 ? "-" : "+";
    const zoneText = `UTC${sign}${pad(Math.floor(Math.abs(offset) / 60))}:` +
      pad(Math.abs(offset) % 60);
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
      `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())} ${zoneText}`;
  }

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }

  function timeEl(unix) {
    const node = el("time", localTime(unix));
    node.dateTime = new Date(unix * 1000).toISOString();
    node.title = zone;
    node.dataset.unix = String(unix);
    return node;
  }

  function localize(root) {
    for (const node of root.querySelectorAll("time[data-unix]")) {
      node.textContent = localTime(Number(node.dataset.unix));
      node.title = zone;
    }
  }

  function cell(content, cls) {
    const td = el("td", null, cls);
    td.append(...[].concat(content).map((c) => (c instanceof Node ? c : String(c))));
    return td;
  }

  function table(headers, rows, empty) {
    if (!rows.length) return el("p", empty, "muted");
    const t = el("table");
    const head = el("tr");
    for (const h of headers) head.append(el("th", h));
    t.append(head);
    for (const row of rows) {
      const tr = el("tr");
      tr.append(...row);
      t.append(tr);
    }
    return t;
  }

  function link(href, text) {
    const a = el("a", text);
    a.href = href;
    return a;
  }

  const SVG = "http://www.w3.org/2000/svg";

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  // Queue age at a glance: one bar per age class, older classes in warmer colours.
  function ageChart(ages) {
    const colours = ["#1a7f37", "#4c9a2a", "#9a6700", "#c77700", "#d4561c", "#b42318",
      "#7a1010"];
    const width = 60 * ages.length, height = 110, top = 16, base = 90;
    const max = Math.max(1, ...ages.map((a) => a.count));
    const chart = svg("svg", {width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
      "aria-label": "queued messages by age"});
    ages.forEach((a, i) => {
      const h = a.count ? Math.max(2, (base - top) * a.count / max) : 0;
      const bar = svg("rect", {x: i * 60 + 10, y: base - h, width: 40, height: h,
        fill: colours[i % colours.length], "data-class": a.class, "data-count": a.count});
      bar.append(svg("title", {}, `${a.label}: ${a.count} message(s)`));
      chart.append(bar);
      chart.append(svg("text", {x: i * 60 + 30, y: base - h - 3, "text-anchor": "middle",
        "font-size": 11}, a.count));
      chart.append(svg("text", {x: i * 60 + 30, y: base + 14, "text-anchor": "middle",
        "font-size": 10, fill: "#666"}, a.label));
    });
    return chart;
  }

  function drawQueue(data) {
    const q = data.queue;
    const rows = q.mailboxes.map((m) => [cell(m.mailbox), cell(m.count), cell(m.age),
      cell(m.last_error, "detail")]);
    const figure = el("figure");
    figure.id = "age-chart";
    figure.append(ageChart(q.ages));
    const summary = el("p", q.summary);
    summary.id = "queue-summary";
    const parts = [el("h2", "Queue"), summary, figure];
    if (rows.length) parts.push(table(["mailbox", "messages", "oldest", "last error"], rows));
    return parts;
  }

  function drawWaiting(data) {
    const rows = data.waiting.map((w) => [cell(w.id, "nw"), cell(w.account),
      cell(w.recipients.join(", ")), cell(w.attempts), cell(timeEl(w.next_attempt_at), "nw"),
      cell(link(`#why-${w.id}`, "why?"))]);
    const parts = [el("h2", "Waiting for a retry"),
      table(["queue id", "account", "recipients", "attempts", "next try", ""], rows,
        "No message waits for a retry.")];
    for (const w of data.waiting) {
      const why = el("div", null, "why");
      why.id = `why-${w.id}`;
      why.append(el("h3", `${w.id}: why it waits`), el("p", w.last_error, "detail"));
      parts.push(why);
    }
    return parts;
  }

  function drawTokens(data) {
    const rows = data.tokens.map((t) => [cell(t.app), cell(t.client_id, "nw"),
      cell(t.state, `${t.css} nw`), cell(t.expires_in, "nw"),
      cell(`${t.requests} / ${t.failures}`), cell(t.detail, "detail")]);
    return [el("h2", "Tokens"), table(["app", "client id", "state", "expires in",
      "requests / failures", "explanation"], rows, "No apps configured.")];
  }

  function drawCluster(data) {
    if (!data.cluster.length) return [];
    const rows = data.cluster.map((n) => [cell(n.me ? `${n.node} (this relay)` : n.node),
      cell(n.alive ? "alive" : "gone", n.alive ? "ok" : "failing"),
      cell(timeEl(n.started), "nw"), cell(`${n.seen_ago} ago`), cell(n.owned),
      cell(n.claimed), cell(n.slots)]);
    return [el("h2", "Cluster"), table(["node", "state", "started", "last seen", "queued",
      "in flight", "connection slots"], rows)];
  }

  function drawRecent(data) {
    const rows = data.recent.map((ev) => [
      cell([timeEl(ev.time), ` (${ev.ago} ago)`], "nw"), cell(ev.queue_id), cell(ev.account),
      cell(ev.recipient),
      cell(ev.waiting ? link(`#why-${ev.queue_id}`, ev.status) : ev.status, ev.status),
      cell(ev.detail, "detail")]);
    const summary = el("p", data.summary);
    summary.id = "recent-summary";
    return [el("h2", "Recent deliveries"), summary, table(["when", "queue id", "account",
      "recipient", "status", "reply"], rows, "Nothing delivered or tried since the start.")];
  }

  function draw(data) {
    document.getElementById("queue").replaceChildren(...drawQueue(data));
    document.getElementById("waiting").replaceChildren(...drawWaiting(data));
    document.getElementById("tokens").replaceChildren(...drawTokens(data));
    document.getElementById("cluster").replaceChildren(...drawCluster(data));
    document.getElementById("recent").replaceChildren(...drawRecent(data));
    document.getElementById("updated").replaceChildren(timeEl(data.now));
    document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
  }

  function say(text) {
    document.getElementById("refresh-state").textContent = text;
  }

  async function refresh() {
    try {
      const response = await fetch("/api/status", {cache: "no-store",
        credentials: "same-origin"});
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const data = await response.json();
      refreshSeconds = data.refresh || refreshSeconds;
      draw(data);
      say("");
    } catch (err) {
      // The relay may be restarting: say so on the page and keep trying.
      say(`· refresh failed (${err.message}); trying again`);
    } finally {
      setTimeout(refresh, refreshSeconds * 1000);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    localize(document);
    refresh();
  });
})();

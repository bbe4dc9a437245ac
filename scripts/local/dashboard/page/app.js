// The usage dashboard's page: fetches /_dashboard/api/summary and draws it. Plain browser JavaScript (served as is,
// no build step); every value from the summary is inserted as text (textContent), never as HTML.
/* global Chart */
(function () {
  "use strict";

  var refreshMs = Number(document.body.getAttribute("data-refresh-ms")) || 5000;
  var bucket = "hour";
  var charts = {};
  var timer;
  var inFlight = false;
  var PALETTE = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4d7c0f", "#9333ea", "#475569"];

  function $(id) { return document.getElementById(id); }
  function int(n) { return Number(n).toLocaleString("en-US"); }
  function micros(m) { var s = String(Math.abs(m) % 1000000); while (s.length < 6) s = "0" + s; return (m < 0 ? "-" : "") + Math.floor(Math.abs(m) / 1000000) + "." + s; }
  function colour(i, alpha) {
    var hex = PALETTE[i % PALETTE.length];
    var r = parseInt(hex.slice(1, 3), 16), g = parseInt(hex.slice(3, 5), 16), b = parseInt(hex.slice(5, 7), 16);
    return "rgba(" + r + "," + g + "," + b + "," + alpha + ")";
  }
  function cell(tr, text, opts) {
    var td = document.createElement("td");
    td.textContent = text;
    if (opts && opts.num) td.className = "num";
    if (opts && opts.cls) td.className += " " + opts.cls;
    if (opts && opts.field) td.setAttribute("data-field", opts.field);
    tr.appendChild(td);
    return td;
  }
  function costText(byCurrency) {
    var parts = Object.keys(byCurrency).sort().map(function (c) { return byCurrency[c] + " " + c; });
    return parts.length ? parts.join(" + ") : "-";
  }
  function label(iso) {
    // Hourly: "11-28 08:00"; daily: "2026-11-28" (UTC, as the buckets are).
    return bucket === "hour" ? iso.slice(5, 10) + " " + iso.slice(11, 16) : iso.slice(0, 10);
  }

  function drawCharts(summary) {
    var labels = summary.series.buckets.map(label);
    var tokenSets = [];
    var costSets = [];
    summary.series.customers.forEach(function (s, i) {
      tokenSets.push({ label: s.customer + " input", data: s.prompt_tokens, stack: "input", backgroundColor: colour(i, 0.85), borderColor: colour(i, 1), borderWidth: 0 });
      tokenSets.push({ label: s.customer + " output", data: s.completion_tokens, stack: "output", backgroundColor: colour(i, 0.35), borderColor: colour(i, 1), borderWidth: 1 });
      Object.keys(s.cost_micros).sort().forEach(function (currency) {
        costSets.push({
          label: s.customer + " (" + currency + ")",
          data: s.cost_micros[currency].map(function (m) { return m / 1e6; }),
          stack: currency, backgroundColor: colour(i, 0.75), borderColor: colour(i, 1), borderWidth: 0,
        });
      });
    });
    var common = { animation: false, responsive: true, maintainAspectRatio: false, interaction: { mode: "index", intersect: false }, plugins: { legend: { position: "bottom", labels: { boxWidth: 12 } } } };
    var specs = {
      tokens: { canvas: "tokens-chart", type: "bar", datasets: tokenSets, options: Object.assign({}, common, { scales: { x: { stacked: true, ticks: { maxTicksLimit: 12 } }, y: { stacked: true, beginAtZero: true, title: { display: true, text: "tokens" }, ticks: { callback: function (v) { return Number(v).toLocaleString("en-US"); } } } } }) },
      cost: { canvas: "cost-chart", type: "bar", datasets: costSets, options: Object.assign({}, common, { scales: { x: { stacked: true, ticks: { maxTicksLimit: 12 } }, y: { stacked: true, beginAtZero: true, title: { display: true, text: "cost (currency units)" }, ticks: { callback: function (v) { return Number(v).toLocaleString("en-US", { maximumSignificantDigits: 3 }); } } } } }) },
    };
    Object.keys(specs).forEach(function (name) {
      var spec = specs[name];
      var chart = charts[name];
      if (chart && chart.config.type === spec.type) {
        chart.data.labels = labels;
        chart.data.datasets = spec.datasets;
        chart.update("none");
      } else {
        charts[name] = new Chart($(spec.canvas), { type: spec.type, data: { labels: labels, datasets: spec.datasets }, options: spec.options });
      }
    });
  }

  function drawCustomers(summary) {
    var body = $("customers").querySelector("tbody");
    body.textContent = "";
    summary.customers.forEach(function (c) {
      var tr = document.createElement("tr");
      tr.setAttribute("data-customer", c.customer);
      cell(tr, c.customer, { field: "customer" });
      cell(tr, c.plan === null ? "-" : c.plan, { field: "plan" });
      cell(tr, c.billing === null ? "-" : c.billing, { field: "billing" });
      cell(tr, int(c.requests), { num: true, field: "requests" });
      cell(tr, int(c.prompt_tokens), { num: true, field: "prompt_tokens" });
      cell(tr, int(c.completion_tokens), { num: true, field: "completion_tokens" });
      cell(tr, costText(c.cost), { num: true, field: "cost" });
      var q = c.quota;
      var used = q.used === null ? "-" : int(q.used);
      var quotaText = q.limit === null ? used + " (no quota)" : used + " / " + int(q.limit) + " per " + q.period.toLowerCase();
      var share = q.limit && q.used !== null ? q.used / q.limit : 0;
      var quotaCell = cell(tr, quotaText, { num: true, field: "quota", cls: share >= 1 ? "bad" : share >= 0.8 ? "warn" : "" });
      quotaCell.title = "requests since " + q.period_start + " (UTC)";
      var balance = c.balance === null ? "-" : c.balance + " " + (c.currency || "");
      var balanceCell = cell(tr, balance, { num: true, field: "balance", cls: c.balance_micros === 0 ? "bad" : "" });
      if (c.reserved_micros) balanceCell.title = micros(c.reserved_micros) + " reserved by requests in flight";
      body.appendChild(tr);
    });
    if (summary.customers.length === 0) {
      var tr = document.createElement("tr");
      var td = cell(tr, "no customers yet");
      td.colSpan = 9;
      body.appendChild(tr);
    }
  }

  function drawDelivery(summary) {
    var box = $("delivery");
    box.textContent = "";
    [["moesif", "Moesif"], ["stripe", "Stripe"]].forEach(function (pair) {
      var d = summary.delivery[pair[0]];
      var div = document.createElement("div");
      div.className = "sink";
      div.setAttribute("data-sink", pair[0]);
      var h = document.createElement("h3");
      var state = d.failed > 0 ? ["status-bad", "failing"] : d.pending > 0 ? ["status-warn", "catching up"] : ["status-ok", "healthy"];
      h.textContent = pair[1] + " ";
      var span = document.createElement("span");
      span.className = state[0];
      span.textContent = "● " + state[1];
      h.appendChild(span);
      div.appendChild(h);
      var dl = document.createElement("dl");
      var oldest = d.oldest_undelivered;
      [
        ["delivered", int(d.delivered) + " (window)"],
        ["pending", int(d.pending) + (d.backlog_truncated ? "+" : "")],
        ["failed", int(d.failed) + (d.backlog_truncated ? "+" : "")],
        ["not owed", int(d.not_owed)],
        ["oldest undelivered", oldest ? oldest.created_at.replace("T", " ").slice(0, 19) + " (" + oldest.state + ")" : "none"],
      ].concat(oldest && oldest.error ? [["last error", oldest.error.slice(0, 160)]] : []).forEach(function (row) {
        var dt = document.createElement("dt");
        dt.textContent = row[0];
        var dd = document.createElement("dd");
        dd.textContent = row[1];
        dd.setAttribute("data-field", row[0].replace(/ /g, "_"));
        dl.appendChild(dt);
        dl.appendChild(dd);
      });
      div.appendChild(dl);
      box.appendChild(div);
    });
  }

  function drawLatest(summary) {
    var body = $("latest").querySelector("tbody");
    body.textContent = "";
    summary.latest.forEach(function (r) {
      var tr = document.createElement("tr");
      cell(tr, r.time.replace("T", " ").slice(0, 19));
      cell(tr, r.customer === null ? "-" : r.customer);
      cell(tr, r.method + " " + r.route);
      cell(tr, r.model === null ? "-" : r.model);
      cell(tr, String(r.status), { num: true, cls: r.status >= 500 ? "bad" : r.status >= 400 ? "warn" : "" });
      cell(tr, int(r.prompt_tokens), { num: true });
      cell(tr, int(r.completion_tokens), { num: true });
      cell(tr, int(r.latency_ms) + " ms", { num: true });
      cell(tr, r.estimated ? "estimated" : "");
      body.appendChild(tr);
    });
    if (summary.latest.length === 0) {
      var tr = document.createElement("tr");
      cell(tr, "no requests in the window").colSpan = 9;
      body.appendChild(tr);
    }
  }

  function draw(summary) {
    $("source").textContent = summary.source;
    var w = $("window");
    var win = summary.window;
    w.textContent = "Window: the last " + win.days + " day(s), since " + win.since.slice(0, 16).replace("T", " ") + " UTC (hourly chart: the last " + win.hourly_hours + " h) · " +
      int(win.items) + " request(s) read, at most " + int(win.max_items) + " per refresh · " + win.note;
    w.className = summary.window.truncated ? "note partial" : "note";
    drawCharts(summary);
    drawCustomers(summary);
    drawDelivery(summary);
    drawLatest(summary);
    document.body.setAttribute("data-bucket", summary.bucket);
    document.body.setAttribute("data-generated-at", summary.generated_at);
  }

  function refresh() {
    if (inFlight) return;
    inFlight = true;
    var asked = bucket;
    fetch("api/summary?bucket=" + encodeURIComponent(asked), { cache: "no-store" })
      .then(function (response) {
        return response.json().then(function (body) {
          if (!response.ok) throw new Error(body && body.error ? body.error.message : "HTTP " + response.status);
          return body;
        });
      })
      .then(function (summary) {
        if (asked !== bucket) return;
        draw(summary);
        $("error").hidden = true;
        $("refreshed").textContent = "refreshed " + new Date().toLocaleTimeString() + " · every " + refreshMs / 1000 + " s";
      })
      .catch(function (err) {
        var box = $("error");
        box.textContent = "Refresh failed (showing the last data): " + err.message;
        box.hidden = false;
      })
      .then(function () {
        inFlight = false;
        if (asked !== bucket) refresh();
      });
  }

  document.querySelectorAll(".toggle button").forEach(function (button) {
    button.addEventListener("click", function () {
      bucket = button.getAttribute("data-bucket");
      document.querySelectorAll(".toggle button").forEach(function (b) { b.setAttribute("aria-pressed", String(b === button)); });
      refresh();
    });
  });

  refresh();
  timer = setInterval(refresh, refreshMs);
  window.addEventListener("pagehide", function () { clearInterval(timer); });
})();

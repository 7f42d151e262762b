(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("browser-data").textContent);
  var V = D.vocab, L = D.latents, byId = {};
  L.forEach(function (l) { byId[l.id] = l; });
  var SVG = "http://www.w3.org/2000/svg";

  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function visible(s) {  // whitespace made visible
    return s.replace(/\r/g, "\u240d").replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5");
  }
  function tokenText(id) { var s = V[id]; return s === undefined ? "[" + id + "]" : s; }
  function listText(id) {  // token in a list: spaces at the ends shown as a visible mark
    var s = visible(tokenText(id));
    return s.replace(/^ +| +$/g, function (m) { return "\u2423".repeat(m.length); }) || "\u2205";
  }
  function num(x) {
    if (x === 0) return "0";
    var a = Math.abs(x);
    if (a >= 1e4 || a < 1e-3) return x.toExponential(2);
    return x.toPrecision(a >= 100 ? 4 : 3);
  }
  function pct(d) {
    if (d === 0) return "0";
    return d >= 0.01 ? (100 * d).toFixed(2) + "%" : (100 * d).toPrecision(2) + "%";
  }
  function svgEl(tag, attrs) {
    var e = document.createElementNS(SVG, tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }
  function bars(counts, lo, hi, label, marker, color) {
    var w = 300, h = 90, pad = 16, n = counts.length;
    var s = svgEl("svg", {width: w, height: h + pad + 14, role: "img", "aria-label": label});
    var max = Math.max.apply(null, counts.concat([1]));
    var bw = (w - 2) / Math.max(n, 1);
    counts.forEach(function (c, i) {
      var bh = c ? Math.max(1, (h * c) / max) : 0;
      var r = svgEl("rect", {x: 1 + i * bw, y: h - bh, width: Math.max(bw - 1, 1), height: bh,
                             fill: color});
      var t = svgEl("title", {});
      t.textContent = c + "";
      r.appendChild(t);
      s.appendChild(r);
    });
    s.appendChild(svgEl("line", {x1: 0, x2: w, y1: h + 0.5, y2: h + 0.5, stroke: "#999"}));
    if (marker !== null && marker !== undefined && n) {
      var x = 1 + Math.min(Math.max(marker, 0), 1) * (w - 2);
      s.appendChild(svgEl("line", {x1: x, x2: x, y1: 0, y2: h, stroke: "#c62828",
                                   "stroke-width": 2}));
    }
    [[lo, "start"], [hi, "end"]].forEach(function (p, i) {
      var t = svgEl("text", {x: i ? w : 0, y: h + 12, "text-anchor": p[1], class: "axis"});
      t.textContent = p[0];
      s.appendChild(t);
    });
    var t = svgEl("text", {x: w / 2, y: h + pad + 10, "text-anchor": "middle", class: "axis"});
    t.textContent = label;
    s.appendChild(t);
    return s;
  }

  // ------------------------------------------------------------------ index
  var sortKey = null, sortDir = 1, cur = null;
  var tbody = document.querySelector("#index tbody");
  var filter = document.getElementById("filter");
  function drawIndex() {
    var rows = L.slice();
    if (sortKey) rows.sort(function (a, b) { return sortDir * (a[sortKey] - b[sortKey]); });
    var q = filter.value.trim();
    tbody.textContent = "";
    rows.forEach(function (l) {
      if (q && String(l.id).indexOf(q) < 0) return;
      var tr = el("tr", "row" + (l.id === cur ? " cur" : ""));
      tr.dataset.latent = l.id;
      tr.appendChild(el("td", null, l.id));
      tr.appendChild(el("td", null, pct(l.density)));
      tr.appendChild(el("td", null, num(l.max)));
      tr.addEventListener("click", function () { location.hash = "latent-" + l.id; });
      tbody.appendChild(tr);
    });
  }
  document.querySelectorAll("#index th").forEach(function (th) {
    th.addEventListener("click", function () {
      var k = th.dataset.key;
      sortDir = sortKey === k ? -sortDir : (k === "id" ? 1 : -1);
      sortKey = k;
      drawIndex();
    });
  });
  filter.addEventListener("input", drawIndex);

  // ------------------------------------------------------------------ one latent
  function contextRow(l, c) {
    var row = el("div", "ctx");
    row.dataset.ctx = c.c + ":" + c.p;
    row.dataset.act = c.act;
    row.appendChild(el("span", "v", num(c.act)));
    var toks = el("span", "toks");
    if (c.start > 0) toks.appendChild(el("span", "ell", "\u2026"));
    c.t.forEach(function (id, i) {
      var a = c.a[i], pos = c.start + i;
      var s = el("span", "tok" + (pos === c.p ? " peak" : ""), visible(tokenText(id)));
      var alpha = l.max > 0 ? Math.min(1, Math.max(0, a / l.max)) : 0;
      if (alpha > 0) s.style.background = "rgba(var(--hl)," + alpha.toFixed(3) + ")";
      s.title = JSON.stringify(tokenText(id)) + "  activation " + num(a) +
        "  (position " + pos + ")";
      s.dataset.act = a;
      toks.appendChild(s);
    });
    row.appendChild(toks);
    return row;
  }
  function logitTable(list, cls, head) {
    var box = el("div", cls);
    box.appendChild(el("h3", null, head));
    var t = el("table");
    list.forEach(function (p) {
      var tr = el("tr");
      var td = el("td");
      td.appendChild(el("span", "tt", listText(p[0])));
      tr.appendChild(td);
      tr.appendChild(el("td", "v", (p[1] > 0 ? "+" : "") + num(p[1])));
      t.appendChild(tr);
    });
    box.appendChild(t);
    return box;
  }
  function show(id) {
    var l = byId[id];
    if (!l) { l = L[0]; if (!l) return; }
    cur = l.id;
    var m = document.getElementById("detail");
    m.textContent = "";
    m.dataset.latent = l.id;
    m.appendChild(el("h2", null, "Latent " + l.id));
    var st = el("div", "stats");
    [["density ", pct(l.density) + (l.density > 0 ? " (1 in " + num(1 / l.density) + ")" : "")],
     ["  \u00b7  fires on ", l.count.toLocaleString() + " positions"],
     ["  \u00b7  max ", num(l.max)], ["  \u00b7  mean when active ", num(l.mean)]]
      .forEach(function (p) { st.append(p[0]); st.appendChild(el("b", null, p[1])); });
    m.appendChild(st);
    (l.notes || []).forEach(function (t) {  // eval results: first-letter roles
      m.appendChild(el("div", "stats note", t));
    });
    if (l.place_norms) {  // a crosscoder: where the latent writes
      var pn = el("div", "stats");
      pn.append("decoder norm per place ");
      l.place_norms.forEach(function (v, i) {
        pn.append(i ? "  \u00b7  " + D.meta.places[i] + " " : D.meta.places[i] + " ");
        pn.appendChild(el("b", null, num(v)));
      });
      m.appendChild(pn);
    }

    var charts = el("div", "charts");
    var h = l.hist, hc = el("div");
    hc.appendChild(el("h3", null, "Activation histogram"));
    if (h.counts.length) {
      var top = h.lo + h.step * h.counts.length;
      hc.appendChild(bars(h.counts, num(Math.pow(10, h.lo)), num(Math.pow(10, top)),
                          "activation (log scale)", null, "rgb(255,110,20)"));
    } else hc.appendChild(el("div", "empty", "never fires"));
    charts.appendChild(hc);
    var dh = D.density_hist, dc = el("div");
    dc.appendChild(el("h3", null, "Density among all latents"));
    var e0 = dh.edges[0], e1 = dh.edges[dh.edges.length - 1];
    var mk = l.density > 0 ? (Math.log10(l.density) - e0) / (e1 - e0) : null;
    dc.appendChild(bars(dh.counts, "1e" + e0, "1", "log10 density (this latent in red)", mk,
                        "#8a8fa3"));
    charts.appendChild(dc);
    m.appendChild(charts);

    if (l.logits) {
      var lg = el("div", "logits");
      lg.appendChild(logitTable(l.logits.pos, "pos", "Promoted tokens"));
      lg.appendChild(logitTable(l.logits.neg, "neg", "Suppressed tokens"));
      m.appendChild(lg);
    }
    m.appendChild(el("h3", null, "Top contexts"));
    var box = el("div", "contexts");
    if (!l.contexts.length) box.appendChild(el("div", "empty", "no activating positions"));
    l.contexts.forEach(function (c) { box.appendChild(contextRow(l, c)); });
    m.appendChild(box);
    drawIndex();
    var r = tbody.querySelector("tr.cur");
    if (r && document.readyState === "complete") r.scrollIntoView({block: "nearest"});
  }
  function fromHash() {
    var m = /^#latent-(\d+)$/.exec(location.hash);
    show(m ? Number(m[1]) : (L.length ? L[0].id : null));
  }
  window.addEventListener("hashchange", fromHash);
  document.addEventListener("keydown", function (ev) {
    if (ev.target === filter || !L.length) return;
    var rows = Array.prototype.slice.call(tbody.querySelectorAll("tr.row"));
    var i = rows.findIndex(function (r) { return Number(r.dataset.latent) === cur; });
    var step = {j: 1, ArrowDown: 1, k: -1, ArrowUp: -1}[ev.key];
    if (!step || !rows.length) return;
    var nx = rows[Math.min(rows.length - 1, Math.max(0, i + step))];
    location.hash = "latent-" + nx.dataset.latent;
    ev.preventDefault();
  });
  document.getElementById("count").textContent = L.length + " latents";
  fromHash();
})();

/* WeightWatcher local report: draws the JSON block #ww-data, or the data that report-data.js and
   report-latest.js handed to window.ww_report. Vanilla JS, no network. */
(function () {
  "use strict";
  var errors = [];
  window.addEventListener("error", function (e) { errors.push(String(e.message)); });

  // the live report: one chunk per analysis (alphas of the layers it measured), assembled here
  function fromChunks(W) {
    var layers = [], types = [], byStep = {}, order = [];
    W.chunks.forEach(function (c) {
      (c.n || []).forEach(function (nt) { layers.push(nt[0]); types.push(nt[1]); });
      if (!(c.s in byStep)) order.push(c.s);
      byStep[c.s] = c;
    });
    order.sort(function (a, b) { return a - b; });
    var n = order.length, keep = W.max_steps, idx = [], seen = {};
    for (var k = 0; k < (n <= keep ? n : keep); k++) {
      var v = n <= keep ? k : Math.round(k * (n - 1) / (keep - 1));
      if (!seen[v]) { seen[v] = 1; idx.push(v); }
    }
    var shown = idx.map(function (q) { return order[q]; }), unjudged = [], mean = [];
    // undefined: the layer was not analysed at that step (layer rotation); null: no fit
    var alpha = layers.map(function () { return shown.map(function () { return undefined; }); });
    shown.forEach(function (s, j) {
      var c = byStep[s], sum = 0, cnt = 0;
      c.a.forEach(function (a, q) {
        var i = c.i ? c.i[q] : q;
        alpha[i][j] = a;
        if (a !== null) { sum += a; cnt++; }
      });
      (c.u || []).forEach(function (i) { unjudged.push([i, j]); });
      mean.push(cnt ? +(sum / cnt).toPrecision(4) : null);
    });
    var L = W.latest || {latest: [], esd: [], latest_step: null, latest_epoch: null, esd_note: ""};
    var perStep = {}, stepsOf = [];
    W.decisions.forEach(function (d) {
      if (!(d[0] in perStep)) { perStep[d[0]] = {}; stepsOf.push(d[0]); }
      perStep[d[0]][d[2]] = (perStep[d[0]][d[2]] || 0) + 1;
    });
    stepsOf.sort(function (a, b) { return a - b; });
    return {title: W.title, updated: L.updated || "", band: W.band, layers: layers, types: types,
      num_analyses: n, steps: shown, alpha: alpha, mean: mean, unjudged: unjudged,
      unjudged_flags: W.unjudged_flags, latest_step: L.latest_step, latest_epoch: L.latest_epoch,
      columns: W.columns, latest: L.latest, summary_columns: W.summary_columns,
      summary: order.map(function (s) { return byStep[s].m; }), decision_columns: W.decision_columns,
      decisions: W.max_decisions > 0 ? W.decisions.slice(-W.max_decisions) : [],
      num_decisions: W.decisions.length,
      decision_steps: stepsOf.map(function (s) {
        var kinds = perStep[s], total = 0, text = [];
        for (var a in kinds) { total += kinds[a]; text.push(a + " x" + kinds[a]); }
        return [s, total, text.join(", ")];
      }),
      esd: L.esd || [], esd_step: L.esd_step === undefined ? null : L.esd_step, esd_note: L.esd_note || ""};
  }
  var block = document.getElementById("ww-data");
  var D = block ? JSON.parse(block.textContent) : fromChunks(window.ww_report);
  var NS = "http://www.w3.org/2000/svg", LO = D.band[0], HI = D.band[1];
  var nL = D.layers.length, nS = D.steps.length, sticky = -1, hoverI = -1, matches = null;
  var paths = [];

  function $(id) { return document.getElementById(id); }
  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c];
    });
  }
  function svg(tag, attrs, parent, text) {
    var e = document.createElementNS(NS, tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }
  var INT = {"#": 1, N: 1, M: 1, num_evals: 1, step: 1, epoch: 1, num_layers: 1, num_flagged: 1,
    num_under_trained: 1, num_over_trained: 1};
  function fmt(v, col) {
    if (v === null || v === undefined || v === "") return "";
    if (typeof v !== "number") return String(v);
    if (Number.isInteger(v) && (col === undefined || INT[col])) return String(v);
    var a = Math.abs(v);
    return a >= 1e4 || a < 1e-2 ? v.toPrecision(3) : v.toFixed(3);
  }
  function tip(evt, text) {
    var t = $("tip");
    t.textContent = text; t.style.display = "block";
    var x = evt.pageX + 14, w = t.offsetWidth;
    if (x + w > window.scrollX + document.documentElement.clientWidth) x = evt.pageX - w - 14;
    t.style.left = x + "px"; t.style.top = (evt.pageY + 14) + "px";
  }
  function untip() { $("tip").style.display = "none"; }
  function ticks(lo, hi, n) {
    var span = hi - lo || 1, step = Math.pow(10, Math.floor(Math.log10(span / n)));
    [1, 2, 5, 10].some(function (m) { if (span / (step * m) <= n) { step *= m; return true; } return false; });
    var out = [];
    for (var v = Math.ceil(lo / step) * step; v <= hi + 1e-9; v += step) out.push(+v.toPrecision(12));
    return out;
  }

  // colour: red below the band, greens inside it, blues above; grey for no fit
  var SCALE = [[0.5, [103, 0, 13]], [1, [165, 15, 21]], [1.5, [222, 45, 38]], [LO, [252, 174, 145]],
               [LO, [199, 233, 192]], [(LO + HI) / 2, [116, 196, 118]], [HI, [199, 233, 192]],
               [HI, [198, 219, 239]], [8, [107, 174, 214]], [12, [33, 113, 181]], [20, [8, 48, 107]]];
  // a fit on too few eigenvalues (flag too-few-evals only) is not judged: purple, not red
  var UNJUDGED = "#b9a3d6", few = {};
  (D.unjudged || []).forEach(function (c) { few[c[0] + "," + c[1]] = true; });
  function judged(flags) {
    return String(flags || "").split(",").some(function (f) { return f && (D.unjudged_flags || []).indexOf(f) < 0; });
  }
  function colour(a) {
    if (a === undefined) return "#ececec";
    if (a === null) return "#c8c8c8";
    if (a <= SCALE[0][0]) return "rgb(" + SCALE[0][1] + ")";
    for (var k = 1; k < SCALE.length; k++) {
      var p = SCALE[k - 1], q = SCALE[k];
      if (a <= q[0] && q[0] > p[0]) {
        var t = (a - p[0]) / (q[0] - p[0]);
        return "rgb(" + [0, 1, 2].map(function (c) { return Math.round(p[1][c] + t * (q[1][c] - p[1][c])); }) + ")";
      }
    }
    return "rgb(" + SCALE[SCALE.length - 1][1] + ")";
  }
  var ACTION_COLOURS = {"freeze": "#1f77b4", "unfreeze": "#17becf", "lr-factor": "#ff7f0e", "early-stop": "#d62728"};
  function actionColour(a) { return ACTION_COLOURS[String(a).split(" ")[0]] || "#9467bd"; }
  var decByStep = {};
  D.decisions.forEach(function (d) { (decByStep[d[0]] = decByStep[d[0]] || []).push(d); });
  function decText(d) {
    return d[2] + (d[1] ? " " + d[1] : "") + (d[5] !== "" && d[5] !== null ? " x" + fmt(d[5]) : "") +
      (d[3] ? " (" + d[3] + ")" : "");
  }

  function cards() {
    var last = D.summary.length ? D.summary[D.summary.length - 1] : null, c = D.summary_columns;
    if (!last) return;
    var get = function (k) { return last[c.indexOf(k)]; };
    $("cards").innerHTML = [["step", get("step")], ["layers", get("num_layers")], ["mean alpha", fmt(get("alpha_mean"))],
      ["flagged", get("num_flagged"), get("num_flagged") > 0], ["under-trained (>6)", get("num_under_trained")],
      ["over-trained (<2)", get("num_over_trained")], ["decisions", D.num_decisions]].map(function (x) {
      return "<div class='card" + (x[2] ? " bad" : "") + "'><b>" + esc(x[1] === null ? "" : x[1]) + "</b><span>" + esc(x[0]) + "</span></div>";
    }).join("");
  }

  // ---------------------------------------------------------------- heatmap (canvas)
  function heatmap() {
    var cv = $("heatmap"), ctx = cv.getContext("2d"), dpr = window.devicePixelRatio || 1;
    var font = "11px system-ui,sans-serif";
    ctx.font = font;
    var labelW = Math.min(340, 12 + Math.max.apply(null, [40].concat(D.layers.map(function (n) { return ctx.measureText(n).width; }))));
    var rowH = Math.max(2, Math.min(14, Math.floor(1400 / Math.max(nL, 1))));
    var W = Math.max(500, $("heat-wrap").clientWidth - 4), plotW = W - labelW - 10;
    var colW = plotW / Math.max(nS, 1), H = rowH * nL + 34;
    cv.width = W * dpr; cv.height = H * dpr; cv.style.width = W + "px"; cv.style.height = H + "px";
    ctx.scale(dpr, dpr); ctx.font = font; ctx.textBaseline = "middle";
    for (var i = 0; i < nL; i++) {
      for (var j = 0; j < nS; j++) {
        ctx.fillStyle = few[i + "," + j] ? UNJUDGED : colour(D.alpha[i][j]);
        ctx.fillRect(labelW + j * colW, i * rowH, Math.ceil(colW), rowH);
      }
    }
    var every = Math.ceil(10 / rowH);
    ctx.fillStyle = "#222"; ctx.textAlign = "right";
    for (i = 0; i < nL; i += every) {
      var name = D.layers[i];
      while (name.length > 4 && ctx.measureText(name).width > labelW - 8) name = name.slice(1);
      if (name !== D.layers[i]) name = "\u2026" + name.slice(1);
      ctx.fillText(name, labelW - 4, i * rowH + rowH / 2);
    }
    var col = {};
    D.steps.forEach(function (s, j) { col[s] = j; });
    D.decisions.forEach(function (d) {
      var r = D.layers.indexOf(d[1]), j = col[d[0]];
      if (j === undefined || String(d[2]).indexOf("lr-factor") === 0) return;  // factors: chart markers only
      ctx.fillStyle = actionColour(d[2]);
      if (r < 0) { ctx.fillRect(labelW + j * colW + colW / 2 - 1, 0, 2, rowH * nL); return; }
      ctx.beginPath(); ctx.arc(labelW + (j + 0.5) * colW, (r + 0.5) * rowH, Math.max(1.5, Math.min(rowH, colW) / 3), 0, 7);
      ctx.fill();
    });
    ctx.fillStyle = "#444"; ctx.textAlign = "center"; ctx.textBaseline = "top";
    var colOf = function (v) {  // the column nearest to step v
      var best = 0;
      D.steps.forEach(function (s, j) { if (Math.abs(s - v) < Math.abs(D.steps[best] - v)) best = j; });
      return best;
    };
    ticks(D.steps[0], D.steps[nS - 1], Math.max(2, Math.floor(plotW / 70))).forEach(function (v) {
      var j = colOf(v), x = labelW + (j + 0.5) * colW;
      ctx.fillRect(x, rowH * nL, 1, 4); ctx.fillText(String(D.steps[j]), x, rowH * nL + 6);
    });
    ctx.fillText("global step", labelW + plotW / 2, rowH * nL + 20);
    function at(evt) {
      var b = cv.getBoundingClientRect(), x = evt.clientX - b.left, y = evt.clientY - b.top;
      var r = Math.floor(y / rowH), c = Math.floor((x - labelW) / colW);
      return {r: r, c: x < labelW ? -1 : c, ok: r >= 0 && r < nL && (x < labelW || (c >= 0 && c < nS))};
    }
    cv.onmousemove = function (evt) {
      var p = at(evt);
      if (!p.ok) { untip(); return; }
      var text = D.layers[p.r] + (D.types[p.r] ? " (" + D.types[p.r] + ")" : "");
      if (p.c >= 0) {
        text += "\nstep " + D.steps[p.c] + "   alpha " + (D.alpha[p.r][p.c] === undefined ? "not analysed" :
          D.alpha[p.r][p.c] === null ? "n/a" : fmt(D.alpha[p.r][p.c]));
        if (few[p.r + "," + p.c]) text += "  (too few eigenvalues to judge)";
        (decByStep[D.steps[p.c]] || []).forEach(function (d) { if (d[1] === D.layers[p.r] || !d[1]) text += "\n" + decText(d); });
      }
      tip(evt, text);
    };
    cv.onmouseleave = untip;
    cv.onclick = function (evt) { var p = at(evt); if (p.ok) select(p.r, true); };
    $("heat-note").textContent = nS < D.num_analyses ? "Showing " + nS + " of " + D.num_analyses + " analyses (evenly thinned; the tables are complete)." : "";
    legend();
  }

  function legend() {
    var s = svg("svg", {width: 560, height: 38}), x0 = 10, w = 420, amax = 14;
    var X = function (a) { return x0 + w * Math.log(a / 0.5) / Math.log(amax / 0.5); };
    for (var k = 0; k < w; k += 2) {
      var a = 0.5 * Math.pow(amax / 0.5, k / w);
      svg("rect", {x: x0 + k, y: 2, width: 2.5, height: 14, fill: colour(a)}, s);
    }
    [1, LO, 4, HI, 8, 12].forEach(function (a) {
      svg("line", {x1: X(a), x2: X(a), y1: 16, y2: 20, stroke: "#444"}, s);
      svg("text", {x: X(a), y: 31, "text-anchor": "middle", "font-size": 11}, s, a);
    });
    svg("rect", {x: x0 + w + 14, y: 2, width: 14, height: 14, fill: colour(null)}, s);
    svg("text", {x: x0 + w + 32, y: 13, "font-size": 11}, s, "no fit");
    svg("rect", {x: x0 + w + 14, y: 20, width: 14, height: 14, fill: UNJUDGED}, s);
    svg("text", {x: x0 + w + 32, y: 31, "font-size": 11}, s, "too few evals");
    $("heat-legend").innerHTML = ""; $("heat-legend").appendChild(s);
  }

  // ---------------------------------------------------------------- alpha chart (SVG)
  var chartGeom = null;
  function chart() {
    var s = $("chart"); s.innerHTML = ""; paths = [];
    var W = Math.max(500, s.clientWidth || s.parentNode.clientWidth), H = 440;
    var m = {l: 48, r: 16, t: 12, b: 62}, pw = W - m.l - m.r, ph = H - m.t - m.b;
    s.setAttribute("viewBox", "0 0 " + W + " " + H);
    var all = [];
    D.alpha.forEach(function (row) { row.forEach(function (a) { if (a !== null && a !== undefined) all.push(a); }); });
    all.sort(function (a, b) { return a - b; });
    var p99 = all.length ? all[Math.floor(0.99 * (all.length - 1))] : 8;
    var top = Math.max(8, Math.min(20, p99 * 1.05)), s0 = D.steps[0], s1 = D.steps[nS - 1];
    if (s1 === s0) { s0 -= 1; s1 += 1; }
    var X = function (v) { return m.l + pw * (v - s0) / (s1 - s0); };
    var Y = function (a) { return m.t + ph * (1 - Math.min(a, top) / top); };
    chartGeom = {X: X, Y: Y, top: top, m: m, ph: ph, pw: pw};
    svg("rect", {x: m.l, y: Y(HI), width: pw, height: Y(LO) - Y(HI), fill: "#2ca02c", "fill-opacity": 0.07}, s);
    svg("rect", {x: m.l, y: Y(LO), width: pw, height: Y(0) - Y(LO), fill: "#d62728", "fill-opacity": 0.05}, s);
    ticks(0, top, 8).forEach(function (v) {
      svg("line", {x1: m.l, x2: m.l + pw, y1: Y(v), y2: Y(v), stroke: v === LO || v === HI ? "#888" : "#eee",
        "stroke-dasharray": v === LO || v === HI ? "5 3" : ""}, s);
      svg("text", {x: m.l - 6, y: Y(v) + 4, "text-anchor": "end"}, s, v);
    });
    ticks(s0, s1, 10).forEach(function (v) {
      svg("line", {x1: X(v), x2: X(v), y1: m.t + ph, y2: m.t + ph + 4, stroke: "#666"}, s);
      svg("text", {x: X(v), y: m.t + ph + 16, "text-anchor": "middle"}, s, v);
    });
    svg("text", {x: m.l + pw / 2, y: H - 4, "text-anchor": "middle"}, s, "global step");
    svg("text", {x: 12, y: m.t + ph / 2, transform: "rotate(-90 12 " + (m.t + ph / 2) + ")", "text-anchor": "middle"}, s, "alpha");
    svg("rect", {x: m.l, y: m.t, width: pw, height: ph, fill: "none", stroke: "#bbb"}, s);
    var g = svg("g", {id: "series"}, s);
    function line(vals) {
      var d = "", pen = false;
      vals.forEach(function (a, j) {
        if (a === undefined) return;           // not analysed then: the line goes on to the next value
        if (a === null) { pen = false; return; }
        d += (pen ? "L" : "M") + X(D.steps[j]).toFixed(1) + " " + Y(a).toFixed(1);
        pen = true;
      });
      return d || "M0 0";
    }
    D.alpha.forEach(function (vals, i) {
      var hue = Math.round(360 * i / Math.max(nL, 1) * 7) % 360;
      paths.push(svg("path", {"class": "s", d: line(vals), stroke: "hsl(" + hue + ",55%,45%)", "data-i": i}, g));
    });
    svg("path", {"class": "mean", d: line(D.mean)}, s);
    var guide = svg("line", {y1: m.t, y2: m.t + ph, stroke: "#999", "stroke-dasharray": "2 2", visibility: "hidden"}, s);
    var dec = svg("g", {id: "decision-markers"}, s), y0 = m.t + ph + 24;
    D.decision_steps.forEach(function (ds) {
      var step = ds[0], x = X(step), first = ds[2].split(" x")[0], det = decByStep[step] || [];
      svg("line", {x1: x, x2: x, y1: m.t, y2: m.t + ph, stroke: actionColour(first), "stroke-opacity": 0.35, "stroke-dasharray": "3 3"}, dec);
      var t = svg("path", {d: "M" + x + " " + y0 + "l-6 10h12z", fill: actionColour(first), "class": "marker"}, dec);
      var lines = det.slice(0, 12).map(decText);
      if (ds[1] > lines.length) lines.push("+" + (ds[1] - lines.length) + " more");
      svg("title", {}, t, "step " + step + ": " + ds[2] + "\n" + lines.join("\n"));
    });
    var hit = svg("rect", {x: m.l, y: m.t, width: pw, height: ph, fill: "transparent"}, s);
    function nearest(evt) {
      var b = s.getBoundingClientRect(), sc = W / b.width;
      var px = (evt.clientX - b.left) * sc, py = (evt.clientY - b.top) * sc, j = 0, best = Infinity;
      D.steps.forEach(function (st, k) { var dx = Math.abs(X(st) - px); if (dx < best) { best = dx; j = k; } });
      var bi = -1, bd = 24;
      for (var i = 0; i < nL; i++) {
        var a = D.alpha[i][j];
        if (a === null || a === undefined || (matches && !matches[i])) continue;
        var dy = Math.abs(Y(a) - py);
        if (dy < bd) { bd = dy; bi = i; }
      }
      return {i: bi, j: j};
    }
    hit.addEventListener("mousemove", function (evt) {
      var p = nearest(evt);
      guide.setAttribute("x1", X(D.steps[p.j])); guide.setAttribute("x2", X(D.steps[p.j]));
      guide.setAttribute("visibility", "visible");
      hover(p.i);
      var text = "step " + D.steps[p.j] + "   mean alpha " + fmt(D.mean[p.j]);
      if (p.i >= 0) text = D.layers[p.i] + "\nalpha " + fmt(D.alpha[p.i][p.j]) + "\n" + text;
      tip(evt, text);
    });
    hit.addEventListener("mouseleave", function () { hover(-1); untip(); guide.setAttribute("visibility", "hidden"); });
    hit.addEventListener("click", function (evt) { var p = nearest(evt); select(p.i, false); });
    $("chart-legend").textContent = nL + " layers, " + nS + " analyses; alpha above " + top.toFixed(1) +
      " drawn at the top. " + (D.num_decisions ? "Markers: blue freeze, teal unfreeze, orange LR factor, red early stop." : "");
    restyle();
  }
  function restyle() {
    paths.forEach(function (p, i) {
      p.classList.toggle("hl", i === hoverI || i === sticky);
      p.classList.toggle("dim", !!matches && !matches[i]);
    });
    [sticky, hoverI].forEach(function (i) { if (i >= 0 && paths[i]) paths[i].parentNode.appendChild(paths[i]); });
  }
  function hover(i) { if (i !== hoverI) { hoverI = i; restyle(); } }
  function select(i, scroll) {
    sticky = sticky === i ? -1 : i; restyle(); table();
    if (scroll && sticky >= 0) $("s-chart").scrollIntoView({behavior: "smooth"});
  }

  // ---------------------------------------------------------------- latest table
  var sortCol = 0, sortDir = 1, TEXT = {name: 1, type: 1, warning: 1, flags: 1};
  function table() {
    var cols = D.columns, q = $("filter").value.trim().toLowerCase(), only = $("only-flagged").checked;
    var fi = cols.indexOf("flags"), ni = cols.indexOf("name");
    matches = q || only ? D.layers.map(function () { return false; }) : null;
    var rows = D.latest.filter(function (r) {
      var ok = (!q || String(r[ni]).toLowerCase().indexOf(q) >= 0) && (!only || r[fi]);
      if (ok && matches) matches[r[0]] = true;
      return ok;
    });
    rows.sort(function (a, b) {
      var x = a[sortCol], y = b[sortCol], ex = x === null || x === "", ey = y === null || y === "";
      if (ex || ey) return ex === ey ? a[0] - b[0] : (ex ? 1 : -1);
      return (x < y ? -1 : x > y ? 1 : a[0] - b[0]) * sortDir;
    });
    $("layers").tHead.innerHTML = "<tr>" + cols.map(function (c, k) {
      var arrow = k === sortCol ? (sortDir > 0 ? " \u25b2" : " \u25bc") : "";
      return "<th data-k='" + k + "' class='" + (TEXT[c] ? "l" : "") + "'>" + (c === "d_alpha" ? "\u0394 alpha" : esc(c)) + arrow + "</th>";
    }).join("") + "</tr>";
    $("layers").tBodies[0].innerHTML = rows.map(function (r) {
      return "<tr data-i='" + r[0] + "' class='" + (judged(r[fi]) ? "flag" : r[fi] ? "few" : "") + (r[0] === sticky ? " sel" : "") + "'>" + r.map(function (v, k) {
        var c = cols[k], text = c === "d_alpha" && typeof v === "number" ? (v > 0 ? "+" : "") + v.toFixed(3) : fmt(v, c);
        return "<td class='" + (TEXT[c] ? "l" : "") + (c === "flags" ? " flags" : "") + "'>" + esc(text) + "</td>";
      }).join("") + "</tr>";
    }).join("");
    $("count").textContent = "showing " + rows.length + " of " + D.latest.length + " layers";
    restyle();
  }
  function wireTable() {
    $("filter").addEventListener("input", table);
    $("only-flagged").addEventListener("change", table);
    $("layers").tHead.addEventListener("click", function (evt) {
      var th = evt.target.closest("th"); if (!th) return;
      var k = +th.getAttribute("data-k");
      if (k === sortCol) sortDir = -sortDir; else { sortCol = k; sortDir = 1; }
      table();
    });
    $("layers").tBodies[0].addEventListener("click", function (evt) {
      var tr = evt.target.closest("tr"); if (tr) select(+tr.getAttribute("data-i"), false);
    });
  }

  // ---------------------------------------------------------------- ESDs, decisions, summary
  function esd() {
    var box = $("esd");
    $("esd-note").textContent = D.esd.length ? "Step " + D.esd_step + ": the " + D.esd.length +
      " worst flagged layers (failed fits first, then farthest outside " + LO + "\u2013" + HI + ")." : D.esd_note;
    D.esd.forEach(function (e) {
      var W = 360, H = 240, m = {l: 44, r: 10, t: 30, b: 34}, pw = W - m.l - m.r, ph = H - m.t - m.b;
      var s = svg("svg", {width: W, height: H, "class": "esd", "data-layer": e.name}, box);
      var dens = e.density.filter(function (d) { return d > 0; });
      if (!dens.length) return;
      var x0 = Math.log10(e.edges[0]), x1 = Math.log10(e.edges[e.edges.length - 1]);
      var y0 = Math.log10(Math.min.apply(null, dens)) - 0.3, y1 = Math.log10(Math.max.apply(null, dens)) + 0.3;
      if (x1 <= x0) x1 = x0 + 1;
      var X = function (v) { return m.l + pw * (Math.log10(v) - x0) / (x1 - x0); };
      var Y = function (v) { return m.t + ph * (1 - (Math.log10(v) - y0) / (y1 - y0)); };
      var cid = "esdclip" + box.childNodes.length;
      svg("rect", {x: m.l, y: m.t, width: pw, height: ph}, svg("clipPath", {id: cid}, s));
      var g = svg("g", {"clip-path": "url(#" + cid + ")"}, s);
      for (var k = 0; k < e.density.length; k++) {
        if (!(e.density[k] > 0)) continue;
        svg("rect", {x: X(e.edges[k]), y: Y(e.density[k]), width: Math.max(0.5, X(e.edges[k + 1]) - X(e.edges[k])),
          height: m.t + ph - Y(e.density[k]), fill: "#1f77b4", "fill-opacity": 0.6}, g);
      }
      if (e.alpha !== null && e.xmin && e.tail && e.alpha > 1) {
        var xa = e.xmin, xb = e.xmax && e.xmax > xa ? e.xmax : e.edges[e.edges.length - 1];
        var f = function (x) { return e.tail * (e.alpha - 1) / e.xmin * Math.pow(x / e.xmin, -e.alpha); };
        svg("line", {x1: X(xa), y1: Y(f(xa)), x2: X(xb), y2: Y(f(xb)), stroke: "#000", "stroke-width": 2, "class": "fit"}, g);
      }
      if (e.xmin) {
        var xl = X(e.xmin), right = xl > m.l + pw * 0.6;
        svg("line", {x1: xl, x2: xl, y1: m.t, y2: m.t + ph, stroke: "#d62728", "stroke-dasharray": "4 3", "class": "xmin"}, s);
        svg("text", {x: right ? xl - 3 : xl + 3, y: m.t + 11, fill: "#d62728", "text-anchor": right ? "end" : "start"}, s, "xmin " + fmt(e.xmin));
      }
      svg("rect", {x: m.l, y: m.t, width: pw, height: ph, fill: "none", stroke: "#bbb"}, s);
      for (var p = Math.ceil(x0); p <= Math.floor(x1); p++) svg("text", {x: X(Math.pow(10, p)), y: H - 20, "text-anchor": "middle"}, s, "1e" + p);
      for (p = Math.ceil(y0); p <= Math.floor(y1); p++) svg("text", {x: m.l - 4, y: Y(Math.pow(10, p)) + 3, "text-anchor": "end"}, s, "1e" + p);
      svg("text", {x: m.l + pw / 2, y: H - 5, "text-anchor": "middle"}, s, "eigenvalue \u03bb (log-log; black: fitted tail)");
      var name = e.name.length > 52 ? "\u2026" + e.name.slice(-51) : e.name;
      svg("text", {x: 6, y: 12, "font-weight": 600}, s, name);
      svg("text", {x: 6, y: 25}, s, "alpha " + fmt(e.alpha) + "  D " + fmt(e.D) + "  n " + e.n + "  [" + e.flags + "]");
    });
  }
  function simpleTable(id, cols, rows, textCols) {
    $(id).tHead.innerHTML = "<tr>" + cols.map(function (c) { return "<th class='" + (textCols[c] ? "l" : "") + "'>" + esc(c) + "</th>"; }).join("") + "</tr>";
    $(id).tBodies[0].innerHTML = rows.map(function (r) {
      return "<tr>" + r.map(function (v, k) { return "<td class='" + (textCols[cols[k]] ? "l" : "") + "'>" + esc(fmt(v, cols[k])) + "</td>"; }).join("") + "</tr>";
    }).join("");
  }
  function decisions() {
    simpleTable("decisions", D.decision_columns, D.decisions.slice().reverse(), {layer: 1, action: 1, reason: 1});
    $("dec-note").textContent = D.num_decisions ? D.num_decisions + " decisions" + (D.num_decisions > D.decisions.length ?
      ", the newest " + D.decisions.length + " shown" : "") + ", newest first." :
      "No decisions (no freeze, TempBalance or early-stop action reported one).";
  }
  function summary() {
    var ti = D.summary_columns.indexOf("time");
    var rows = D.summary.slice().reverse().map(function (r) {
      r = r.slice();
      if (r[ti] !== null) r[ti] = new Date(r[ti] * 1000).toLocaleTimeString();
      return r;
    });
    simpleTable("summary", D.summary_columns, rows, {time: 1});
  }

  // ---------------------------------------------------------------- self-check (#selfcheck)
  function selfcheck(filterText) {
    var out = {layers: nL, steps: nS, series: document.querySelectorAll("#chart path.s").length,
      mean: document.querySelectorAll("#chart path.mean").length,
      markers: document.querySelectorAll("#decision-markers path.marker").length,
      heatmap: [$("heatmap").width, $("heatmap").height], esd: document.querySelectorAll("#esd svg.esd").length,
      esd_fit: document.querySelectorAll("#esd line.fit").length, esd_xmin: document.querySelectorAll("#esd line.xmin").length,
      rows: $("layers").tBodies[0].rows.length, decisions: $("decisions").tBodies[0].rows.length,
      summary: $("summary").tBodies[0].rows.length, analyses: D.num_analyses, latest_step: D.latest_step,
      head: $("latest-head") ? $("latest-head").textContent : null,
      gaps: D.alpha.reduce(function (t, a) { return t + a.filter(function (v) { return v === null || v === undefined; }).length; }, 0)};
    var f = $("filter");
    f.value = filterText; f.dispatchEvent(new Event("input"));
    out.filter = filterText; out.filtered_rows = $("layers").tBodies[0].rows.length;
    out.filtered_names = [].map.call($("layers").tBodies[0].rows, function (tr) { return tr.cells[1].textContent; });
    out.dimmed = document.querySelectorAll("#chart path.s.dim").length;
    f.value = ""; f.dispatchEvent(new Event("input"));
    var ai = D.columns.indexOf("alpha"), th = $("layers").tHead.rows[0].cells[ai];
    th.click();
    var col = function () { return [].map.call($("layers").tBodies[0].rows, function (tr) { return tr.cells[ai].textContent; }).filter(Boolean).map(Number); };
    var asc = col(); $("layers").tHead.rows[0].cells[ai].click(); var desc = col();
    out.sorted_asc = asc.every(function (v, k) { return !k || asc[k - 1] <= v; });
    out.sorted_desc = desc.every(function (v, k) { return !k || desc[k - 1] >= v; });
    // hover the chart at the last step of layer 0: the tooltip must name it
    var j = nS - 1, i = 0;
    while (i < nL && (D.alpha[i][j] === null || D.alpha[i][j] === undefined)) i++;
    if (i < nL && chartGeom) {
      var s = $("chart"), b = s.getBoundingClientRect(), sc = b.width / s.viewBox.baseVal.width;
      var evt = new MouseEvent("mousemove", {bubbles: true, clientX: b.left + chartGeom.X(D.steps[j]) * sc - 1,
        clientY: b.top + chartGeom.Y(D.alpha[i][j]) * sc});
      s.querySelector("rect[fill=transparent]").dispatchEvent(evt);
      out.hover_tip = $("tip").textContent.split("\n")[0];
      out.hover_expected = D.layers[i];
      out.highlighted = document.querySelectorAll("#chart path.s.hl").length;
    }
    return out;
  }

  function head() {  // the live page's heading (the embedded page has its own)
    var box = $("head");
    if (!box || D.latest_step === null || D.latest_step === undefined) return;
    var fi = D.columns.indexOf("flags"), flagged = D.latest.filter(function (r) { return judged(r[fi]); }).length;
    box.innerHTML = "<h2 id='latest-head'>Latest analysis: step " + esc(D.latest_step) + ", epoch " +
      esc(D.latest_epoch) + "</h2><p class='meta'>Updated " + esc(D.updated) + " &middot; " + D.latest.length +
      " layers, " + flagged + " flagged &middot; " + D.num_analyses + " analyses &middot; " +
      D.num_decisions + " decisions</p>";
  }

  function main() {
    head(); cards();
    if (!nL) return;
    wireTable(); heatmap(); chart(); table(); esd(); decisions(); summary();
    var timer = null;
    window.addEventListener("resize", function () { clearTimeout(timer); timer = setTimeout(function () { heatmap(); chart(); }, 150); });
  }
  try { main(); } catch (e) { errors.push("main: " + (e && e.stack || e)); }
  var h = decodeURIComponent(location.hash || "");
  if (h.indexOf("#selfcheck") === 0) {
    var out = {};
    try { out = selfcheck(h.slice(11)); } catch (e) { errors.push("selfcheck: " + (e && e.stack || e)); }
    out.errors = errors;
    var pre = $("selfcheck"); pre.textContent = JSON.stringify(out); pre.hidden = false;
  }
})();

"use strict";
// routecap report: unpack the embedded plotly.js, draw every figure, run the request view.
(function () {
  const status = document.getElementById("rc-status");

  function fail(msg, err) {
    status.textContent = msg;
    status.classList.add("error");
    if (err) console.error(err);
  }

  async function loadPlotly() {
    if (typeof DecompressionStream === "undefined") {
      throw new Error("this browser lacks DecompressionStream (Chrome 80+, Firefox 113+, Safari 16.4+)");
    }
    const b64 = document.getElementById("rc-plotly").textContent.trim();
    const bin = atob(b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    const code = await new Response(stream).text();
    window.PlotlyConfig = { MathJaxConfig: "local" };
    (0, eval)(code); // global scope: defines window.Plotly
    if (typeof window.Plotly === "undefined") throw new Error("plotly.js did not load");
  }

  async function drawFigures() {
    const figs = JSON.parse(document.getElementById("rc-figures").textContent);
    const jobs = [];
    for (const el of document.querySelectorAll(".plot[data-figure]")) {
      const fig = figs[el.dataset.figure];
      jobs.push(Plotly.newPlot(el, fig.data, fig.layout,
        { responsive: true, displaylogo: false, modeBarButtonsToRemove: ["select2d", "lasso2d"] })
        .then(() => el.setAttribute("data-drawn", "1")));
    }
    await Promise.all(jobs);
    return jobs.length;
  }

  // ---- request view ---------------------------------------------------------------------------
  function decodeB64(b64, wide) {
    const bin = atob(b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return wide ? new Uint16Array(bytes.buffer) : bytes;
  }

  const PALETTE = ["#8fb8e6", "#ffbf80", "#9fd89f", "#f29e9e", "#c9b3e6", "#d4b8a6", "#f5b8de",
    "#c7c7c7", "#e0e08a", "#8ee0e8", "#5f9ed1", "#ff9a3c", "#63c063", "#e56b6b", "#a98bd6",
    "#b8917a", "#ee8ac7", "#a3a3a3", "#caca5a", "#52ccd9"];
  function expertColor(e, E) {
    if (E <= PALETTE.length) return PALETTE[e];
    const hue = (e * 137.508) % 360;
    const light = 72 + (e % 3) * 7;
    return "hsl(" + hue.toFixed(1) + ",70%," + light + "%)";
  }

  function showable(s) {
    if (s === "\n") return "\u21b5\n";
    if (s === "\t") return "\u21e5";
    if (s === "") return "\u2205";
    return s;
  }

  function requestView(data) {
    const root = document.getElementById("rv-root");
    if (!root || !data || !data.requests.length) return;
    const selReq = document.getElementById("rv-request");
    const selLayer = document.getElementById("rv-layer");
    const tokensEl = document.getElementById("rv-tokens");
    const routeEl = document.getElementById("rv-route");
    const legendEl = document.getElementById("rv-legend");
    const L = data.layers.length, K = data.K, E = data.E;
    data.requests.forEach((r, i) => {
      const o = document.createElement("option");
      o.value = String(i);
      o.textContent = r.id + " (" + r.T + " tokens)";
      selReq.appendChild(o);
    });
    data.layers.forEach((layer, i) => {
      const o = document.createElement("option");
      o.value = String(i);
      o.textContent = "layer " + layer;
      selLayer.appendChild(o);
    });
    const cache = new Map();
    function req(i) {
      if (!cache.has(i)) {
        const r = data.requests[i];
        cache.set(i, { r: r, ids: decodeB64(r.ids, data.wide), miss: r.missing ? decodeB64(r.missing, false) : null });
      }
      return cache.get(i);
    }
    function route(q, t) {
      const rows = [];
      const l0 = Number(selLayer.value);
      for (let l = 0; l < L; l++) {
        let cells;
        if (q.miss && q.miss[t * L + l]) cells = '<span class="muted">missing</span>';
        else {
          cells = "";
          for (let k = 0; k < K; k++) {
            const e = q.ids[(t * L + l) * K + k];
            cells += '<span class="chip" style="background:' + expertColor(e, E) + '">' + e + "</span>";
          }
        }
        rows.push('<tr class="' + (l === l0 ? "sel" : "") + '"><td>layer ' + data.layers[l] + "</td><td>" + cells + "</td></tr>");
      }
      const r = q.r, pos = r.start + t;
      const kind = pos < r.prompt_len ? "prompt" : "generated";
      const tok = r.token_ids ? " &middot; token " + r.token_ids[t] : "";
      const txt = r.text ? " &middot; <code>" + escapeHtml(JSON.stringify(r.text[t])) + "</code>" : "";
      routeEl.innerHTML = "<h3>position " + pos + " (" + kind + ")" + tok + txt + "</h3><table>" + rows.join("") + "</table>";
    }
    function escapeHtml(s) {
      return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
    }
    function render() {
      const q = req(Number(selReq.value));
      const l = Number(selLayer.value);
      const r = q.r;
      const frag = document.createDocumentFragment();
      const counts = new Array(E).fill(0);
      for (let t = 0; t < r.T; t++) {
        const span = document.createElement("span");
        span.className = "tok";
        span.dataset.t = String(t);
        const pos = r.start + t;
        if (pos >= r.prompt_len) span.classList.add("gen");
        if (q.miss && q.miss[t * L + l]) span.classList.add("miss");
        else {
          const e = q.ids[(t * L + l) * K];
          counts[e]++;
          span.style.background = expertColor(e, E);
        }
        span.textContent = r.text ? showable(r.text[t]) : (r.token_ids ? "\u27e8" + r.token_ids[t] + "\u27e9" : "\u00b7" + pos);
        frag.appendChild(span);
      }
      tokensEl.replaceChildren(frag);
      let leg = "";
      for (let e = 0; e < E; e++) {
        if (counts[e] === 0 && E > 32) continue;
        leg += '<span class="chip" style="background:' + expertColor(e, E) + '" title="' + counts[e] + ' tokens">' + e + "</span>";
      }
      legendEl.innerHTML = '<span class="muted">first expert (router order) at layer ' + data.layers[l] + ":</span> " + leg;
      route(q, 0);
    }
    tokensEl.addEventListener("mouseover", (ev) => {
      const span = ev.target.closest(".tok");
      if (!span) return;
      for (const s of tokensEl.querySelectorAll(".tok.on")) s.classList.remove("on");
      span.classList.add("on");
      route(req(Number(selReq.value)), Number(span.dataset.t));
    });
    selReq.addEventListener("change", render);
    selLayer.addEventListener("change", render);
    render();
    root.setAttribute("data-drawn", "1");
  }

  (async function main() {
    try {
      requestView(JSON.parse(document.getElementById("rc-requests").textContent));
    } catch (e) {
      fail("The request view failed: " + e.message, e);
    }
    try {
      await loadPlotly();
      const n = await drawFigures();
      status.textContent = n + " plots drawn (plotly.js " + Plotly.version + ", embedded). Hover for values, drag to zoom, double-click to reset.";
      document.body.setAttribute("data-plots-drawn", String(n));
    } catch (e) {
      fail("The plots could not be drawn: " + e.message, e);
    }
  })();
})();

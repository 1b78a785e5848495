// Helpers shared by the node page (dashboard.html) and the cluster page
// (cluster.html): escaping, table rows, the token-aware fetch, polling with
// backoff and the small line chart. No framework, nothing fetched from elsewhere.
"use strict";
const $ = (sel) => document.querySelector(sel);
const esc = (s) => String(s).replace(/[&<>"']/g,
  (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const row = (cells) => "<tr>" + cells.map((c) => "<td>" + c + "</td>").join("") + "</tr>";
let token = sessionStorage.getItem("pmlb-admin-token") || "";

// fetch + JSON; asks for the admin token once per browser session on a 401.
// A 404 with a JSON error body is returned, not thrown (searches use it).
async function api(path, options = {}) {
  const auth = () => (token ? {Authorization: "Bearer " + token} : {});
  let resp = await fetch(path, {...options, headers: auth()});
  if (resp.status === 401) {
    const given = prompt("Admin token (--admin-token):");
    if (given === null) throw new Error("an admin token is required");
    token = given;
    sessionStorage.setItem("pmlb-admin-token", token);
    resp = await fetch(path, {...options, headers: auth()});
  }
  const body = await resp.json().catch(() => ({error: "HTTP " + resp.status}));
  if (!resp.ok && !body.error) throw new Error(path + ": HTTP " + resp.status);
  return body;
}

// Call render(await api(path)) every 2 s; back off to 30 s while it fails.
function poll(path, render) {
  let delay = 2000;
  const tick = async () => {
    try {
      render(await api(path));
      $("#status").textContent = "live, updated " + new Date().toLocaleTimeString();
      delay = 2000;
    } catch (e) {
      delay = Math.min(delay * 2, 30000);
      $("#status").innerHTML = '<span class="bad">not answering: ' + esc(e.message) +
        "</span> (retrying in " + Math.round(delay / 1000) + " s)";
    }
    setTimeout(tick, delay);
  };
  tick();
}

// A line over the last five minutes of [time ms, value] points.
function chart(canvas, history, unit) {
  const g = canvas.getContext("2d");
  g.clearRect(0, 0, canvas.width, canvas.height);
  while (history.length && history[0][0] < history[history.length - 1][0] - 300000) history.shift();
  if (history.length < 2) return;
  const t0 = history[0][0], t1 = history[history.length - 1][0];
  const max = Math.max(1, ...history.map((h) => h[1]));
  g.strokeStyle = "#2b6cb0";
  g.beginPath();
  history.forEach(([t, v], i) => {
    const x = ((t - t0) / Math.max(1, t1 - t0)) * (canvas.width - 10) + 5;
    const y = canvas.height - 5 - (v / max) * (canvas.height - 20);
    i ? g.lineTo(x, y) : g.moveTo(x, y);
  });
  g.stroke();
  g.fillStyle = "#555";
  g.fillText("max " + (Number.isInteger(max) ? max : max.toFixed(1)) + unit, 5, 12);
}

// The live view: polls /stats once a second and shows connections now, connections per second
// (from the count of joins or stored files) and bytes per second, with a sparkline of the bytes.
"use strict";
(function () {
  const box = document.getElementById("live");
  if (!box) return;
  const el = (id) => document.getElementById(id);
  const history = [];
  let last = null;
  function human(n) {
    const units = ["B", "KiB", "MiB", "GiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(Math.round(n))) + " " + units[i];
  }
  function draw() {
    const max = Math.max(1, ...history);
    const points = history.map((v, i) => `${i * 4},${30 - (v / max) * 28}`).join(" ");
    el("spark").setAttribute("points", points);
  }
  async function tick() {
    try {
      const response = await fetch("stats", { cache: "no-store" });
      const now = await response.json();
      const at = performance.now();
      el("live-connections").textContent = String(now.connections);
      if (last !== null) {
        const seconds = Math.max(0.001, (at - last.at) / 1000);
        const bytes = (now.bytesIn + (now.bytesOut || 0)) - (last.stats.bytesIn + (last.stats.bytesOut || 0));
        const started = (now.joined ?? now.stored + now.refused) - (last.stats.joined ?? last.stats.stored + last.stats.refused);
        el("live-rate").textContent = (started / seconds).toFixed(1);
        el("live-bytes").textContent = human(bytes / seconds) + "/s";
        history.push(bytes / seconds);
        if (history.length > 48) history.shift();
        draw();
      }
      last = { at, stats: now };
      document.dispatchEvent(new CustomEvent("tcplab-stats", { detail: now }));
    } catch (e) {
      el("live-connections").textContent = "?";
    }
  }
  tick();
  setInterval(tick, 1000);
})();

// The room over WebSocket: each text message sent is one line; what comes back is shown as text
// (textContent, never HTML), already escaped by the server for terminal controls.
"use strict";
(function () {
  const log = document.getElementById("log");
  const line = document.getElementById("line");
  const send = document.getElementById("send");
  const status = document.getElementById("status");
  const MAX_SHOWN = 2000;
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const ws = new WebSocket(scheme + location.host + "/ws");
  let pending = "";

  function show(text) {
    const row = document.createElement("div");
    row.textContent = text;
    if (text.startsWith("* ")) row.className = "server";
    const atBottom = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.appendChild(row);
    while (log.childElementCount > MAX_SHOWN) log.firstElementChild.remove();
    if (atBottom) log.scrollTop = log.scrollHeight;
  }

  ws.onopen = () => {
    status.textContent = "connected to " + location.host;
    line.disabled = send.disabled = false;
    line.focus();
  };
  ws.onmessage = (event) => {
    pending += event.data;
    const lines = pending.split("\n");
    pending = lines.pop();
    for (const text of lines) show(text);
  };
  ws.onclose = (event) => {
    if (pending) show(pending);
    pending = "";
    status.textContent = "disconnected" + (event.reason ? ": " + event.reason : "") + " (reload the page to join again)";
    line.disabled = send.disabled = true;
  };
  document.getElementById("say").addEventListener("submit", (event) => {
    event.preventDefault();
    if (ws.readyState !== WebSocket.OPEN) return;
    ws.send(line.value);
    line.value = "";
  });
})();

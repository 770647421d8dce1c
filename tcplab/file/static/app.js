// Uploads as `nc` would: one WebSocket per file carrying "PUT [token=T] <size> <name>\n" and then the
// file's bytes, read a slice at a time and sent only while little is waiting in the socket (the
// browser never holds the file). The server's one-line answer is the verdict. The SHA-256 shown is
// the server's: this page does not hash in the browser (WebCrypto cannot hash a stream).
"use strict";
(function () {
  const CHUNK = 256 * 1024;
  const HIGH_WATER = 4 * 1024 * 1024;
  const el = (id) => document.getElementById(id);
  const url = (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws";
  const queue = [];
  let busy = false, total = 0, finished = 0;

  document.addEventListener("tcplab-stats", (event) => {
    el("tokenform").classList.toggle("hidden", !event.detail.token);
  });
  el("tokenform").addEventListener("submit", (event) => event.preventDefault());

  function cell(row, text, className) {
    const td = document.createElement("td");
    td.textContent = text;
    if (className) td.className = className;
    row.appendChild(td);
  }

  function verdict(line) {
    let m = /^OK ([0-9]+) ([0-9a-f]{64}) (.*)$/.exec(line);
    if (m) return { ok: true, size: m[1], sha256: m[2], stored: m[3] };
    m = /^ERR (\S+) (.*)$/.exec(line);
    if (m) return { ok: false, code: m[1], message: m[2] };
    return { ok: false, code: "bad-reply", message: "the server answered something unexpected: " + line };
  }

  function uploadOne(file, name, shown) {
    return new Promise((resolve) => {
      const ws = new WebSocket(url);
      ws.binaryType = "arraybuffer";
      const decoder = new TextDecoder();
      let reply = "", done = false, sent = 0;
      const finish = (result) => {
        if (done) return;
        done = true;
        finished += file.size;
        resolve(result);
        ws.close();
      };
      ws.onmessage = (event) => {
        reply += typeof event.data === "string" ? event.data : decoder.decode(event.data, { stream: true });
        const end = reply.indexOf("\n");
        if (end >= 0) finish(verdict(reply.slice(0, end).replace(/\r$/, "")));
      };
      ws.onclose = (event) => finish(reply ? verdict(reply.trim()) : {
        ok: false, code: "closed", message: "the connection closed before the server answered" +
          (event.code === 1006 ? " (refused, or the network dropped it)" : "") });
      ws.onopen = async () => {
        const token = el("token").value.trim();
        ws.send(`PUT ${token ? "token=" + token + " " : ""}${file.size} ${name}\n`);
        while (sent < file.size && !done) {
          while (ws.bufferedAmount > HIGH_WATER && !done) await new Promise((r) => setTimeout(r, 5));
          if (done) break;
          const chunk = await file.slice(sent, sent + CHUNK).arrayBuffer();
          if (done || ws.readyState !== WebSocket.OPEN) break;
          ws.send(chunk);
          sent += chunk.byteLength;
          shown(sent - ws.bufferedAmount);
        }
      };
    });
  }

  async function run() {
    if (busy) return;
    busy = true;
    while (queue.length) {
      const file = queue.shift();
      const name = file.webkitRelativePath || file.name;
      const row = document.createElement("tr");
      cell(row, name);
      el("results").appendChild(row);
      el("status").textContent = "uploading " + name;
      let result;
      if (/[\r\n]/.test(name)) {
        result = { ok: false, code: "bad-name", message: "the name has a line break" };
        finished += file.size;
      } else {
        result = await uploadOne(file, name, (n) => { el("progress").value = total ? (finished + n) / total : 1; });
      }
      el("progress").value = total ? finished / total : 1;
      if (result.ok) {
        row.className = "ok";
        cell(row, result.size);
        cell(row, "stored as " + result.stored, "ok");
        cell(row, result.sha256 + " (the server's SHA-256 of what it stored; not hashed in the browser)", "hash");
      } else {
        row.className = "err";
        cell(row, String(file.size));
        cell(row, result.code + ": " + result.message, "err");
        cell(row, "");
      }
    }
    el("status").textContent = "done";
    busy = false;
  }

  function add(files) {
    for (const file of files) { queue.push(file); total += file.size; }
    run();
  }

  el("files").addEventListener("change", (event) => add(event.target.files));
  el("folder").addEventListener("change", (event) => add(event.target.files));
  const drop = el("drop");
  drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    add(event.dataTransfer.files);
  });
})();

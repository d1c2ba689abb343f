// The built-in web REPL page: runs code through /execute-stream and renders its events as
// they arrive (fetch + ReadableStream; EventSource cannot POST), completes and inspects
// through /complete and /inspect, and shows the session's files. The editor is
// CodeMirror 6, bundled in editor.js (window.ReplEditor; built from page/ by `make page`).
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const transcript = $("transcript");
  const editorForm = $("editor");
  const runButton = $("run");
  const stopButton = $("stop");
  const resetButton = $("reset");
  const tokenField = $("token");
  const statusLine = $("status");
  const fileList = $("file-list");
  const filesPanel = $("files");
  const filesStatus = $("files-status");

  const TOKEN_KEY = "replserver.token";
  const sessionId = newSessionId();
  const history = [];
  let historyIndex = 0;
  let running = false;
  // The session exists on the server once something ran or was uploaded; before that its
  // file listing is a 404, and there is nothing to list.
  let started = false;

  $("session-id").textContent = sessionId;
  tokenField.value = localStorage.getItem(TOKEN_KEY) || "";
  tokenField.addEventListener("input", () => {
    localStorage.setItem(TOKEN_KEY, tokenField.value.trim());
  });
  $("token-form").addEventListener("submit", (event) => event.preventDefault());

  function newSessionId() {
    // randomUUID needs a secure context (https or localhost); plain http on a LAN has not.
    if (crypto.randomUUID) return crypto.randomUUID();
    const bytes = crypto.getRandomValues(new Uint8Array(16));
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  // --- talking to the server -------------------------------------------------------------
  function authorization() {
    const token = tokenField.value.trim();
    return token ? { Authorization: `Bearer ${token}` } : {};
  }

  function post(route, body) {
    const headers = authorization();
    if (body !== undefined) headers["Content-Type"] = "application/json";
    return fetch(`${route}/${encodeURIComponent(sessionId)}`, {
      method: "POST",
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
    });
  }

  async function failure(response) {
    let detail = response.statusText;
    try {
      detail = (await response.json()).detail || detail;
    } catch {
      // not JSON: keep the status text
    }
    return `${response.status} ${detail}`;
  }

  async function ask(route, code, cursor) {
    // /complete and /inspect: their JSON, or an Error with the server's detail.
    const response = await post(route, { code, cursor });
    if (!response.ok) throw new Error(await failure(response));
    return response.json();
  }

  async function readEvents(response, onEvent) {
    // Server-Sent Events: blocks separated by a blank line, payload on `data:` lines.
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      const blocks = buffer.split("\n\n");
      buffer = blocks.pop();
      for (const block of blocks) {
        const data = block
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(line.startsWith("data: ") ? 6 : 5))
          .join("\n");
        if (data) onEvent(JSON.parse(data));
      }
    }
  }

  // --- rendering -------------------------------------------------------------------------
  function element(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function scrollDown() {
    transcript.scrollTop = transcript.scrollHeight;
  }

  function newCell(source) {
    const cell = element("section", "cell");
    const outputs = element("div", "outputs");
    const code = element("pre", "source");
    window.ReplEditor.highlight(source, code);
    cell.append(code, outputs);
    transcript.append(cell);
    scrollDown();
    return cell;
  }

  function appendText(outputs, stream, text) {
    // Consecutive chunks of one stream extend the same <pre>: few nodes for long output.
    const last = outputs.lastElementChild;
    if (last && last.dataset.stream === stream) {
      last.append(text);
    } else {
      const pre = element("pre", stream, text);
      pre.dataset.stream = stream;
      outputs.append(pre);
    }
  }

  function renderDisplay(data) {
    const box = element("div", "display");
    const image = ["image/png", "image/jpeg"].find((type) => typeof data[type] === "string");
    if (image) {
      const img = element("img");
      img.src = `data:${image};base64,${data[image]}`;
      img.alt = data["text/plain"] || "";
      box.append(img);
    } else if (typeof data["image/svg+xml"] === "string") {
      const img = element("img");
      img.src = `data:image/svg+xml;charset=utf-8,${encodeURIComponent(data["image/svg+xml"])}`;
      img.alt = data["text/plain"] || "";
      box.append(img);
    } else if (typeof data["text/html"] === "string") {
      // A frame without scripts: user HTML cannot reach this page, its token or its API.
      const frame = element("iframe");
      frame.setAttribute("sandbox", "allow-same-origin");
      frame.srcdoc = data["text/html"];
      frame.addEventListener("load", () => {
        const page = frame.contentDocument.documentElement;
        frame.style.height = "0";
        frame.style.height = `${page.scrollHeight + 4}px`;
      });
      box.append(frame);
    } else if (typeof data["text/markdown"] === "string") {
      box.append(element("pre", "markdown", data["text/markdown"]));
    } else if ("application/json" in data) {
      box.append(element("pre", "json", JSON.stringify(data["application/json"], null, 2)));
    } else {
      box.append(element("pre", "plain", data["text/plain"] ?? ""));
    }
    return box;
  }

  function askInput(outputs, request) {
    const form = element("form", "input-request");
    const label = element("label", null, request.prompt);
    const field = element("input");
    field.type = request.password ? "password" : "text";
    field.autocomplete = "off";
    field.setAttribute("aria-label", request.prompt || "input");
    form.append(label, field);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      field.disabled = true;
      try {
        const response = await post("input", { value: field.value });
        if (!response.ok) throw new Error(await failure(response));
        // input() echoes prompt and answer as output; getpass echoes nothing, as a terminal.
        if (request.password) form.replaceWith(element("pre", "stdout", `${request.prompt}\n`));
        else form.remove();
      } catch (error) {
        field.disabled = false;
        appendText(outputs, "stderr", `Could not send the answer: ${error.message}\n`);
      }
    });
    outputs.append(form);
    field.focus();
  }

  function footer(cell, event) {
    const ok = event.returnCode === 0;
    const parts = [ok ? "✓" : `✗ ${event.reason}`, `${Math.round(event.durationMs)} ms`];
    if (event.executionCount) parts.unshift(`[${event.executionCount}]`);
    cell.append(element("div", ok ? "footer" : "footer failed", parts.join("  ")));
  }

  function handle(cell, event) {
    const outputs = cell.querySelector(".outputs");
    switch (event.type) {
      case "output":
        appendText(outputs, "stdout", event.content);
        break;
      case "error":
        appendText(outputs, "stderr", event.content);
        break;
      case "result":
        outputs.append(element("pre", "result", event.content));
        break;
      case "display":
        outputs.append(renderDisplay(event.data));
        break;
      case "input_request":
        askInput(outputs, event);
        break;
      case "restart":
        outputs.append(element("div", "notice", `Fresh interpreter: ${event.reason}`));
        break;
      case "complete":
        footer(cell, event);
        break;
      default: // event types of later versions: ignored, as the API asks of clients
    }
    scrollDown();
  }

  // --- actions ---------------------------------------------------------------------------
  function setRunning(flag) {
    running = flag;
    runButton.disabled = flag;
    stopButton.disabled = !flag;
    document.body.classList.toggle("running", flag);
    statusLine.textContent = flag ? "running…" : "idle";
  }

  async function run() {
    const source = editor.getCode();
    if (running || !source.trim()) return;
    if (history[history.length - 1] !== source) history.push(source);
    historyIndex = history.length;
    editor.setCode("");
    started = true;
    const cell = newCell(source);
    const outputs = cell.querySelector(".outputs");
    setRunning(true);
    try {
      // Protocol 2: the rich events (results, displays, input requests) this page renders.
      const response = await post("execute-stream", { code: source, protocol: 2 });
      if (!response.ok) {
        appendText(outputs, "stderr", `${await failure(response)}\n`);
        return;
      }
      await readEvents(response, (event) => handle(cell, event));
    } catch (error) {
      appendText(outputs, "stderr", `Connection failed: ${error.message}\n`);
    } finally {
      for (const form of outputs.querySelectorAll(".input-request")) form.remove();
      setRunning(false);
      editor.focus();
      refreshFiles();
    }
  }

  async function simple(route, done) {
    try {
      const response = await post(route);
      if (!response.ok) throw new Error(await failure(response));
      if (done) done(await response.json());
    } catch (error) {
      transcript.append(element("div", "notice stderr", `${route}: ${error.message}`));
      scrollDown();
    }
  }

  editorForm.addEventListener("submit", (event) => {
    event.preventDefault();
    run();
  });
  stopButton.addEventListener("click", () => simple("interrupt"));
  resetButton.addEventListener("click", () =>
    simple("reset", () => {
      transcript.append(element("div", "notice", "Namespace reset: a fresh interpreter."));
      scrollDown();
      refreshFiles();
    }),
  );

  // --- the editor ------------------------------------------------------------------------
  function historyEntry(step) {
    const next = historyIndex + step;
    if (next < 0 || next > history.length) return null;
    historyIndex = next;
    return history[next] ?? "";
  }

  const editor = window.ReplEditor.create({
    parent: $("code"),
    placeholder: "print('hello')",
    onRun: run,
    onHistory: historyEntry,
    complete: (code, cursor) => ask("complete", code, cursor),
    inspect: (code, cursor) => ask("inspect", code, cursor),
  });
  editor.focus();
  if (/Mac|iPhone|iPad/u.test(navigator.platform)) {
    for (const key of document.querySelectorAll("#keys .mod")) key.textContent = "⌘";
  }

  // --- the session's files -----------------------------------------------------------------
  function fileUrl(path) {
    const base = `sessions/${encodeURIComponent(sessionId)}/files`;
    if (path === undefined) return base;
    return `${base}/${path.split("/").map(encodeURIComponent).join("/")}`;
  }

  function formatSize(bytes) {
    if (bytes < 1024) return `${bytes} B`;
    const units = ["KiB", "MiB", "GiB", "TiB"];
    let value = bytes / 1024;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return `${value.toFixed(value < 10 ? 1 : 0)} ${units[unit]}`;
  }

  async function download(event, path) {
    // A plain link cannot carry the token: with one, fetch the bytes and save them.
    const headers = authorization();
    if (!headers.Authorization) return;
    event.preventDefault();
    try {
      const response = await fetch(fileUrl(path), { headers });
      if (!response.ok) throw new Error(await failure(response));
      const url = URL.createObjectURL(await response.blob());
      const link = element("a");
      link.href = url;
      link.download = path.split("/").pop();
      link.click();
      setTimeout(() => URL.revokeObjectURL(url), 60_000);
    } catch (error) {
      showFilesError(`${path}: ${error.message}`);
    }
  }

  function renderFiles(files, truncated) {
    const items = files.map((file) => {
      const link = element("a", "file", file.path);
      link.href = fileUrl(file.path);
      link.download = file.path.split("/").pop();
      link.title = `Download ${file.path} (modified ${file.modified})`;
      link.addEventListener("click", (event) => download(event, file.path));
      const item = element("li");
      item.append(link, element("span", "size", formatSize(file.size)));
      return item;
    });
    if (truncated) items.push(element("li", "hint", "… and more: the listing stops here."));
    fileList.replaceChildren(...items);
    $("files-empty").hidden = files.length > 0;
  }

  function showFilesError(message, kind = "failed") {
    filesStatus.append(element("div", `stderr ${kind}`, message));
  }

  let listing = 0;
  async function refreshFiles() {
    if (!started) return;
    const mine = ++listing; // listings can overlap: only the latest one is shown
    try {
      const response = await fetch(fileUrl(), { headers: authorization() });
      if (!response.ok) throw new Error(await failure(response));
      const { files, truncated } = await response.json();
      if (mine !== listing) return;
      renderFiles(files, truncated);
      for (const stale of filesStatus.querySelectorAll(".listing")) stale.remove();
    } catch (error) {
      if (mine === listing) showFilesError(`Listing the files: ${error.message}`, "listing");
    }
  }

  async function upload(files) {
    filesStatus.replaceChildren();
    for (const file of files) {
      const note = element("div", "uploading", `Uploading ${file.name}…`);
      filesStatus.append(note);
      try {
        // The raw bytes are the body; the server writes them to the session's directory.
        const response = await fetch(fileUrl(file.name), {
          method: "PUT",
          headers: authorization(),
          body: file,
        });
        if (!response.ok) throw new Error(await failure(response));
        started = true;
        note.remove();
      } catch (error) {
        note.remove();
        showFilesError(`${file.name}: ${error.message}`);
      }
      await refreshFiles();
    }
  }

  const carriesFiles = (event) => event.dataTransfer?.types.includes("Files");
  filesPanel.addEventListener("dragover", (event) => {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
    filesPanel.classList.add("dropping");
  });
  filesPanel.addEventListener("dragleave", (event) => {
    if (!filesPanel.contains(event.relatedTarget)) filesPanel.classList.remove("dropping");
  });
  filesPanel.addEventListener("drop", (event) => {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    filesPanel.classList.remove("dropping");
    upload([...event.dataTransfer.files]);
  });
  // A file dropped anywhere else would make the browser leave the page to show it.
  for (const type of ["dragover", "drop"]) {
    window.addEventListener(type, (event) => {
      if (carriesFiles(event) && !filesPanel.contains(event.target)) event.preventDefault();
    });
  }
  $("file-input").addEventListener("change", (event) => {
    upload([...event.target.files]);
    event.target.value = "";
  });
})();

// xraylib's upload page: send the chosen files to POST /api/predict and show one card per file.
// Every server string goes into the page as text (textContent), never as HTML.
"use strict";

(function () {
  const body = document.body;
  const maxFiles = Number(body.dataset.maxFiles);
  const maxBytes = Number(body.dataset.maxBytes);
  const maxMb = body.dataset.maxMb;
  const notJudgeable = body.dataset.notJudgeable;
  const imageSize = body.dataset.imageSize;
  const input = document.getElementById("files");
  const zone = document.getElementById("dropzone");
  const status = document.getElementById("status");
  const results = document.getElementById("results");

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined && text !== null) node.textContent = text;
    return node;
  }

  function setStatus(text, kind) {
    status.textContent = text;
    status.className = "status" + (kind ? " " + kind : "");
  }

  function percent(p) {
    return (100 * p).toFixed(1) + " %";
  }

  function figure(src, caption, alt) {
    const fig = el("figure");
    const img = el("img");
    img.src = src;
    img.alt = alt;
    fig.append(img, el("figcaption", null, caption));
    return fig;
  }

  function card(result) {
    const article = el("article", "card");
    article.dataset.name = result.name;
    const head = el("header");
    head.append(el("h2", "name", result.name));
    article.append(head);

    if (!result.ok) {
      article.classList.add("bad");
      head.append(el("span", "badge bad", "not read"));
      article.append(el("p", "error-msg", "Could not read this file: " + result.error));
      return article;
    }
    const images = result.images || {};
    if (!result.judgeable) {
      article.classList.add("ood");
      head.append(el("span", "badge ood", "no prediction"));
      const box = el("div", "ood-warning");
      box.append(el("strong", "ood-title", notJudgeable));
      const list = el("ul");
      for (const reason of result.ood.reasons) list.append(el("li", null, reason));
      box.append(list, el("p", null, "The model gives no decision for it: any answer would be meaningless."));
      article.append(box);
      if (images.original) {
        const row = el("div", "figures");
        row.append(figure(images.original, "Your image (" + result.width + "\u00d7" + result.height + ")", "uploaded image"));
        article.append(row);
      }
      return article;
    }

    article.classList.add("ok");
    head.append(el("span", "badge ok", "prediction"));
    const decision = el("p", "decision");
    decision.append("Model's decision: ", el("strong", "decision-value", result.decision));
    decision.append(el("span", "muted",
      " (" + result.positive_class + " when its probability \u2265 " + result.threshold.toFixed(3) +
      (result.site ? ", site profile " + result.site : "") + ")"));
    article.append(decision);

    const table = el("table", "probs");
    for (const [name, p] of Object.entries(result.probabilities)) {
      const row = el("tr", "prob");
      row.dataset.class = name;
      row.dataset.probability = String(p);
      const bar = el("div", "bar");
      const fill = el("span");
      fill.style.width = Math.max(0, Math.min(100, 100 * p)).toFixed(1) + "%";
      if (name === result.decision) fill.className = "chosen";
      bar.append(fill);
      const barCell = el("td", "bar-cell");
      barCell.append(bar);
      row.append(el("th", null, name), barCell, el("td", "prob-value", percent(p)));
      table.append(row);
    }
    article.append(table);

    const row = el("div", "figures");
    if (images.original) {
      row.append(figure(images.original, "Your image (" + result.width + "\u00d7" + result.height + ")", "uploaded image"));
    }
    if (images.overlay) {
      row.append(figure(images.overlay, "Grad-CAM: where the evidence for \u201c" + result.decision +
        "\u201d was, on the model's " + imageSize + "\u00d7" + imageSize + " input", "Grad-CAM heatmap"));
    } else if (images.model_input) {
      row.append(figure(images.model_input, "The model's " + imageSize + "\u00d7" + imageSize + " input", "model input"));
    }
    article.append(row);
    const notes = (result.ood.notes || []).slice();
    if (result.gradcam_note) notes.push(result.gradcam_note);
    for (const note of notes) article.append(el("p", "note small", note));
    return article;
  }

  async function analyse(files) {
    files = Array.from(files);
    if (!files.length) return;
    if (files.length > maxFiles) {
      setStatus(files.length + " files chosen; this server takes at most " + maxFiles + " per upload.", "error");
      return;
    }
    const total = files.reduce((sum, f) => sum + f.size, 0);
    if (total > maxBytes) {
      setStatus("The files add up to " + (total / 1e6).toFixed(1) + " MB; this server takes at most " + maxMb + " MB per upload.", "error");
      return;
    }
    const form = new FormData();
    for (const file of files) form.append("files", file, file.name);
    setStatus("Analysing " + files.length + (files.length === 1 ? " image" : " images") + "\u2026", "busy");
    results.replaceChildren();
    let response, data;
    try {
      // The custom header: a page on another site cannot make a browser send it (the server refuses uploads without it).
      response = await fetch("/api/predict", { method: "POST", body: form, headers: { "X-Xraylib": "1" } });
      data = await response.json();
    } catch (err) {
      setStatus("The server did not answer (" + err + "). Is it still running?", "error");
      return;
    }
    if (data.results) {
      for (const result of data.results) results.append(card(result));
    }
    if (!response.ok) {
      setStatus(data.error ? data.error.message : "The upload failed (" + response.status + ").", "error");
    } else {
      const shown = data.results.length;
      setStatus(shown + (shown === 1 ? " image" : " images") + " analysed.", "done");
    }
  }

  input.addEventListener("change", () => {
    analyse(input.files);
    input.value = "";
  });
  for (const type of ["dragenter", "dragover"]) {
    zone.addEventListener(type, (event) => {
      event.preventDefault();
      zone.classList.add("over");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    zone.addEventListener(type, () => zone.classList.remove("over"));
  }
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    analyse(event.dataTransfer.files);
  });
  // A file dropped outside the zone would make the browser open it and leave the page.
  window.addEventListener("dragover", (event) => event.preventDefault());
  window.addEventListener("drop", (event) => event.preventDefault());
})();

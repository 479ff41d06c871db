// The live map: polls /api/map, swaps the SVG Graphviz drew and the table of health columns.
// Data goes into the page as text (textContent), never as markup; the SVG is the server's own drawing.
"use strict";

const state = { generation: -1, timer: null };

function setStatus(text, isError) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.className = isError ? "error" : "";
}

function fillTable(answer) {
  const head = document.querySelector("#health thead tr");
  head.replaceChildren(...answer.columns.map((name) => {
    const th = document.createElement("th");
    th.textContent = name;
    return th;
  }));
  const body = document.querySelector("#health tbody");
  body.replaceChildren(...answer.rows.map((row) => {
    const tr = document.createElement("tr");
    tr.dataset.edge = row.edge;
    if (row.violation) tr.classList.add("violation");
    else if (row.trouble) tr.classList.add("trouble");
    for (const cell of row.cells) {
      const td = document.createElement("td");
      td.textContent = cell;
      tr.appendChild(td);
    }
    tr.addEventListener("mouseenter", () => highlight(row.edge, true));
    tr.addEventListener("mouseleave", () => highlight(row.edge, false));
    return tr;
  }));
}

function highlight(edgeId, on) {
  const edge = document.getElementById(edgeId);
  if (edge) edge.classList.toggle("hover", on);
  for (const tr of document.querySelectorAll("#health tbody tr")) {
    if (tr.dataset.edge === edgeId) tr.classList.toggle("hover", on);
  }
}

function drawMap(svgText) {
  const parsed = new DOMParser().parseFromString(svgText, "image/svg+xml");
  const svg = parsed.documentElement;
  if (svg.nodeName !== "svg") throw new Error("the server sent no SVG");
  const map = document.getElementById("map");
  map.replaceChildren(document.importNode(svg, true));
  for (const edge of map.querySelectorAll("g.edge")) {
    edge.addEventListener("mouseenter", () => highlight(edge.id, true));
    edge.addEventListener("mouseleave", () => highlight(edge.id, false));
  }
}

async function refresh() {
  let delay = 3000;
  try {
    const response = await fetch("/api/map", { cache: "no-store" });
    const answer = await response.json();
    delay = Math.max(1000, (answer.refreshSeconds || 3) * 1000);
    if (answer.svg && answer.generation !== state.generation) {
      drawMap(answer.svg);
      fillTable(answer);
      document.getElementById("note").textContent = answer.note || "";
      state.generation = answer.generation;
      document.body.dataset.generation = String(answer.generation);
    }
    const unit = answer.perSecond ? "per second" : "totals since the agents started";
    const when = new Date(answer.servedAt).toLocaleTimeString();
    if (answer.error) setStatus(`${when}: ${answer.error} (showing the last map)`, true);
    else if (!answer.svg) setStatus("waiting for the first reading…", false);
    else setStatus(`${answer.source} · ${unit} · ${answer.nodes.length} workloads · updated ${when}`, false);
  } catch (error) {
    setStatus(`the map server does not answer (${error.message})`, true);
  }
  state.timer = setTimeout(refresh, delay);
}

refresh();

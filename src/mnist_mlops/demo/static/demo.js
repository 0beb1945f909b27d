// The draw-a-digit page: strokes from any pointer (mouse, finger, pen) on a canvas, read by the
// served model through POST /api/predict while drawing (debounced) and when a stroke ends.
"use strict";

const LINE_WIDTH = 20; // on the 280 px canvas: about MNIST's stroke for a digit drawn 200 px tall
const DEBOUNCE_MS = 150; // while drawing, read once the pointer rests this long
const INK = "#000000";
const PAPER = "#ffffff";
const NO_DIGIT = "No digit found"; // the served model's digit_found is false: a dot, a scribble

const canvas = document.getElementById("pad");
const pen = canvas.getContext("2d", { willReadFrequently: true });
const statusLine = document.getElementById("status");
const answer = document.getElementById("answer");
const bars = makeBars(document.getElementById("bars"));

let stroke = null; // the pointer drawing now: { id, x, y }
let timer = null; // the debounced reading while drawing
let latest = 0; // number of the latest reading asked for; answers to older ones are dropped

function makeBars(list) {
  return Array.from({ length: 10 }, (_, digit) => {
    const row = document.createElement("li");
    row.dataset.digit = digit;
    row.innerHTML =
      `<span class="digit">${digit}</span>` +
      '<span class="track"><span class="fill"></span></span><span class="value"></span>';
    list.append(row);
    return row;
  });
}

function clearCanvas() {
  pen.fillStyle = PAPER;
  pen.fillRect(0, 0, canvas.width, canvas.height);
}

// Canvas pixels under a pointer event, whatever size CSS gives the canvas.
function at(event) {
  const box = canvas.getBoundingClientRect();
  return {
    x: ((event.clientX - box.left - canvas.clientLeft) * canvas.width) / canvas.clientWidth,
    y: ((event.clientY - box.top - canvas.clientTop) * canvas.height) / canvas.clientHeight,
  };
}

function dot({ x, y }) {
  pen.fillStyle = INK;
  pen.beginPath();
  pen.arc(x, y, LINE_WIDTH / 2, 0, 2 * Math.PI);
  pen.fill();
}

function line(from, to) {
  pen.strokeStyle = INK;
  pen.lineWidth = LINE_WIDTH;
  pen.lineCap = "round";
  pen.lineJoin = "round";
  pen.beginPath();
  pen.moveTo(from.x, from.y);
  pen.lineTo(to.x, to.y);
  pen.stroke();
}

function blank() {
  const pixels = pen.getImageData(0, 0, canvas.width, canvas.height).data;
  for (let i = 0; i < pixels.length; i += 4) {
    if (pixels[i] < 255) return false; // red below full: some ink
  }
  return true;
}

// Ask the model for the drawing as it is now, and show the answer unless the drawing has
// changed meanwhile. A blank canvas is not sent.
async function read() {
  clearTimeout(timer);
  const ticket = ++latest;
  if (blank()) {
    show({ message: "Draw a digit" });
    return;
  }
  document.body.dataset.state = "reading";
  const png = canvas.toDataURL("image/png").split(",")[1];
  let reply;
  try {
    const response = await fetch("/api/predict", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ png }),
    });
    const body = await response.json().catch(() => ({}));
    reply = response.ok ? body : { error: body.error || `The demo answered ${response.status}.` };
  } catch {
    reply = { error: "The demo is not answering: is `make demo` still running?" };
  }
  if (ticket === latest) show(reply);
}

function show(reply) {
  // The served model still names a digit for a drawing that holds none: show no answer.
  if (reply.digit_found === false) {
    show({ state: "no-digit", message: NO_DIGIT });
    return;
  }
  const { digit = null, probabilities = null, error = null, message = "", state = null } = reply;
  document.body.dataset.state = state || (error ? "error" : digit === null ? "idle" : "answered");
  const sure = digit === null ? "" : `${(100 * probabilities[digit]).toFixed(0)}% sure`;
  statusLine.textContent = error || message || `The model reads a ${digit} (${sure})`;
  statusLine.classList.toggle("error", Boolean(error));
  answer.textContent = digit ?? "";
  bars.forEach((row, d) => {
    const p = digit === null ? null : probabilities[d];
    const percent = p === null ? "" : `${(100 * p).toFixed(1)}%`;
    row.classList.toggle("top", d === digit);
    row.querySelector(".fill").style.width = percent || "0";
    row.querySelector(".value").textContent = percent;
    if (p === null) delete row.dataset.probability;
    else row.dataset.probability = p;
  });
}

canvas.addEventListener("pointerdown", (event) => {
  if (stroke || event.button !== 0) return; // one pointer at a time; no right button or eraser
  canvas.setPointerCapture(event.pointerId);
  stroke = { id: event.pointerId, ...at(event) };
  dot(stroke);
  event.preventDefault();
});

canvas.addEventListener("pointermove", (event) => {
  if (!stroke || event.pointerId !== stroke.id) return;
  // Coalesced events are the points the browser merged into this one: smoother fast strokes.
  const coalesced = event.getCoalescedEvents ? event.getCoalescedEvents() : [];
  for (const step of coalesced.length ? coalesced : [event]) {
    const to = at(step);
    line(stroke, to);
    Object.assign(stroke, to);
  }
  clearTimeout(timer);
  timer = setTimeout(read, DEBOUNCE_MS);
});

function endStroke(event) {
  if (!stroke || event.pointerId !== stroke.id) return;
  stroke = null;
  read();
}
canvas.addEventListener("pointerup", endStroke);
canvas.addEventListener("pointercancel", endStroke);

document.getElementById("clear").addEventListener("click", () => {
  stroke = null;
  clearCanvas();
  read();
});

clearCanvas();
show({ message: "Draw a digit" });

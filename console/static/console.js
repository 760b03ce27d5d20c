// inspectd console: refreshes the line page's tiles, counts selected frames. No framework, no build step.
"use strict";

function pollTiles(box) {
  const url = box.dataset.poll;
  const every = Number(box.dataset.pollMs) || 5000;
  const banner = document.getElementById("banner");
  async function refresh() {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), every);
    try {
      const response = await fetch(url, { credentials: "same-origin", signal: controller.signal });
      if (response.redirected || response.status === 401) {
        window.location.assign("/login");
        return;
      }
      const html = await response.text();
      if (response.ok) {
        box.innerHTML = html;
        banner.classList.add("hidden");
      } else {
        const doc = new DOMParser().parseFromString(html, "text/html");
        banner.textContent = (doc.body.textContent || "").trim() || "The console could not refresh (HTTP " + response.status + ").";
        banner.classList.remove("hidden");
      }
    } catch (err) {
      banner.textContent = "The console did not answer in time: the tiles are not current.";
      banner.classList.remove("hidden");
    } finally {
      clearTimeout(timer);
      setTimeout(refresh, every);
    }
  }
  setTimeout(refresh, every);
}

function selection(form) {
  const picks = Array.from(form.querySelectorAll("input.pick"));
  const all = document.getElementById("select-all");
  const count = document.getElementById("selected-count");
  function update() {
    const n = picks.filter((p) => p.checked).length;
    if (count) count.textContent = n + " selected";
    picks.forEach((p) => p.closest(".frame").classList.toggle("picked", p.checked));
  }
  picks.forEach((p) => p.addEventListener("change", update));
  if (all) {
    all.addEventListener("change", () => {
      picks.forEach((p) => { p.checked = all.checked; });
      update();
    });
  }
  update();
}

document.addEventListener("DOMContentLoaded", () => {
  const box = document.querySelector("[data-poll]");
  if (box) pollTiles(box);
  const form = document.getElementById("confirm-form");
  if (form) selection(form);
});

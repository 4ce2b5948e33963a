// Conveniences only: every page works without this script.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  // A confirmation is sent once: its button is disabled as the form goes.
  for (const button of document.querySelectorAll("button[data-once]")) {
    button.form.addEventListener("submit", () => { button.disabled = true; });
  }
  // A new key: selected on focus, and a Copy button where the clipboard is available.
  for (const field of document.querySelectorAll("input[data-select]")) {
    field.addEventListener("focus", () => field.select());
  }
  for (const button of document.querySelectorAll("button[data-copy]")) {
    const field = document.getElementById(button.dataset.copy);
    if (!field || !navigator.clipboard) continue;
    button.hidden = false;
    button.addEventListener("click", async () => {
      await navigator.clipboard.writeText(field.value);
      button.textContent = "Copied";
    });
  }
});

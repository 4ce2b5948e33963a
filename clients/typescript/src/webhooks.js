// Verifying the service's outgoing webhooks (Standard Webhooks: https://www.standardwebhooks.com)
// with the runtime's Web Crypto (Node >= 18, Deno, edge runtimes, browsers): no dependency.

import { WebhookVerificationError } from "./errors.js";

const encoder = new TextEncoder();

function header(headers, name) {
  if (typeof headers?.get === "function") return headers.get(name);
  const found = Object.entries(headers ?? {}).find(([k]) => k.toLowerCase() === name);
  const value = found?.[1];
  return Array.isArray(value) ? value[0] : (value ?? null);
}

function base64ToBytes(text) {
  const binary = atob(text);
  return Uint8Array.from(binary, (c) => c.charCodeAt(0));
}

function bytesToBase64(bytes) {
  let binary = "";
  for (const byte of new Uint8Array(bytes)) binary += String.fromCharCode(byte);
  return btoa(binary);
}

function sameText(a, b) {
  // Compares every character whatever the first difference (no early exit on a mismatch).
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i += 1) diff |= a.charCodeAt(i) ^ b.charCodeAt(i);
  return diff === 0;
}

/**
 * Verify a delivery and return its parsed event (`{type, timestamp, data}`); throws
 * WebhookVerificationError otherwise. `body` is the raw request body (string or bytes) exactly
 * as received; `secret` the endpoint's `whsec_...`; a timestamp more than `toleranceSeconds`
 * from now is refused (replays). Drop duplicates by the `webhook-id` header.
 */
export async function verifyWebhook(secret, body, headers, { toleranceSeconds = 300, now = Date.now() } = {}) {
  const id = header(headers, "webhook-id");
  const timestamp = header(headers, "webhook-timestamp");
  const signatures = header(headers, "webhook-signature");
  if (!id || !timestamp || !signatures) throw new WebhookVerificationError("Missing webhook-id, webhook-timestamp or webhook-signature");
  const seconds = Number(timestamp);
  if (!Number.isInteger(seconds)) throw new WebhookVerificationError("Invalid webhook-timestamp");
  if (Math.abs(now / 1000 - seconds) > toleranceSeconds) throw new WebhookVerificationError("Webhook timestamp out of tolerance");
  const text = typeof body === "string" ? body : new TextDecoder().decode(body);
  let keyBytes;
  try {
    keyBytes = base64ToBytes(String(secret).replace(/^whsec_/, ""));
  } catch {
    throw new TypeError("The webhook secret is not a whsec_ base64 secret");
  }
  const key = await globalThis.crypto.subtle.importKey("raw", keyBytes, { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  const expected = bytesToBase64(await globalThis.crypto.subtle.sign("HMAC", key, encoder.encode(`${id}.${timestamp}.${text}`)));
  const matched = signatures
    .split(" ")
    .some((entry) => {
      const [version, signature] = entry.split(",", 2);
      return version === "v1" && signature !== undefined && sameText(signature, expected);
    });
  if (!matched) throw new WebhookVerificationError("No matching signature");
  return JSON.parse(text);
}

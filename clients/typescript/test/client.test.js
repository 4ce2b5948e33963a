// @ciris/billing against a real running service (node --test). tests/client/test_typescript_client.py
// starts the service on 127.0.0.1 and runs this with BILLING_URL, BILLING_KEY (write) and
// BILLING_ADMIN_KEY (admin); the service delivers webhooks every second to private addresses.
import assert from "node:assert/strict";
import http from "node:http";
import { test } from "node:test";

import {
  BillingClient,
  BillingUnavailableError,
  IdempotencyConflictError,
  PurchaseRequiredError,
  ReservationNotHeldError,
  WebhookVerificationError,
  retryAfterSeconds,
  verifyWebhook,
} from "../src/index.js";

const BASE = process.env.BILLING_URL;
const KEY = process.env.BILLING_KEY;
const ADMIN = process.env.BILLING_ADMIN_KEY;
const GOOGLE = "oauth:google";
const FAST = { backoffMs: 5, maxBackoffMs: 2000 };

const user = () => `ts-${globalThis.crypto.randomUUID().slice(0, 12)}@example.com`;
const billing = (options = {}) => new BillingClient({ baseUrl: BASE, apiKey: KEY, ...FAST, ...options });

/** A proxy in front of the service that can be down, or answer a status before forwarding. */
async function proxy() {
  const state = { down: false, answers: [], seen: 0 };
  const server = http.createServer(async (req, res) => {
    state.seen += 1;
    if (state.down) return req.socket.destroy();
    const next = state.answers.shift();
    if (next) {
      res.writeHead(next.status, { "Content-Type": "application/json", ...next.headers });
      return res.end(JSON.stringify({ error: "busy", detail: "try later" }));
    }
    const chunks = [];
    for await (const chunk of req) chunks.push(chunk);
    const headers = { ...req.headers };
    delete headers.host;
    delete headers["content-length"];
    const upstream = await fetch(BASE + req.url, { method: req.method, headers, body: chunks.length ? Buffer.concat(chunks) : undefined });
    res.writeHead(upstream.status, Object.fromEntries(upstream.headers));
    res.end(Buffer.from(await upstream.arrayBuffer()));
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  state.url = `http://127.0.0.1:${server.address().port}`;
  state.close = () => new Promise((resolve) => server.close(resolve));
  return state;
}

test("check and charge, with an automatic idempotency key that replays", async () => {
  const client = billing();
  const who = user();
  const check = await client.check(GOOGLE, who, { context: { conversation: "c-1" } });
  assert.deepEqual([check.has_credit, check.purchase_required, check.free_uses_remaining, check.credits_remaining], [true, false, 3, 0]);

  const charge = await client.charge(GOOGLE, who, { description: "one chat turn", metadata: { tokens: 42 } });
  assert.match(charge.idempotency_key, /^[0-9a-f-]{36}$/);
  assert.deepEqual([charge.uses, charge.free_uses_used, charge.free_uses_remaining, charge.replayed], [1, 1, 2, false]);
  assert.deepEqual(charge.metadata, { tokens: 42 });

  const again = await client.charge(GOOGLE, who, { description: "one chat turn", metadata: { tokens: 42 }, idempotencyKey: charge.idempotency_key });
  assert.equal(again.replayed, true);
  assert.equal(again.charge_id, charge.charge_id);
  await assert.rejects(client.charge(GOOGLE, who, { uses: 2, idempotencyKey: charge.idempotency_key }), IdempotencyConflictError);

  const ledger = await client.transactions(GOOGLE, who);
  assert.equal(ledger.transactions.filter((t) => t.type === "charge").length, 1);
});

test("no use left: a typed 402 with the checkout link and the offers", async () => {
  const client = billing();
  const who = user();
  for (let i = 0; i < 3; i += 1) await client.charge(GOOGLE, who);
  const check = await client.check(GOOGLE, who);
  assert.deepEqual([check.has_credit, check.purchase_required, check.purchase_uses, check.purchase_price_minor], [false, true, 20, 500]);
  const refused = await client.charge(GOOGLE, who).catch((e) => e);
  assert.ok(refused instanceof PurchaseRequiredError, String(refused));
  assert.equal(refused.status, 402);
  assert.deepEqual(refused.offer, { priceMinor: 500, uses: 20, currency: "USD" });
  assert.ok(refused.offers.length >= 1);
  assert.match(refused.checkoutUrl, /^http:\/\/127\.0\.0\.1:\d+\/v1\/billing\/buy\//);
  assert.ok(refused.portalUrl);

  const purchase = await client.purchase(GOOGLE, who, { customerEmail: who });
  assert.deepEqual([purchase.amount_minor, purchase.uses_purchased, purchase.status], [500, 20, "requires_payment_method"]);
  assert.ok(purchase.client_secret && purchase.checkout_url);
  assert.equal((await client.purchaseStatus(purchase.payment_id)).payment_id, purchase.payment_id);

  // Paid with a sandbox test card (what the payment page does), then confirmed: credited once.
  const paid = await fetch(`${BASE}/v1/billing/sandbox/payment_intents/${purchase.payment_id}/confirm`, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ client_secret: purchase.client_secret, card_number: "4242 4242 4242 4242" }),
  });
  assert.equal(paid.status, 200, await paid.text());
  const confirmed = await client.confirmPurchase(purchase.payment_id);
  assert.equal(confirmed.status, "succeeded");
  assert.equal((await client.confirmPurchase(purchase.payment_id)).status, "succeeded");
  const after = await client.check(GOOGLE, who);
  assert.deepEqual([after.has_credit, after.credits_remaining], [true, 20]);
});

test("reserve(..., async (hold) => ...) captures what the work took; a throw releases", async () => {
  const client = billing();
  const who = user();
  const steps = await client.reserve(GOOGLE, who, { uses: 3, ttlSeconds: 60 }, async (hold) => {
    assert.equal(hold.status, "held");
    assert.equal(hold.reservation.held_uses, 3);
    assert.equal((await client.check(GOOGLE, who)).free_uses_remaining, 0);
    const charge = await hold.capture(2, { description: "agent run" });
    assert.deepEqual([charge.uses, charge.released_uses, charge.reservation_id], [2, 1, hold.reservationId]);
    await assert.rejects(client.capture(hold.reservationId, { uses: 1 }), ReservationNotHeldError);
    return 2;
  });
  assert.equal(steps, 2);
  assert.equal((await client.check(GOOGLE, who)).free_uses_remaining, 1);

  let made;
  await assert.rejects(
    client.reserve(GOOGLE, who, { uses: 1 }, async (hold) => {
      made = hold;
      throw new Error("the model failed");
    }),
    /the model failed/,
  );
  assert.equal((await client.reservation(made.reservationId)).status, "released");
  assert.equal((await client.check(GOOGLE, who)).free_uses_remaining, 1);

  // Returning without a capture releases too.
  await client.reserve(GOOGLE, who, { uses: 1 }, async () => {});
  assert.equal((await client.check(GOOGLE, who)).free_uses_remaining, 1);

  // Fewer uses than asked: the same 402 as a charge; the callback never runs.
  const refused = await client.reserve(GOOGLE, who, { uses: 5 }, async () => assert.fail("ran")).catch((e) => e);
  assert.ok(refused instanceof PurchaseRequiredError);
  assert.ok(refused.checkoutUrl);

  const page = await client.reservations({ oauthProvider: GOOGLE, externalId: who });
  assert.equal(page.reservations.length, 3);
});

test("a hold is async-disposable (`await using hold = await billing.reserve(...)`)", async () => {
  const client = billing();
  const who = user();
  assert.equal(typeof Symbol.asyncDispose, "symbol");
  {
    // What `await using` does at the end of the block, spelled out for runtimes without it.
    const hold = await client.reserve(GOOGLE, who, { uses: 2 });
    try {
      assert.equal((await client.check(GOOGLE, who)).held_uses, 2);
    } finally {
      await hold[Symbol.asyncDispose]();
    }
    assert.equal(hold.status, "released");
  }
  const hold = await client.reserve(GOOGLE, who, { uses: 2 });
  await hold.capture(1);
  await hold[Symbol.asyncDispose](); // captured: nothing more
  assert.equal(hold.status, "captured");
  const check = await client.check(GOOGLE, who);
  assert.deepEqual([check.free_uses_remaining, check.held_uses], [2, 0]);
});

test("429 and 503 are retried after Retry-After; the same key throughout", async () => {
  const front = await proxy();
  try {
    // Every check asks (checkReuseSeconds 0): the check below must reach the proxy.
    const client = new BillingClient({ baseUrl: front.url, apiKey: KEY, ...FAST, checkReuseSeconds: 0 });
    const who = user();
    front.answers.push({ status: 503, headers: { "Retry-After": "1" } }, { status: 429, headers: { "Retry-After": "0" } });
    const started = Date.now();
    const charge = await client.charge(GOOGLE, who);
    assert.ok(Date.now() - started >= 1000, "waited the Retry-After second");
    assert.equal(front.seen, 3);
    assert.equal(charge.free_uses_remaining, 2);

    // A Retry-After longer than maxBackoffMs ends the retries at once.
    front.answers.push({ status: 503, headers: { "Retry-After": "30" } });
    const gaveUp = await client.check(GOOGLE, who).catch((e) => e);
    assert.ok(gaveUp instanceof BillingUnavailableError);
    assert.equal(gaveUp.attempts, 1);
  } finally {
    await front.close();
  }
  assert.equal(retryAfterSeconds("2"), 2);
  assert.equal(retryAfterSeconds(new Date(Date.now() + 5000).toUTCString()) > 3, true);
});

test("fails closed by default when billing is unreachable", async () => {
  const front = await proxy();
  front.down = true;
  try {
    const client = new BillingClient({ baseUrl: front.url, apiKey: KEY, maxRetries: 1, backoffMs: 5, maxBackoffMs: 10 });
    const error = await client.check(GOOGLE, user()).catch((e) => e);
    assert.ok(error instanceof BillingUnavailableError);
    assert.equal(error.attempts, 2);
    await assert.rejects(client.charge(GOOGLE, user()), BillingUnavailableError);
    await assert.rejects(client.reserve(GOOGLE, user(), { uses: 1 }, async () => {}), BillingUnavailableError);
  } finally {
    await front.close();
  }
});

test("fails open within the grace period, then records the queued charge exactly once", async () => {
  const front = await proxy();
  const events = [];
  try {
    const client = new BillingClient({ baseUrl: front.url, apiKey: KEY, maxRetries: 1, backoffMs: 5, maxBackoffMs: 10, failOpenGraceSeconds: 60, onEvent: (e) => events.push(e.event) });
    const who = user();
    await client.check(GOOGLE, who); // the account exists, 3 free uses
    front.down = true;
    const check = await client.check(GOOGLE, who);
    assert.deepEqual([check.has_credit, check.degraded, check.free_uses_remaining], [true, true, null]);
    const pending = await client.charge(GOOGLE, who, { description: "while down" });
    assert.deepEqual([pending.pending, client.pendingCharges.length], [true, 1]);
    assert.ok(events.includes("billing_fail_open_check") && events.includes("billing_fail_open_charge_queued"));

    front.down = false;
    const back = await client.check(GOOGLE, who); // a success flushes the outbox
    assert.equal(back.degraded, undefined);
    assert.equal(client.pendingCharges.length, 0);
    const report = await client.flushPending();
    assert.deepEqual([report.recorded.length, report.remaining], [0, 0]);
    const charges = (await billing().transactions(GOOGLE, who)).transactions.filter((t) => t.type === "charge");
    assert.deepEqual(charges.map((t) => t.description), ["while down"]);
  } finally {
    await front.close();
  }
});

test("fail open ends after the grace period", async () => {
  const front = await proxy();
  front.down = true;
  try {
    const client = new BillingClient({ baseUrl: front.url, apiKey: KEY, maxRetries: 0, failOpenGraceSeconds: 0.2 });
    assert.equal((await client.check(GOOGLE, user())).degraded, true);
    await new Promise((resolve) => setTimeout(resolve, 300));
    await assert.rejects(client.check(GOOGLE, user()), BillingUnavailableError);
  } finally {
    await front.close();
  }
});

test("verifyWebhook accepts the service's own signed delivery and refuses a tampered one", async () => {
  const received = [];
  const receiver = http.createServer(async (req, res) => {
    const chunks = [];
    for await (const chunk of req) chunks.push(chunk);
    received.push({ headers: req.headers, body: Buffer.concat(chunks).toString("utf8") });
    res.writeHead(204).end();
  });
  await new Promise((resolve) => receiver.listen(0, "127.0.0.1", resolve));
  const url = `http://127.0.0.1:${receiver.address().port}/events`;
  const admin = { "X-API-Key": ADMIN, "Content-Type": "application/json" };
  const made = await fetch(`${BASE}/v1/billing/webhook_endpoints`, { method: "POST", headers: admin, body: JSON.stringify({ url, events: ["account.created"] }) });
  assert.equal(made.status, 201, await made.clone().text());
  const endpoint = await made.json();
  try {
    const who = user();
    await billing().check(GOOGLE, who); // creates the account: one account.created event
    const deadline = Date.now() + 30_000;
    let delivery;
    while (!(delivery = received.find((r) => r.body.includes(who))) && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
    assert.ok(delivery, "the event arrived");
    const event = await verifyWebhook(endpoint.secret, delivery.body, delivery.headers);
    assert.equal(event.type, "account.created");
    await assert.rejects(verifyWebhook(endpoint.secret, delivery.body.replace(who, "someone-else"), delivery.headers), WebhookVerificationError);
    await assert.rejects(verifyWebhook(endpoint.secret, delivery.body, delivery.headers, { now: Date.now() + 3_600_000 }), WebhookVerificationError);
    const headers = new Headers(delivery.headers);
    assert.equal((await verifyWebhook(endpoint.secret, new TextEncoder().encode(delivery.body), headers)).type, "account.created");
  } finally {
    await fetch(`${BASE}/v1/billing/webhook_endpoints/${endpoint.endpoint_id ?? endpoint.id}`, { method: "DELETE", headers: admin });
    await new Promise((resolve) => receiver.close(resolve));
  }
});

test("lots: open ones in consumption order, closed ones on asking", async () => {
  const client = billing();
  const who = user();
  const granted = await fetch(`${BASE}/v1/billing/credits`, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-API-Key": ADMIN },
    body: JSON.stringify({ oauth_provider: GOOGLE, external_id: who, uses: 4, reason: "promo", priority: 1, expires_in_days: 30 }),
  }).then((r) => r.json());
  const { lots } = await client.lots(GOOGLE, who);
  assert.deepEqual(lots.map((l) => [l.kind, l.uses_remaining, l.priority]), [["promotional", 4, 1], ["free", 3, 100]]);
  assert.equal(lots[0].lot_id, granted.lot_id);
  assert.equal(lots[0].expires_at, granted.expires_at);
  const all = await client.lots(GOOGLE, who, { include: "all" });
  assert.equal(all.lots.length, 2);
});

test("the check after a charge is answered from the charge's next_check (once, a yes only)", async () => {
  const front = await proxy();
  try {
    const client = new BillingClient({ baseUrl: front.url, apiKey: KEY, ...FAST });
    const who = user();
    await client.check(GOOGLE, who);
    const charge = await client.charge(GOOGLE, who);
    assert.equal(charge.next_check.free_uses_remaining, 2);
    assert.equal(front.seen, 2);
    const again = await client.check(GOOGLE, who);
    assert.equal(front.seen, 2); // not sent: answered from the charge
    assert.deepEqual(again, charge.next_check);
    await client.check(GOOGLE, who); // once only: this one asks
    assert.equal(front.seen, 3);
    await client.charge(GOOGLE, who);
    const emptied = await client.charge(GOOGLE, who);
    assert.equal(emptied.next_check.purchase_required, true);
    const refused = await client.check(GOOGLE, who); // a "no" is always asked again
    assert.equal(front.seen, 6);
    assert.equal(refused.purchase_required, true);
    const never = new BillingClient({ baseUrl: front.url, apiKey: KEY, ...FAST, checkReuseSeconds: 0 });
    await never.charge(GOOGLE, user());
    await never.check(GOOGLE, who);
    assert.equal(front.seen, 8);
  } finally {
    await front.close();
  }
});

test("a hold by a carry feature is captured by the quantity used", async () => {
  const rate = await fetch(`${BASE}/v1/billing/rates`, {
    method: "POST",
    headers: { "Content-Type": "application/json", "X-API-Key": ADMIN },
    body: JSON.stringify({ feature: "ts-tokens", units_per_use: 1000, rounding: "carry" }),
  });
  assert.equal(rate.status, 200, await rate.text());
  const client = billing();
  const who = user();
  const charge = await client.reserve(GOOGLE, who, { feature: "ts-tokens", quantity: 2500 }, async (hold) => {
    assert.equal(hold.reservation.uses, 3);
    return hold.capture(null, { quantity: 1200 });
  });
  assert.deepEqual([charge.uses, charge.released_uses, charge.feature, charge.quantity], [1, 2, "ts-tokens", 1200]);
});

// The billing client: fetch-based, no dependencies. The same policy as the Python client
// (clients/python): automatic idempotency keys, retries with backoff honouring Retry-After,
// fail closed by default or fail open for a grace period, holds released on throw.

import { BillingError, BillingUnavailableError, errorFor } from "./errors.js";

const RETRYABLE = new Set([429, 502, 503, 504]);
const RETRY_AFTER = new Set([429, 503]);
const CHECK = "/v1/billing/credits/check";
const CHARGES = "/v1/billing/charges";
const NEXT_CHECK = "next-check";
const MAX_NEXT_CHECKS = 10_000;
const PURCHASES = "/v1/billing/purchases";
const TRANSACTIONS = "/v1/billing/transactions";
const ACCOUNTS = "/v1/billing/accounts";
const RESERVATIONS = "/v1/billing/reservations";
export const VERSION = "0.1.0";

/** A fresh idempotency key (a UUID v4, from the runtime's Web Crypto). */
export function newIdempotencyKey() {
  return globalThis.crypto.randomUUID();
}

/** A Retry-After header (seconds or an HTTP date) in seconds; null if absent or invalid. */
export function retryAfterSeconds(value, now = Date.now()) {
  if (value === null || value === undefined) return null;
  const text = String(value).trim();
  if (/^\d+(\.\d+)?$/.test(text)) return Number(text);
  const when = Date.parse(text);
  return Number.isNaN(when) ? null : Math.max(0, (when - now) / 1000);
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const seg = (value) => encodeURIComponent(value);

function withoutUndefined(object) {
  return Object.fromEntries(Object.entries(object).filter(([, v]) => v !== undefined));
}

export class BillingClient {
  /**
   * @param {import("./index.js").ClientOptions} options
   */
  constructor({
    baseUrl,
    apiKey,
    timeoutMs = 10_000,
    maxRetries = 3,
    backoffMs = 250,
    maxBackoffMs = 10_000,
    failOpenGraceSeconds = null,
    checkReuseSeconds = 2,
    fetch: fetchImpl = globalThis.fetch,
    onEvent = null,
  }) {
    const url = new URL(baseUrl);
    if (url.protocol !== "http:" && url.protocol !== "https:") {
      throw new TypeError(`baseUrl must be an http(s) URL, not ${baseUrl}`);
    }
    if (!apiKey) throw new TypeError("apiKey is required");
    if (maxRetries < 0 || backoffMs < 0 || maxBackoffMs < 0 || !(timeoutMs > 0)) {
      throw new RangeError("timeoutMs must be > 0; maxRetries, backoffMs, maxBackoffMs >= 0");
    }
    if (failOpenGraceSeconds !== null && failOpenGraceSeconds < 0) {
      throw new RangeError("failOpenGraceSeconds must be >= 0 (or null: fail closed)");
    }
    this.baseUrl = baseUrl.replace(/\/+$/, "");
    this.timeoutMs = timeoutMs;
    this.maxRetries = maxRetries;
    this.backoffMs = backoffMs;
    this.maxBackoffMs = maxBackoffMs;
    this.failOpenGraceSeconds = failOpenGraceSeconds;
    this._fetch = fetchImpl;
    this._onEvent = onEvent;
    this._apiKey = apiKey;
    this._unreachableSince = null;
    this._outbox = new Map();
    this._inFlight = new Set();
    if (!(checkReuseSeconds >= 0)) throw new RangeError("checkReuseSeconds must be >= 0 (0: every check asks)");
    // A charge asks for the next check's answer (Prefer: next-check); the user's next check is
    // answered from it, once, within checkReuseSeconds. Only a "yes" is kept: a stale "no"
    // would stop a user who just bought. At most MAX_NEXT_CHECKS users (the oldest go first).
    this.checkReuseSeconds = checkReuseSeconds;
    this._nextChecks = new Map();
  }

  // -- state ---------------------------------------------------------------------------

  /** Charges accepted while billing was unreachable (fail open), oldest first. */
  get pendingCharges() {
    return [...this._outbox.values()];
  }

  /** Seconds since the first failure of the current outage; null while reachable. */
  get unreachableFor() {
    return this._unreachableSince === null ? null : (Date.now() - this._unreachableSince) / 1000;
  }

  _failOpenAllowed() {
    const down = this.unreachableFor;
    return this.failOpenGraceSeconds !== null && down !== null && down < this.failOpenGraceSeconds;
  }

  _event(level, name, fields) {
    if (this._onEvent) this._onEvent({ level, event: name, ...fields });
  }

  // -- one request, with retries --------------------------------------------------------

  _backoff(attempt) {
    const ceiling = Math.min(this.maxBackoffMs, this.backoffMs * 2 ** (attempt - 1));
    return ceiling / 2 + (Math.random() * ceiling) / 2;
  }

  async _send({ method, path, body, params, idempotencyKey, prefer }) {
    let url = this.baseUrl + path;
    if (params) {
      const query = new URLSearchParams(
        Object.entries(params).filter(([, v]) => v !== undefined && v !== null).map(([k, v]) => [k, String(v)]),
      );
      url += `?${query}`;
    }
    const headers = {
      "X-API-Key": this._apiKey,
      Accept: "application/json",
    };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (idempotencyKey !== undefined) headers["Idempotency-Key"] = idempotencyKey;
    if (prefer !== undefined) headers.Prefer = prefer;
    return this._fetch(url, {
      method,
      headers,
      body: body === undefined ? undefined : JSON.stringify(body),
      signal: AbortSignal.timeout(this.timeoutMs),
    });
  }

  /** Send until the answer is not transient; returns {status, headers, data}. */
  async _exchange(call, maxRetries = this.maxRetries) {
    for (let attempt = 1; ; attempt += 1) {
      let response = null;
      let problem;
      let retryAfter = null;
      try {
        response = await this._send(call);
      } catch (error) {
        problem = `${error?.name ?? "Error"}: ${error?.cause?.code ?? error?.message ?? error}`;
      }
      let reply = null;
      if (response !== null) {
        reply = await readReply(response);
        // Every call the client makes is safe to repeat (keyed or read-only): 500 too.
        if (!RETRYABLE.has(reply.status) && reply.status !== 500) {
          this._unreachableSince = null;
          return reply;
        }
        problem = `HTTP ${reply.status}`;
        if (RETRY_AFTER.has(reply.status)) retryAfter = retryAfterSeconds(reply.headers.get("retry-after"));
      }
      if (reply?.status !== 429 && this._unreachableSince === null) this._unreachableSince = Date.now();
      const tooLong = retryAfter !== null && retryAfter * 1000 > this.maxBackoffMs;
      if (attempt > maxRetries || tooLong) throw this._gaveUp(call, attempt, problem, reply);
      let delay = this._backoff(attempt);
      if (retryAfter !== null) delay = Math.max(delay, retryAfter * 1000);
      this._event("info", "billing_request_retry", { call: `${call.method} ${call.path}`, attempt, problem, delay });
      await sleep(delay);
    }
  }

  _gaveUp(call, attempts, problem, reply) {
    if (reply?.status === 429) {
      const error = errorFor(429, reply.data, reply.text);
      error.detail = `Rate limited after ${attempts} attempt(s): ${error.detail}`;
      return error;
    }
    return new BillingUnavailableError(
      `Billing unreachable for ${call.method} ${call.path} after ${attempts} attempt(s): ${problem}`,
      { attempts, status: reply?.status ?? null, body: reply && isObject(reply.data) ? reply.data : {} },
    );
  }

  /** `_exchange`, then: a 2xx flushes pending charges and is returned; else it throws. */
  async _call(call) {
    const reply = await this._exchange(call);
    if (reply.status < 200 || reply.status >= 300) throw errorFor(reply.status, reply.data, reply.text);
    if (!isObject(reply.data)) {
      throw new BillingError(`The billing service answered HTTP ${reply.status} without a JSON object`, {
        status: reply.status,
        code: "invalid_response",
      });
    }
    if (this._outbox.size) await this.flushPending({ maxRetries: 0 });
    return reply;
  }

  // -- the API --------------------------------------------------------------------------

  /** May this user go on? Fails open (degraded) only within the grace period. */
  async check(oauthProvider, externalId, { context = {}, customerEmail } = {}) {
    const body = withoutUndefined({ oauth_provider: oauthProvider, external_id: externalId, context, customer_email: customerEmail });
    const who = JSON.stringify([oauthProvider, externalId]);
    const kept = this._nextChecks.get(who);
    this._nextChecks.delete(who);
    if (kept !== undefined && (Date.now() - kept.at) / 1000 < this.checkReuseSeconds) return kept.check;
    try {
      return (await this._call({ method: "POST", path: CHECK, body })).data;
    } catch (error) {
      if (!(error instanceof BillingUnavailableError)) throw error;
      const fields = { oauthProvider, externalId, unreachableFor: this.unreachableFor, graceSeconds: this.failOpenGraceSeconds, error: error.detail };
      if (!this._failOpenAllowed()) {
        this._event("warn", "billing_fail_closed", { call: "check", ...fields });
        throw error;
      }
      this._event("warn", "billing_fail_open_check", fields);
      return {
        has_credit: true,
        purchase_required: false,
        credits_remaining: null,
        free_uses_remaining: null,
        total_uses: null,
        plan_name: null,
        reason: "billing_unreachable",
        degraded: true,
      };
    }
  }

  /** Record a use (free first, then paid). 402 throws PurchaseRequiredError. */
  async charge(oauthProvider, externalId, { uses = 1, amountMinor = 0, currency, description, metadata = {}, idempotencyKey, feature, quantity } = {}) {
    const key = idempotencyKey ?? newIdempotencyKey();
    const body = withoutUndefined({
      oauth_provider: oauthProvider,
      external_id: externalId,
      // A rated charge sends its feature and quantity instead of uses (the rate makes them uses).
      uses: feature === undefined ? uses : undefined,
      feature,
      quantity,
      amount_minor: amountMinor,
      currency,
      description,
      metadata,
    });
    let reply;
    const who = JSON.stringify([oauthProvider, externalId]);
    this._nextChecks.delete(who); // whatever this charge's outcome, an earlier answer is stale
    try {
      reply = await this._call({ method: "POST", path: CHARGES, body, idempotencyKey: key, prefer: NEXT_CHECK });
    } catch (error) {
      if (!(error instanceof BillingUnavailableError)) throw error;
      const fields = { oauthProvider, externalId, uses, idempotencyKey: key, unreachableFor: this.unreachableFor, error: error.detail };
      if (!this._failOpenAllowed()) {
        this._event("warn", "billing_fail_closed", { call: "charge", ...fields });
        throw error;
      }
      // Queued byte-for-byte as first sent: a flush under the same key replays or records once.
      this._outbox.set(key, { body, idempotencyKey: key, queuedAt: Date.now() });
      this._event("warn", "billing_fail_open_charge_queued", { ...fields, pending: this._outbox.size });
      return { ...body, idempotency_key: key, pending: true, replayed: false };
    }
    const next = reply.data.next_check;
    if (this.checkReuseSeconds > 0 && next && next.has_credit) {
      this._nextChecks.set(who, { check: next, at: Date.now() });
      if (this._nextChecks.size > MAX_NEXT_CHECKS) this._nextChecks.delete(this._nextChecks.keys().next().value);
    }
    return { ...reply.data, idempotency_key: key, pending: false, replayed: reply.headers.get("idempotent-replayed") === "true" };
  }

  /** Start buying uses: pay at `checkout_url` (or confirm `client_secret` with Stripe.js). */
  async purchase(oauthProvider, externalId, { customerEmail, idempotencyKey, packId, promotionCode } = {}) {
    const key = idempotencyKey ?? newIdempotencyKey();
    const body = withoutUndefined({
      oauth_provider: oauthProvider,
      external_id: externalId,
      customer_email: customerEmail,
      // The catalog: which pack (default: the server's default pack), and a promotion code.
      pack_id: packId,
      promotion_code: promotionCode,
    });
    const reply = await this._call({ method: "POST", path: PURCHASES, body, idempotencyKey: key });
    return { ...reply.data, idempotency_key: key };
  }

  /** A purchase as it is now (`status === "succeeded"` once its uses are credited). */
  async purchaseStatus(paymentId) {
    return (await this._call({ method: "GET", path: `${PURCHASES}/${seg(paymentId)}` })).data;
  }

  /**
   * Once the provider told the payer it succeeded: the service asks the provider and credits
   * the purchase now (once, as its webhook would); the purchase after it. Safe to repeat.
   */
  async confirmPurchase(paymentId) {
    return (await this._call({ method: "POST", path: `${PURCHASES}/${seg(paymentId)}/sync` })).data;
  }

  /** A page of the account's ledger, newest first. */
  async transactions(oauthProvider, externalId, { limit = 50, offset = 0 } = {}) {
    const params = { oauth_provider: oauthProvider, external_id: externalId, limit, offset };
    return (await this._call({ method: "GET", path: TRANSACTIONS, params })).data;
  }

  /** The account's lots: open ones in consumption order (include: "expired" adds closed). */
  async lots(oauthProvider, externalId, { include = "active" } = {}) {
    const path = `${ACCOUNTS}/${seg(oauthProvider)}/${seg(externalId)}/lots`;
    return (await this._call({ method: "GET", path, params: { include } })).data;
  }

  // -- holds (reserve before, capture after); always fail closed -------------------------

  /**
   * Hold uses for work whose cost is known only at its end.
   *   await billing.reserve(provider, id, { uses: 5 }, async (hold) => hold.capture(steps))
   * runs the callback with the hold, releases it if the callback throws or returns without
   * capturing, and returns what the callback returned. Without a callback it returns the Hold
   * (release it yourself, or `await using hold = await billing.reserve(...)`).
   */
  async reserve(oauthProvider, externalId, options = {}, fn = undefined) {
    if (typeof options === "function") [options, fn] = [{}, options];
    const hold = new Hold(this, oauthProvider, externalId, options);
    await hold._enter();
    if (fn === undefined) return hold;
    let result;
    try {
      result = await fn(hold);
    } catch (error) {
      await hold._exit(true);
      throw error;
    }
    await hold._exit(false);
    return result;
  }

  async createReservation(oauthProvider, externalId, { uses = 1, ttlSeconds = 300, metadata = {}, idempotencyKey, feature, quantity } = {}) {
    const key = idempotencyKey ?? newIdempotencyKey();
    // A hold by a feature's quantity (the rate makes it uses), or of uses.
    const held = feature === undefined ? { uses } : { feature, quantity };
    const body = { oauth_provider: oauthProvider, external_id: externalId, ...held, ttl_seconds: ttlSeconds, metadata };
    const reply = await this._call({ method: "POST", path: RESERVATIONS, body, idempotencyKey: key });
    return { ...reply.data, idempotency_key: key, replayed: reply.headers.get("idempotent-replayed") === "true" };
  }

  async capture(reservationId, { uses = null, amountMinor = 0, description = null, metadata = {}, idempotencyKey, quantity } = {}) {
    const key = idempotencyKey ?? newIdempotencyKey();
    // quantity: a hold by a `carry` feature is captured by the units the work used.
    const body = withoutUndefined({ uses, quantity, amount_minor: amountMinor, description, metadata });
    const path = `${RESERVATIONS}/${seg(reservationId)}/capture`;
    const reply = await this._call({ method: "POST", path, body, idempotencyKey: key });
    return { ...reply.data, idempotency_key: key, pending: false, replayed: reply.headers.get("idempotent-replayed") === "true" };
  }

  async release(reservationId) {
    // Safe to retry without a key: releasing a released (or expired) hold answers it as is.
    return (await this._call({ method: "POST", path: `${RESERVATIONS}/${seg(reservationId)}/release` })).data;
  }

  async reservation(reservationId) {
    return (await this._call({ method: "GET", path: `${RESERVATIONS}/${seg(reservationId)}` })).data;
  }

  async reservations({ oauthProvider, externalId, status, limit = 50, offset = 0 } = {}) {
    const params = { oauth_provider: oauthProvider, external_id: externalId, status, limit, offset };
    return (await this._call({ method: "GET", path: RESERVATIONS, params })).data;
  }

  // -- the outbox -----------------------------------------------------------------------

  /**
   * Send the queued charges, oldest first, each under its own key (recorded exactly once
   * however often this runs). Stops at the first unavailability; a charge refused for good
   * (402, 404, 409, 422, suspended) is dropped and reported; one refused for our key stays.
   */
  async flushPending({ maxRetries } = {}) {
    const batch = [...this._outbox.values()].filter((c) => !this._inFlight.has(c.idempotencyKey));
    for (const queued of batch) this._inFlight.add(queued.idempotencyKey);
    const recorded = [];
    const dropped = [];
    let error = null;
    try {
      for (const queued of batch) {
        let reply;
        try {
          reply = await this._exchange({ method: "POST", path: CHARGES, body: queued.body, idempotencyKey: queued.idempotencyKey }, maxRetries);
        } catch (caught) {
          error = caught;
          break;
        }
        if (reply.status >= 200 && reply.status < 300) {
          this._outbox.delete(queued.idempotencyKey);
          recorded.push({ ...reply.data, idempotency_key: queued.idempotencyKey, pending: false, replayed: reply.headers.get("idempotent-replayed") === "true" });
          this._event("info", "billing_pending_charge_recorded", { idempotencyKey: queued.idempotencyKey });
          continue;
        }
        const refused = errorFor(reply.status, reply.data, reply.text);
        if (reply.status >= 500 || reply.status === 401 || (reply.status === 403 && refused.code !== "account_suspended")) {
          error = refused;
          break;
        }
        this._outbox.delete(queued.idempotencyKey);
        dropped.push({ charge: queued, error: refused });
        this._event("error", "billing_pending_charge_dropped", { idempotencyKey: queued.idempotencyKey, error: refused.code });
      }
    } finally {
      for (const queued of batch) this._inFlight.delete(queued.idempotencyKey);
    }
    return { recorded, dropped, remaining: this._outbox.size, error };
  }

  /** A last flush of pending charges; what could not be sent is reported. */
  async close() {
    if (!this._outbox.size) return;
    const report = await this.flushPending();
    if (report.remaining) {
      this._event("error", "billing_pending_charges_lost", { count: report.remaining, idempotencyKeys: this.pendingCharges.map((c) => c.idempotencyKey) });
    }
  }

  async [Symbol.asyncDispose ?? Symbol.for("Symbol.asyncDispose")]() {
    await this.close();
  }
}

/** One hold: `capture()` what the work took (once), or `release()`; disposable. */
export class Hold {
  constructor(client, oauthProvider, externalId, { uses = 1, ttlSeconds = 300, metadata = {}, idempotencyKey, feature, quantity } = {}) {
    this.client = client;
    this.oauthProvider = oauthProvider;
    this.externalId = externalId;
    this.uses = uses;
    this.feature = feature;
    this.quantity = quantity;
    this.ttlSeconds = ttlSeconds;
    this.metadata = metadata;
    // Made once: every send of the reserve and of the capture reuses its key, so a lost
    // answer never makes two holds or two charges.
    this.idempotencyKey = idempotencyKey ?? newIdempotencyKey();
    this.captureKey = newIdempotencyKey();
    this.reservation = null;
    this.charge = null;
    this.released = null;
    this._unsettled = null;
  }

  get reservationId() {
    return this.reservation?.reservation_id ?? null;
  }

  get expiresAt() {
    return this.reservation?.expires_at ?? null;
  }

  get status() {
    if (this.reservation === null) return "new";
    if (this.charge !== null) return "captured";
    if (this.released !== null) return this.released.status;
    return "held";
  }

  async _enter() {
    this.reservation = await this.client.createReservation(this.oauthProvider, this.externalId, {
      uses: this.uses,
      ttlSeconds: this.ttlSeconds,
      metadata: this.metadata,
      idempotencyKey: this.idempotencyKey,
      feature: this.feature,
      quantity: this.quantity,
    });
    this.client._event("info", "billing_hold_made", { reservationId: this.reservationId, uses: this.uses });
    return this;
  }

  /** Charge `uses` (at most the held ones; all when null) as one charge; the rest go back. */
  async capture(uses = null, { description = null, metadata = {}, amountMinor = 0, quantity } = {}) {
    const asked = { uses, description, metadata, amountMinor, quantity };
    this._unsettled = asked;
    try {
      this.charge = await this.client.capture(this.reservationId, { ...asked, idempotencyKey: this.captureKey });
    } catch (error) {
      // A definite refusal charged nothing; anything else may have (sent again on exit).
      if (error.status !== null && error.status >= 400 && error.status < 500 && error.status !== 429) this._unsettled = null;
      throw error;
    }
    this._unsettled = null;
    return this.charge;
  }

  /** Give all the held uses back now (idempotent). */
  async release() {
    this.released = await this.client.release(this.reservationId);
    return this.released;
  }

  async _exit(threw) {
    if (this.reservation === null || this.charge !== null || this.released !== null) return;
    if (!threw && this._unsettled !== null) {
      await this.capture(this._unsettled.uses, this._unsettled);
      return;
    }
    try {
      await this.release();
    } catch (error) {
      // The service releases the hold by itself at expires_at.
      this.client._event("warn", "billing_hold_release_failed", { reservationId: this.reservationId, error: error.code, expiresAt: this.expiresAt });
      return;
    }
    this.client._event("info", "billing_hold_released", { reservationId: this.reservationId, because: threw ? "exception" : "not_captured" });
  }

  async [Symbol.asyncDispose ?? Symbol.for("Symbol.asyncDispose")]() {
    await this._exit(false);
  }
}

function isObject(value) {
  return value !== null && typeof value === "object" && !Array.isArray(value);
}

async function readReply(response) {
  const text = await response.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  return { status: response.status, headers: response.headers, data, text };
}

// What the client throws. Every error carries the HTTP `status` (null when no response came),
// the service's stable error `code`, a human `detail`, and the JSON error `body`.

export class BillingError extends Error {
  constructor(detail, { status = null, code = "billing_error", body = {} } = {}) {
    super(`${code} (${status === null ? "no response" : `HTTP ${status}`}): ${detail}`);
    this.name = new.target.name;
    this.detail = detail;
    this.status = status;
    this.code = code;
    this.body = body ?? {};
  }
}

/** 401/403: the API key is missing, unknown, revoked, or lacks the scope for this call. */
export class AuthenticationError extends BillingError {}

/** 403 `account_suspended`: the account may not be charged. */
export class AccountSuspendedError extends BillingError {}

/** 404: no such account, purchase or reservation. */
export class NotFoundError extends BillingError {}

/** 409: the idempotency key was already used for a different request. */
export class IdempotencyConflictError extends BillingError {}

/** 409 on a hold: no longer held (captured or released) or past its time. */
export class ReservationStateError extends BillingError {}

/** 409 `reservation_expired`: past `expires_at`; its uses went back to the account. */
export class ReservationExpiredError extends ReservationStateError {}

/** 409 `reservation_not_held`: the hold was already captured or released. */
export class ReservationNotHeldError extends ReservationStateError {}

/**
 * 402: no free or paid use left (a charge), or fewer than asked (a hold). `offer` is what one
 * purchase buys, `offers` every pack on sale (the one offer when the service lists none),
 * `checkoutUrl` the page where the user can pay, `portalUrl` the user's own page.
 */
export class PurchaseRequiredError extends BillingError {
  constructor(detail, { offer, offers, checkoutUrl = null, portalUrl = null, status = 402, code = "purchase_required", body = {} }) {
    super(detail, { status, code, body });
    this.offer = offer;
    this.offers = offers ?? [offer];
    this.checkoutUrl = checkoutUrl;
    this.portalUrl = portalUrl;
  }
}

/** Billing could not be reached: connection errors, timeouts or 5xx on every attempt. */
export class BillingUnavailableError extends BillingError {
  constructor(detail, { attempts, status = null, code = "billing_unavailable", body = {} }) {
    super(detail, { status, code, body });
    this.attempts = attempts;
  }
}

/** A webhook whose signature, timestamp or headers do not verify. */
export class WebhookVerificationError extends Error {
  constructor(message) {
    super(message);
    this.name = "WebhookVerificationError";
  }
}

function offerFrom(body) {
  const { purchase_price_minor: priceMinor, purchase_uses: uses, currency } = body;
  if (!Number.isInteger(priceMinor) || !Number.isInteger(uses) || typeof currency !== "string") {
    return null;
  }
  return { priceMinor, uses, currency };
}

/** The error for a non-2xx answer, from the service's `{"error", "detail"}` body. */
export function errorFor(status, body, text) {
  const data = body !== null && typeof body === "object" && !Array.isArray(body) ? body : {};
  const code = typeof data.error === "string" ? data.error : `http_${status}`;
  const detail = typeof data.detail === "string" ? data.detail : (text || "").slice(0, 200) || `HTTP ${status}`;
  const options = { status, code, body: data };
  if (status === 402 && code === "purchase_required") {
    const offer = offerFrom(data);
    if (offer !== null) {
      const offers = Array.isArray(data.offers)
        ? data.offers.map((o) => ({ priceMinor: o.price_minor, uses: o.uses, currency: o.currency, ...o }))
        : undefined;
      return new PurchaseRequiredError(detail, {
        ...options,
        offer,
        offers,
        checkoutUrl: typeof data.checkout_url === "string" ? data.checkout_url : null,
        portalUrl: typeof data.portal_url === "string" ? data.portal_url : null,
      });
    }
  }
  if (status === 403 && code === "account_suspended") return new AccountSuspendedError(detail, options);
  if (status === 401 || status === 403) return new AuthenticationError(detail, options);
  if (status === 404) return new NotFoundError(detail, options);
  if (status === 409 && code === "reservation_expired") return new ReservationExpiredError(detail, options);
  if (status === 409 && code === "reservation_not_held") return new ReservationNotHeldError(detail, options);
  if (status === 409) return new IdempotencyConflictError(detail, options);
  return new BillingError(detail, options);
}

// @ciris/billing: types written by hand, for src/*.js (plain ESM, no build step).
// The API's shapes below carry `@schema Name`: tests/client/test_typescript_types.py compares
// each with components.schemas.Name in the service's /openapi.json (field names, optional or
// not, types), so they cannot drift apart silently.

// ---- the API's answers (snake_case, as the service sends them) -------------------------

/** @schema CreditCheckOut */
export interface CreditCheckOut {
  has_credit: boolean;
  credits_remaining: number;
  plan_name: string;
  reason: string | null;
  free_uses_remaining: number;
  total_uses: number;
  held_uses: number;
  purchase_required: boolean;
  purchase_price_minor?: number | null;
  purchase_uses?: number | null;
  next_expiry: NextExpiryOut | null;
  portal_url: string;
}

/** @schema NextExpiryOut */
export interface NextExpiryOut {
  uses: number;
  expires_at: string;
}

/** @schema LotUseOut */
export interface LotUseOut {
  lot_id: string;
  uses: number;
}

/** A check while billing was unreachable and the client failed open: counts are null. */
export interface DegradedCheck {
  has_credit: true;
  purchase_required: false;
  credits_remaining: null;
  free_uses_remaining: null;
  total_uses: null;
  plan_name: null;
  reason: "billing_unreachable";
  degraded: true;
}

/** @schema ChargeOut */
export interface ChargeOut {
  charge_id: string;
  account_id: string;
  oauth_provider: string;
  external_id: string;
  uses: number;
  free_uses_used: number;
  paid_uses_used: number;
  amount_minor: number;
  currency: string;
  description: string | null;
  metadata: Record<string, unknown>;
  free_uses_remaining: number;
  credits_remaining: number;
  balance_minor: number;
  total_uses: number;
  plan_name: string;
  created_at: string;
  lots: LotUseOut[];
  /** A rated charge's feature and quantity (charged by `feature` and `quantity`). */
  feature?: string | null;
  quantity?: number | null;
  /** What the user's next credit check answers, right after this charge (the client asks with
   * `Prefer: next-check` and answers that check from it; absent on a replay). */
  next_check?: CreditCheckOut | null;
}

/** @schema ReservationCaptureOut */
export interface ReservationCaptureOut extends ChargeOut {
  reservation_id: string;
  status: "captured";
  released_uses: number;
  held_uses: number;
}

/** What the client adds to a charge: its key, and whether the service replayed it. */
export interface ChargeMeta {
  idempotency_key: string;
  replayed: boolean;
  /** True when billing was unreachable and the charge waits in the outbox (fail open). */
  pending: boolean;
}

export type Charge = (ChargeOut & ChargeMeta & { pending: false }) | PendingCharge;

/** A charge accepted while billing was unreachable: the server's fields come once flushed. */
export interface PendingCharge extends ChargeMeta {
  pending: true;
  oauth_provider: string;
  external_id: string;
  uses: number;
  amount_minor: number;
  currency?: string;
  description?: string;
  metadata: Record<string, unknown>;
}

/** @schema PurchaseOut */
export interface PurchaseOut {
  purchase_id: string;
  payment_id: string;
  client_secret?: string | null;
  amount_minor: number;
  currency: string;
  uses_purchased: number;
  pack_id?: string | null;
  promotion_code?: string | null;
  status: string;
  provider: string;
  publishable_key?: string | null;
  checkout_url?: string | null;
  portal_url?: string | null;
  account_id?: string | null;
  credited?: boolean | null;
  failure_message?: string | null;
  created_at?: string | null;
  updated_at?: string | null;
}

/** @schema ReservationOut */
export interface ReservationOut {
  reservation_id: string;
  account_id: string;
  oauth_provider: string;
  external_id: string;
  status: "held" | "captured" | "released" | "expired";
  uses: number;
  captured_uses: number | null;
  charge_id: string | null;
  expires_at: string;
  metadata: Record<string, unknown>;
  held_uses: number;
  free_uses_remaining: number;
  credits_remaining: number;
  total_uses: number;
  created_at: string;
  [field: string]: unknown;
}

/** @schema ReservationsOut */
export interface ReservationsOut {
  reservations: ReservationOut[];
  limit: number;
  offset: number;
}

/** @schema TransactionOut */
export interface TransactionOut {
  transaction_id: string;
  type: "charge" | "credit";
  kind: string;
  free_uses_delta: number;
  paid_uses_delta: number;
  amount_minor: number;
  currency: string;
  description: string | null;
  external_transaction_id: string | null;
  created_at: string;
}

/** @schema TransactionsOut */
export interface TransactionsOut {
  account_id: string;
  transactions: TransactionOut[];
  total: number;
  limit: number;
  offset: number;
  has_more: boolean;
}

/** @schema LotOut */
export interface LotOut {
  lot_id: string;
  kind: "free" | "promotional" | "paid";
  uses_granted: number;
  uses_remaining: number;
  priority: number;
  expires_at: string | null;
  source: string;
  created_at: string;
  status: "active" | "expired" | "voided" | "used" | "erased";
  cost_basis_minor: number | null;
  closed_at: string | null;
}

/** @schema LotsOut */
export interface LotsOut {
  lots: LotOut[];
}

/** @schema FieldError */
export interface FieldError {
  field: string;
  message: string;
  type: string | null;
}

/** @schema ErrorOut */
export interface ErrorOut {
  error: string;
  detail: string;
  errors?: FieldError[] | null;
  [field: string]: unknown;
}

/** @schema PurchaseRequiredOut */
export interface PurchaseRequiredOut {
  error: "purchase_required";
  detail: string;
  purchase_required: boolean;
  purchase_price_minor: number;
  purchase_uses: number;
  currency: string;
  free_uses_remaining: number;
  credits_remaining: number;
  held_uses: number;
  uses_requested: number;
  checkout_url: string;
  portal_url: string;
  /** The packs the account's plan may buy (GET /v1/billing/packs fields). */
  offers?: Record<string, unknown>[];
  [field: string]: unknown;
}

// ---- the client -------------------------------------------------------------------------

export interface BillingEvent {
  level: "info" | "warn" | "error";
  /** billing_request_retry, billing_fail_open_check, billing_fail_open_charge_queued,
   * billing_fail_closed, billing_pending_charge_recorded, billing_pending_charge_dropped,
   * billing_hold_made, billing_hold_released, billing_hold_release_failed, ... */
  event: string;
  [field: string]: unknown;
}

export interface ClientOptions {
  baseUrl: string;
  apiKey: string;
  /** One attempt's timeout (default 10 000). */
  timeoutMs?: number;
  /** Retries after the first attempt (default 3), on network errors, timeouts, 429, 5xx. */
  maxRetries?: number;
  /** First backoff (default 250), doubling, with jitter, capped at maxBackoffMs (10 000). A
   * Retry-After longer than maxBackoffMs ends the retries. */
  backoffMs?: number;
  maxBackoffMs?: number;
  /** null (default): fail closed. N: when billing is unreachable, checks pass (degraded) and
   * charges are queued for N seconds from the first failure; then fail closed again. */
  failOpenGraceSeconds?: number | null;
  /** Seconds (default 2; 0: never) for which the user's next check is answered from the last
   * charge's `next_check` (once, and only a "yes"), instead of asking the service again. */
  checkReuseSeconds?: number;
  /** Another fetch (default globalThis.fetch). */
  fetch?: typeof fetch;
  /** Told of retries, fail-open decisions, holds (no secrets in them). */
  onEvent?: ((event: BillingEvent) => void) | null;
}

export interface ReserveOptions {
  uses?: number;
  ttlSeconds?: number;
  metadata?: Record<string, unknown>;
  idempotencyKey?: string;
  /** Hold by a feature's rate instead of uses (both or neither). */
  feature?: string;
  quantity?: number;
}

export interface CaptureOptions {
  description?: string | null;
  metadata?: Record<string, unknown>;
  amountMinor?: number;
  /** A hold by a `carry` feature: the units the work used (default: all held). */
  quantity?: number;
}

export interface FlushReport {
  recorded: (ChargeOut & ChargeMeta)[];
  dropped: { charge: { body: Record<string, unknown>; idempotencyKey: string; queuedAt: number }; error: BillingError }[];
  remaining: number;
  error: BillingError | null;
}

export declare const VERSION: string;
export declare function newIdempotencyKey(): string;
export declare function retryAfterSeconds(value: string | null | undefined, now?: number): number | null;

export declare class BillingClient {
  constructor(options: ClientOptions);
  readonly baseUrl: string;
  readonly pendingCharges: { body: Record<string, unknown>; idempotencyKey: string; queuedAt: number }[];
  readonly unreachableFor: number | null;

  check(
    oauthProvider: string,
    externalId: string,
    options?: { context?: Record<string, unknown>; customerEmail?: string },
  ): Promise<CreditCheckOut | DegradedCheck>;
  charge(
    oauthProvider: string,
    externalId: string,
    options?: {
      uses?: number;
      amountMinor?: number;
      currency?: string;
      description?: string;
      metadata?: Record<string, unknown>;
      idempotencyKey?: string;
      /** A rated charge: `quantity` units of `feature` instead of `uses`. */
      feature?: string;
      quantity?: number;
    },
  ): Promise<Charge>;
  purchase(
    oauthProvider: string,
    externalId: string,
    options?: { customerEmail?: string; idempotencyKey?: string; packId?: string; promotionCode?: string },
  ): Promise<PurchaseOut & { idempotency_key: string }>;
  purchaseStatus(paymentId: string): Promise<PurchaseOut>;
  /** After the payer's provider said succeeded: credited now, once (as its webhook would). */
  confirmPurchase(paymentId: string): Promise<PurchaseOut>;
  transactions(
    oauthProvider: string,
    externalId: string,
    options?: { limit?: number; offset?: number },
  ): Promise<TransactionsOut>;
  /** Open lots in consumption order; `include: "expired"` (or "all") adds the closed ones. */
  lots(
    oauthProvider: string,
    externalId: string,
    options?: { include?: "active" | "expired" | "all" },
  ): Promise<LotsOut>;

  /** Runs `fn` with the hold; releases it if `fn` throws or returns without capturing. */
  reserve<T>(oauthProvider: string, externalId: string, options: ReserveOptions, fn: (hold: Hold) => Promise<T>): Promise<T>;
  reserve<T>(oauthProvider: string, externalId: string, fn: (hold: Hold) => Promise<T>): Promise<T>;
  /** The hold itself: `await using hold = await billing.reserve(...)`, or release it yourself. */
  reserve(oauthProvider: string, externalId: string, options?: ReserveOptions): Promise<Hold>;

  createReservation(
    oauthProvider: string,
    externalId: string,
    options?: ReserveOptions,
  ): Promise<ReservationOut & { idempotency_key: string; replayed: boolean }>;
  capture(
    reservationId: string,
    options?: CaptureOptions & { uses?: number | null; idempotencyKey?: string },
  ): Promise<ReservationCaptureOut & ChargeMeta>;
  release(reservationId: string): Promise<ReservationOut>;
  reservation(reservationId: string): Promise<ReservationOut>;
  reservations(options?: {
    oauthProvider?: string;
    externalId?: string;
    status?: ReservationOut["status"];
    limit?: number;
    offset?: number;
  }): Promise<ReservationsOut>;

  flushPending(options?: { maxRetries?: number }): Promise<FlushReport>;
  /** A last flush of pending charges. */
  close(): Promise<void>;
  [Symbol.asyncDispose](): Promise<void>;
}

export declare class Hold {
  readonly client: BillingClient;
  readonly uses: number;
  readonly idempotencyKey: string;
  readonly captureKey: string;
  readonly reservation: (ReservationOut & { idempotency_key: string; replayed: boolean }) | null;
  readonly charge: (ReservationCaptureOut & ChargeMeta) | null;
  readonly released: ReservationOut | null;
  readonly reservationId: string | null;
  readonly expiresAt: string | null;
  readonly status: "new" | "held" | "captured" | "released" | "expired";
  /** Charge `uses` (at most the held ones; all when null) as one charge; the rest go back. */
  capture(uses?: number | null, options?: CaptureOptions): Promise<ReservationCaptureOut & ChargeMeta>;
  release(): Promise<ReservationOut>;
  /** Leaving an `await using` scope: released unless captured. */
  [Symbol.asyncDispose](): Promise<void>;
}

// ---- errors -----------------------------------------------------------------------------

export declare class BillingError extends Error {
  constructor(detail: string, options?: { status?: number | null; code?: string; body?: Record<string, unknown> });
  readonly detail: string;
  readonly status: number | null;
  readonly code: string;
  readonly body: ErrorOut | Record<string, unknown>;
}
export declare class AuthenticationError extends BillingError {}
export declare class AccountSuspendedError extends BillingError {}
export declare class NotFoundError extends BillingError {}
export declare class IdempotencyConflictError extends BillingError {}
export declare class ReservationStateError extends BillingError {}
export declare class ReservationExpiredError extends ReservationStateError {}
export declare class ReservationNotHeldError extends ReservationStateError {}

export interface Offer {
  priceMinor: number;
  uses: number;
  currency: string;
  [field: string]: unknown;
}

/** 402: no use left (a charge) or fewer than asked (a hold). */
export declare class PurchaseRequiredError extends BillingError {
  readonly status: 402;
  readonly body: PurchaseRequiredOut;
  /** What one purchase buys. */
  readonly offer: Offer;
  /** Every pack on sale (the one offer when the service lists none). */
  readonly offers: Offer[];
  /** The page where the user can pay (a signed link, 24 h). */
  readonly checkoutUrl: string | null;
  /** The user's own page: balance, usage history, receipts. */
  readonly portalUrl: string | null;
}

/** Billing unreachable: network errors, timeouts or 5xx on every attempt. */
export declare class BillingUnavailableError extends BillingError {
  readonly attempts: number;
}

export declare class WebhookVerificationError extends Error {}

/** An outgoing event as delivered (Standard Webhooks). */
export interface WebhookEvent {
  type: string;
  timestamp: string;
  data: Record<string, unknown>;
}

/**
 * Verify a delivery (Standard Webhooks: webhook-id, webhook-timestamp, webhook-signature) on
 * its raw body and return the event; throws WebhookVerificationError otherwise.
 */
export declare function verifyWebhook(
  secret: string,
  body: string | Uint8Array,
  headers: Headers | Record<string, string | string[] | undefined>,
  options?: { toleranceSeconds?: number; now?: number },
): Promise<WebhookEvent>;

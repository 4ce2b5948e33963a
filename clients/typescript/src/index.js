// @ciris/billing: the CIRIS Billing API client for JavaScript and TypeScript. No dependencies.
export { BillingClient, Hold, VERSION, newIdempotencyKey, retryAfterSeconds } from "./client.js";
export {
  AccountSuspendedError,
  AuthenticationError,
  BillingError,
  BillingUnavailableError,
  IdempotencyConflictError,
  NotFoundError,
  PurchaseRequiredError,
  ReservationExpiredError,
  ReservationNotHeldError,
  ReservationStateError,
  WebhookVerificationError,
} from "./errors.js";
export { verifyWebhook } from "./webhooks.js";

// The payment page's script (served same-origin: the page's CSP allows no inline script).
//
// The client secret comes from the URL fragment (#cs=...), which browsers never send to a
// server. It leaves this page only in the X-Client-Secret header of the summary request, in
// the body of the sandbox's confirm/authenticate requests, and to Stripe.js in Stripe mode.
// It is never written into the page. Card expiry, CVC and ZIP are checked here and never sent.
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const SECTIONS = [
    "loading", "invalid", "offer", "auto-topup-box", "sandbox-pay", "stripe-pay",
    "busy", "auth", "declined", "success", "failure",
  ];
  const PAYMENT_ID = /^[A-Za-z0-9_]{1,255}$/;
  const mode = document.body.dataset.provider === "stripe" ? "stripe" : "sandbox";

  let secret = null;
  let paymentId = null;
  let base = "";  // "/v1/billing", or whatever prefix the service is mounted under
  let summary = null;
  let stripe = null;
  let elements = null;

  // --- small helpers -------------------------------------------------------------------

  function show(...ids) {
    for (const id of SECTIONS) $(id).hidden = !ids.includes(id);
  }

  function plural(n, word) {
    return `${n} ${word}${n === 1 ? "" : "s"}`;
  }

  function balanceText(s, lead) {
    return `${lead} ${plural(s.free_uses_remaining, "free use")} and ` +
      `${plural(s.credits_remaining, "paid use")} left.`;
  }

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  class HttpError extends Error {
    constructor(status, detail) {
      super(detail || `HTTP ${status}`);
      this.status = status;
    }
  }

  async function request(url, options) {
    const response = await fetch(url, {
      cache: "no-store",
      credentials: "omit",
      referrerPolicy: "no-referrer",
      ...options,
      headers: { Accept: "application/json", ...(options.headers || {}) },
    });
    let body = {};
    try {
      body = await response.json();
    } catch (_) {
      body = {};
    }
    return { status: response.status, body };
  }

  function postJson(url, payload) {
    return request(url, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(payload),
    });
  }

  // --- where we are ----------------------------------------------------------------------

  function readLocation() {
    const marker = "/checkout/";
    const path = location.pathname.replace(/\/+$/, "");
    const at = path.lastIndexOf(marker);
    if (at < 0) return false;
    base = path.slice(0, at);
    try {
      paymentId = decodeURIComponent(path.slice(at + marker.length));
    } catch (_) {
      return false;
    }
    secret = new URLSearchParams(location.hash.slice(1)).get("cs");
    const query = new URLSearchParams(location.search);
    if (query.has("payment_intent_client_secret") || query.has("payment_intent")) {
      // Back from a Stripe redirect: Stripe put the secret in the query string. Take it, and
      // move it back into the fragment so it is not kept in history or sent on a reload.
      secret = secret || query.get("payment_intent_client_secret");
      const fragment = secret ? `#cs=${encodeURIComponent(secret)}` : "";
      history.replaceState(null, "", location.pathname + fragment);
    }
    return Boolean(secret) && PAYMENT_ID.test(paymentId);
  }

  const summaryUrl = () => `${base}/checkout/${encodeURIComponent(paymentId)}/summary`;
  const syncUrl = () => `${base}/checkout/${encodeURIComponent(paymentId)}/sync`;
  const sandboxUrl = (action) =>
    `${base}/sandbox/payment_intents/${encodeURIComponent(paymentId)}/${action}`;

  async function loadSummary() {
    const { status, body } = await request(summaryUrl(), {
      headers: { "X-Client-Secret": secret },
    });
    if (status !== 200) throw new HttpError(status, body.detail);
    summary = body;
    return body;
  }

  // The provider said "succeeded": the service asks it too and credits the purchase now, as
  // its webhook would (a webhook lost to a fault no longer makes the payer wait); the summary.
  async function syncSummary() {
    const { status, body } = await request(syncUrl(), {
      method: "POST",
      headers: { "X-Client-Secret": secret },
    });
    if (status !== 200) throw new HttpError(status, body.detail);
    summary = body;
    return body;
  }

  // --- states ----------------------------------------------------------------------------

  function showInvalid(detail) {
    if (detail) $("invalid-detail").textContent = detail;
    show("invalid");
  }

  function showFailure(detail) {
    $("failure-detail").textContent = detail;
    show("failure");
  }

  function showError(error) {
    if (error instanceof HttpError && error.status === 404) return showInvalid();
    if (error instanceof HttpError) {
      return showFailure(`${error.message} (HTTP ${error.status}). Try again in a moment.`);
    }
    return showFailure(
      "Could not reach the payment service. Check your connection and try again; " +
      "you will not be charged twice."
    );
  }

  function showBusy(text) {
    $("busy-text").textContent = text;
    show("offer", "busy");
  }

  function renderOffer(s) {
    $("offer-title").textContent = `Buy ${plural(s.uses, "use")} for ${s.price}`;
    $("balance").textContent = balanceText(s, "You have");
    $("pay-button").textContent = `Pay ${s.price}`;
    $("stripe-pay-button").textContent = `Pay ${s.price}`;
    // The account's other packs (the catalog), each a link that starts its own purchase.
    const others = (s.offers || []).filter((o) => o.pack_id !== s.pack_id);
    const list = $("other-packs-list");
    list.replaceChildren(
      ...others.map((o) => {
        const item = document.createElement("li");
        const link = document.createElement("a");
        link.href = o.buy_url;
        link.textContent = `${o.name}: ${plural(o.uses, "use")} for ${o.price}`;
        item.append(link);
        return item;
      }),
    );
    $("other-packs").hidden = others.length === 0;
    // Whose uses these are: the payer sees it before paying (a link may come from anyone).
    $("account-line").textContent = `The uses go to the account ${s.account_label}.`;
    // The pack's real size and what ticking the box agrees to. The box itself starts (and
    // stays) unticked until the payer ticks it: nothing the server holds sets it.
    const t = s.auto_topup;
    $("auto-topup-label").textContent =
      `Top up ${plural(t.uses, "use")} automatically when I run low`;
    $("auto-topup-terms").textContent =
      `If you tick this, your card will be charged ${t.price} automatically for ` +
      `${plural(t.uses, "use")} on the account ${s.account_label} each time fewer than ` +
      `${plural(t.threshold_uses, "use")} are left, at most ${t.max_per_month} times a month.`;
  }

  // The payer's consent to keep the card, sent with the confirmation itself.
  const saveCard = () => $("auto-topup").checked;

  function showPayForm() {
    if (mode === "stripe") {
      show("offer", "auto-topup-box", "stripe-pay");  // visible: Stripe sizes it right
      if (!ensureStripe()) return;
      setStripeBusy(false);
      return;
    }
    setSandboxBusy(false);
    show("offer", "auto-topup-box", "sandbox-pay");
    $("card-number").focus();
  }

  function showDeclined(detail) {
    $("declined-detail").textContent = detail || "Your card was declined.";
    show("offer", "declined");
    $("try-again").focus();
  }

  function showAuth() {
    $("auth-fail").hidden = mode === "stripe";  // with Stripe, the bank's own dialog decides
    $("auth-complete").disabled = false;
    $("auth-fail").disabled = false;
    show("offer", "auth");
    $("auth-complete").focus();
  }

  function showSuccess(alreadyPaid) {
    const uses = plural(summary.uses, "use");
    $("success-title").textContent = alreadyPaid
      ? `This purchase is complete — ${uses} added`
      : `Payment successful — ${uses} added`;
    $("success-balance").textContent = "Updating your balance…";
    show("success");
    if (summary.credited) {
      $("success-balance").textContent = balanceText(summary, "You now have");
    } else {
      waitForCredit();
    }
  }

  // After the provider says "succeeded", the service confirms it with the provider and
  // credits the uses (or its webhook did already): ask until the purchase says so.
  async function waitForCredit() {
    const started = Date.now();
    let delay = 300;
    while (Date.now() - started < 60000) {
      try {
        const s = await syncSummary();
        if (s.credited || s.status === "succeeded") {
          $("success-balance").textContent = balanceText(s, "You now have");
          return;
        }
      } catch (_) {
        // keep trying: the payment itself has succeeded
      }
      await sleep(delay);
      delay = Math.min(delay * 1.5, 5000);
    }
    $("success-balance").textContent =
      "Your payment went through; the uses will show up in a minute. You can close this page.";
  }

  async function waitWhileProcessing() {
    showBusy("Your payment is processing…");
    const started = Date.now();
    let delay = 1000;
    while (Date.now() - started < 120000) {
      await sleep(delay);
      delay = Math.min(delay * 1.5, 5000);
      try {
        const s = await loadSummary();
        if (s.payment_status !== "processing") return route(s);
      } catch (_) {
        // try again
      }
    }
    showFailure("Your payment is still processing. Reload this page later to see the result.");
  }

  function onPaymentStatus(status, failureMessage) {
    switch (status) {
      case "succeeded":
        return showSuccess(false);
      case "requires_action":
        return showAuth();
      case "processing":
        return waitWhileProcessing();
      case "requires_payment_method":
        return showDeclined(failureMessage || "The payment did not go through.");
      case "canceled":
        return showInvalid("This payment was canceled. Ask for a new link.");
      default:
        return showFailure(`Unexpected payment status: ${status}. Reload this page.`);
    }
  }

  // The page as the summary says it should be now.
  function route(s) {
    renderOffer(s);
    if (s.credited || s.status === "succeeded") return showSuccess(true);
    switch (s.payment_status) {
      case "succeeded":
        return showSuccess(false);
      case "processing":
        return waitWhileProcessing();
      case "canceled":
        return showInvalid("This payment was canceled. Ask for a new link.");
      case "requires_action":
        if (mode === "stripe" && !ensureStripe()) return undefined;
        return showAuth();
      default:
        return showPayForm();
    }
  }

  // --- sandbox: the plain card form ------------------------------------------------------

  const digitsOf = (value) => value.replace(/\D/g, "");

  function luhn(digits) {
    let sum = 0;
    for (let i = 0; i < digits.length; i++) {
      let d = Number(digits[digits.length - 1 - i]);
      if (i % 2 === 1) {
        d *= 2;
        if (d > 9) d -= 9;
      }
      sum += d;
    }
    return sum % 10 === 0;
  }

  function cardProblem() {
    const number = $("card-number").value;
    const digits = digitsOf(number);
    if (/[^\d\s-]/.test(number) || digits.length < 12 || digits.length > 19 || !luhn(digits)) {
      return ["card-number", "Check the card number."];
    }
    const expiry = /^\s*(\d{1,2})\s*\/?\s*(\d{2}|\d{4})\s*$/.exec($("card-expiry").value);
    if (!expiry) return ["card-expiry", "Enter the expiry date as MM / YY."];
    const month = Number(expiry[1]);
    let year = Number(expiry[2]);
    if (year < 100) year += 2000;
    if (month < 1 || month > 12) return ["card-expiry", "Check the expiry month."];
    const now = new Date();
    if (year < now.getFullYear() || (year === now.getFullYear() && month < now.getMonth() + 1)) {
      return ["card-expiry", "This card has expired."];
    }
    if (!/^\d{3,4}$/.test($("card-cvc").value.trim())) {
      return ["card-cvc", "Enter the 3 or 4 digit CVC."];
    }
    if (!/^[A-Za-z0-9][A-Za-z0-9 -]{1,9}$/.test($("card-zip").value.trim())) {
      return ["card-zip", "Enter your ZIP or postal code."];
    }
    return null;
  }

  function showCardProblem(field, message) {
    for (const id of ["card-number", "card-expiry", "card-cvc", "card-zip"]) {
      $(id).removeAttribute("aria-invalid");
    }
    const problem = $("card-problem");
    if (!field) {
      problem.hidden = true;
      problem.textContent = "";
      return;
    }
    $(field).setAttribute("aria-invalid", "true");
    problem.textContent = message;
    problem.hidden = false;
    $(field).focus();
  }

  function setSandboxBusy(busy) {
    $("pay-button").disabled = busy;
    $("pay-button").textContent = busy ? "Processing…" : `Pay ${summary ? summary.price : ""}`;
  }

  async function payInSandbox(event) {
    event.preventDefault();
    const problem = cardProblem();
    if (problem) return showCardProblem(...problem);
    showCardProblem(null);
    setSandboxBusy(true);
    let result;
    try {
      result = await postJson(sandboxUrl("confirm"), {
        client_secret: secret,
        card_number: digitsOf($("card-number").value),
        save_card: saveCard(),
      });
    } catch (error) {
      return showError(error);
    }
    return onSandboxAnswer(result);
  }

  async function authenticateInSandbox(success) {
    $("auth-complete").disabled = true;
    $("auth-fail").disabled = true;
    let result;
    try {
      result = await postJson(sandboxUrl("authenticate"), { client_secret: secret, success });
    } catch (error) {
      return showError(error);
    }
    return onSandboxAnswer(result);
  }

  async function onSandboxAnswer({ status, body }) {
    if (status === 200) return onPaymentStatus(body.status, body.failure_message);
    if (status === 402) return showDeclined(body.detail);
    if (status === 404) return showInvalid();
    if (status === 409) {
      // Paid or changed elsewhere (another tab): show what it is now.
      try {
        return route(await loadSummary());
      } catch (error) {
        return showError(error);
      }
    }
    return showError(new HttpError(status, body.detail || "The payment could not be sent"));
  }

  function formatCardNumber() {
    const input = $("card-number");
    const atEnd = input.selectionStart === input.value.length;
    if (!atEnd) return;
    const digits = digitsOf(input.value).slice(0, 19);
    input.value = digits.replace(/(\d{4})(?=\d)/g, "$1 ");
  }

  function formatExpiry(event) {
    const input = $("card-expiry");
    if (event.inputType && event.inputType.startsWith("delete")) return;
    const digits = digitsOf(input.value).slice(0, 4);
    input.value = digits.length > 2 ? `${digits.slice(0, 2)} / ${digits.slice(2)}` : digits;
  }

  // --- Stripe: the Payment Element -------------------------------------------------------

  function ensureStripe() {
    if (stripe) return true;
    if (typeof window.Stripe !== "function") {
      showFailure("Could not load Stripe (js.stripe.com). Check your connection and reload.");
      return false;
    }
    if (!summary.publishable_key) {
      showFailure("This payment page is not set up for Stripe (no publishable key).");
      return false;
    }
    stripe = window.Stripe(summary.publishable_key);
    elements = stripe.elements({
      clientSecret: secret,
      appearance: {
        theme: "stripe",
        variables: { colorPrimary: "#4f46e5", fontSizeBase: "18px", borderRadius: "8px" },
      },
    });
    elements.create("payment", { layout: "tabs" }).mount("#payment-element");
    return true;
  }

  function setStripeBusy(busy) {
    $("stripe-pay-button").disabled = busy;
    $("stripe-pay-button").textContent = busy
      ? "Processing…"
      : `Pay ${summary ? summary.price : ""}`;
  }

  async function payWithStripe(event) {
    event.preventDefault();
    $("stripe-problem").hidden = true;
    setStripeBusy(true);
    let outcome;
    try {
      const confirmParams = { return_url: location.origin + location.pathname };
      if (saveCard()) confirmParams.setup_future_usage = "off_session";
      outcome = await stripe.confirmPayment({
        elements,
        confirmParams,
        redirect: "if_required",
      });
    } catch (error) {
      setStripeBusy(false);
      return showError(error);
    }
    return onStripeOutcome(outcome);
  }

  async function authenticateWithStripe() {
    $("auth-complete").disabled = true;
    let outcome;
    try {
      outcome = await stripe.handleNextAction({ clientSecret: secret });
    } catch (error) {
      return showError(error);
    }
    return onStripeOutcome(outcome);
  }

  function onStripeOutcome({ error, paymentIntent }) {
    if (error) {
      if (error.type === "validation_error") {
        // The Payment Element shows what is missing next to the field.
        setStripeBusy(false);
        show("offer", "auto-topup-box", "stripe-pay");
        return undefined;
      }
      return showDeclined(error.message);
    }
    const lastError = paymentIntent.last_payment_error;
    return onPaymentStatus(paymentIntent.status, lastError && lastError.message);
  }

  // --- wiring ----------------------------------------------------------------------------

  async function start() {
    if (!readLocation()) return showInvalid();
    try {
      return route(await loadSummary());
    } catch (error) {
      return showError(error);
    }
  }

  $("card-form").addEventListener("submit", payInSandbox);
  $("card-number").addEventListener("input", formatCardNumber);
  $("card-expiry").addEventListener("input", formatExpiry);
  $("stripe-form").addEventListener("submit", payWithStripe);
  $("auth-complete").addEventListener("click", () =>
    mode === "stripe" ? authenticateWithStripe() : authenticateInSandbox(true));
  $("auth-fail").addEventListener("click", () => authenticateInSandbox(false));
  $("try-again").addEventListener("click", () => {
    if (mode === "sandbox") {
      $("card-number").value = "";
      showCardProblem(null);
    }
    showPayForm();
  });
  $("reload").addEventListener("click", () => location.reload());
  start();
})();

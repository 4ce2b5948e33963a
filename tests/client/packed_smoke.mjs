// Run by test_typescript_client.py in an empty folder where only the packed @ciris/billing is
// installed: a check, three charges, a 402 and a hold, printed as one JSON line.
import { BillingClient, PurchaseRequiredError } from "@ciris/billing";
const billing = new BillingClient({ baseUrl: process.env.BILLING_URL, apiKey: process.env.BILLING_KEY });
const user = `pack-${crypto.randomUUID()}@example.com`;
const out = {};
const check = await billing.check("oauth:google", user);
out.check = [check.has_credit, check.free_uses_remaining];
out.charges = [];
for (let i = 0; i < 3; i++) out.charges.push((await billing.charge("oauth:google", user)).free_uses_remaining);
try { await billing.charge("oauth:google", user); } catch (e) {
  if (!(e instanceof PurchaseRequiredError)) throw e;
  out["402"] = [e.status, e.offer.uses, e.checkoutUrl.startsWith("http")];
}
const other = `pack-${crypto.randomUUID()}@example.com`;
const charge = await billing.reserve("oauth:google", other, { uses: 2 }, async (hold) => hold.capture(1));
out.hold = [charge.uses + charge.released_uses, charge.uses, charge.released_uses];
console.log(JSON.stringify(out));

// A 30-line agent: check, call the model, charge; 402 with the checkout link when no use is left.
//   BILLING_URL=http://127.0.0.1:8000 BILLING_KEY=cbk_... node examples/agent.mjs
//   curl -s localhost:3000/chat -d '{"user": "ada@example.com", "message": "hello"}'
import http from "node:http";
import { BillingClient, PurchaseRequiredError } from "../clients/typescript/src/index.js"; // "@ciris/billing"

const billing = new BillingClient({ baseUrl: process.env.BILLING_URL, apiKey: process.env.BILLING_KEY });
const model = async (message) => `You said: ${message}`; // the model stub: your LLM call here

async function chat({ user, message }) {
  try {
    const check = await billing.check("oauth:google", user);
    if (!check.has_credit) {
      const { checkout_url: checkoutUrl } = await billing.purchase("oauth:google", user);
      return [402, { error: "purchase_required", checkout_url: checkoutUrl, uses: check.purchase_uses }];
    }
    const reply = await model(message);
    const charge = await billing.charge("oauth:google", user, { description: "chat turn" });
    return [200, { reply, free_uses_remaining: charge.free_uses_remaining, credits_remaining: charge.credits_remaining }];
  } catch (e) {
    if (!(e instanceof PurchaseRequiredError)) throw e; // a concurrent turn took the last use
    return [402, { error: "purchase_required", checkout_url: e.checkoutUrl, uses: e.offer.uses }];
  }
}

const server = http.createServer(async (req, res) => {
  let body = "";
  for await (const chunk of req) body += chunk;
  const [status, answer] = await chat(JSON.parse(body)).catch((e) => [503, { error: "billing_unavailable", detail: e.message }]);
  res.writeHead(status, { "Content-Type": "application/json" }).end(JSON.stringify(answer));
});
server.listen(Number(process.env.PORT ?? 3000), "127.0.0.1", () => console.log(`listening on http://127.0.0.1:${server.address().port}`));

-- wrk script for CIRIS Billing: credit checks, charges, one hot account, the agent's mix, or
-- reserve then capture.
--
--   wrk -t2 -c64 -d10s -s bench/billing.lua -H "X-API-Key: ..." URL -- MODE ACCOUNTS [LIMIT] [IDEM]
--
-- MODE      check | charge | hot | mix (check then charge for the same user) | hello (GET /)
--           | reserve (a 1-use hold, then the capture of a hold this thread was answered)
--           | carry, up (a rated charge: 300 units of feature bench-carry or bench-up, rated
--             1,000 units per use by bench/run.py --rated)
--           | client (the agent client's loop: a charge with its own Idempotency-Key and
--             "Prefer: next-check", whose answer also answers the next check, so one request
--             is one interaction)
-- ACCOUNTS  seeded accounts are bench-1@example.com .. bench-ACCOUNTS@example.com;
--           the hot account is bench-0@example.com
-- LIMIT     stop each thread after LIMIT responses (0 = run for the duration); a thread that
--           stops writes "wrk-thread-done" to stderr so the caller can end wrk early
-- IDEM      if given, every charge, hold and capture carries "Idempotency-Key: IDEM-<thread>-<n>"
-- done() prints one line: BENCH_RESULT {json}, latencies in microseconds.

local CHECK = "/v1/billing/credits/check"
local CHARGE = "/v1/billing/charges"
local CHECK_BODY = '{"oauth_provider":"oauth:google","external_id":"bench-%d@example.com",'
  .. '"context":{}}'
local CHARGE_BODY = '{"oauth_provider":"oauth:google","external_id":"bench-%d@example.com",'
  .. '"amount_minor":100,"currency":"USD","description":"bench","metadata":{}}'
local RATED_BODY = '{"oauth_provider":"oauth:google","external_id":"bench-%d@example.com",'
  .. '"amount_minor":100,"currency":"USD","description":"bench","metadata":{},'
  .. '"feature":"bench-%s","quantity":300}'
local RESERVE = "/v1/billing/reservations"
local RESERVE_BODY = '{"oauth_provider":"oauth:google","external_id":"bench-%d@example.com",'
  .. '"uses":1,"ttl_seconds":300,"metadata":{}}'
local CAPTURE_BODY = '{"amount_minor":100,"description":"bench","metadata":{}}'

local threads = {}
local mode, accounts, idem, thread_id
local sent = 0
local pending_charge = nil
-- reserve: holds this thread was answered (any of its connections may capture one).
local held = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("id", #threads)
end

function init(args)
  mode = args[1] or "check"
  accounts = tonumber(args[2] or "10000")
  local limit = tonumber(args[3] or "0")
  idem = args[4]
  thread_id = wrk.thread:get("id")
  math.randomseed(os.time() * 1000 + thread_id)
  if limit > 0 or mode == "reserve" then
    -- Defined only when needed: wrk parses responses (headers, body) only if `response` exists.
    local received = 0
    response = function(status, headers, body)
      if mode == "reserve" and status == 201 then
        -- A hold's answer (a capture's says "captured"): remember it for a capture.
        if string.find(body, '"status":%s*"held"') then
          local id = string.match(body, '"reservation_id":%s*"([%w_]+)"')
          if id then
            table.insert(held, id)
          end
        end
      end
      received = received + 1
      if limit > 0 and received == limit then
        io.stderr:write("wrk-thread-done\n")
        io.stderr:flush()
        wrk.thread:stop()
      end
    end
  end
end

-- With IDEM: the request's headers with a new Idempotency-Key; else nil (wrk.headers).
local function keyed()
  if not idem then
    return nil
  end
  sent = sent + 1
  local headers = {} -- a headers table replaces wrk.headers (the API key): copy them
  for name, value in pairs(wrk.headers) do
    headers[name] = value
  end
  headers["Idempotency-Key"] = string.format("%s-%d-%d", idem, thread_id, sent)
  return headers
end

local function charge(n)
  return wrk.format("POST", CHARGE, keyed(), string.format(CHARGE_BODY, n))
end

-- client: what the agent client sends per interaction (a key of its own, as the client makes).
local function client_charge(n)
  sent = sent + 1
  local headers = {}
  for name, value in pairs(wrk.headers) do
    headers[name] = value
  end
  headers["Idempotency-Key"] = string.format("client-%d-%d-%d", os.time(), thread_id, sent)
  headers["Prefer"] = "next-check"
  return wrk.format("POST", CHARGE, headers, string.format(CHARGE_BODY, n))
end

function request()
  if mode == "hello" then
    return wrk.format("GET", "/")
  elseif mode == "check" then
    return wrk.format("POST", CHECK, nil, string.format(CHECK_BODY, math.random(1, accounts)))
  elseif mode == "charge" then
    return charge(math.random(1, accounts))
  elseif mode == "hot" then
    return charge(0)
  elseif mode == "client" then
    return client_charge(math.random(1, accounts))
  elseif mode == "carry" or mode == "up" then
    local body = string.format(RATED_BODY, math.random(1, accounts), mode)
    return wrk.format("POST", CHARGE, keyed(), body)
  elseif mode == "reserve" then
    -- One interaction = a hold on a random account, then its capture (all of it).
    local id = table.remove(held)
    if id then
      return wrk.format("POST", RESERVE .. "/" .. id .. "/capture", keyed(), CAPTURE_BODY)
    end
    local body = string.format(RESERVE_BODY, math.random(1, accounts))
    return wrk.format("POST", RESERVE, keyed(), body)
  end
  -- mix: one interaction = a check, then a charge for the same user.
  if pending_charge then
    local n = pending_charge
    pending_charge = nil
    return charge(n)
  end
  pending_charge = math.random(1, accounts)
  return wrk.format("POST", CHECK, nil, string.format(CHECK_BODY, pending_charge))
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_RESULT {"requests":%d,"duration_us":%d,"status_errors":%d,"connect":%d,'
      .. '"read":%d,"write":%d,"timeout":%d,"p50":%d,"p90":%d,"p99":%d,"mean":%.1f,"max":%d}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean,
    latency.max
  ))
end

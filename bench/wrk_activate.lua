-- wrk script for bench/activate.py: one request per line of a bodies file, each line used once.
--
--   wrk -t T -c C -d D --timeout 10s -s bench/wrk_activate.lua URL -- METHOD BODIES_FILE T
--
-- METHOD is GET (the file is ignored, every request is the same bare GET) or POST (line i of the
-- file is the JSON body of request i; thread k of T takes lines k, k+T, k+2T, ...).  Activation
-- nonces are single-use, so a thread that runs out of lines stops rather than replaying one.
-- Both endpoints go through this same request()/response() path, so wrk's per-request CPU is
-- alike for both.  done() prints one line "WRKJSON {...}" with the counts and the latency
-- percentiles (microseconds) for the Python harness to parse.

local threads = {}
local counter = 0

function setup(thread)
   thread:set("tid", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

function init(args)
   method = args[1]
   path = wrk.path
   bodies = {}
   if method == "POST" then
      local nthreads = tonumber(args[3])
      local i = 0
      for line in io.lines(args[2]) do
         if line ~= "" then
            if i % nthreads == tid then
               bodies[#bodies + 1] = line
            end
            i = i + 1
         end
      end
   end
   headers = {["Content-Type"] = "application/json"}
   sent = 0
   ok = 0
   non200 = 0
   exhausted = 0
   first_bad = ""
end

function request()
   if method == "GET" then
      sent = sent + 1
      return wrk.format("GET", path)
   end
   sent = sent + 1
   local body = bodies[sent]
   if body == nil then
      exhausted = 1
      wrk.thread:stop()
      -- the stopped loop will not send this; keep the request well-formed anyway
      return wrk.format("GET", "/v1/ping")
   end
   return wrk.format("POST", path, headers, body)
end

function response(status, hdrs, body)
   if status == 200 then
      ok = ok + 1
   else
      non200 = non200 + 1
      if first_bad == "" then
         first_bad = tostring(status) .. " " .. string.sub(body or "", 1, 160)
      end
   end
end

function done(summary, latency, requests)
   local tok, tbad, texh, bad = 0, 0, 0, ""
   for _, t in ipairs(threads) do
      tok = tok + t:get("ok")
      tbad = tbad + t:get("non200")
      texh = texh + t:get("exhausted")
      if bad == "" then bad = t:get("first_bad") end
   end
   local e = summary.errors
   bad = string.gsub(bad, '[%c"\\]', " ")
   io.write(string.format(
      'WRKJSON {"requests": %d, "duration_us": %d, "ok": %d, "non200": %d, "exhausted_threads": %d, ' ..
      '"errors_connect": %d, "errors_read": %d, "errors_write": %d, "errors_timeout": %d, ' ..
      '"p50_us": %d, "p99_us": %d, "max_us": %d, "first_bad": "%s"}\n',
      summary.requests, summary.duration, tok, tbad, texh,
      e.connect, e.read, e.write, e.timeout,
      latency:percentile(50), latency:percentile(99), latency.max, bad))
end

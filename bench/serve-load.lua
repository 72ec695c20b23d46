-- wrk script for bench/serve-load: POST /predict with one BBC News article per request,
-- cycling through the JSON bodies of a file (one per line, the first script argument);
-- prints one machine-readable RESULT line at the end.
local bodies = {}
local next_body = 0
local threads = {}

function setup(thread)
   thread:set("id", #threads)
   table.insert(threads, thread)
end

function init(args)
   for line in io.lines(args[1]) do
      bodies[#bodies + 1] = line
   end
   -- Each wrk thread starts at a different article.
   next_body = (id or 0) * 97 % #bodies
end

function request()
   next_body = next_body % #bodies + 1
   return wrk.format("POST", "/predict", { ["Content-Type"] = "application/json" }, bodies[next_body])
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      "RESULT requests=%d duration_us=%d p50_us=%d p99_us=%d connect=%d read=%d write=%d status=%d timeout=%d\n",
      summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
      e.connect, e.read, e.write, e.status, e.timeout))
end

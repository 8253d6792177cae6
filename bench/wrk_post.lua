-- wrk script for bench/bench_server.py: POST /progress with realistic tqdm updates.
--
--   wrk -t1 -c8 -d5s -s bench/wrk_post.lua http://127.0.0.1:PORT -- MODE IDS BATCH SEQ0 TAG
--
-- MODE  single: one JSON object (~260 bytes) per POST; batch: a JSON array of BATCH
--       updates per POST (consecutive task ids, wrapping around IDS).
-- IDS   how many distinct task ids per wrk thread (32 hex digits, like uuid4().hex).
-- TAG   8 hex digits that start every task id of the run.
-- SEQ0  first seq; seq grows by one per update, so every update is applied (never
--       ignored as a retry) even when several runs hit the same server: give each
--       run a SEQ0 above the last one's.
-- RUNS  (optional) when > 0, each update names one of RUNS runs ("run":"run-0007"):
--       bench_runs.py --http compares that load with the same without runs.
-- Bodies are built in request(), so each carries a fresh seq/n/timestamp. done() prints
-- one line "WRK_JSON {...}" that the bench parses.

local mode, ids, batch, seq, tag, runs = "single", 1000, 100, 1, "bench", 0
local task_ids = {}
local counter = 0
local head
local threads = 0

function setup(thread)
   -- several wrk threads (-t2): each gets its own ids, so no thread's seq is behind
   thread:set("tid", threads)
   threads = threads + 1
end

function init(args)
   mode = args[1] or mode
   ids = tonumber(args[2] or ids)
   batch = tonumber(args[3] or batch)
   seq = tonumber(args[4] or seq)
   tag = args[5] or tag
   runs = tonumber(args[6] or runs)
   local t = tonumber(tid or 0)  -- a global, set by setup() in the main state
   for i = 1, ids do
      -- 32 hex digits, like uuid4().hex: TAG (8 hex digits), thread, scrambled index
      task_ids[i] = string.format("%s%04x%04x%016x", tag, t,
                                  (i * 40503) % 65536, i)
   end
   head = "POST /progress HTTP/1.1\r\nHost: 127.0.0.1\r\n" ..
          "Content-Type: application/json\r\nUser-Agent: progressista-bench\r\n" ..
          "Content-Length: "
end

local function update(i, s)
   local total = 10000
   local n = s % total
   local run = ""
   if runs > 0 then run = string.format('"run":"run-%04d",', i % runs) end
   return "{" .. run .. string.format(
      '"task_id":"%s","desc":"train epoch %d","n":%d,"total":%d,"unit":"it",' ..
      '"unit_scale":false,"unit_divisor":1000,"rate":%.2f,"elapsed":%.3f,' ..
      '"postfix":"loss=0.%04d","status":"running",' ..
      '"meta":{"host":"node-%02d","pid":%d,"job":"job-4711"},"seq":%d,"timestamp":%.3f}',
      task_ids[i], i % 10, n, total, 100 + (s % 50), n / 100.0, s % 10000,
      i % 64, 20000 + i, s, 1.7e9 + s / 1000.0)
end

function request()
   local body
   if mode == "batch" then
      local parts = {}
      for k = 1, batch do
         local i = (counter % ids) + 1
         parts[k] = update(i, seq)
         counter = counter + 1
         seq = seq + 1
      end
      body = "[" .. table.concat(parts, ",") .. "]"
   else
      local i = (counter % ids) + 1
      body = update(i, seq)
      counter = counter + 1
      seq = seq + 1
   end
   return head .. #body .. "\r\n\r\n" .. body
end

function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
      '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"max_us":%d}\n',
      summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
      e.status, e.timeout, latency:percentile(50), latency:percentile(99), latency.max))
end

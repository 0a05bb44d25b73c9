-- wrk script for loadtest/bench.py: closed-loop POSTs of multipart image uploads.
--
--   wrk -t1 -c32 -d20s --timeout 60s -s loadtest/wrk_multipart.lua URL -- PATH FIELD FILE...
--
-- FIELD "@oip:NAME" sends instead an Open Inference Protocol v2 request with the binary data
-- extension (Triton's): a JSON header naming the BYTES input NAME of shape [1, 1], then the
-- image as one length-prefixed BYTES element; an answer counts when it holds "outputs".
--
-- Each connection sends one request and waits for its answer (closed loop, concurrency =
-- connections). Requests rotate over the given image files; the bodies are built once, in
-- init(), so the generator spends its CPU on sockets only. A 2xx answer without a "label" in
-- its body counts as bad. done() prints one JSON line (prefixed "WRK_JSON ") for bench.py.

local threads = {}
local counter = 1

function setup(thread)
   thread:set("id", counter)
   counter = counter + 1
   table.insert(threads, thread)
end

local function read_file(path)
   local f = assert(io.open(path, "rb"))
   local data = f:read("*a")
   f:close()
   return data
end

local function basename(path)
   return path:match("([^/]+)$")
end

function init(args)
   local path, field = args[1], args[2]
   requests_list = {}
   bad = 0
   ok = 0
   local boundary = "lungservebench" .. tostring(id) .. "x7MA4YWxkTrZu0gW"
   local oip_input = field:match("^@oip:(.+)$")
   marker = oip_input and '"outputs"' or '"label"'
   for i = 3, #args do
      if oip_input then
         local data = read_file(args[i])
         local n = #data
         local element = string.char(n % 256, math.floor(n / 256) % 256, math.floor(n / 65536) % 256,
            math.floor(n / 16777216) % 256) .. data
         local header = '{"inputs":[{"name":"' .. oip_input .. '","shape":[1,1],"datatype":"BYTES",'
            .. '"parameters":{"binary_data_size":' .. #element .. '}}],'
            .. '"outputs":[{"name":"probabilities","parameters":{"binary_data":false}}]}'
         local headers = {
            ["Content-Type"] = "application/octet-stream",
            ["Inference-Header-Content-Length"] = tostring(#header),
         }
         table.insert(requests_list, wrk.format("POST", path, headers, header .. element))
      else
         local file = args[i]
         local ctype = "image/jpeg"
         if file:match("%.png$") then ctype = "image/png" end
         local body = "--" .. boundary .. "\r\n"
            .. 'Content-Disposition: form-data; name="' .. field .. '"; filename="' .. basename(file) .. '"\r\n'
            .. "Content-Type: " .. ctype .. "\r\n\r\n"
            .. read_file(file) .. "\r\n--" .. boundary .. "--\r\n"
         local headers = { ["Content-Type"] = "multipart/form-data; boundary=" .. boundary }
         table.insert(requests_list, wrk.format("POST", path, headers, body))
      end
   end
   assert(#requests_list > 0, "no image files given")
   -- Start each thread at a different image so that threads do not move in lockstep.
   index = (id - 1) % #requests_list
end

function request()
   index = index % #requests_list + 1
   return requests_list[index]
end

function response(status, headers, body)
   if status >= 200 and status < 300 then
      if body ~= nil and body:find(marker, 1, true) then
         ok = ok + 1
      else
         bad = bad + 1
      end
   end
end

function done(summary, latency, requests)
   local bad_total, ok_total = 0, 0
   for _, thread in ipairs(threads) do
      bad_total = bad_total + thread:get("bad")
      ok_total = ok_total + thread:get("ok")
   end
   local e = summary.errors
   io.write(string.format(
      'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, '
      .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
      .. '"ok_bodies": %d, "bad_bodies": %d, '
      .. '"latency_us": {"min": %d, "mean": %.1f, "p50": %d, "p90": %d, "p95": %d, "p99": %d, "max": %d}}\n',
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      ok_total, bad_total,
      latency.min, latency.mean, latency:percentile(50), latency:percentile(90),
      latency:percentile(95), latency:percentile(99), latency.max))
end

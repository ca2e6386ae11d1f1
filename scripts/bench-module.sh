#!/bin/sh
# Token budget: proxy throughput and added latency with the module on and
# off.  One nginx, two servers: the gateway on one port proxying to a
# second server on another port that answers every POST with a fixed JSON
# body, so that the upstream costs next to nothing.  wrk sends the POSTs.
#
#   sh scripts/bench-module.sh [SECONDS]

set -e

cd "$(dirname "$0")/.."

. scripts/bench-conf.sh

repo=$PWD
secs=${1:-10}
dir=$repo/build/bench-module
nginx=${NGINX:-/usr/sbin/nginx}
port=18480
upport=18481

make -s module

rm -rf "$dir"
mkdir -p "$dir/logs"

# bodies: a 4 KB chat request and a 500 KB one (about 128K tokens)

node -e '
const fs = require("fs");
const text = fs.readFileSync("t/corpus/english.txt", "utf8");
function body(size, model) {
    let s = "";
    while (s.length < size) s += text;
    s = s.slice(0, size);
    return JSON.stringify({model: model, max_tokens: 64, messages: [
        {role: "system", content: "You are a helpful assistant."},
        {role: "user", content: s}]});
}
fs.writeFileSync(process.argv[1] + "/small.json", body(3900, "gpt-4o"));
fs.writeFileSync(process.argv[1] + "/large.json", body(500000, "gpt-4.1"));
fs.writeFileSync(process.argv[1] + "/tiny.json", JSON.stringify({model: "gpt-4o",
    max_tokens: 1, messages: [{role: "user", content: "Hi"}]}));
' "$dir"

cat > "$dir/post.lua" <<'END'
local f = io.open(os.getenv("TB_BODY"), "rb")
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Tenant"] = "acme"
local n = 0
request = function()
    n = n + 1
    wrk.headers["X-User"] = "user" .. (n % 1000)
    return wrk.format()
end
END

cat > "$dir/nginx.conf" <<END
$(bench_conf_head)

    token_budget_zone \$http_x_user zone=users:16m tokens=1000000000 per=1m;
    token_budget_zone \$http_x_tenant zone=tenants:16m tokens=1000000000 per=1d;

$(bench_conf_paths)
    client_max_body_size 4m;
    client_body_buffer_size 1m;

    upstream llm {
        server 127.0.0.1:$upport;
        keepalive 32;
    }

    server {
        listen 127.0.0.1:$port;

        location /on/v1/ {
            token_budget on;
            proxy_pass http://llm/v1/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }

        location /nocache/v1/ {
            token_budget on;
            token_budget_count_cache off;
            proxy_pass http://llm/v1/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }

        location /limited/v1/ {
            token_budget on;
            token_budget_limit zone=users;
            token_budget_limit zone=tenants;
            proxy_pass http://llm/v1/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }

        location /budget/ {
            token_budget_api;
        }

        location /off/v1/ {
            proxy_pass http://llm/v1/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }

    server {
        listen 127.0.0.1:$upport;
        location / {
            client_body_buffer_size 1m;
            default_type application/json;
            return 200 '{"id":"x","object":"chat.completion","choices":[]}';
        }
    }
}
END

"$nginx" -p "$dir/" -c "$dir/nginx.conf"
trap '"$nginx" -p "$dir/" -c "$dir/nginx.conf" -s quit 2>/dev/null || true' EXIT
sleep 1

# the worker's CPU time, in clock ticks: steadier than requests/s on a
# machine shared with other work

cpu() {
    awk '{ print $14 + $15 }' /proc/$(pgrep -P "$(cat "$dir/nginx.pid")" \
                                      | head -1)/stat
}

rps() {
    t0=$(cpu)
    TB_BODY=$dir/$2.json wrk -t1 -c"$3" -d"${secs}s" -s "$dir/post.lua" \
        "http://127.0.0.1:$port/$1/v1/chat/completions" > "$dir/wrk.out"
    t1=$(cpu)
    awk -v t="$((t1 - t0))" -v hz="$(getconf CLK_TCK)" -v s="$secs" \
        '/Requests\/sec/ { printf "%s %.1f\n", $2, t * 1e6 / hz / ($2 * s) }' \
        "$dir/wrk.out"
}

latency() {
    TB_BODY=$dir/$2.json wrk -t1 -c1 -d"${secs}s" --latency \
        -s "$dir/post.lua" \
        "http://127.0.0.1:$port/$1/v1/chat/completions" > "$dir/wrk.out"
    awk '$1 == "Latency" && NF == 5 { print $2; exit }
         $1 == "50%" { p50 = $2 } $1 == "99%" { print "p50 " p50 " p99 " $2 }' \
        "$dir/wrk.out" | tr '\n' ' '
    echo
}

curl -s -o /dev/null -w "check: %{http_code}\n" \
    -H 'Content-Type: application/json' --data-binary @"$dir/large.json" \
    "http://127.0.0.1:$port/on/v1/chat/completions"

on=$(rps on small 16)
off=$(rps off small 16)
nocache=$(rps nocache small 16)
limited=$(rps limited small 16)

echo "4 KB chat body, 16 connections, $secs s each" \
     "(requests/s, and the worker's CPU time per request):"
echo "  module off:               ${off% *} requests/s, ${off#* } us"
echo "  module on:                ${on% *} requests/s, ${on#* } us"
echo "  module on, no count cache: ${nocache% *} requests/s, ${nocache#* } us"
echo "  module on, two limits:    ${limited% *} requests/s," \
     "${limited#* } us (1000 users, 1 tenant)"
awk -v on="${on% *}" -v off="${off% *}" -v lim="${limited% *}" \
    -v nc="${nocache% *}" -v con="${on#* }" -v coff="${off#* }" \
    -v clim="${limited#* }" -v cnc="${nocache#* }" \
    'BEGIN { printf "  on / off:                 %.1f%% (by CPU time %.1f%%)\n",
                    100 * on / off, 100 * coff / con;
             printf "  no cache / off:           %.1f%% (by CPU time %.1f%%)\n",
                    100 * nc / off, 100 * coff / cnc;
             printf "  two limits / off:         %.1f%% (by CPU time %.1f%%)\n",
                    100 * lim / off, 100 * coff / clim }'

# memory per key: free slab pages before and after 20000 new keys

pages() {
    curl -s "http://127.0.0.1:$port/budget/zones" \
        | sed -e 's/.*"name":"users"[^}]*"free_pages":\([0-9]*\).*/\1/'
}

before=$(pages)
cat > "$dir/keys.lua" <<'END'
local f = io.open(os.getenv("TB_BODY"), "rb")
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = "application/json"
local n = 0
request = function()
    n = n + 1
    wrk.headers["X-User"] = "k" .. n .. "-" .. math.random(1e9)
    return wrk.format()
end
END
TB_BODY=$dir/tiny.json wrk -t1 -c4 -d3s -s "$dir/keys.lua" \
    "http://127.0.0.1:$port/limited/v1/chat/completions" > "$dir/wrk.out"
after=$(pages)
keys=$(curl -s "http://127.0.0.1:$port/budget/zones" \
    | sed -e 's/.*"name":"users"[^}]*"keys":\([0-9]*\).*/\1/')
echo "zone memory: $keys keys took $((before - after)) pages of 4096 bytes:" \
    "$(( (before - after) * 4096 / (keys > 1 ? keys - 1000 : 1) )) bytes a key"

echo "500 KB chat body, one connection, mean latency:"
echo "  module off:               $(latency off large)"
echo "  module on, no count cache: $(latency nocache large)"

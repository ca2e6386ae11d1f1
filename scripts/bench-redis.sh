#!/bin/sh
# Token budget: what a zone shared through Redis costs.  One nginx (one
# worker) proxying to a "return 200" server, a local redis-server, wrk
# POSTing a small chat body for 1000 users: latency with one connection,
# and admissions per second with 16, for the shared memory zone alone,
# mode=strict and mode=batched.
#
#   sh scripts/bench-redis.sh [SECONDS]

set -e

cd "$(dirname "$0")/.."

. scripts/bench-conf.sh

repo=$PWD
secs=${1:-10}
dir=$repo/build/bench-redis
nginx=${NGINX:-/usr/sbin/nginx}
port=18680
upport=18681
rport=18682

make -s module

rm -rf "$dir"
mkdir -p "$dir/logs"

# (without the descriptors of whoever runs this, a lock for one)
redis-server --port $rport --bind 127.0.0.1 --save '' --appendonly no \
    --dir "$dir" --logfile redis.log --daemonize yes \
    --pidfile "$dir/redis.pid" 3>&- 4>&- 5>&-
trap 'kill $(cat "$dir/redis.pid") 2>/dev/null || true' EXIT

cat > "$dir/post.lua" <<'END'
wrk.method = "POST"
wrk.body = '{"model":"gpt-4o","max_tokens":16,"messages":'
           .. '[{"role":"user","content":"Hello, how are you today?"}]}'
wrk.headers["Content-Type"] = "application/json"
local n = 0
request = function()
    n = n + 1
    wrk.headers["X-User"] = "user" .. (n % 1000)
    return wrk.format()
end
END

cat > "$dir/nginx.conf" <<END
$(bench_conf_head)

    token_budget_zone \$http_x_user zone=shm:16m tokens=1000000000 per=1m;
    token_budget_zone \$http_x_user zone=strict:16m tokens=1000000000 per=1m
        redis=127.0.0.1:$rport mode=strict;
    token_budget_zone \$http_x_user zone=batched:16m tokens=1000000000
        per=1m redis=127.0.0.1:$rport mode=batched sync=100ms;

$(bench_conf_paths)

    upstream llm {
        server 127.0.0.1:$upport;
        keepalive 32;
    }

    server {
        listen 127.0.0.1:$port;

        token_budget on;
        proxy_http_version 1.1;
        proxy_set_header Connection "";

        location /shm/v1/ {
            token_budget_limit zone=shm;
            proxy_pass http://llm/v1/;
        }

        location /strict/v1/ {
            token_budget_limit zone=strict;
            proxy_pass http://llm/v1/;
        }

        location /batched/v1/ {
            token_budget_limit zone=batched;
            proxy_pass http://llm/v1/;
        }

        location /budget/ {
            token_budget_api;
        }
    }

    server {
        listen 127.0.0.1:$upport;
        location / {
            default_type application/json;
            return 200 '{"id":"x","object":"chat.completion","choices":[],"usage":{"prompt_tokens":20,"completion_tokens":16,"total_tokens":36}}';
        }
    }
}
END

"$nginx" -p "$dir/" -c "$dir/nginx.conf"
trap '"$nginx" -p "$dir/" -c "$dir/nginx.conf" -s quit 2>/dev/null || true;
      kill $(cat "$dir/redis.pid") 2>/dev/null || true' EXIT
sleep 1

run() {
    wrk -t1 -c"$2" -d"${secs}s" --latency -s "$dir/post.lua" \
        "http://127.0.0.1:$port/$1/v1/chat/completions" > "$dir/wrk.out"
    awk '/Requests\/sec/ { rps = $2 }
         $1 == "50%" { p50 = $2 } $1 == "99%" { p99 = $2 }
         /Non-2xx/ { bad = $4 }
         END { printf "%s req/s, p50 %s, p99 %s%s\n", rps, p50, p99,
               bad ? ", " bad " not 200" : "" }' "$dir/wrk.out"
}

for z in shm strict batched; do
    curl -s -o /dev/null -H 'Content-Type: application/json' -H 'X-User: w' \
        -d '{"model":"gpt-4o","messages":[{"role":"user","content":"Hi"}]}' \
        "http://127.0.0.1:$port/$z/v1/chat/completions"
done

echo "one connection (latency), $secs s each:"
for z in shm strict batched; do
    printf "  %-8s %s\n" "$z:" "$(run $z 1)"
done

echo "16 connections (admissions per second), $secs s each:"
for z in shm strict batched; do
    printf "  %-8s %s\n" "$z:" "$(run $z 16)"
done

echo "redis: $(redis-cli -p $rport info commandstats \
    | grep -E 'cmdstat_(evalsha|eval):' | cut -d, -f1 | tr '\r\n' '  ')"
echo "zones: $(curl -s http://127.0.0.1:$port/budget/zones \
    | grep -o '"name":"[a-z]*"[^]]*"redis":{[^}]*}' \
    | sed -e 's/"key".*"spent":\([0-9]*\).*"errors":\([0-9]*\).*"syncs":\([0-9]*\)}/spent \1, errors \2, syncs \3/' \
    | tr '\n' ' ')"

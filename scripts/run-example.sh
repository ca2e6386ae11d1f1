#!/bin/sh
# Token budget: build the module and run conf/example.conf in the
# foreground, nginx on 127.0.0.1:8080 in front of the mock upstream on
# 127.0.0.1:8081.  Ctrl-C stops both.

set -e

cd "$(dirname "$0")/.."

repo=$PWD
nginx=${NGINX:-/usr/sbin/nginx}
rundir=$repo/build/example

sh scripts/deps.sh
make

for port in 8080 8081; do
    if curl -s -o /dev/null "http://127.0.0.1:$port/" 2>/dev/null; then
        echo "run-example: 127.0.0.1:$port is in use" >&2
        exit 1
    fi
done

mkdir -p "$rundir"
for d in logs client_body_temp proxy_temp fastcgi_temp uwsgi_temp scgi_temp
do
    mkdir -p "$rundir/$d"
done

sed -e "s|%%MODULE%%|$repo/build/ngx_http_token_budget_module.so|g" \
    -e "s|%%DATADIR%%|$repo/data|g" \
    -e "s|%%RUNDIR%%|$rundir|g" \
    conf/example.conf > "$rundir/nginx.conf"

"$nginx" -t -q -p "$rundir/" -c "$rundir/nginx.conf"

node t/upstream/server.js 8081 > "$rundir/upstream.log" 2>&1 &
upstream=$!

trap 'kill $upstream 2>/dev/null || true' EXIT
trap 'exit 130' INT TERM

i=0
until curl -s -o /dev/null http://127.0.0.1:8081/health; do
    i=$((i + 1))
    if [ $i -gt 50 ] || ! kill -0 $upstream 2>/dev/null; then
        echo "run-example: the mock upstream did not start:" >&2
        cat "$rundir/upstream.log" >&2
        exit 1
    fi
    sleep 0.1
done

cat <<END

nginx with the token budget module: http://127.0.0.1:8080
mock upstream:                      http://127.0.0.1:8081
configuration and logs:             $rundir

Try:

  curl -i http://127.0.0.1:8080/v1/chat/completions \\
      -H 'Content-Type: application/json' \\
      -d '{"model": "gpt-4o", "max_tokens": 16,
           "messages": [{"role": "user", "content": "Hello!"}]}'

  tail -f $rundir/access.log

Stop with Ctrl-C (or: $nginx -p $rundir/ -s quit).

END

"$nginx" -p "$rundir/" -c "$rundir/nginx.conf" -g 'daemon off;'

#!/bin/sh
# Token budget: what the gateway adds to a stream.  A small server-sent
# events upstream in node streams OpenAI chat chunks on a fixed schedule,
# one every DELAY ms, each carrying the time it was written (CLOCK_MONOTONIC,
# shared by the processes of this machine).  A node client reads the same
# stream directly, through nginx without the module, and through nginx with
# a budget zone, the usage asked for on the client's behalf and taken out
# again (so every event is rewritten) and token_budget_stream_cut reserved
# armed but not reached; it notes when each event arrives.  Reported: the
# time to the first byte and to the first event, each event's latency
# (arrival less the time it was written), and the delay added per event:
# an event's latency through a proxy less the same event's latency in the
# direct run next to it.
#
#   sh scripts/bench-stream.sh [EVENTS] [DELAY_MS] [RUNS]
#
# defaults: 1000 events, 1 ms apart, 5 runs of each.  Then the memory the
# nginx worker grows by (its peak RSS) while it passes one stream of
# BENCH_MEMORY_EVENTS (default 10000) events, without and with the module.

set -e

cd "$(dirname "$0")/.."

. scripts/bench-conf.sh

repo=$PWD
events=${1:-1000}
delay=${2:-1}
runs=${3:-5}
dir=$repo/build/bench-stream
nginx=${NGINX:-/usr/sbin/nginx}
port=${BENCH_PORT:-18490}
upport=$((port + 1))

make -s module

rm -rf "$dir"
mkdir -p "$dir/logs"

cat > "$dir/sse.js" <<'END'
// the upstream: POST /v1/chat/completions streams x-events chunks, one
// every x-delay ms on a fixed schedule from the request, each with "t",
// the time it was written (ns, CLOCK_MONOTONIC)

'use strict';

const http = require('http');

const WORDS = ['Hello', ' from', ' the', ' bench', ' upstream', ',', ' one',
               ' token', ' at', ' a', ' time', '.'];

const server = http.createServer((req, res) => {
    const chunks = [];

    req.on('data', (c) => chunks.push(c));
    req.on('end', () => {
        const body = JSON.parse(Buffer.concat(chunks).toString() || '{}');
        const usage = body.stream_options
                      && body.stream_options.include_usage === true;
        const n = parseInt(req.headers['x-events'] || '1000', 10);
        const delay = parseFloat(req.headers['x-delay'] || '1');
        const start = process.hrtime.bigint();
        const created = Math.floor(Date.now() / 1000);

        res.socket.setNoDelay(true);
        res.writeHead(200, { 'content-type': 'text/event-stream',
                             'cache-control': 'no-cache' });

        const chunk = (choices, u) => {
            const c = { id: 'chatcmpl-bench', object: 'chat.completion.chunk',
                        created: created, model: 'gpt-4o',
                        system_fingerprint: 'fp_bench',
                        t: process.hrtime.bigint().toString(),
                        choices: choices };
            if (usage) {
                c.usage = u;
            }
            return 'data: ' + JSON.stringify(c) + '\n\n';
        };

        let i = 0;

        const next = () => {
            if (res.destroyed) {
                return;
            }

            if (i < n) {
                do {
                    res.write(chunk([{ index: 0,
                                       delta: { content:
                                                WORDS[i % WORDS.length] },
                                       logprobs: null,
                                       finish_reason: null }], null));
                    i++;

                    /* no delay: a hundred at a time */
                } while (delay <= 0 && i < n && i % 100 !== 0);

                if (delay <= 0) {
                    setImmediate(next);
                    return;
                }

                /* the next one at start + i * delay, whatever this one took */
                const at = Number(start) / 1e6 + i * delay;
                const wait = at - Number(process.hrtime.bigint()) / 1e6;
                setTimeout(next, Math.max(0, wait));
                return;
            }

            let tail = chunk([{ index: 0, delta: {}, logprobs: null,
                                finish_reason: 'stop' }], null);
            if (usage) {
                tail += chunk([], { prompt_tokens: parseInt(
                                        req.headers['x-token-count'] || '0',
                                        10),
                                    completion_tokens: n,
                                    total_tokens: n });
            }
            res.end(tail + 'data: [DONE]\n\n');
        };

        next();
    });
});

server.keepAliveTimeout = 60000;
server.listen(parseInt(process.argv[2], 10), '127.0.0.1');
END

cat > "$dir/client.js" <<'END'
// reads the streams and prints the table

'use strict';

const http = require('http');

const [port, upport, events, delay, runs] = process.argv.slice(2)
                                            .map((v) => parseFloat(v));

const TARGETS = {
    direct: { port: upport, path: '/v1/chat/completions' },
    plain: { port: port, path: '/plain/v1/chat/completions' },
    module: { port: port, path: '/tb/v1/chat/completions' },
};

const BODY = JSON.stringify({ model: 'gpt-4o', stream: true,
    messages: [{ role: 'user', content: 'Stream me a thousand tokens.' }] });

const now = () => Number(process.hrtime.bigint()) / 1e6;    /* ms */

function stream(target, n, user) {
    return new Promise((resolve, reject) => {
        const t = TARGETS[target];
        const start = now();
        const lat = [];
        let ttfb = null;
        let first = null;
        let buf = '';
        let raw = '';

        const req = http.request({
            host: '127.0.0.1', port: t.port, path: t.path, method: 'POST',
            agent: false,
            headers: { 'content-type': 'application/json',
                       'content-length': Buffer.byteLength(BODY),
                       'x-events': String(n), 'x-delay': String(delay),
                       'x-user': user },
        }, (res) => {
            ttfb = now() - start;
            res.setEncoding('utf8');

            res.on('data', (s) => {
                const at = now();
                raw += s;
                buf += s;

                let end;
                while ((end = buf.indexOf('\n\n')) >= 0) {
                    const ev = buf.slice(0, end);
                    buf = buf.slice(end + 2);

                    const m = /"t":"(\d+)"/.exec(ev);
                    if (m && /"content":/.test(ev)) {
                        if (first === null) {
                            first = at - start;
                        }
                        lat.push(at - Number(BigInt(m[1])) / 1e6);
                    }
                }
            });

            res.on('end', () => resolve({ status: res.statusCode, ttfb,
                                          first, lat, raw }));
        });

        req.on('error', reject);
        req.setNoDelay(true);
        req.end(BODY);
    });
}

function pct(a, p) {
    const s = Float64Array.from(a).sort();
    return s[Math.min(s.length - 1, Math.ceil(p / 100 * s.length) - 1)];
}

const f = (v) => v.toFixed(3);

async function main() {
    /* warm up: connections, the worker's pools, the JIT */

    for (const target of Object.keys(TARGETS)) {
        await stream(target, 20, 'warmup');
    }

    const res = { direct: [], plain: [], module: [] };
    const order = Object.keys(TARGETS);

    for (let r = 0; r < runs; r++) {
        for (let k = 0; k < order.length; k++) {
            const target = order[(r + k) % order.length];
            const s = await stream(target, events, 'bench' + r);

            if (s.status !== 200 || s.lat.length !== events) {
                throw new Error(target + ': status ' + s.status + ', '
                                + s.lat.length + ' events of ' + events);
            }

            res[target].push(s);
        }
    }

    /* the gateway passed the stream the client asked for: no usage */

    for (const s of res.module) {
        if (/"usage"/.test(s.raw)) {
            throw new Error('a usage reached the client through the module');
        }
    }

    const text = (s) => s.raw.replace(/"t":"\d+",/g, '')
                             .replace(/"created":\d+/g, '"created":0');

    if (text(res.module[0]) !== text(res.direct[0])) {
        throw new Error('the stream through the module differs');
    }

    /*
     * an event's added delay: its latency through the proxy less its
     * latency direct, each the median of the runs, so that a pause of the
     * client or the machine in one run (a garbage collection, a timer
     * late) is not taken for the proxy's; "paired" is the run by run
     * difference, pauses and all
     */

    const median = (a) => pct(a, 50);
    const perEvent = (all, i) => median(all.map((s) => s.lat[i]));

    console.log('%d events, %s ms apart, %d runs of each; ms',
                events, delay, runs);
    console.log('');
    console.log('| path | TTFB | first event | latency p50 | p99 | max '
                + '| added p50 | added p99 | added max | paired p99 |');
    console.log('| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: '
                + '| ---: | ---: |');

    const verdict = {};

    for (const target of order) {
        const all = res[target];
        const lat = [];
        const added = [];
        const paired = [];

        for (let i = 0; i < events; i++) {
            lat.push(perEvent(all, i));
            added.push(perEvent(all, i) - perEvent(res.direct, i));
        }

        all.forEach((s, r) => s.lat.forEach((l, i) =>
            paired.push(l - res.direct[r].lat[i])));

        const row = [target,
                     f(median(all.map((s) => s.ttfb))),
                     f(median(all.map((s) => s.first))),
                     f(pct(lat, 50)), f(pct(lat, 99)), f(Math.max(...lat))];

        if (target === 'direct') {
            row.push('', '', '', '');

        } else {
            row.push(f(pct(added, 50)), f(pct(added, 99)),
                     f(Math.max(...added)), f(pct(paired, 99)));
            verdict[target] = pct(added, 99);
        }

        console.log('| ' + row.join(' | ') + ' |');
    }

    console.log('');
    console.log('TTFB and first event: medians of the runs; latency: per '
                + 'event, the median of the runs');
    console.log('added delay p99 through the module: %s ms (goal: at most 1)',
                f(verdict.module));

    process.exitCode = verdict.module <= 1 ? 0 : 2;
}

main().catch((e) => {
    console.error('bench-stream: ' + e.message);
    process.exit(1);
});
END

cat > "$dir/nginx.conf" <<END
$(bench_conf_head)

    token_budget_zone \$http_x_user zone=users:16m tokens=1000000000 per=1d;

$(bench_conf_paths)

    upstream sse {
        server 127.0.0.1:$upport;
        keepalive 8;
    }

    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_buffering off;

    server {
        listen 127.0.0.1:$port;

        location /plain/v1/ {
            proxy_pass http://sse/v1/;
        }

        location /tb/v1/ {
            token_budget on;
            token_budget_limit zone=users;
            token_budget_reserve_output 16000;
            token_budget_stream_cut reserved;
            proxy_pass http://sse/v1/;
        }

        location /budget/ {
            token_budget_api;
        }
    }
}
END

node "$dir/sse.js" "$upport" &
upstream=$!

cleanup() {
    "$nginx" -p "$dir/" -c "$dir/nginx.conf" -s quit 2>/dev/null || true
    kill "$upstream" 2>/dev/null || true
}

trap cleanup EXIT

"$nginx" -p "$dir/" -c "$dir/nginx.conf"
sleep 1

rc=0
node "$dir/client.js" "$port" "$upport" "$events" "$delay" "$runs" || rc=$?

echo
echo "the key of the first run through the module (prompt + $events expected):"
echo "$(curl -s "http://127.0.0.1:$port/budget/zones/users/keys/bench0")"

# memory: the worker's peak RSS before and after one long stream each

worker=$(pgrep -P "$(cat "$dir/nginx.pid")" | head -n 1)
memevents=${BENCH_MEMORY_EVENTS:-10000}

hwm() {
    awk '/^VmHWM:/ { print $2 }' "/proc/$worker/status"
}

echo
echo "| one stream of $memevents events, no delay | worker peak RSS growth |"
echo "| --- | ---: |"

for loc in plain tb; do
    before=$(hwm)
    curl -s -o /dev/null -H 'Content-Type: application/json' \
        -H "X-Events: $memevents" -H 'X-Delay: 0' -H 'X-User: memory' \
        -d '{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"Hi"}]}' \
        "http://127.0.0.1:$port/$loc/v1/chat/completions"
    after=$(hwm)
    echo "| $( [ $loc = tb ] && echo module || echo plain ) |" \
         "$(( (after - before) / 1024 )) MB ($(( (after - before) * 1024 / memevents )) bytes an event) |"
done

exit $rc

/*
 * Token budget: the openai npm SDK against a spent windowed budget.  It
 * gets a 429 with Retry-After, waits that long by itself, retries, and the
 * retry passes; what can never fit, or with no retries left, it is not
 * retried.
 *
 *   TB_GATEWAY=http://127.0.0.1:PORT/v1 TB_UPSTREAM=http://127.0.0.1:PORT \
 *   TB_API=http://127.0.0.1:PORT/budget TB_PERIOD=2 \
 *       node --test t/e2e/retry.test.mjs
 *
 * The gateway limits the key in the x-user header to 100 tokens per
 * TB_PERIOD seconds, windows aligned to the epoch.  One "Hello!" message
 * is 9 prompt tokens; the reservation is that and max_tokens.  Run by
 * t/24-zone-sdk.t, which starts nginx and the mock upstream.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';

import OpenAI from 'openai';


const GATEWAY = process.env.TB_GATEWAY;
const UPSTREAM = process.env.TB_UPSTREAM;
const API = process.env.TB_API;
const PERIOD = Number(process.env.TB_PERIOD || 2) * 1000;
const skip = (GATEWAY && UPSTREAM && API) ? false
                                          : 'TB_GATEWAY, TB_UPSTREAM, TB_API';

const messages = [{ role: 'user', content: 'Hello!' }];


/* a client whose every HTTP attempt is recorded, with its timing */

function client(user, maxRetries) {
    const calls = [];

    const fetch = async (url, init) => {
        const call = { url: String(url), start: Date.now() };
        calls.push(call);

        const r = await globalThis.fetch(url, init);

        call.end = Date.now();
        call.status = r.status;
        call.retryAfter = r.headers.get('retry-after');

        return r;
    };

    const openai = new OpenAI({ apiKey: 'sk-test', baseURL: GATEWAY,
                                fetch: fetch, maxRetries: maxRetries,
                                timeout: 20000,
                                defaultHeaders: { 'x-user': user } });

    return { openai, calls };
}


async function json(url, init) {
    const r = await fetch(url, init);
    assert.equal(r.status, 200, url);
    return r.json();
}

const reset = () => json(UPSTREAM + '/__reset', { method: 'POST' });
const recorded = () => json(UPSTREAM + '/__requests');
const key = (user) => json(API + '/zones/fast/keys/' + user);


/* spends tokens of the key past the SDK: the upstream reports usage */

async function spend(user, usage) {
    const r = await fetch(GATEWAY + '/chat/completions', {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'x-user': user,
                   'x-mock': 'usage=' + usage },
        body: JSON.stringify({ model: 'm', messages: messages,
                               max_tokens: 1 }),
    });

    assert.equal(r.status, 200, 'spent');
    await r.arrayBuffer();
}


/* the start of the next window, and a little */

async function windowStart() {
    const next = (Math.floor(Date.now() / PERIOD) + 1) * PERIOD + 50;
    await sleep(next - Date.now());
}


test('more than the whole budget is not retried', { skip }, async () => {
    const { openai, calls } = client('sdk-big', 3);

    const err = await openai.chat.completions.create({
        model: 'm', messages: messages, max_tokens: 92,
    }).then(() => assert.fail('passed'), (e) => e);

    assert.equal(err.status, 413);
    assert.equal(err.code, 'budget_exceeded');
    assert.equal(calls.length, 1, 'one attempt');
});

test('without retries the 429 is thrown', { skip }, async () => {
    const { openai, calls } = client('sdk-none', 0);

    await windowStart();
    await spend('sdk-none', '90,10');

    const err = await openai.chat.completions.create({
        model: 'm', messages: messages, max_tokens: 1,
    }).then(() => assert.fail('passed'), (e) => e);

    assert.ok(err instanceof OpenAI.RateLimitError, 'RateLimitError');
    assert.equal(err.status, 429);
    assert.equal(err.code, 'rate_limit_exceeded');
    assert.match(err.headers.get('retry-after') ?? '', /^[1-9]\d*$/);
    assert.equal(calls.length, 1, 'one attempt');
});

test('a 429 is retried after Retry-After, and passes', { skip },
     async (t) => {
    const { openai, calls } = client('sdk', 3);

    /*
     * 90 spent right after a window starts; 30 fit again once the next
     * window has taken enough of the 90 out, 2.44 periods of 2s in: the
     * SDK is told 3s and retries then
     */

    await windowStart();
    await spend('sdk', '80,10');
    await reset();

    const r = await openai.chat.completions.create({
        model: 'm', messages: messages, max_tokens: 21,
    }, { headers: { 'x-mock': 'usage=9,16' } });

    assert.equal(r.object, 'chat.completion');
    assert.equal(r.usage.total_tokens, 25);

    assert.deepEqual(calls.map((c) => c.status), [429, 200],
                     'refused, then passed');

    const wait = Number(calls[0].retryAfter);

    assert.ok(wait >= 1 && wait <= 2 * PERIOD / 1000,
              'Retry-After ' + calls[0].retryAfter);

    /* the SDK waited at least Retry-After, and not much more */

    const waited = calls[1].start - calls[0].end;

    t.diagnostic('Retry-After ' + wait + 's, the SDK waited ' + waited
                 + 'ms');

    assert.ok(waited >= wait * 1000 - 2,
              'waited ' + waited + 'ms for ' + wait + 's');
    assert.ok(waited < wait * 1000 + 1000, 'waited ' + waited + 'ms');

    /* the retry, as the upstream saw it: once, after Retry-After */

    const reqs = await recorded();

    assert.equal(reqs.length, 1, 'one request upstream');
    assert.equal(reqs[0].headers['x-stainless-retry-count'], '1');
    assert.ok(reqs[0].time * 1000 >= calls[0].end + wait * 1000 - 2,
              'upstream got it ' + (reqs[0].time * 1000 - calls[0].end)
              + 'ms after the 429');

    /* settled: 90 weighed down by the window, and the 25 reported */

    const k = await key('sdk');

    assert.equal(k.reserved, 0);
    assert.equal(k.in_flight, 0);
    assert.ok(k.used >= 25 && k.used <= 25 + 90, 'used ' + k.used);
});

/*
 * Token budget: streams end to end with the providers' own SDKs, the
 * openai and @anthropic-ai/sdk npm packages, against nginx with the module
 * in front of the mock upstream (t/upstream/server.js).
 *
 *   TB_GATEWAY=http://127.0.0.1:PORT/v1 TB_CUT=http://127.0.0.1:PORT/cut/v1 \
 *   TB_BUDGET=http://127.0.0.1:PORT/budget TB_UPSTREAM=http://127.0.0.1:PORT \
 *       node --test t/e2e/stream.test.mjs
 *
 * TB_GATEWAY passes streams whole, under a budget (the usage asked for
 * and taken out again); TB_CUT cuts them after the 5 output tokens
 * token_budget_reserve_output reserves; TB_BUDGET is token_budget_api,
 * whose zone "user" is keyed by the X-User header.  The Anthropic SDK adds
 * /v1 itself and gets the URLs without.  Run by t/32-sdk-stream.t.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';

import OpenAI from 'openai';
import Anthropic from '@anthropic-ai/sdk';


const GATEWAY = process.env.TB_GATEWAY;
const CUT = process.env.TB_CUT;
const BUDGET = process.env.TB_BUDGET;
const UPSTREAM = process.env.TB_UPSTREAM;
const skip = (GATEWAY && CUT && BUDGET && UPSTREAM)
             ? false : 'TB_GATEWAY, TB_CUT, TB_BUDGET or TB_UPSTREAM unset';

/* what the mock writes: its words, one a token, at most 16 */
const WORDS = ['Hello', ' from', ' the', ' mock', ' upstream', ',', ' one',
               ' token', ' at', ' a', ' time', '.', ' Budget', ' me',
               ' gently', '!'];
const mockText = (n) => WORDS.slice(0, n).join('');

const CUT_AT = 5;

const messages = [{ role: 'user', content: 'Say hello to the budget.' }];


/*
 * clients with the SDKs' own retries (2): after a cut nginx closes the
 * client's connection although the response said keep-alive, and a
 * request sent on it before the close is seen fails with a connection
 * error, which the SDKs retry; "calls" counts every HTTP attempt
 */

let calls = 0;

const counting = (url, init) => {
    calls++;
    return globalThis.fetch(url, init);
};

function openai(baseURL, retries) {
    return new OpenAI({ apiKey: 'sk-test', baseURL: baseURL,
                        maxRetries: retries ?? 2, timeout: 30000,
                        fetch: counting });
}

function anthropic(baseURL, retries) {
    return new Anthropic({ apiKey: 'sk-ant-test',
                           baseURL: baseURL.replace(/\/v1\/?$/, ''),
                           maxRetries: retries ?? 2, timeout: 30000,
                           fetch: counting });
}

/* per request: the key charged, and what the mock does */

const opts = (user, mock) => ({ headers: { 'x-user': user,
                                           'x-mock': mock ?? '' } });


async function get(url, init) {
    const r = await fetch(url, init);
    assert.equal(r.status, 200, url);
    return r.json();
}

/* the mock's record of a key's request, once its stream ended there */

async function recorded(user) {
    for (let i = 0; i < 100; i++) {
        const reqs = await get(UPSTREAM + '/__requests');
        const req = reqs.filter((r) => r.headers['x-user'] === user).pop();

        if (req && req.closed_time !== undefined) {
            return req;
        }

        await new Promise((resolve) => setTimeout(resolve, 50));
    }

    assert.fail('no stream of ' + user + ' ended at the mock');
}

/* a key's budget, once nothing is reserved or in flight */

async function settled(user) {
    let k = null;

    for (let i = 0; i < 100; i++) {
        k = await get(BUDGET + '/zones/user/keys/' + user);

        if (!k.reserved && !k.in_flight) {
            return k;
        }

        await new Promise((resolve) => setTimeout(resolve, 50));
    }

    assert.fail('still reserved: ' + JSON.stringify(k));
}

/* chunks without what differs from one response to another */

const same = (chunk) => Object.assign({}, chunk, { id: 'ID', created: 0 });


/* a whole chat stream, the client not asking for the usage */

test('chat stream through the gateway: what the mock streams', { skip },
     async () => {
    const body = { model: 'gpt-4o', messages: messages, stream: true };

    const direct = [];
    for await (const chunk of await openai(UPSTREAM + '/v1')
                   .chat.completions.create(body, opts('direct-chat')))
    {
        direct.push(chunk);
    }

    const chunks = [];
    for await (const chunk of await openai(GATEWAY)
                   .chat.completions.create(body, opts('sdk-chat')))
    {
        chunks.push(chunk);
    }

    const text = (cs) => cs.map((c) => c.choices.map(
        (ch) => ch.delta.content ?? '').join('')).join('');

    assert.equal(text(direct), mockText(16));
    assert.equal(text(chunks), text(direct), 'the same content');
    assert.deepEqual(chunks.map(same), direct.map(same), 'the same chunks');

    assert.equal(chunks.filter((c) => c.choices.length === 0).length, 0,
                 'no chunk without choices');
    assert.equal(chunks.filter((c) => 'usage' in c).length, 0,
                 'no usage, not even null');
    assert.equal(chunks.at(-1).choices[0].finish_reason, 'stop');

    /* the usage was asked for, and settles the key */

    const req = await recorded('sdk-chat');
    assert.equal(JSON.parse(req.body).stream_options.include_usage, true);

    const k = await settled('sdk-chat');
    assert.equal(k.used, Number(req.headers['x-token-count']) + 16);
});

test('chat stream helper through the gateway', { skip }, async () => {
    const stream = openai(GATEWAY).chat.completions.stream(
        { model: 'gpt-4o', messages: messages }, opts('sdk-chat-helper'));

    let chunks = 0;
    stream.on('chunk', (c) => {
        assert.ok(c.choices.length > 0, 'no chunk without choices');
        assert.ok(!('usage' in c), 'no usage');
        chunks++;
    });

    const final = await stream.finalChatCompletion();

    assert.equal(final.choices[0].message.content, mockText(16));
    assert.equal(final.choices[0].finish_reason, 'stop');
    assert.equal(final.usage, undefined);
    assert.equal(chunks, 18);
});


/* cut after 5 tokens: finish_reason "length", no exception */

test('chat stream cut', { skip }, async () => {
    const stream = await openai(CUT).chat.completions.create(
        { model: 'gpt-4o', messages: messages, stream: true },
        opts('sdk-chat-cut', 'chunkdelay=20'));

    const chunks = [];
    for await (const chunk of stream) {
        chunks.push(chunk);
    }

    const text = chunks.map((c) => c.choices.map(
        (ch) => ch.delta.content ?? '').join('')).join('');

    assert.equal(text, mockText(CUT_AT));
    assert.equal(chunks.at(-1).choices.length, 1);
    assert.equal(chunks.at(-1).choices[0].finish_reason, 'length');
    assert.equal(chunks.filter((c) => c.choices.length === 0).length, 0);
    assert.equal(chunks.filter((c) => 'usage' in c).length, 0);

    const req = await recorded('sdk-chat-cut');
    assert.ok(req.aborted && req.events_sent < req.events,
              'the upstream closed early');

    const k = await settled('sdk-chat-cut');
    assert.equal(k.used, Number(req.headers['x-token-count']) + CUT_AT);
});

test('chat stream cut, usage asked for', { skip }, async () => {
    const stream = await openai(CUT).chat.completions.create(
        { model: 'gpt-4o', messages: messages, stream: true,
          stream_options: { include_usage: true } },
        opts('sdk-chat-cut-usage', 'chunkdelay=20'));

    const chunks = [];
    for await (const chunk of stream) {
        chunks.push(chunk);
    }

    const usage = chunks.at(-1);
    const req = await recorded('sdk-chat-cut-usage');
    const prompt = Number(req.headers['x-token-count']);

    assert.equal(chunks.at(-2).choices[0].finish_reason, 'length');
    assert.equal(usage.choices.length, 0);
    assert.equal(usage.usage.prompt_tokens, prompt);
    assert.equal(usage.usage.completion_tokens, CUT_AT);
    assert.equal(usage.usage.total_tokens, prompt + CUT_AT);
});

test('chat stream helper cut', { skip }, async () => {
    const stream = openai(CUT).chat.completions.stream(
        { model: 'gpt-4o', messages: messages },
        opts('sdk-chat-helper-cut', 'chunkdelay=20'));

    let content = '';
    stream.on('content', (delta) => { content += delta; });

    const final = await stream.finalChatCompletion();

    assert.equal(content, mockText(CUT_AT));
    assert.equal(final.choices[0].message.content, mockText(CUT_AT));
    assert.equal(final.choices[0].finish_reason, 'length');
});


/* the Responses API cut: response.incomplete, no exception */

test('responses stream cut', { skip }, async () => {
    const stream = await openai(CUT).responses.create(
        { model: 'gpt-4o', input: 'Say hello.', stream: true },
        opts('sdk-responses-cut', 'chunkdelay=20'));

    const events = [];
    for await (const ev of stream) {
        events.push(ev);
    }

    const text = events.filter((e) => e.type === 'response.output_text.delta')
                       .map((e) => e.delta).join('');
    const last = events.at(-1);
    const req = await recorded('sdk-responses-cut');
    const prompt = Number(req.headers['x-token-count']);

    assert.equal(text, mockText(CUT_AT));
    assert.equal(last.type, 'response.incomplete');
    assert.equal(last.response.status, 'incomplete');
    assert.equal(last.response.incomplete_details.reason, 'max_output_tokens');
    assert.equal(last.response.usage.input_tokens, prompt);
    assert.equal(last.response.usage.output_tokens, CUT_AT);
    assert.equal(last.response.id, events[0].response.id);
    assert.equal(events.filter((e) => e.type === 'response.completed').length,
                 0);
    assert.ok(req.aborted, 'the upstream closed early');
});

test('responses stream helper cut: finalResponse', { skip }, async () => {
    const stream = openai(CUT).responses.stream(
        { model: 'gpt-4o', input: 'Say hello.' },
        opts('sdk-responses-helper-cut', 'chunkdelay=20'));

    let text = '';
    stream.on('response.output_text.delta', (e) => { text += e.delta; });

    const final = await stream.finalResponse();

    assert.equal(text, mockText(CUT_AT));
    assert.equal(final.status, 'incomplete');
    assert.equal(final.incomplete_details.reason, 'max_output_tokens');
    assert.equal(final.usage.output_tokens, CUT_AT);
});

test('responses stream helper cut: the text in finalResponse',
     { skip, todo: skip ? false : 'the module\'s response.incomplete has '
       + '"output": [], and the SDK takes the response of '
       + 'response.incomplete as the final one: output_text is empty' },
     async () => {
    const stream = openai(CUT).responses.stream(
        { model: 'gpt-4o', input: 'Say hello.' },
        opts('sdk-responses-helper-text', 'chunkdelay=20'));

    const final = await stream.finalResponse();

    assert.equal(final.status, 'incomplete');
    assert.equal(final.output_text, mockText(CUT_AT));
    assert.equal(final.output[0]?.content?.[0]?.text, mockText(CUT_AT));
});


/* Anthropic: max_tokens is required, so the reservation is the client's;
   the mock ignores it and streams on (words=16): stop_reason "max_tokens",
   no exception */

test('anthropic messages.create stream cut', { skip }, async () => {
    const stream = await anthropic(CUT).messages.create(
        { model: 'claude-sonnet-4-5', max_tokens: CUT_AT,
          messages: messages, stream: true },
        opts('sdk-anthropic-cut', 'words=16 chunkdelay=20'));

    const events = [];
    for await (const ev of stream) {
        events.push(ev);
    }

    const text = events.filter((e) => e.type === 'content_block_delta')
                       .map((e) => e.delta.text).join('');
    const delta = events.filter((e) => e.type === 'message_delta');

    assert.equal(text, mockText(CUT_AT));
    assert.equal(delta.length, 1);
    assert.equal(delta[0].delta.stop_reason, 'max_tokens');
    assert.equal(delta[0].usage.output_tokens, CUT_AT);
    assert.equal(events.at(-1).type, 'message_stop');

    const req = await recorded('sdk-anthropic-cut');
    assert.ok(req.aborted && req.events_sent < req.events,
              'the upstream closed early');

    const k = await settled('sdk-anthropic-cut');
    assert.equal(k.used, Number(req.headers['x-token-count']) + CUT_AT);
});

test('anthropic messages.stream cut: finalMessage', { skip }, async () => {
    const stream = anthropic(CUT).messages.stream(
        { model: 'claude-sonnet-4-5', max_tokens: CUT_AT, messages: messages },
        opts('sdk-anthropic-stream-cut', 'words=16 chunkdelay=20'));

    let text = '';
    stream.on('text', (delta) => { text += delta; });

    const final = await stream.finalMessage();

    assert.equal(text, mockText(CUT_AT));
    assert.equal(final.stop_reason, 'max_tokens');
    assert.equal(final.content.length, 1);
    assert.equal(final.content[0].type, 'text');
    assert.equal(final.content[0].text, mockText(CUT_AT));
    assert.equal(final.usage.output_tokens, CUT_AT);
    assert.equal(await stream.finalText(), mockText(CUT_AT));
});

test('anthropic messages.stream uncut: finalMessage', { skip }, async () => {
    const stream = anthropic(GATEWAY).messages.stream(
        { model: 'claude-sonnet-4-5', max_tokens: 1024, messages: messages },
        opts('sdk-anthropic-stream'));

    const final = await stream.finalMessage();

    assert.equal(final.stop_reason, 'end_turn');
    assert.equal(final.content[0].text, mockText(16));
    assert.equal(final.usage.output_tokens, 16);
});


/* a request right after a cut, on the connection pool of the cut one */

test('a request right after a cut, without retries',
     { skip, todo: skip ? false : 'after a cut nginx closes the client\'s '
       + 'connection although the response said "Connection: keep-alive": '
       + 'a request sent on it before the close is seen fails ("other side '
       + 'closed"); this is racy and may pass' },
     async () => {
    for (let i = 0; i < 5; i++) {
        const client = openai(CUT, 0);

        const stream = await client.chat.completions.create(
            { model: 'gpt-4o', messages: messages, stream: true },
            opts('sdk-after-cut-' + i));

        for await (const chunk of stream) {
            void chunk;
        }

        await client.chat.completions.create(
            { model: 'gpt-4o', messages: messages, max_tokens: 1 },
            opts('sdk-after-cut-' + i));
    }
});

/*
 * Token budget: end to end with the providers' own SDKs, the openai and
 * @anthropic-ai/sdk npm packages, against nginx with the module in front
 * of the mock upstream (t/upstream/server.js).
 *
 *   TB_GATEWAY=http://127.0.0.1:PORT/v1 TB_UPSTREAM=http://127.0.0.1:PORT \
 *       node --test t/e2e/sdk.test.mjs
 *
 * TB_GATEWAY is the OpenAI base URL; the Anthropic SDK adds /v1 itself and
 * gets it without.  TB_UPSTREAM is the mock, asked what reached it.  Run
 * by t/17-sdk.t, which starts both.
 *
 * The counts asserted are the published recipe's: the cookbook's example
 * conversation is 124 prompt tokens for gpt-4o, its weather tool example
 * 101, as the OpenAI API reported them; the mock answers usage with the
 * count the module sent up in X-Token-Count.
 */

import { test } from 'node:test';
import assert from 'node:assert/strict';

import OpenAI from 'openai';
import Anthropic from '@anthropic-ai/sdk';


const GATEWAY = process.env.TB_GATEWAY;
const UPSTREAM = process.env.TB_UPSTREAM;
const skip = (GATEWAY && UPSTREAM) ? false : 'TB_GATEWAY and TB_UPSTREAM unset';

/* what the mock writes: its words, one a token, at most 16 */
const WORDS = ['Hello', ' from', ' the', ' mock', ' upstream', ',', ' one',
               ' token', ' at', ' a', ' time', '.', ' Budget', ' me',
               ' gently', '!'];
const mockText = (n) => WORDS.slice(0, n).join('');


/* clients whose every HTTP attempt is counted: retries would show */

function clients() {
    const calls = [];

    const fetch = (url, init) => {
        calls.push(String(url));
        return globalThis.fetch(url, init);
    };

    const openai = new OpenAI({ apiKey: 'sk-test', baseURL: GATEWAY,
                                fetch: fetch, timeout: 60000 });
    const anthropic = new Anthropic({ apiKey: 'sk-ant-test',
                                      baseURL: GATEWAY.replace(/\/v1\/?$/, ''),
                                      fetch: fetch, timeout: 60000 });

    return { openai, anthropic, calls };
}


async function upstream(path, init) {
    const r = await fetch(UPSTREAM + path, init);
    assert.equal(r.status, 200, 'mock upstream ' + path);
    return r.json();
}

const reset = () => upstream('/__reset', { method: 'POST' });
const recorded = () => upstream('/__requests');


/* what reached the upstream: one request, with the module's count */

async function passedOnce(path, count) {
    const reqs = await recorded();

    assert.equal(reqs.length, 1, 'one request upstream');
    assert.equal(reqs[0].path, path);
    assert.equal(reqs[0].headers['x-token-count'], String(count),
                 'the count sent upstream');
}


/* a rejection: thrown once by the SDK, not retried, not forwarded */

async function rejected(promise, calls) {
    const err = await promise.then(
        () => assert.fail('the request was not rejected'),
        (e) => e);

    assert.equal(calls.length, 1, 'one attempt, no retry');
    assert.equal((await recorded()).length, 0, 'nothing upstream');

    return err;
}


const cookbookMessages = [
    { role: 'system',
      content: 'You are a helpful, pattern-following assistant that '
               + 'translates corporate jargon into plain English.' },
    { role: 'system', name: 'example_user',
      content: 'New synergies will help drive top-line growth.' },
    { role: 'system', name: 'example_assistant',
      content: 'Things working well together will increase revenue.' },
    { role: 'system', name: 'example_user',
      content: 'Let\'s circle back when we have more bandwidth to touch '
               + 'base on opportunities for increased leverage.' },
    { role: 'system', name: 'example_assistant',
      content: 'Let\'s talk later when we\'re less busy about how to do '
               + 'better.' },
    { role: 'user',
      content: 'This late pivot means we don\'t have time to boil the '
               + 'ocean for the client deliverable.' },
];

const cookbookToolMessages = [
    { role: 'system',
      content: 'You are a helpful assistant that can answer to questions '
               + 'about the weather.' },
    { role: 'user', content: 'What\'s the weather like in San Francisco?' },
];

const cookbookTools = [{
    type: 'function',
    function: {
        name: 'get_current_weather',
        description: 'Get the current weather in a given location',
        parameters: {
            type: 'object',
            properties: {
                location: {
                    type: 'string',
                    description: 'The city and state, e.g. San Francisco, CA',
                },
                unit: {
                    type: 'string',
                    description: 'The unit of temperature to return',
                    enum: ['celsius', 'fahrenheit'],
                },
            },
            required: ['location'],
        },
    },
}];

/* "hello" and n - 1 " hello": n tokens in cl100k_base and o200k_base */
const hellos = (n) => 'hello' + ' hello'.repeat(n - 1);


/* accepted */

test('chat.completions.create passes, counted', { skip }, async () => {
    const { openai, calls } = clients();
    await reset();

    const r = await openai.chat.completions.create({
        model: 'gpt-4o', messages: cookbookMessages, max_tokens: 5,
    });

    assert.equal(r.object, 'chat.completion');
    assert.equal(r.choices[0].message.content, mockText(5));
    assert.equal(r.choices[0].finish_reason, 'length');
    assert.equal(r.usage.prompt_tokens, 124);
    assert.equal(calls.length, 1);

    await passedOnce('/v1/chat/completions', 124);
});

test('chat.completions.create with tools passes, counted', { skip },
     async () => {
    const { openai } = clients();
    await reset();

    const r = await openai.chat.completions.create({
        model: 'gpt-4o',
        messages: cookbookToolMessages,
        tools: cookbookTools,
        temperature: 0,
        max_tokens: 16,
    });

    assert.equal(r.choices[0].message.content, mockText(16));
    assert.equal(r.usage.prompt_tokens, 101);

    await passedOnce('/v1/chat/completions', 101);
});

test('completions.create passes, counted', { skip }, async () => {
    const { openai } = clients();
    await reset();

    let r = await openai.completions.create({
        model: 'gpt-4o', prompt: 'Say this is a test', max_tokens: 7,
    });

    assert.equal(r.object, 'text_completion');
    assert.equal(r.choices[0].text, mockText(7));
    assert.equal(r.usage.prompt_tokens, 5);

    await passedOnce('/v1/completions', 5);

    await reset();

    r = await openai.completions.create({
        model: 'gpt-4', prompt: [[9906, 1917], [0]], max_tokens: 2,
    });

    assert.equal(r.choices[0].text, mockText(2));
    assert.equal(r.usage.prompt_tokens, 3);

    await passedOnce('/v1/completions', 3);
});

test('embeddings.create passes, counted', { skip }, async () => {
    const { openai } = clients();
    await reset();

    /* the SDK asks for base64 and decodes it */

    const r = await openai.embeddings.create({
        model: 'text-embedding-3-small', input: ['hello world', 'hello'],
    });

    assert.equal(r.data.length, 2);
    assert.equal(r.data[1].embedding.length, 8);
    assert.ok(Math.abs(r.data[0].embedding[0] - Math.sin(1)) < 1e-6);
    assert.equal(r.usage.prompt_tokens, 3);

    await passedOnce('/v1/embeddings', 3);
});

test('responses.create passes, counted', { skip }, async () => {
    const { openai } = clients();
    await reset();

    /* instructions 3 + 1, input 3 + 2, priming 3 */

    const r = await openai.responses.create({
        model: 'gpt-4o', instructions: 'hello', input: 'hello world',
        max_output_tokens: 16,
    });

    assert.equal(r.object, 'response');
    assert.equal(r.output_text, mockText(16));
    assert.equal(r.usage.input_tokens, 12);

    await passedOnce('/v1/responses', 12);
});

test('anthropic messages.create passes, estimated', { skip }, async () => {
    const { anthropic, calls } = clients();
    await reset();

    /* system 1, the message 3 + 1 + 2: 7, estimated at 120%: 9 */

    const r = await anthropic.messages.create({
        model: 'claude-sonnet-4-5', max_tokens: 16, system: 'hello',
        messages: [{ role: 'user', content: 'hello world' }],
    });

    assert.equal(r.type, 'message');
    assert.equal(r.content[0].text, mockText(16));
    assert.equal(r.stop_reason, 'max_tokens');
    assert.equal(r.usage.input_tokens, 9);
    assert.equal(calls.length, 1);

    await passedOnce('/v1/messages', 9);
});


/* streaming passes through */

test('chat.completions.create streams', { skip }, async () => {
    const { openai } = clients();
    await reset();

    const stream = await openai.chat.completions.create({
        model: 'gpt-4o', messages: cookbookMessages, max_tokens: 6,
        stream: true, stream_options: { include_usage: true },
    });

    let text = '';
    let usage = null;
    let finish = null;

    for await (const chunk of stream) {
        for (const c of chunk.choices) {
            text += c.delta.content ?? '';
            finish = c.finish_reason ?? finish;
        }

        usage = chunk.usage ?? usage;
    }

    assert.equal(text, mockText(6));
    assert.equal(finish, 'length');
    assert.equal(usage.prompt_tokens, 124);

    await passedOnce('/v1/chat/completions', 124);
});

test('responses.create streams', { skip }, async () => {
    const { openai } = clients();
    await reset();

    const stream = await openai.responses.create({
        model: 'gpt-4o', instructions: 'hello', input: 'hello world',
        max_output_tokens: 4, stream: true,
    });

    let text = '';
    let final = null;

    for await (const ev of stream) {
        if (ev.type === 'response.output_text.delta') {
            text += ev.delta;
        }

        if (ev.type === 'response.completed'
            || ev.type === 'response.incomplete')
        {
            final = ev.response;
        }
    }

    assert.equal(text, mockText(4));
    assert.equal(final.usage.input_tokens, 12);

    await passedOnce('/v1/responses', 12);
});

test('anthropic messages.create streams', { skip }, async () => {
    const { anthropic } = clients();
    await reset();

    const stream = await anthropic.messages.create({
        model: 'claude-sonnet-4-5', max_tokens: 3, system: 'hello',
        messages: [{ role: 'user', content: 'hello world' }], stream: true,
    });

    let text = '';
    let input = null;
    let stop = null;

    for await (const ev of stream) {
        if (ev.type === 'message_start') {
            input = ev.message.usage.input_tokens;
        }

        if (ev.type === 'content_block_delta') {
            text += ev.delta.text;
        }

        if (ev.type === 'message_delta') {
            stop = ev.delta.stop_reason;
        }
    }

    assert.equal(text, mockText(3));
    assert.equal(input, 9);
    assert.equal(stop, 'max_tokens');

    await passedOnce('/v1/messages', 9);
});


/* over the context window: 413, the SDK's own error, not retried */

test('openai: a prompt over the context window', { skip }, async () => {
    const { openai, calls } = clients();
    await reset();

    /* 3 + 1 + 9000 + 3 in the messages, gpt-4's window is 8192 */

    const err = await rejected(openai.chat.completions.create({
        model: 'gpt-4', max_tokens: 100,
        messages: [{ role: 'user', content: hellos(9000) }],
    }), calls);

    assert.ok(err instanceof OpenAI.APIError, 'an APIError');
    assert.ok(!(err instanceof OpenAI.BadRequestError), 'not a 400');
    assert.equal(err.status, 413);
    assert.equal(err.code, 'context_length_exceeded');
    assert.equal(err.type, 'invalid_request_error');
    assert.equal(err.param, null);
    assert.equal(err.error.message,
                 'this model\'s maximum context length is 8192 tokens, '
                 + 'however you requested 9107 tokens (9007 in the '
                 + 'messages, 100 in the completion)');
    assert.match(err.message, /^413 this model's maximum context length/);
});

test('openai: a streaming prompt over the context window', { skip },
     async () => {
    const { openai, calls } = clients();
    await reset();

    const err = await rejected(openai.chat.completions.create({
        model: 'gpt-4', max_tokens: 100, stream: true,
        messages: [{ role: 'user', content: hellos(9000) }],
    }), calls);

    assert.ok(err instanceof OpenAI.APIError, 'an APIError');
    assert.equal(err.status, 413);
    assert.equal(err.code, 'context_length_exceeded');
});

test('anthropic: a prompt over the context window', { skip }, async () => {
    const { anthropic, calls } = clients();
    await reset();

    /*
     * 3 + 1 + 200000, estimated at 120%: 240005, with 1024 out over the
     * window of 200000 and its margin of 10%
     */

    const err = await rejected(anthropic.messages.create({
        model: 'claude-sonnet-4-5', max_tokens: 1024,
        messages: [{ role: 'user', content: hellos(200000) }],
    }), calls);

    assert.ok(err instanceof Anthropic.APIError, 'an APIError');

    if (Anthropic.ContentTooLargeError) {
        assert.ok(err instanceof Anthropic.ContentTooLargeError,
                  'a ContentTooLargeError');
    }

    assert.equal(err.status, 413);
    assert.equal(err.error.type, 'error');
    assert.equal(err.error.error.type, 'request_too_large');
    assert.equal(err.error.error.message,
                 'this model\'s maximum context length is 200000 tokens, '
                 + 'however you requested 241029 tokens (240005 in the '
                 + 'messages, 1024 in the completion)');
});


/* an unknown model: 400, model_not_found, not retried */

test('openai: an unknown model', { skip }, async () => {
    const { openai, calls } = clients();
    await reset();

    const err = await rejected(openai.chat.completions.create({
        model: 'gpt-nonesuch', messages: [{ role: 'user', content: 'hi' }],
    }), calls);

    assert.ok(err instanceof OpenAI.BadRequestError, 'a BadRequestError');
    assert.equal(err.status, 400);
    assert.equal(err.code, 'model_not_found');
    assert.equal(err.type, 'invalid_request_error');
});

test('anthropic: an unknown model', { skip }, async () => {
    const { anthropic, calls } = clients();
    await reset();

    const err = await rejected(anthropic.messages.create({
        model: 'claude-nonesuch', max_tokens: 16,
        messages: [{ role: 'user', content: 'hi' }],
    }), calls);

    assert.ok(err instanceof Anthropic.BadRequestError, 'a BadRequestError');
    assert.equal(err.status, 400);
    assert.equal(err.error.type, 'error');
    assert.equal(err.error.error.type, 'invalid_request_error');
});

#!/usr/bin/env node
/*
 * Token budget: a mock OpenAI- and Anthropic-compatible upstream for the
 * tests and the example.  No npm dependencies.
 *
 *   node t/upstream/server.js [PORT]      (or env PORT, default 8081)
 *
 * POST /v1/chat/completions, /v1/completions, /v1/embeddings,
 * /v1/responses, /v1/messages answer in the provider's shape, streaming
 * with "stream": true.  Usage: prompt tokens from the request header
 * x-token-count (else 0); completion tokens from max_tokens,
 * max_completion_tokens or max_output_tokens, at most 16 (else 16).
 *
 * Request header x-mock, directives separated by ";" or spaces:
 *   status=NNN        reply NNN with a provider-shaped error body
 *   delay=MS          wait before replying
 *   chunkdelay=MS     wait between stream events
 *   usage=N,M         report N prompt and M completion tokens
 *   nousage           omit usage
 *   die               close the connection in the middle of the response
 *
 * and for streams only:
 *   echo=N            stream the prompt's text (the string "prompt",
 *                     "input", or the last message's string "content")
 *                     in pieces of N characters instead of the mock words
 *   words=N           N of the mock words (one token each, repeated),
 *                     whatever the request's max_tokens: an upstream
 *                     that ignores the limit
 *   dieat=N           close the connection after N bytes of the stream
 *   split=N           write the stream in pieces of N bytes, each a write
 *                     of its own (a chunk of its own when chunked)
 *   crlf, cr          end lines in CR LF, or in CR alone
 *   comments          a comment line (": keep-alive") before each event,
 *                     comment-only blocks between events, "id:" and
 *                     "retry:" fields
 *   events            an "event:" line for events that have no name
 *   multiline         the data of an event on two "data:" lines, split
 *                     where JSON allows a line feed
 *   nospace           "data:" without the space before the value
 *   ascii             JSON with non-ASCII characters as \uXXXX escapes
 *
 * The bytes of a stream's body as written are recorded with the request,
 * in sent_base64, and how it ended: events (how many the stream has),
 * events_sent, sent_bytes, finished (all of it written) and aborted (the
 * connection closed by the other side before the end), with closed_time.
 *
 * GET /__requests lists the requests received (JSON), POST /__reset
 * forgets them, GET /health answers {"status":"ok"}.
 */

'use strict';

const http = require('http');

const MAX_COMPLETION = 16;
const WORDS = ['Hello', ' from', ' the', ' mock', ' upstream', ',', ' one',
               ' token', ' at', ' a', ' time', '.', ' Budget', ' me',
               ' gently', '!'];

let requests = [];
let serial = 0;


function parseMock(req) {
    const mock = { status: 0, delay: 0, chunkdelay: 0, usage: null,
                   nousage: false, die: false, dieat: 0, echo: 0, split: 0,
                   words: 0,
                   eol: '\n', comments: false, events: false,
                   multiline: false, nospace: false, ascii: false };
    const values = req.headersDistinct['x-mock'] || [];

    for (const value of values) {
        for (const d of value.split(/[;\s]+/)) {
            if (d === '') {
                continue;
            }

            const eq = d.indexOf('=');
            const name = eq === -1 ? d : d.slice(0, eq);
            const arg = eq === -1 ? '' : d.slice(eq + 1);

            switch (name) {
            case 'status':
                mock.status = parseInt(arg, 10) || 0;
                break;
            case 'delay':
                mock.delay = parseInt(arg, 10) || 0;
                break;
            case 'chunkdelay':
                mock.chunkdelay = parseInt(arg, 10) || 0;
                break;
            case 'usage': {
                const [p, c] = arg.split(',').map((n) => parseInt(n, 10));
                mock.usage = { prompt: p || 0, completion: c || 0 };
                break;
            }
            case 'nousage':
                mock.nousage = true;
                break;
            case 'die':
                mock.die = true;
                break;
            case 'dieat':
                mock.dieat = parseInt(arg, 10) || 0;
                break;
            case 'echo':
                mock.echo = parseInt(arg, 10) || 0;
                break;
            case 'words':
                mock.words = parseInt(arg, 10) || 0;
                break;
            case 'split':
                mock.split = parseInt(arg, 10) || 0;
                break;
            case 'crlf':
                mock.eol = '\r\n';
                break;
            case 'cr':
                mock.eol = '\r';
                break;
            case 'comments':
            case 'events':
            case 'multiline':
            case 'nospace':
            case 'ascii':
                mock[name] = true;
                break;
            default:
                break;
            }
        }
    }

    return mock;
}


function isCount(v) {
    return Number.isInteger(v) && v >= 0;
}


function includeUsage(body) {
    return body.stream_options != null
           && body.stream_options.include_usage === true;
}


/* the text echo=N streams */

function promptText(body) {
    for (const k of ['prompt', 'input']) {
        if (typeof body[k] === 'string') {
            return body[k];
        }
    }

    if (Array.isArray(body.messages) && body.messages.length > 0) {
        const m = body.messages[body.messages.length - 1];

        if (m !== null && typeof m === 'object'
            && typeof m.content === 'string')
        {
            return m.content;
        }
    }

    return null;
}


/* what to generate and what to report */

function plan(req, body, mock) {
    const text = mock.echo > 0 && body.stream === true ? promptText(body)
                                                       : null;

    if (text !== null) {
        const chars = Array.from(text);
        const pieces = [];

        for (let i = 0; i < chars.length; i += mock.echo) {
            pieces.push(chars.slice(i, i + mock.echo).join(''));
        }

        return planned(req, body, mock, pieces, false);
    }

    if (mock.words > 0) {
        const pieces = [];

        for (let i = 0; i < mock.words; i++) {
            pieces.push(WORDS[i % WORDS.length]);
        }

        return planned(req, body, mock, pieces, false);
    }

    let limit = null;

    for (const k of ['max_tokens', 'max_completion_tokens',
                     'max_output_tokens'])
    {
        if (isCount(body[k])) {
            limit = body[k];
            break;
        }
    }

    const n = limit === null ? MAX_COMPLETION
                             : Math.min(limit, MAX_COMPLETION);
    const pieces = [];

    for (let i = 0; i < n; i++) {
        pieces.push(WORDS[i % WORDS.length]);
    }

    return planned(req, body, mock, pieces,
                   limit !== null && limit <= MAX_COMPLETION);
}


function planned(req, body, mock, pieces, truncated) {
    const n = pieces.length;
    const header = parseInt(req.headers['x-token-count'], 10);

    const usage = mock.usage
        ? { prompt: mock.usage.prompt, completion: mock.usage.completion }
        : { prompt: isCount(header) ? header : 0, completion: n };

    return {
        model: typeof body.model === 'string' ? body.model : 'mock-model',
        pieces: pieces,
        text: pieces.join(''),
        truncated: truncated,
        usage: mock.nousage ? null : usage,
        created: Math.floor(Date.now() / 1000),
        id: (++serial).toString(36).padStart(8, '0'),
    };
}


/* errors */

function errorBody(dialect, status, message) {
    if (dialect === 'anthropic') {
        const types = { 400: 'invalid_request_error',
                        401: 'authentication_error',
                        403: 'permission_error', 404: 'not_found_error',
                        413: 'request_too_large', 429: 'rate_limit_error',
                        500: 'api_error', 529: 'overloaded_error' };
        return { type: 'error',
                 error: { type: types[status] || 'api_error',
                          message: message } };
    }

    const types = { 400: ['invalid_request_error', null],
                    401: ['invalid_request_error', 'invalid_api_key'],
                    403: ['invalid_request_error', 'unsupported_country'],
                    404: ['invalid_request_error', 'model_not_found'],
                    429: ['tokens', 'rate_limit_exceeded'] };
    const [type, code] = types[status]
                         || (status >= 500 ? ['server_error', null]
                                           : ['invalid_request_error', null]);
    return { error: { message: message, type: type, param: null,
                      code: code } };
}


/* OpenAI chat completions */

function chatUsage(u) {
    return { prompt_tokens: u.prompt, completion_tokens: u.completion,
             total_tokens: u.prompt + u.completion,
             prompt_tokens_details: { cached_tokens: 0, audio_tokens: 0 },
             completion_tokens_details: { reasoning_tokens: 0,
                                          audio_tokens: 0,
                                          accepted_prediction_tokens: 0,
                                          rejected_prediction_tokens: 0 } };
}


function chat(body, p) {
    const r = {
        id: 'chatcmpl-mock' + p.id,
        object: 'chat.completion',
        created: p.created,
        model: p.model,
        choices: [{
            index: 0,
            message: { role: 'assistant', content: p.text, refusal: null,
                       annotations: [] },
            logprobs: null,
            finish_reason: p.truncated ? 'length' : 'stop',
        }],
        service_tier: 'default',
        system_fingerprint: 'fp_mock',
    };

    if (p.usage) {
        r.usage = chatUsage(p.usage);
    }

    return r;
}


function chatStream(body, p) {
    const withUsage = includeUsage(body);
    const events = [];

    const chunk = (choices, usage) => {
        const c = { id: 'chatcmpl-mock' + p.id,
                    object: 'chat.completion.chunk', created: p.created,
                    model: p.model, service_tier: 'default',
                    system_fingerprint: 'fp_mock', choices: choices };
        if (withUsage) {
            c.usage = usage;
        }
        events.push({ data: JSON.stringify(c) });
    };

    const choice = (delta, finish) => ({ index: 0, delta: delta,
                                         logprobs: null,
                                         finish_reason: finish });

    chunk([choice({ role: 'assistant', content: '', refusal: null },
                  null)], null);

    for (const piece of p.pieces) {
        chunk([choice({ content: piece }, null)], null);
    }

    chunk([choice({}, p.truncated ? 'length' : 'stop')], null);

    if (withUsage && p.usage) {
        chunk([], chatUsage(p.usage));
    }

    events.push({ data: '[DONE]' });
    return events;
}


/* OpenAI legacy completions */

function completion(body, p) {
    const r = {
        id: 'cmpl-mock' + p.id,
        object: 'text_completion',
        created: p.created,
        model: p.model,
        choices: [{ text: p.text, index: 0, logprobs: null,
                    finish_reason: p.truncated ? 'length' : 'stop' }],
    };

    if (p.usage) {
        r.usage = { prompt_tokens: p.usage.prompt,
                    completion_tokens: p.usage.completion,
                    total_tokens: p.usage.prompt + p.usage.completion };
    }

    return r;
}


function completionStream(body, p) {
    const withUsage = includeUsage(body);
    const events = [];

    const chunk = (choices, usage) => {
        const c = { id: 'cmpl-mock' + p.id, object: 'text_completion',
                    created: p.created, choices: choices, model: p.model,
                    system_fingerprint: 'fp_mock' };
        if (withUsage) {
            c.usage = usage;
        }
        events.push({ data: JSON.stringify(c) });
    };

    p.pieces.forEach((piece, i) => {
        const last = i === p.pieces.length - 1;
        chunk([{ text: piece, index: 0, logprobs: null,
                 finish_reason: last ? (p.truncated ? 'length' : 'stop')
                                     : null }], null);
    });

    if (p.pieces.length === 0) {
        chunk([{ text: '', index: 0, logprobs: null,
                 finish_reason: 'length' }], null);
    }

    if (withUsage && p.usage) {
        chunk([], { prompt_tokens: p.usage.prompt,
                    completion_tokens: p.usage.completion,
                    total_tokens: p.usage.prompt + p.usage.completion });
    }

    events.push({ data: '[DONE]' });
    return events;
}


/* OpenAI embeddings */

function embeddings(body, p) {
    let inputs = body.input;

    if (!Array.isArray(inputs)
        || (inputs.length > 0 && typeof inputs[0] === 'number'))
    {
        inputs = [inputs];
    }

    const data = inputs.map((input, i) => {
        const v = [];
        for (let k = 0; k < 8; k++) {
            v.push(Math.round(Math.sin(i + k + 1) * 1e6) / 1e6);
        }

        let embedding = v;
        if (body.encoding_format === 'base64') {
            embedding = Buffer.from(new Float32Array(v).buffer)
                        .toString('base64');
        }

        return { object: 'embedding', index: i, embedding: embedding };
    });

    const r = { object: 'list', data: data, model: p.model };

    if (p.usage) {
        r.usage = { prompt_tokens: p.usage.prompt,
                    total_tokens: p.usage.prompt };
    }

    return r;
}


/* OpenAI Responses API */

function responseObject(body, p, status) {
    const done = status !== 'in_progress';
    const msg = { id: 'msg_mock' + p.id, type: 'message',
                  status: p.truncated ? 'incomplete' : 'completed',
                  role: 'assistant',
                  content: [{ type: 'output_text', text: p.text,
                              annotations: [], logprobs: [] }] };

    const r = {
        id: 'resp_mock' + p.id,
        object: 'response',
        created_at: p.created,
        status: status,
        background: false,
        error: null,
        incomplete_details: status === 'incomplete'
                            ? { reason: 'max_output_tokens' } : null,
        instructions: body.instructions === undefined ? null
                                                      : body.instructions,
        max_output_tokens: isCount(body.max_output_tokens)
                           ? body.max_output_tokens : null,
        model: p.model,
        output: done ? [msg] : [],
        parallel_tool_calls: true,
        previous_response_id: null,
        reasoning: { effort: null, summary: null },
        service_tier: 'default',
        store: true,
        temperature: 1.0,
        text: { format: { type: 'text' } },
        tool_choice: 'auto',
        tools: [],
        top_p: 1.0,
        truncation: 'disabled',
        usage: null,
        metadata: {},
    };

    if (done && p.usage) {
        r.usage = { input_tokens: p.usage.prompt,
                    input_tokens_details: { cached_tokens: 0 },
                    output_tokens: p.usage.completion,
                    output_tokens_details: { reasoning_tokens: 0 },
                    total_tokens: p.usage.prompt + p.usage.completion };
    }

    if (done && !p.usage) {
        delete r.usage;
    }

    return r;
}


function responses(body, p) {
    return responseObject(body, p, p.truncated ? 'incomplete' : 'completed');
}


function responsesStream(body, p) {
    const events = [];
    const item = 'msg_mock' + p.id;
    const final = p.truncated ? 'incomplete' : 'completed';
    let seq = 0;

    const ev = (type, fields) => {
        const e = Object.assign({ type: type, sequence_number: seq++ },
                                fields);
        events.push({ event: type, data: JSON.stringify(e) });
    };

    const part = (text) => ({ type: 'output_text', text: text,
                              annotations: [], logprobs: [] });
    const where = { item_id: item, output_index: 0, content_index: 0 };

    ev('response.created',
       { response: responseObject(body, p, 'in_progress') });
    ev('response.in_progress',
       { response: responseObject(body, p, 'in_progress') });
    ev('response.output_item.added',
       { output_index: 0,
         item: { id: item, type: 'message', status: 'in_progress',
                 role: 'assistant', content: [] } });
    ev('response.content_part.added', Object.assign({}, where,
       { part: part('') }));

    for (const piece of p.pieces) {
        ev('response.output_text.delta', Object.assign({}, where,
           { delta: piece, logprobs: [] }));
    }

    ev('response.output_text.done', Object.assign({}, where,
       { text: p.text, logprobs: [] }));
    ev('response.content_part.done', Object.assign({}, where,
       { part: part(p.text) }));
    ev('response.output_item.done',
       { output_index: 0,
         item: { id: item, type: 'message',
                 status: p.truncated ? 'incomplete' : 'completed',
                 role: 'assistant', content: [part(p.text)] } });
    ev('response.' + final, { response: responseObject(body, p, final) });

    return events;
}


/* Anthropic messages */

function anthropicUsage(u, output) {
    return { input_tokens: u.prompt, cache_creation_input_tokens: 0,
             cache_read_input_tokens: 0, output_tokens: output,
             service_tier: 'standard' };
}


function messages(body, p) {
    const r = {
        id: 'msg_mock' + p.id,
        type: 'message',
        role: 'assistant',
        model: p.model,
        content: [{ type: 'text', text: p.text }],
        stop_reason: p.truncated ? 'max_tokens' : 'end_turn',
        stop_sequence: null,
    };

    if (p.usage) {
        r.usage = anthropicUsage(p.usage, p.usage.completion);
    }

    return r;
}


function messagesStream(body, p) {
    const events = [];

    const ev = (type, fields) => {
        events.push({ event: type,
                      data: JSON.stringify(Object.assign({ type: type },
                                                         fields)) });
    };

    const start = { id: 'msg_mock' + p.id, type: 'message',
                    role: 'assistant', model: p.model, content: [],
                    stop_reason: null, stop_sequence: null };
    if (p.usage) {
        start.usage = anthropicUsage(p.usage, 1);
    }

    ev('message_start', { message: start });
    ev('content_block_start',
       { index: 0, content_block: { type: 'text', text: '' } });
    ev('ping', {});

    for (const piece of p.pieces) {
        ev('content_block_delta',
           { index: 0, delta: { type: 'text_delta', text: piece } });
    }

    ev('content_block_stop', { index: 0 });

    const delta = { delta: { stop_reason: p.truncated ? 'max_tokens'
                                                      : 'end_turn',
                             stop_sequence: null } };
    if (p.usage) {
        delta.usage = { output_tokens: p.usage.completion };
    }

    ev('message_delta', delta);
    ev('message_stop', {});

    return events;
}


const ROUTES = {
    '/v1/chat/completions': ['openai', chat, chatStream],
    '/v1/completions': ['openai', completion, completionStream],
    '/v1/embeddings': ['openai', embeddings, null],
    '/v1/responses': ['openai', responses, responsesStream],
    '/v1/messages': ['anthropic', messages, messagesStream],
};


/* replies */

function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
}


function commonHeaders(dialect, p) {
    const id = p ? p.id : (++serial).toString(36).padStart(8, '0');
    const h = { 'x-request-id': 'req_mock' + id };

    if (dialect === 'anthropic') {
        h['request-id'] = h['x-request-id'];
    }

    return h;
}


function sendJson(res, status, obj, headers, mock) {
    const data = Buffer.from(JSON.stringify(obj));

    res.writeHead(status, Object.assign({
        'content-type': 'application/json',
        'content-length': data.length,
    }, headers));

    if (mock && mock.die) {
        res.write(data.subarray(0, data.length >> 1),
                  () => res.socket.destroy());
        return;
    }

    res.end(data);
}


/* the data of an event on two lines: split after a comma or a colon
   outside strings, near the middle */

function splitData(data) {
    const at = [];
    let string = false;

    for (let i = 0; i < data.length; i++) {
        const c = data[i];

        if (string) {
            if (c === '\\') {
                i++;
            } else if (c === '"') {
                string = false;
            }

        } else if (c === '"') {
            string = true;

        } else if (c === ',' || c === ':') {
            at.push(i + 1);
        }
    }

    if (at.length === 0) {
        return [data];
    }

    const i = at[at.length >> 1];
    return [data.slice(0, i), data.slice(i)];
}


function eventText(e, i, mock) {
    const eol = mock.eol;
    const data = mock.ascii
        ? e.data.replace(/[\u0080-\uffff]/g,
                         (c) => '\\u' + c.charCodeAt(0).toString(16)
                                         .padStart(4, '0'))
        : e.data;
    const lines = mock.multiline ? splitData(data) : [data];
    let text = '';

    if (mock.comments) {
        if (i === 0) {
            text += 'retry: 3000' + eol;
        }

        text += ': keep-alive' + eol + 'id: ' + (i + 1) + eol;
    }

    if (e.event) {
        text += 'event: ' + e.event + eol;

    } else if (mock.events) {
        text += 'event: chunk' + eol;
    }

    for (const line of lines) {
        text += (mock.nospace ? 'data:' : 'data: ') + line + eol;
    }

    text += eol;

    if (mock.comments) {
        text += ': ping' + eol + eol;
    }

    return Buffer.from(text);
}


async function sendStream(res, events, headers, mock, entry) {
    res.writeHead(200, Object.assign({
        'content-type': 'text/event-stream; charset=utf-8',
        'cache-control': 'no-cache',
    }, headers));

    const half = events.length >> 1;
    const sent = [];
    let total = 0;
    let dead = false;

    let self = false;

    if (entry) {
        entry.sent_base64 = '';
        entry.events = events.length;
        entry.events_sent = 0;
        entry.sent_bytes = 0;
        entry.finished = false;
        entry.aborted = false;

        res.on('close', () => {
            entry.finished = res.writableFinished;
            entry.aborted = !res.writableFinished && !self;
            entry.closed_time = Date.now() / 1000;
        });
    }

    const write = (data, cb) => {
        if (mock.dieat > 0 && total + data.length >= mock.dieat) {
            data = data.subarray(0, mock.dieat - total);
            cb = () => res.socket.destroy();
            dead = true;
            self = true;
        }

        total += data.length;
        sent.push(data);

        if (entry) {
            entry.sent_base64 = Buffer.concat(sent).toString('base64');
            entry.sent_bytes = total;
        }

        if (data.length === 0) {
            res.socket.end();
            return;
        }

        if (mock.split > 0) {
            for (let i = 0; i < data.length; i += mock.split) {
                const last = i + mock.split >= data.length;
                res.write(data.subarray(i, i + mock.split),
                          last ? cb : undefined);
            }

            return;
        }

        res.write(data, cb);
    };

    for (let i = 0; i < events.length; i++) {
        const text = eventText(events[i], i, mock);

        if (mock.die && i === half) {
            self = true;
            write(text.subarray(0, text.length >> 1),
                  () => res.socket.destroy());
            return;
        }

        if (res.destroyed) {
            return;
        }

        write(text);

        if (entry && !dead) {
            entry.events_sent = i + 1;
        }

        if (dead) {
            return;
        }

        if (mock.chunkdelay > 0) {
            await sleep(mock.chunkdelay);
        }

        if (res.destroyed) {
            return;
        }
    }

    res.end();
}


function record(req, raw) {
    const entry = {
        method: req.method,
        path: req.url,
        http_version: req.httpVersion,
        headers: req.headers,
        raw_headers: req.rawHeaders,
        body_base64: raw.toString('base64'),
        body: raw.toString('utf8'),
        time: Date.now() / 1000,
    };

    requests.push(entry);

    return entry;
}


async function handle(req, res, raw) {
    const path = req.url.split('?')[0];

    if (path === '/health' && req.method === 'GET') {
        return sendJson(res, 200, { status: 'ok' }, {});
    }

    if (path === '/__requests' && req.method === 'GET') {
        return sendJson(res, 200, requests, {});
    }

    if (path === '/__reset' && req.method === 'POST') {
        const n = requests.length;
        requests = [];
        return sendJson(res, 200, { cleared: n }, {});
    }

    const entry = record(req, raw);

    const mock = parseMock(req);
    const route = ROUTES[path];
    const dialect = route ? route[0]
                          : (path.startsWith('/v1/messages') ? 'anthropic'
                                                             : 'openai');

    if (mock.delay > 0) {
        await sleep(mock.delay);
    }

    if (mock.status >= 400) {
        const headers = commonHeaders(dialect, null);
        if (mock.status === 429 || mock.status === 529) {
            headers['retry-after'] = '1';
        }
        return sendJson(res, mock.status,
                        errorBody(dialect, mock.status,
                                  'mock error ' + mock.status),
                        headers, mock);
    }

    if (path === '/v1/models' && req.method === 'GET') {
        return sendJson(res, 200, {
            object: 'list',
            data: ['gpt-4o', 'gpt-4', 'text-embedding-3-small'].map((id) =>
                ({ id: id, object: 'model', created: 0,
                   owned_by: 'mock' })),
        }, {});
    }

    if (!route) {
        return sendJson(res, 404,
                        errorBody(dialect, 404,
                                  'Unknown request URL: ' + req.method
                                  + ' ' + path),
                        commonHeaders(dialect, null));
    }

    if (req.method !== 'POST') {
        return sendJson(res, 405,
                        errorBody(dialect, 405, 'Method not allowed'),
                        commonHeaders(dialect, null));
    }

    let body;

    try {
        body = JSON.parse(raw.toString('utf8'));
        if (body === null || typeof body !== 'object'
            || Array.isArray(body))
        {
            throw new Error('not an object');
        }

    } catch (e) {
        return sendJson(res, 400,
                        errorBody(dialect, 400,
                                  'We could not parse the JSON body of'
                                  + ' your request.'),
                        commonHeaders(dialect, null));
    }

    const p = plan(req, body, mock);
    const headers = commonHeaders(dialect, p);

    if (body.stream === true && route[2]) {
        return sendStream(res, route[2](body, p), headers, mock, entry);
    }

    return sendJson(res, 200, route[1](body, p), headers, mock);
}


function main() {
    const port = parseInt(process.argv[2] || process.env.PORT || '8081', 10);

    const server = http.createServer((req, res) => {
        const chunks = [];

        req.on('data', (c) => chunks.push(c));
        req.on('end', () => {
            handle(req, res, Buffer.concat(chunks)).catch((e) => {
                console.error('mock upstream: ' + e.stack);
                if (!res.headersSent) {
                    res.writeHead(500);
                }
                res.end();
            });
        });
    });

    server.keepAliveTimeout = 60000;

    server.listen(port, '127.0.0.1', () => {
        console.log('mock upstream listening on 127.0.0.1:'
                    + server.address().port);
    });

    const stop = () => {
        server.close();
        server.closeAllConnections();
        process.exit(0);
    };

    process.on('SIGTERM', stop);
    process.on('SIGINT', stop);
}


main();

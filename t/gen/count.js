#!/usr/bin/env node
'use strict';

/*
 * The prompt tokens of a request body by the published recipes, counted
 * with the official tiktoken npm package (encode_ordinary, the wasm build
 * of OpenAI's Rust core): the expectations of t/10-count.t and friends.
 *
 *   chat          3 a message, every string value of it, 1 more for a
 *                 "name", text parts of array content; 3 priming the reply
 *   completions   the prompt (a string, strings, token ids) and suffix
 *   embeddings    the input (a string, strings, token ids)
 *   responses     instructions: 3 + text; input: a string (3 + text) or
 *                 items counted as chat messages; 3 priming
 *   anthropic     the system (a string or text blocks), 3 a message and
 *                 its role and text, raised by estimate= (a percentage,
 *                 rounded up) when the model has one
 *
 * Only what the tests send is covered: text, no images, tools or schemas.
 *
 * Usage:
 *   node count.js FORMAT ENCODING BODY [ESTIMATE]   prints one count
 *   node count.js < CASES                           CASES: a JSON array of
 *       [FORMAT, ENCODING, BODY, ESTIMATE?], BODY a JSON text; prints a
 *       JSON array of counts
 */

const fs = require('fs');
const path = require('path');
const { Tiktoken } = require(path.join(__dirname, 'node_modules', 'tiktoken',
                                      'lite', 'tiktoken.cjs'));

const encodings = {};


/* only the encodings asked for: loading one takes a second */

function load(name) {
    const e = require(path.join(__dirname, 'node_modules', 'tiktoken',
                                'encoders', name + '.json'));

    return new Tiktoken(e.bpe_ranks, e.special_tokens, e.pat_str);
}


function text(enc, s) {
    return s === '' ? 0 : enc.encode_ordinary(s).length;
}


/* the string values of an object or array, "type" values left out */

function strings(enc, v) {
    if (typeof v === 'string') {
        return text(enc, v);
    }

    if (v === null || typeof v !== 'object') {
        return 0;
    }

    let n = 0;

    for (const k of Object.keys(v)) {
        if (!Array.isArray(v) && k === 'type') {
            continue;
        }

        n += strings(enc, v[k]);
    }

    return n;
}


function message(enc, m) {
    let n = 3;

    for (const k of Object.keys(m)) {
        if (k === 'name' && typeof m[k] === 'string') {
            n += 1;
        }

        n += strings(enc, m[k]);
    }

    return n;
}


function input(enc, v) {
    if (typeof v === 'string') {
        return text(enc, v);
    }

    if (typeof v[0] === 'number') {
        return v.length;
    }

    let n = 0;

    for (const e of v) {
        n += typeof e === 'string' ? text(enc, e) : e.length;
    }

    return n;
}


function count(format, name, body, estimate) {
    const enc = encodings[name] || (encodings[name] = load(name));
    const b = JSON.parse(body);
    let n = 0;

    switch (format) {

    case 'chat':
        for (const m of b.messages) {
            n += message(enc, m);
        }

        return n + 3;

    case 'completions':
        return input(enc, b.prompt)
               + (typeof b.suffix === 'string' ? text(enc, b.suffix) : 0);

    case 'embeddings':
        return input(enc, b.input);

    case 'responses':
        if (typeof b.instructions === 'string') {
            n += 3 + text(enc, b.instructions);
        }

        if (typeof b.input === 'string') {
            n += 3 + text(enc, b.input);

        } else {
            for (const m of b.input) {
                n += message(enc, m);
            }
        }

        return n + 3;

    case 'anthropic':
        if (b.system !== undefined) {
            n += strings(enc, b.system);
        }

        for (const m of b.messages) {
            n += 3 + strings(enc, m);
        }

        return estimate ? Math.ceil(n * estimate / 100) : n;

    default:
        throw new Error('unknown format ' + format);
    }
}


function main(argv) {
    if (argv.length >= 3) {
        console.log(count(argv[0], argv[1], argv[2], Number(argv[3] || 0)));
        return;
    }

    const cases = JSON.parse(fs.readFileSync(0, 'utf8'));

    console.log(JSON.stringify(cases.map((c) =>
        count(c[0], c[1], c[2], c[3] || 0))));
}


main(process.argv.slice(2));

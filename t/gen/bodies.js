#!/usr/bin/env node
'use strict';

/*
 * Writes t/corpus/bodies/expected.txt: for every request body in
 * t/corpus/bodies/*.json, the prompt tokens the module must count, one
 * "<file> <count>" a line, sorted by file name.
 *
 * The counts are made here independently of the module, with the official
 * tiktoken npm package (encode_ordinary: text that looks like a special
 * token is ordinary text) and the published OpenAI cookbook recipes
 * ("How to count tokens with tiktoken"):
 *
 *   chat messages    3 a message, 1 more for a "name", every string value
 *                    of the message, 3 priming the reply;
 *   tools            per function: func_init (7 for the GPT-4o family,
 *                    o200k_base; 10 for GPT-4 and GPT-3.5, cl100k_base),
 *                    the line "name:description"; when it has properties,
 *                    prop_init 3, and per property prop_key 3 and the line
 *                    "key:type:description"; a property with an enum adds
 *                    enum_init -3 and per item enum_item 3 and the item;
 *                    func_end 12 once for all the functions; a trailing
 *                    "." of a description is removed.
 *
 * Where the module counts more than the recipe, the rule it documents is
 * implemented here from its statement, each marked "beyond the recipe".
 * The file names say the endpoint: chat-*, completions-*, embeddings-*,
 * responses-*, anthropic-*.
 *
 * Usage: cd t/gen && npm ci && node bodies.js
 */

const fs = require('fs');
const path = require('path');
const tiktoken = require(path.join(__dirname, 'node_modules', 'tiktoken',
                                   'tiktoken.cjs'));

const ROOT = path.resolve(__dirname, '..', '..');
const BODIES = path.join(ROOT, 't', 'corpus', 'bodies');

/* token_budget_image_tokens, the default bound of an image not sized */
const IMAGE_BOUND = 1600;

/*
 * the cookbook's examples and the prompt_tokens the OpenAI API reported for
 * them, as published with the recipe: a check of this script
 */
const PUBLISHED = {
    'chat-cookbook-messages-gpt-4.json': 129,
    'chat-cookbook-messages-gpt-4o.json': 124,
    'chat-cookbook-tools-gpt-4.json': 105,
    'chat-cookbook-tools-gpt-4o.json': 101,
};


/*
 * A JSON reader that keeps what JSON.parse loses: a number's text as it was
 * written (the module counts numbers as their text) and the order of keys
 * that look like integers.  Objects are { object: [[key, value], ...] },
 * numbers { number: 'text' }; strings, arrays, booleans and null are
 * themselves.  Duplicate keys are refused, as the module refuses them.
 */

function parse(text) {
    let i = 0;

    const fail = (what) => {
        throw new Error(what + ' at byte ' + i);
    };

    const ws = () => {
        while (i < text.length && ' \t\r\n'.includes(text[i])) {
            i++;
        }
    };

    const string = () => {
        const m = /^"(?:[^"\\\u0000-\u001f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"/
                  .exec(text.slice(i));
        if (m === null) {
            fail('bad string');
        }

        i += m[0].length;

        return JSON.parse(m[0]);
    };

    const value = () => {
        ws();

        const ch = text[i];

        if (ch === '{') {
            const entries = [];
            const seen = new Set();

            i++;
            ws();

            if (text[i] === '}') {
                i++;
                return { object: entries };
            }

            for ( ;; ) {
                ws();
                const key = string();

                if (seen.has(key)) {
                    fail('duplicate key "' + key + '"');
                }

                seen.add(key);
                ws();

                if (text[i++] !== ':') {
                    fail('expected ":"');
                }

                entries.push([key, value()]);
                ws();

                if (text[i] === ',') {
                    i++;
                    continue;
                }

                if (text[i++] !== '}') {
                    fail('expected "}"');
                }

                return { object: entries };
            }
        }

        if (ch === '[') {
            const items = [];

            i++;
            ws();

            if (text[i] === ']') {
                i++;
                return items;
            }

            for ( ;; ) {
                items.push(value());
                ws();

                if (text[i] === ',') {
                    i++;
                    continue;
                }

                if (text[i++] !== ']') {
                    fail('expected "]"');
                }

                return items;
            }
        }

        if (ch === '"') {
            return string();
        }

        for (const [word, v] of [['true', true], ['false', false],
                                 ['null', null]])
        {
            if (text.startsWith(word, i)) {
                i += word.length;
                return v;
            }
        }

        const m = /^-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?/
                  .exec(text.slice(i));
        if (m === null) {
            fail('bad value');
        }

        i += m[0].length;

        return { number: m[0] };
    };

    const v = value();

    ws();

    if (i !== text.length) {
        fail('data after the value');
    }

    return v;
}


const isObject = (v) => v !== null && typeof v === 'object'
                        && Array.isArray(v.object);
const isNumber = (v) => v !== null && typeof v === 'object'
                        && typeof v.number === 'string';
const isString = (v) => typeof v === 'string';

function get(obj, key) {
    if (!isObject(obj)) {
        return undefined;
    }

    const e = obj.object.find(([k]) => k === key);

    return e === undefined ? undefined : e[1];
}


/* the models of the corpus: encodings from tiktoken's own model table */

const ESTIMATES = {
    /*
     * beyond the recipe: Claude's tokenizer is not public; data/models.conf
     * counts claude-* with cl100k_base and raises the count to 120%,
     * rounding up
     */
    'claude-sonnet-4-5': { encoding: 'cl100k_base', percent: 120 },
};

const encodings = {};

function model(name) {
    let encoding, percent = 0;

    if (ESTIMATES[name]) {
        encoding = ESTIMATES[name].encoding;
        percent = ESTIMATES[name].percent;

    } else {
        encoding = tiktoken.get_encoding_name_for_model(name);
    }

    if (!encodings[encoding]) {
        encodings[encoding] = tiktoken.get_encoding(encoding);
    }

    return { name: name, encoding: encoding, enc: encodings[encoding],
             percent: percent };
}


/* a counter for one body */

function counter(m) {
    const tokens = (s) => (s.length ? m.enc.encode_ordinary(s).length : 0);

    /*
     * every string under a value; with "keys", object keys too; with
     * "numbers", numbers as their text; with "noType", members named
     * "type" are left out, key and value, at any depth; booleans and null
     * are never counted
     */

    function leaves(v, opts) {
        if (isString(v)) {
            return tokens(v);
        }

        if (isNumber(v)) {
            return opts.numbers ? tokens(v.number) : 0;
        }

        if (Array.isArray(v)) {
            return v.reduce((n, e) => n + leaves(e, opts), 0);
        }

        if (isObject(v)) {
            let n = 0;

            for (const [k, x] of v.object) {
                if (opts.noType && k === 'type') {
                    continue;
                }

                if (opts.keys) {
                    n += tokens(k);
                }

                n += leaves(x, opts);
            }

            return n;
        }

        return 0;
    }

    /*
     * beyond the recipe: the members of a definition the recipe does not
     * name (format, pattern, minimum, nested properties, items, $defs...)
     * count as text, keys and values, numbers included
     */

    function members(obj, skip) {
        let n = 0;

        if (!isObject(obj)) {
            return 0;
        }

        for (const [k, x] of obj.object) {
            if (!skip.includes(k)) {
                n += tokens(k) + leaves(x, { keys: true, numbers: true });
            }
        }

        return n;
    }

    const strip = (s) => (s.endsWith('.') ? s.slice(0, -1) : s);

    /* one function definition by the recipe, without func_end */

    function fn(f) {
        let n = m.encoding === 'o200k_base' ? 7 : 10;

        const name = get(f, 'name');
        const desc = get(f, 'description');

        /* a missing name or description is the empty string */
        n += tokens((isString(name) ? name : '') + ':'
                    + strip(isString(desc) ? desc : ''));

        const params = get(f, 'parameters');
        const props = get(params, 'properties');

        if (isObject(props) && props.object.length > 0) {
            n += 3;

            for (const [key, prop] of props.object) {
                n += 3;

                let type = get(prop, 'type');
                const pdesc = get(prop, 'description');

                /*
                 * beyond the recipe: a type that is not a string (["string",
                 * "null"]) counts its strings, and the line has an empty type
                 */
                if (type !== undefined && !isString(type)) {
                    n += leaves(type, {});
                    type = '';
                }

                const e = get(prop, 'enum');

                if (Array.isArray(e)) {
                    n -= 3;

                    for (const item of e) {
                        /* beyond the recipe: numeric items count as text */
                        n += 3 + leaves(item, { numbers: true });
                    }
                }

                n += tokens(key + ':' + (type === undefined ? '' : type)
                            + ':' + strip(isString(pdesc) ? pdesc : ''));

                n += members(prop, ['type', 'description', 'enum']);
            }
        }

        /*
         * beyond the recipe: other members of "parameters" and of the
         * function; "required", "additionalProperties" and "strict" are
         * left out
         */
        n += members(params, ['type', 'properties', 'required',
                              'additionalProperties']);
        n += members(f, ['type', 'name', 'description', 'parameters',
                         'strict']);

        return n;
    }

    function tools(list) {
        if (!Array.isArray(list)) {
            throw new Error('tools must be an array');
        }

        if (list.length === 0) {
            return 0;
        }

        let n = 0;
        let functions = 0;

        for (const t of list) {
            const f = get(t, 'function');

            if (isObject(f)) {
                functions++;
                n += fn(f);

                /* beyond the recipe: members of the tool beside these two */
                n += members(t, ['type', 'function']);

            } else if (get(t, 'name') !== undefined) {
                /* legacy "functions", and Responses API function tools */
                functions++;
                n += fn(t);

            } else {
                /*
                 * beyond the recipe: a tool that is not a function (a
                 * built-in such as web search) counts its keys and strings
                 * but not its "type"
                 */
                n += leaves(t, { keys: true, noType: true });
            }
        }

        /* func_end, once, when there is a function */
        return functions ? n + 12 : n;
    }

    /* OpenAI images: the published formula for the GPT-4o family */

    function image(url, detail) {
        if (detail === 'low') {
            return 85;
        }

        const size = isString(url) ? dataSize(url, false) : null;

        if (size === null) {
            /* beyond the recipe: an image not sized here counts the bound */
            return IMAGE_BOUND;
        }

        let [w, h] = size;

        if (w > 2048 || h > 2048) {
            const s = Math.max(w, h);
            w = Math.floor(w * 2048 / s);
            h = Math.floor(h * 2048 / s);
        }

        if (w > 768 && h > 768) {
            const s = Math.min(w, h);
            w = Math.floor(w * 768 / s);
            h = Math.floor(h * 768 / s);
        }

        return 170 * Math.ceil(w / 512) * Math.ceil(h / 512) + 85;
    }

    function content(v) {
        if (isString(v)) {
            return tokens(v);
        }

        if (v === null) {
            return 0;
        }

        let n = 0;

        for (const part of v) {
            const type = get(part, 'type');

            if (type === 'image_url' || type === 'input_image') {
                const img = get(part, 'image_url');
                const url = isObject(img) ? get(img, 'url') : img;
                let detail = get(part, 'detail');

                if (detail === undefined && isObject(img)) {
                    detail = get(img, 'detail');
                }

                n += image(url, detail);

            } else if (type === 'input_audio' || type === 'file'
                       || type === 'input_file')
            {
                /* beyond the recipe: billed by duration or pages, not text */

            } else {
                /* a text part: its strings but not its "type" */
                n += leaves(part, { noType: true });
            }
        }

        return n;
    }

    /*
     * a chat message, also a Responses API input item: 3, 1 more for a
     * "name", and every string value; the strings of a value that is an
     * array or object (tool_calls, function_call, refusal) count too, but
     * not the values of their "type" members, nor numbers
     */

    function message(msg) {
        let n = 3;

        for (const [k, x] of msg.object) {
            if (k === 'name' && isString(x)) {
                n += 1;
            }

            if (k === 'content') {
                n += content(x);

            } else {
                n += leaves(x, { noType: true });
            }
        }

        return n;
    }

    function chat(body) {
        let n = 3;     /* priming the reply */

        for (const msg of get(body, 'messages')) {
            n += message(msg);
        }

        for (const key of ['tools', 'functions']) {
            const v = get(body, key);

            if (v !== undefined && v !== null) {
                n += tools(v);
            }
        }

        /*
         * beyond the recipe: a structured output schema is part of the
         * prompt: its keys and strings, without "type" members, numbers
         * not counted; of json_schema when there is one
         */
        const rf = get(body, 'response_format');

        if (rf !== undefined) {
            const schema = get(rf, 'json_schema');
            n += leaves(schema !== undefined ? schema : rf,
                        { keys: true, noType: true });
        }

        return n;
    }

    /* a string, strings, token ids, arrays of token ids: their tokens */

    function input(v) {
        if (isString(v)) {
            return tokens(v);
        }

        const ids = (a) => {
            for (const id of a) {
                if (!isNumber(id) || !/^[0-9]{1,12}$/.test(id.number)
                    || Number(id.number) > 0xffffffff)
                {
                    throw new Error('bad token id');
                }
            }

            return a.length;
        };

        if (!Array.isArray(v) || v.length === 0) {
            throw new Error('bad input');
        }

        if (isNumber(v[0])) {
            return ids(v);
        }

        let n = 0;

        for (const e of v) {
            if (isString(e)) {
                n += tokens(e);

            } else if (Array.isArray(e) && e.length > 0) {
                n += ids(e);

            } else {
                throw new Error('bad input');
            }
        }

        return n;
    }

    function completions(body) {
        const suffix = get(body, 'suffix');

        /* beyond the recipe: a suffix is prompt text too */
        return input(get(body, 'prompt'))
               + (isString(suffix) ? tokens(suffix) : 0);
    }

    function embeddings(body) {
        return input(get(body, 'input'));
    }

    /*
     * beyond the recipe: the Responses API as chat: instructions and an
     * input string each as a message (3 and the text, no role), input items
     * as chat messages, 3 priming; tools as chat's; the "text" member (the
     * output format) as keys and strings without "type" members
     */

    function responses(body) {
        let n = 0;

        const instructions = get(body, 'instructions');

        if (isString(instructions)) {
            n += 3 + tokens(instructions);
        }

        const inp = get(body, 'input');

        if (isString(inp)) {
            n += 3 + tokens(inp);

        } else {
            for (const item of inp) {
                n += message(item);
            }
        }

        n += 3;

        const t = get(body, 'tools');

        if (t !== undefined && t !== null) {
            n += tools(t);
        }

        const text = get(body, 'text');

        if (text !== undefined) {
            n += leaves(text, { keys: true, noType: true });
        }

        return n;
    }

    /*
     * beyond the recipe: Anthropic, an estimate: the system prompt's text;
     * per message 3 and its role and content; text blocks their strings
     * without "type"; tool_use blocks their keys, strings and numbers
     * without "type"; tool_result blocks their content alone; documents
     * nothing; images by Anthropic's published formula (long side fitted
     * in 1568 px, width x height / 750 rounded up, at most 1600); "tools"
     * all its keys, strings and numbers; then the model's estimate= percent
     */

    function anthropicImage(data) {
        const size = isString(data) ? dataSize(data, true) : null;

        if (size === null) {
            return IMAGE_BOUND;
        }

        let [w, h] = size;

        if (w > 1568 || h > 1568) {
            const s = Math.max(w, h);
            w = Math.floor(w * 1568 / s);
            h = Math.floor(h * 1568 / s);
        }

        return Math.min(Math.ceil(w * h / 750), 1600);
    }

    function blocks(v) {
        if (isString(v)) {
            return tokens(v);
        }

        let n = 0;

        for (const b of v) {
            const type = get(b, 'type');

            if (type === 'image') {
                n += anthropicImage(get(get(b, 'source'), 'data'));

            } else if (type === 'document') {
                /* not counted */

            } else if (type === 'tool_use') {
                n += leaves(b, { keys: true, numbers: true, noType: true });

            } else if (type === 'tool_result') {
                const c = get(b, 'content');
                n += c === undefined ? 0 : blocks(c);

            } else {
                n += leaves(b, { noType: true });
            }
        }

        return n;
    }

    function anthropic(body) {
        let n = 0;

        const system = get(body, 'system');

        if (system !== undefined) {
            n += blocks(system);
        }

        for (const msg of get(body, 'messages')) {
            n += 3;

            for (const [k, x] of msg.object) {
                n += k === 'content' ? blocks(x) : leaves(x, {});
            }
        }

        const t = get(body, 'tools');

        if (t !== undefined) {
            n += leaves(t, { keys: true, numbers: true });
        }

        return n;
    }

    return { chat, completions, embeddings, responses, anthropic };
}


/* width and height from a base64 PNG, a data URL or (raw) bare base64 */

function dataSize(s, raw) {
    let b64;

    const m = /^data:[^,]*;base64,(.*)$/s.exec(s);

    if (m) {
        b64 = m[1];

    } else if (raw) {
        b64 = s;

    } else {
        return null;
    }

    const b = Buffer.from(b64, 'base64');

    if (b.length >= 24
        && b.subarray(0, 8).equals(Buffer.from('\x89PNG\r\n\x1a\n', 'latin1'))
        && b.toString('latin1', 12, 16) === 'IHDR')
    {
        return [b.readUInt32BE(16), b.readUInt32BE(20)];
    }

    throw new Error('only PNG images are sized here');
}


function count(file) {
    const body = parse(fs.readFileSync(path.join(BODIES, file), 'utf8'));
    const m = model(get(body, 'model'));
    const c = counter(m);

    const kind = file.split('-')[0];

    if (!c[kind]) {
        throw new Error(file + ': unknown endpoint "' + kind + '"');
    }

    let n = c[kind](body);

    if (m.percent) {
        n = Math.ceil(n * m.percent / 100);
    }

    return n;
}


function main() {
    const files = fs.readdirSync(BODIES).filter((f) => f.endsWith('.json'))
                    .sort();
    let out = '';

    for (const f of files) {
        const n = count(f);

        if (PUBLISHED[f] !== undefined && PUBLISHED[f] !== n) {
            throw new Error(f + ': ' + n + ' tokens, the cookbook published '
                            + PUBLISHED[f]);
        }

        out += f + ' ' + n + '\n';
    }

    fs.writeFileSync(path.join(BODIES, 'expected.txt'), out);
    process.stdout.write(out);

    for (const e of Object.values(encodings)) {
        e.free();
    }
}


main();

#!/usr/bin/env node
'use strict';

/*
 * Writes data/<encoding>.tiktoken, data/SHA256SUMS and data/README.md
 * from the vocabularies shipped in the npm package tiktoken
 * (node_modules/tiktoken/encoders/<encoding>.json).
 *
 * The package stores the ranks in a compact form ("bpe_ranks"): lines of
 * space-separated fields, "!" (a marker telling the compact form from the
 * plain .tiktoken form), the rank of the first token on the line, then the
 * base64 tokens, whose ranks follow each other from that first rank.
 *
 * Usage: cd t/gen && npm ci && node vocab.js
 */

const fs = require('fs');
const path = require('path');
const crypto = require('crypto');

const ROOT = path.resolve(__dirname, '..', '..');
const DATA = path.join(ROOT, 'data');
const PKG = path.join(__dirname, 'node_modules', 'tiktoken');

const ENCODINGS = ['r50k_base', 'p50k_base', 'cl100k_base', 'o200k_base'];

/*
 * SHA-256 of the files OpenAI publishes, as checked by tiktoken's Python
 * package (tiktoken_ext/openai_public.py, "expected_hash").
 */

const OPENAI_SHA256 = {
    r50k_base:
        '306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930',
    p50k_base:
        '94b5ca7dff4d00767bc256fdd1b27e5b17361d7b8a5f968547f9f23eb70d2069',
    cl100k_base:
        '223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7',
    o200k_base:
        '446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d',
};

const B64 = /^[A-Za-z0-9+/]*={0,2}$/;


function parseRanks(name, compact) {
    const ranks = [];     /* [rank, base64] */

    if (compact[0] !== '!') {
        throw new Error(name + ': bpe_ranks is not in the compact form');
    }

    for (const line of compact.split('\n')) {
        if (line === '') {
            continue;
        }

        const f = line.split(' ');

        if (f[0] !== '!' || !/^[0-9]+$/.test(f[1])) {
            throw new Error(name + ': bad line: ' + line.slice(0, 60));
        }

        const start = Number(f[1]);

        for (let i = 2; i < f.length; i++) {
            if (f[i] === '' || !B64.test(f[i]) || f[i].length % 4 !== 0) {
                throw new Error(name + ': bad base64 token "' + f[i] + '"');
            }

            ranks.push([start + i - 2, f[i]]);
        }
    }

    ranks.sort((a, b) => a[0] - b[0]);

    /* checks: unique ranks, unique byte strings, canonical base64 */

    const seen = new Set();

    for (let i = 0; i < ranks.length; i++) {
        if (i > 0 && ranks[i][0] === ranks[i - 1][0]) {
            throw new Error(name + ': rank ' + ranks[i][0] + ' twice');
        }

        const bytes = Buffer.from(ranks[i][1], 'base64');

        if (bytes.length === 0 || bytes.toString('base64') !== ranks[i][1]) {
            throw new Error(name + ': non-canonical base64 ' + ranks[i][1]);
        }

        if (seen.has(ranks[i][1])) {
            throw new Error(name + ': token ' + ranks[i][1] + ' twice');
        }

        seen.add(ranks[i][1]);
    }

    return ranks;
}


function gaps(ranks) {
    const list = [];
    let next = 0;

    for (const [rank] of ranks) {
        if (rank !== next) {
            list.push([next, rank - 1]);
        }

        next = rank + 1;
    }

    return list;
}


function sha256(buf) {
    return crypto.createHash('sha256').update(buf).digest('hex');
}


function describeGaps(g) {
    if (g.length === 0) {
        return 'none';
    }

    return g.map(([a, b]) => (a === b ? String(a) : a + '..' + b))
            .join(', ');
}


function main() {
    const pkg = JSON.parse(fs.readFileSync(path.join(PKG, 'package.json')));
    const info = [];
    let sums = '';

    fs.mkdirSync(DATA, { recursive: true });

    for (const name of ENCODINGS) {
        const file = path.join(PKG, 'encoders', name + '.json');
        const enc = JSON.parse(fs.readFileSync(file, 'utf8'));
        const ranks = parseRanks(name, enc.bpe_ranks);
        const g = gaps(ranks);

        const text = ranks.map(([rank, tok]) => tok + ' ' + rank + '\n')
                          .join('');
        const buf = Buffer.from(text, 'latin1');
        const sum = sha256(buf);

        fs.writeFileSync(path.join(DATA, name + '.tiktoken'), buf);
        sums += sum + '  ' + name + '.tiktoken\n';

        /* special tokens must not collide with mergeable ranks */

        const rankSet = new Set(ranks.map((r) => r[0]));

        for (const [tok, id] of Object.entries(enc.special_tokens)) {
            if (rankSet.has(id)) {
                throw new Error(name + ': special ' + tok + ' = rank ' + id);
            }
        }

        info.push({
            name: name,
            pat_str: enc.pat_str,
            special: enc.special_tokens,
            explicit: enc.explicit_n_vocab,
            count: ranks.length,
            max: ranks[ranks.length - 1][0],
            gaps: g,
            size: buf.length,
            sha256: sum,
            openai: sum === OPENAI_SHA256[name],
        });

        console.log(name + ': ' + ranks.length + ' ranks, max '
                    + ranks[ranks.length - 1][0] + ', gaps '
                    + describeGaps(g) + ', ' + buf.length + ' bytes, '
                    + (sum === OPENAI_SHA256[name]
                       ? 'identical to OpenAI\'s file'
                       : 'DIFFERS from OpenAI\'s published sha256'));
    }

    fs.writeFileSync(path.join(DATA, 'SHA256SUMS'), sums);
    fs.writeFileSync(path.join(DATA, 'README.md'), readme(pkg, info));

    for (const e of info) {
        verify(e);
    }
}


/*
 * Loads a written file with tiktoken's own parser of the plain format
 * (tiktoken/lite) and compares its ids and decoding with get_encoding().
 */

const SAMPLES = [
    'Hello, world! It\'s 2024 and THEY\'LL say 12345678 things.',
    '  indented\tcode();\r\n\n\n  x = y + 1; // comment\n',
    'na\u00efve caf\u00e9 \u6f22\u5b57\u304b\u306a \ud55c\uad6d\uc5b4 '
        + '\u0440\u0443\u0441\u0441\u043a\u0438\u0439 '
        + '\ud83d\udc4d\ud83c\udffd',
    'XMLHttpRequest getHTTPResponseCode \u00b2\u00bd\u216b\u2460 \u0661\u0662',
    '{"a": "b\\n", "c": [1, 2.5e10, null]}',
];


function verify(e) {
    const tiktoken = require(path.join(PKG, 'tiktoken.cjs'));
    const lite = require(path.join(PKG, 'lite', 'tiktoken.cjs'));
    const text = fs.readFileSync(path.join(DATA, e.name + '.tiktoken'),
                                 'latin1');
    const mine = new lite.Tiktoken(text, e.special, e.pat_str);
    const ref = tiktoken.get_encoding(e.name);

    for (const s of SAMPLES) {
        const a = Array.from(mine.encode_ordinary(s));
        const b = Array.from(ref.encode_ordinary(s));

        if (a.join(' ') !== b.join(' ')) {
            throw new Error(e.name + ': ids differ for ' + JSON.stringify(s)
                            + ': ' + a + ' / ' + b);
        }

        const d = Buffer.from(mine.decode(new Uint32Array(a)));

        if (!d.equals(Buffer.from(s, 'utf8'))) {
            throw new Error(e.name + ': decode differs for '
                            + JSON.stringify(s));
        }
    }

    /* every rank decodes to the same bytes in both */

    for (let id = 0; id <= e.max; id++) {
        let a, b;

        try {
            a = Buffer.from(mine.decode_single_token_bytes(id));
        } catch (err) {
            a = null;
        }

        try {
            b = Buffer.from(ref.decode_single_token_bytes(id));
        } catch (err) {
            b = null;
        }

        if ((a === null) !== (b === null) || (a && !a.equals(b))) {
            throw new Error(e.name + ': token ' + id + ' differs');
        }
    }

    mine.free();
    ref.free();

    console.log(e.name + ': loaded back with tiktoken/lite, same ids and '
                + 'token bytes as get_encoding()');
}


function readme(pkg, info) {
    let s = '';

    s += '# Vocabularies\n\n';
    s += 'The `.tiktoken` files here are the byte-pair-encoding ranks of\n'
       + 'OpenAI\'s tokenizers, in tiktoken\'s text format: one line per\n'
       + 'token, `<base64 of the token bytes> <rank>`, sorted by rank, each\n'
       + 'line ending in `\\n`.  The rank is the token id.\n\n';

    s += '## Source\n\n';
    s += 'Generated by `t/gen/vocab.js` from the npm package `' + pkg.name
       + '` ' + pkg.version + ',\nfiles `encoders/<encoding>.json` (fields '
       + '`pat_str`, `special_tokens` and\n`bpe_ranks`).  '
       + 'These are OpenAI\'s\n'
       + 'vocabularies, the same ones the Python package tiktoken downloads.\n'
       + 'Each generated file is byte for byte the file OpenAI publishes\n'
       + '(checked against the SHA-256 that tiktoken\'s Python package\n'
       + 'expects, `tiktoken_ext/openai_public.py`):\n\n';

    for (const e of info) {
        s += '- `' + e.name + '.tiktoken`: '
           + (e.openai ? 'identical' : '**differs**') + '\n';
    }

    s += '\n## Licence\n\n';
    s += 'MIT (package.json of the npm package `tiktoken` ' + pkg.version
       + ':\n`"license": "' + pkg.license + '"`).  The package ships no\n'
       + 'LICENSE file; the licence of its repository\n'
       + '(' + pkg.repository.url.replace(/^https:\/\//, '') + ') reads:\n\n'
       + '    MIT License\n\n'
       + '    Copyright (c) 2022 OpenAI, Shantanu Jain\n\n'
       + 'with the usual MIT permission notice.\n\n';

    s += '## Encodings\n\n';
    s += '| file | ranks | highest rank | gaps | bytes | sha256 |\n';
    s += '| --- | ---: | ---: | --- | ---: | --- |\n';

    for (const e of info) {
        s += '| `' + e.name + '.tiktoken` | ' + e.count + ' | ' + e.max
           + ' | ' + describeGaps(e.gaps) + ' | ' + e.size + ' | `'
           + e.sha256.slice(0, 16) + '...` |\n';
    }

    s += '\nA gap is an id below the highest rank with no mergeable '
       + 'token.\n\n';

    for (const e of info) {
        s += '- ' + e.name + ': ' + (e.gaps.length === 0
             ? 'ranks 0..' + e.max + ', no gap'
             : 'gap at ' + describeGaps(e.gaps)
               + ' (an id used by a special token: '
               + Object.entries(e.special)
                       .filter(([, id]) => id <= e.max)
                       .map(([t, id]) => '`' + t + '` = ' + id).join(', ')
               + ')') + '.\n';
    }

    s += '\nIds between the highest rank and the special tokens, and between\n'
       + 'special tokens, are unused (e.g. 100256 and 100261..100275 in\n'
       + 'cl100k_base, 199998 in o200k_base).\n\n';

    for (const e of info) {
        s += '### ' + e.name + '\n\n';
        s += 'Pattern (`pat_str` of the package):\n\n';
        s += '```\n' + e.pat_str + '\n```\n\n';
        s += 'Special tokens (not in the file; they are never produced by\n'
           + 'encode_ordinary):\n\n';

        for (const [tok, id] of Object.entries(e.special)) {
            s += '- `' + tok + '`: ' + id + '\n';
        }

        if (e.explicit !== undefined) {
            s += '\nVocabulary size declared by the package '
               + '(`explicit_n_vocab`): ' + e.explicit + '.\n';
        }

        s += '\n';
    }

    s += '## Regenerating\n\n';
    s += '```\ncd t/gen && npm ci && node vocab.js\n```\n\n';
    s += '`SHA256SUMS` is in `sha256sum` format: check with\n'
       + '`cd data && sha256sum -c SHA256SUMS`.\n';

    return s;
}


main();

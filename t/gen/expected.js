#!/usr/bin/env node
'use strict';

/*
 * Writes the expected token ids of the conformance tests, computed with the
 * official tiktoken npm package (encode_ordinary, the wasm build of OpenAI's
 * Rust core):
 *
 *   t/corpus/expected/<encoding>/<file>.ids       every file in t/corpus
 *   t/corpus/expected/<encoding>/long-<name>.ids  generated long inputs
 *   t/corpus/expected/<encoding>/codepoints.txt   code point sweep
 *   t/corpus/expected/<encoding>/contractions.txt contraction sweep
 *   t/corpus/expected/<encoding>/classes.txt      character class sweep
 *
 * An .ids file is the ids separated by single spaces, then "\n".
 * The long inputs are described in t/corpus/expected/LONG.md and the
 * sweeps in t/corpus/expected/SWEEPS.md; keep them in step with this file.
 *
 * Usage: cd t/gen && npm ci && node expected.js [encoding ...]
 */

const fs = require('fs');
const path = require('path');
const tiktoken = require(path.join(__dirname, 'node_modules', 'tiktoken',
                                   'tiktoken.cjs'));

const ROOT = path.resolve(__dirname, '..', '..');
const CORPUS = path.join(ROOT, 't', 'corpus');
const EXPECTED = path.join(CORPUS, 'expected');

const ENCODINGS = ['r50k_base', 'p50k_base', 'cl100k_base', 'o200k_base'];


/* long inputs: see LONG.md */

function lcgLetters(n) {
    let x = 1;
    let s = '';

    for (let i = 0; i < n; i++) {
        /* x = (x * 1103515245 + 12345) mod 2^31, exactly, in 32 bits */
        x = (Math.imul(x, 1103515245) + 12345) & 0x7fffffff;
        s += String.fromCharCode(0x61 + (x >>> 16) % 26);
    }

    return s;
}


function base64Text() {
    const b = Buffer.alloc(15000);

    for (let i = 0; i < b.length; i++) {
        b[i] = (i * 7 + 3) & 0xff;
    }

    return b.toString('base64');
}


const FAMILY = '\u{1F468}\u200d\u{1F469}\u200d\u{1F467}\u200d\u{1F466}';

const LONG = [
    ['a', () => 'a'.repeat(20000)],
    ['spaces', () => ' '.repeat(20000)],
    ['newlines', () => '\n'.repeat(5000)],
    ['digits', () => '0123456789'.repeat(3000)],
    ['base64', base64Text],
    ['thumbs', () => '\u{1F44D}'.repeat(4000)],
    ['family', () => FAMILY.repeat(1000)],
    ['ab', () => 'ab '.repeat(10000)],
    ['hello-world', () => 'Hello' + ' '.repeat(20000) + 'world'],
    ['lcg', () => lcgLetters(20000)],
];


/* sweeps: see SWEEPS.md */

function blockCodePoints(b) {
    const cps = [];

    for (let cp = b << 8; cp < (b + 1) << 8; cp++) {
        if (cp < 0xd800 || cp > 0xdfff) {
            cps.push(cp);
        }
    }

    return cps;
}


function codepointText(cps) {
    const parts = [];

    for (const cp of cps) {
        const c = String.fromCodePoint(cp);

        parts.push('x' + c + 'y' + c + c + ' ' + c + '1' + c + '2A' + c
                   + 'a\'' + c + ' ' + c + '\n');
    }

    return parts.join('');
}


function contractionText(cps) {
    const parts = [];

    for (const cp of cps) {
        const c = String.fromCodePoint(cp);

        parts.push('\'' + c + ' a\'' + c + 'x ');
    }

    return parts.join('');
}


/*
 * A code point whose bytes merge with none of their neighbours hides the
 * pre-tokeniser's view of it; in these contexts its class still shows:
 * a letter keeps "'ll" whole after it, a number takes "12" of "1234",
 * white space takes the three spaces before it into one piece.
 */

function classText(cps) {
    const parts = [];

    for (const cp of cps) {
        const c = String.fromCodePoint(cp);

        parts.push('x' + c + '\'ll ' + c + '1234   ' + c + '!\n');
    }

    return parts.join('');
}


/*
 * FNV-1a, 64 bits, over the ids as 4 bytes little-endian each; the state
 * is kept as two 32-bit halves so that plain numbers stay exact.
 * prime = 0x100000001b3 = 2^40 + 0x1b3
 */

function fnv1a(ids) {
    let hi = 0xcbf29ce4;
    let lo = 0x84222325;

    for (let i = 0; i < ids.length; i++) {
        let id = ids[i];

        for (let k = 0; k < 4; k++) {
            lo = (lo ^ (id & 0xff)) >>> 0;
            id >>>= 8;

            const m = lo * 0x1b3;
            const carry = Math.floor(m / 0x100000000);

            hi = (hi * 0x1b3 + carry + ((lo << 8) >>> 0)) >>> 0;
            lo = m >>> 0;
        }
    }

    return hi.toString(16).padStart(8, '0') + lo.toString(16).padStart(8, '0');
}


function fnv1aBig(ids) {
    let h = 0xcbf29ce484222325n;

    for (const id of ids) {
        for (let k = 0; k < 4; k++) {
            h ^= BigInt((id >>> (8 * k)) & 0xff);
            h = (h * 0x100000001b3n) & 0xffffffffffffffffn;
        }
    }

    return h.toString(16).padStart(16, '0');
}


function corpusFiles() {
    return fs.readdirSync(CORPUS, { withFileTypes: true })
             .filter((d) => d.isFile() && !d.name.startsWith('.'))
             .map((d) => d.name)
             .sort();
}


function readUtf8(file) {
    const buf = fs.readFileSync(file);
    const text = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true })
                     .decode(buf);

    if (!Buffer.from(text, 'utf8').equals(buf)) {
        throw new Error(file + ': does not round-trip as UTF-8');
    }

    return text;
}


function writeIds(file, ids) {
    fs.writeFileSync(file, Array.from(ids).join(' ') + '\n');
}


function checkDecode(enc, name, text, ids) {
    const back = Buffer.from(enc.decode(ids));

    if (!back.equals(Buffer.from(text, 'utf8'))) {
        throw new Error(name + ': decode(encode(x)) != x');
    }
}


function sweep(enc, make) {
    const lines = [];

    for (let b = 0; b < 0x110000 >> 8; b++) {
        const cps = blockCodePoints(b);

        if (cps.length === 0) {
            continue;
        }

        const ids = enc.encode_ordinary(make(cps));

        lines.push(b.toString(16).padStart(4, '0') + ' ' + ids.length + ' '
                   + fnv1a(ids));
    }

    return lines.join('\n') + '\n';
}


function selfTest() {
    const samples = [[], [0], [1, 2, 3], [0xffffffff, 199997, 100255, 256]];

    for (const s of samples) {
        if (fnv1a(s) !== fnv1aBig(s)) {
            throw new Error('fnv1a self test failed for ' + s);
        }
    }

    if (fnv1a([]) !== 'cbf29ce484222325') {
        throw new Error('fnv1a offset basis');
    }

    /* first LCG letters, as documented in LONG.md */

    if (lcgLetters(12) !== 'qmzrhlajoetb') {
        throw new Error('lcg starts with ' + lcgLetters(12));
    }
}


function main() {
    const only = process.argv.slice(2);
    const encodings = only.length ? only : ENCODINGS;
    const files = corpusFiles();
    const t0 = Date.now();

    selfTest();

    const texts = files.map((f) => [f, readUtf8(path.join(CORPUS, f))]);
    const longs = LONG.map(([n, f]) => ['long-' + n, f()]);

    for (const name of encodings) {
        const enc = tiktoken.get_encoding(name);
        const dir = path.join(EXPECTED, name);
        let t = Date.now();

        fs.mkdirSync(dir, { recursive: true });

        for (const [f, text] of texts) {
            const ids = enc.encode_ordinary(text);

            checkDecode(enc, name + '/' + f, text, ids);
            writeIds(path.join(dir, f + '.ids'), ids);
        }

        for (const [f, text] of longs) {
            const t1 = Date.now();
            const ids = enc.encode_ordinary(text);
            const ms = Date.now() - t1;

            checkDecode(enc, name + '/' + f, text, ids);
            writeIds(path.join(dir, f + '.ids'), ids);

            if (ms > 1000) {
                console.log('  ' + name + '/' + f + ': ' + ms + ' ms');
            }
        }

        console.log(name + ': ' + texts.length + ' corpus files, '
                    + longs.length + ' long inputs, '
                    + (Date.now() - t) + ' ms');

        t = Date.now();
        fs.writeFileSync(path.join(dir, 'codepoints.txt'),
                         sweep(enc, codepointText));
        console.log(name + ': codepoints.txt, ' + (Date.now() - t) + ' ms');

        t = Date.now();
        fs.writeFileSync(path.join(dir, 'contractions.txt'),
                         sweep(enc, contractionText));
        console.log(name + ': contractions.txt, ' + (Date.now() - t)
                    + ' ms');

        t = Date.now();
        fs.writeFileSync(path.join(dir, 'classes.txt'),
                         sweep(enc, classText));
        console.log(name + ': classes.txt, ' + (Date.now() - t) + ' ms');

        enc.free();
    }

    console.log('total ' + ((Date.now() - t0) / 1000).toFixed(1) + ' s');
}


main();

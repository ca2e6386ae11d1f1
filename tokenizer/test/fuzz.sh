#!/bin/sh

# Copyright (C) The token budget authors
#
# Builds build/tk_fuzz and runs it for FUZZ_SECONDS (60 by default) on a
# copy of tokenizer/test/fuzz-seed in build/fuzz/corpus, which is kept
# between runs.  A crash leaves its input in build/fuzz/ and makes the
# script exit non-zero.  More libFuzzer options may follow on the command
# line, e.g. "sh tokenizer/test/fuzz.sh -len_control=0" to try inputs of
# up to 4096 bytes from the start rather than growing them slowly.
#
#     FUZZ_SECONDS=600 sh tokenizer/test/fuzz.sh

set -e

cd "$(dirname "$0")/../.."

FUZZ_SECONDS=${FUZZ_SECONDS:-60}
TK_FUZZ_DATA=${TK_FUZZ_DATA:-$(pwd)/data}
export TK_FUZZ_DATA

make build/tk_fuzz

mkdir -p build/fuzz/corpus
cp tokenizer/test/fuzz-seed/* build/fuzz/corpus/

echo "fuzzing for $FUZZ_SECONDS s, corpus build/fuzz/corpus"

status=0

build/tk_fuzz -max_len=4096 -max_total_time="$FUZZ_SECONDS" \
    -timeout=30 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix=build/fuzz/ "$@" build/fuzz/corpus || status=$?

if [ "$status" -ne 0 ]; then
    echo "fuzz: FAILED (status $status), reproducers:" >&2
    ls -l build/fuzz/crash-* build/fuzz/leak-* build/fuzz/timeout-* \
        build/fuzz/oom-* 2>/dev/null >&2 || true
    exit 1
fi

echo "fuzz: no crash in $FUZZ_SECONDS s"

#!/bin/sh
# Token budget: install the dependencies, build, and run every test:
# the tokenizer's unit tests, a minute of fuzzing, the nginx tests under t/ against Debian's
# nginx, then the same tests against nginx built from Debian's source
# with the module compiled in under ASan and UBSan (scripts/test-asan.sh;
# TB_SKIP_ASAN=1 skips that part, about 3 minutes of build the first
# time).

set -e

cd "$(dirname "$0")/.."

sh scripts/deps.sh
make
(cd data && sha256sum -c --quiet SHA256SUMS)
make tk-test
FUZZ_SECONDS=${FUZZ_SECONDS:-60} sh tokenizer/test/fuzz.sh
prove -r t/

if [ "${TB_SKIP_ASAN:-0}" != 1 ]; then
    sh scripts/test-asan.sh
fi

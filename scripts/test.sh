#!/bin/sh
# Token budget: install the dependencies, build, and run every test:
# the tokenizer's unit tests and the nginx tests under t/.

set -e

cd "$(dirname "$0")/.."

sh scripts/deps.sh
make
make tk-test
prove -r t/

#!/bin/sh
# Token budget: the nginx tests under t/ against build/asan/sbin/nginx,
# nginx with the module compiled in under AddressSanitizer and
# UndefinedBehaviorSanitizer (scripts/build-asan.sh).
#
# Reports go to stderr.  nginx points the stderr of its processes at the
# error log once the configuration is read, a worker's included, and the
# harness keeps the stderr of nginx and the output of "nginx -t" as well:
# it fails a test file on any line there with "Sanitizer" or "runtime
# error:" in it.  prove fails when a file fails, and this script with it.
# A worker stopped by a report exits with code 1, which nginx logs at the
# notice level only: the report is what fails the file.
#
# ASAN_OPTIONS:
#   detect_leaks=0     nginx frees its configuration by exiting: every
#                      "nginx -t" leaks its whole cycle, 25k in 45 blocks
#                      for an empty configuration, and the module's
#                      memory comes from pools and the zone's slab,
#                      freed wholesale, which leak checking cannot see
#   abort_on_error=0   exit with an error code rather than dump core
#   halt_on_error=1    stop at the first report, a worker included
#   detect_stack_use_after_return=1, check_initialization_order=1,
#   strict_init_order=1, strict_string_checks=1: the stricter checks
#
# UBSAN_OPTIONS: a stack for each report, and stop at the first one (the
# build also has -fno-sanitize-recover=undefined).

set -e

cd "$(dirname "$0")/.."

bash scripts/build-asan.sh

ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1"
ASAN_OPTIONS="$ASAN_OPTIONS:detect_stack_use_after_return=1"
ASAN_OPTIONS="$ASAN_OPTIONS:check_initialization_order=1:strict_init_order=1"
ASAN_OPTIONS="$ASAN_OPTIONS:strict_string_checks=1"
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"

TEST_NGINX_BINARY=$PWD/build/asan/sbin/nginx
TEST_NGINX_STATIC=1

export ASAN_OPTIONS UBSAN_OPTIONS TEST_NGINX_BINARY TEST_NGINX_STATIC

echo "test-asan: prove -r t/ against $TEST_NGINX_BINARY"

prove -r t/

#!/usr/bin/perl

# (C) The token budget authors

# Tests of windowed budgets with the provider's own client:
# t/e2e/retry.test.mjs drives the openai npm package against a spent zone
# with a window of 2s, and checks that it waits for Retry-After, retries
# and passes.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use TBTest;

###############################################################################

my $e2e = "$FindBin::Bin/e2e";

my $version = `'$TBTest::NODE' --version 2>/dev/null` // '';

plan(skip_all => "no node ($TBTest::NODE)") unless $version =~ /^v(\d+)/;
plan(skip_all => "node $version is older than 20") if $1 < 20;

plan(skip_all => "no openai in t/e2e/node_modules (cd t/e2e && npm ci)")
    unless -f "$e2e/node_modules/openai/package.json";

my $t = TBTest->new()->write_conf(<<'EOF')->run();

%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    token_budget_encoding cl100k_base %%DATADIR%%/cl100k_base.tiktoken;

    token_budget_model m cl100k_base context=100000 max_output=50;

    token_budget_zone $http_x_user zone=fast:1m tokens=100 per=2s;

    upstream mock {
        server %%UPSTREAM%%;
        keepalive 4;
    }

    server {
        listen 127.0.0.1:%%PORT_8080%%;
        server_name localhost;

        location /v1/ {
            token_budget on;
            token_budget_limit zone=fast;

            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }

        location /budget/ {
            token_budget_api;
        }
    }
}

EOF

$t->plan(3);

###############################################################################

local $ENV{TB_GATEWAY} = $t->url('/v1');
local $ENV{TB_UPSTREAM} = 'http://127.0.0.1:' . $t->upstream_port();
local $ENV{TB_API} = $t->url('/budget');
local $ENV{TB_PERIOD} = 2;

my $cmd = "'$TBTest::NODE' --test --test-reporter=spec '$e2e/retry.test.mjs'";
my $out = `$cmd 2>&1`;
my $rc = $? >> 8;

is($rc, 0, 'the SDK retry tests pass') or diag($out);
like($out, qr/\bpass 3\b/, 'all three ran');

diag($out) if $ENV{TEST_NGINX_VERBOSE};

# the SDK waited, nothing is left reserved

my $k = TBTest::json_decode(http_get('/budget/zones/fast/keys/sdk')->{body});
is_deeply([@$k{qw(reserved in_flight)}], [0, 0], 'nothing left reserved');

###############################################################################

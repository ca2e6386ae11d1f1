#!/usr/bin/perl

# (C) The token budget authors

# Streams with the providers' own clients: t/e2e/stream.test.mjs drives the
# openai and @anthropic-ai/sdk npm packages through nginx with the module,
# a stream passed whole under a budget and one cut at its reserved output,
# under node's test runner.

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

for my $m (qw(openai @anthropic-ai/sdk)) {
    plan(skip_all => "no $m in t/e2e/node_modules (cd t/e2e && npm ci)")
        unless -f "$e2e/node_modules/$m/package.json";
}

my $t = TBTest->new()->write_conf(<<'EOF')->run();

%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    token_budget_encoding cl100k_base %%DATADIR%%/cl100k_base.tiktoken;
    token_budget_encoding o200k_base %%DATADIR%%/o200k_base.tiktoken;

    include %%DATADIR%%/models.conf;

    token_budget_zone $http_x_user zone=user:1m tokens=1000000 per=1h;

    upstream mock {
        server %%UPSTREAM%%;
        keepalive 4;
    }

    server {
        listen 127.0.0.1:%%PORT_8080%%;
        server_name localhost;

        token_budget on;
        token_budget_limit zone=user;

        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_buffering off;

        location /v1/ {
            proxy_pass http://mock;
        }

        location /cut/v1/ {
            token_budget_reserve_output 5;
            token_budget_stream_cut reserved;
            proxy_pass http://mock/v1/;
        }

        location /budget/ {
            token_budget_api;
        }
    }
}

EOF

$t->plan(1);

###############################################################################

local $ENV{TB_GATEWAY} = $t->url('/v1');
local $ENV{TB_CUT} = $t->url('/cut/v1');
local $ENV{TB_BUDGET} = $t->url('/budget');
local $ENV{TB_UPSTREAM} = 'http://127.0.0.1:' . $t->upstream_port();

my $cmd = "'$TBTest::NODE' --test --test-reporter=spec '$e2e/stream.test.mjs'";
my $out = `$cmd 2>&1`;
my $rc = $? >> 8;

is($rc, 0, 'the SDK stream tests pass') or diag($out);

diag($out) if $ENV{TEST_NGINX_VERBOSE};

###############################################################################

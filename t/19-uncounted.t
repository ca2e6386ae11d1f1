#!/usr/bin/perl

# (C) The token budget authors

# Tests of token_budget_uncounted: POSTs to APIs whose tokens the module
# does not count pass by default, and are refused with "reject", while the
# counted APIs and other methods go on as before.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use TBTest;

my $t = TBTest->new()->write_conf(<<'EOF')->run();

%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    token_budget_encoding o200k_base %%DATADIR%%/o200k_base.tiktoken;
    token_budget_model gpt-4o* o200k_base context=128000;

    server {
        listen 127.0.0.1:%%PORT_8080%%;
        server_name localhost;

        token_budget on;

        add_header X-TB-Status $token_budget_status always;
        add_header X-TB-Reason $token_budget_reason always;

        location /v1/ {
            proxy_pass http://%%UPSTREAM%%;
        }

        location /strict/v1/ {
            token_budget_uncounted reject;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }
    }
}

EOF

$t->plan(10);

###############################################################################

my $chat = TBTest::json_encode({ model => 'gpt-4o',
    messages => [{ role => 'user', content => 'Hello!' }] });
my $run = '{"assistant_id":"asst_1","additional_instructions":"much text"}';

upstream_reset();

my $r = http_post('/v1/threads/thread_1/runs', $run,
    'Content-Type' => 'application/json');
is($r->{status}, 404, 'default, an uncounted API passes to the upstream');
is(scalar @{upstream_requests()}, 1, 'default, forwarded');

upstream_reset();

$r = http_post('/strict/v1/threads/thread_1/runs', $run,
    'Content-Type' => 'application/json');
my $j = eval { TBTest::json_decode($r->{body}) } || {};

is($r->{status}, 403, 'reject, an uncounted API refused');
is($j->{error}{code}, 'uncounted_api', 'reject, the code');
is($r->{headers}{'x-tb-reason'}, 'uncounted_api', 'reject, the reason');
is(scalar @{upstream_requests()}, 0, 'reject, not forwarded');

$r = http_post('/strict/v1/chat/completions', $chat,
    'Content-Type' => 'application/json');
is($r->{status}, 200, 'reject, a counted API passes');
is($r->{headers}{'x-tb-status'}, 'PASSED', 'reject, counted');

$r = http_get('/strict/v1/models');
is($r->{status}, 200, 'reject, a GET passes');

# the connection stays usable after a refusal with a body

$r = http_post('/strict/v1/files', 'x' x 100000,
    'Content-Type' => 'application/octet-stream');
is($r->{status}, 403, 'reject, a large body refused');

###############################################################################

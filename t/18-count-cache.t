#!/usr/bin/perl

# (C) The token budget authors

# Tests of the count cache: a long string that comes back is counted from
# the cache, and what the cache answers is what counting answers, also for
# strings of the same length that differ, in one worker and with the cache
# off.

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

    token_budget_encoding cl100k_base %%DATADIR%%/cl100k_base.tiktoken;
    token_budget_encoding o200k_base %%DATADIR%%/o200k_base.tiktoken;

    token_budget_model gpt-4o* o200k_base  context=128000;
    token_budget_model gpt-4   cl100k_base context=128000;

    server {
        listen 127.0.0.1:%%PORT_8080%%;
        server_name localhost;

        token_budget on;

        location /v1/ {
            proxy_pass http://%%UPSTREAM%%;
        }

        location /nocache/v1/ {
            token_budget_count_cache off;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }
    }
}

EOF

$t->plan(6);

###############################################################################

sub count {
    my ($path, $model, $text) = @_;

    upstream_reset();

    my $r = http_post($path, TBTest::json_encode({ model => $model,
        messages => [{ role => 'user', content => $text }] }));
    my $reqs = upstream_requests();

    return $reqs->[0] ? $reqs->[0]{headers}{'x-token-count'} : undef;
}

# a long message: words, then the same length made of digits, which count
# otherwise

my $words = join(' ', map { "getHTTPResponseCode$_" } 1 .. 100);
(my $digits = $words) =~ s/[a-zA-Z]/7/g;

my $first = count('/v1/chat/completions', 'gpt-4o', $words);
my $plain = count('/nocache/v1/chat/completions', 'gpt-4o', $words);

is(count('/v1/chat/completions', 'gpt-4o', $words), $first,
    'again, from the cache');
is($first, $plain, 'the cache counts as counting does');

my $other = count('/v1/chat/completions', 'gpt-4o', $digits);
isnt($other, $first, 'same length, other text, other count');
is($other, count('/nocache/v1/chat/completions', 'gpt-4o', $digits),
    'same length, other text, counted');

# the same string in another encoding is counted in that one: Chinese,
# which the two encodings count differently

my $zh = "\x{4e2d}\x{6587}\x{7684}\x{6587}\x{672c}\x{3002}" x 30;
my $o200k = count('/v1/chat/completions', 'gpt-4o', $zh);

is(count('/v1/chat/completions', 'gpt-4', $zh),
    count('/nocache/v1/chat/completions', 'gpt-4', $zh),
    'another encoding, its own count');
isnt(count('/v1/chat/completions', 'gpt-4', $zh), $o200k,
    'another encoding, not the other count');

###############################################################################

#!/usr/bin/perl

# (C) The token budget authors

# Tests for the test harness itself: nginx with no token_budget directives
# (the module loaded when it is built) in front of the mock upstream.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use TBTest;

my $t = TBTest->new(module => 'optional')->write_conf(<<'EOF')->run();

%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    upstream mock {
        server %%UPSTREAM%%;
        keepalive 4;
    }

    server {
        listen 127.0.0.1:%%PORT_8080%%;
        server_name localhost;

        location /v1/ {
            proxy_pass http://mock;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }

        location = /local {
            return 200 "local $request_method\n";
        }
    }

    server {
        listen 127.0.0.1:%%PORT_8081%% http2;
        server_name localhost;

        location /v1/ {
            proxy_pass http://mock;
        }
    }
}

EOF

$t->plan(29);

###############################################################################

my $chat = {
    model => 'gpt-4o',
    messages => [ { role => 'user', content => 'Hello' } ],
    max_tokens => 4,
};

# a POST passes through and the upstream records it

my $r = $t->http_post('/v1/chat/completions', $chat, 'X-Token-Count' => 9);

is($r->{status}, 200, 'post status');
like($r->{headers}{'content-type'}, qr{^application/json}, 'content type');

my $body = TBTest::json_decode($r->{body});
is($body->{object}, 'chat.completion', 'chat completion shape');
is($body->{usage}{prompt_tokens}, 9, 'prompt tokens from x-token-count');
is($body->{usage}{completion_tokens}, 4, 'completion tokens from max_tokens');
is($body->{choices}[0]{finish_reason}, 'length', 'finish reason length');

my $reqs = $t->upstream_requests();
is(scalar @$reqs, 1, 'upstream recorded one request');
is($reqs->[0]{method}, 'POST', 'recorded method');
is($reqs->[0]{path}, '/v1/chat/completions', 'recorded path');
is_deeply(TBTest::json_decode($reqs->[0]{body}), $chat, 'recorded body');
is($reqs->[0]{headers}{'x-token-count'}, '9', 'recorded header');

$t->upstream_reset();
is(scalar @{$t->upstream_requests()}, 0, 'upstream reset');

# list context, GET, the helpers as functions

my ($status, $headers, $text) = http_get('/local');
is($status, 200, 'get status');
is($text, "local GET\n", 'get body');

# a chunked request body reaches the upstream whole

$t->http_post('/v1/embeddings', { model => 'text-embedding-3-small',
    input => 'x' x 100 }, -chunked => 7);
$reqs = upstream_requests();
is(TBTest::json_decode($reqs->[-1]{body})->{input}, 'x' x 100,
    'chunked body');

# raw bytes: a request split in pieces, and two pipelined requests

my $json = '{"model":"gpt-4o","prompt":"hi","max_tokens":2}';
my $req = "POST /v1/completions HTTP/1.1\r\nHost: localhost\r\n"
    . "Content-Length: " . length($json) . "\r\n";

$r = TBTest::parse_response($t->http_raw(
    [ $req, "Connection: close\r\n\r\n", substr($json, 0, 10),
      substr($json, 10) ]));
is($r->{status}, 200, 'split request');
is(TBTest::json_decode($r->{body})->{object}, 'text_completion',
    'split request body');

my @r = TBTest::parse_responses($t->http_raw(
    "GET /local HTTP/1.1\r\nHost: localhost\r\n\r\n"
    . $req . "Connection: close\r\n\r\n" . $json));
is(scalar @r, 2, 'pipelined responses');
is($r[0]{body}, "local GET\n", 'pipelined first');
is($r[1]{status}, 200, 'pipelined second');

# streaming through nginx

$r = $t->http_post('/v1/chat/completions', { %$chat, stream => \1,
    stream_options => { include_usage => \1 } });
like($r->{headers}{'content-type'}, qr{^text/event-stream},
    'stream content type');
like($r->{body}, qr/"usage":\{"prompt_tokens":0,"completion_tokens":4,.*
    data: \ \[DONE\]\n\n\z/sx, 'stream usage chunk and done');

$r = $t->http_post('/v1/messages', { model => 'claude-sonnet-4-5',
    max_tokens => 2, stream => \1, messages => [] });
like($r->{body}, qr/event: message_stop\ndata: \{"type":"message_stop"\}/,
    'anthropic stream');

# mock behaviours

$r = $t->http_post('/v1/messages', { model => 'claude-sonnet-4-5' },
    'X-Mock' => 'status=429');
is($r->{status}, 429, 'mock status');
is(TBTest::json_decode($r->{body})->{error}{type}, 'rate_limit_error',
    'anthropic error shape');

# HTTP/2 with curl

SKIP: {
    my $v = `curl --version 2>/dev/null`;
    skip 'curl without HTTP/2', 1 unless $v =~ /HTTP2/;

    my $out = `curl -s --http2-prior-knowledge -H 'X-Token-Count: 3' \\
        -d '{"model":"gpt-4o","input":"hi"}' \\
        @{[ $t->url('/v1/responses', 8081) ]}`;
    is(TBTest::json_decode($out)->{usage}{input_tokens}, 3, 'http2');
}

# nginx -t

my ($rc, $out) = $t->nginx_t(<<'EOF');
%%TEST_GLOBALS%%
events {
}
http {
    %%TEST_GLOBALS_HTTP%%
    server {
        listen 127.0.0.1:%%PORT_8090%%;
        no_such_directive on;
    }
}
EOF

isnt($rc, 0, 'nginx -t fails');
like($out, qr/\[emerg\].*unknown directive "no_such_directive"/,
    'nginx -t message');

($rc, $out) = $t->nginx_t(<<'EOF');
%%TEST_GLOBALS%%
events {
}
EOF

is($rc, 0, 'nginx -t passes');

###############################################################################

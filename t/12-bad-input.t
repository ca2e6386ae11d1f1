#!/usr/bin/perl

# (C) The token budget authors

# Tests of bad input: every bad body gets a 4xx with a JSON error body and
# never reaches the upstream; large, odd but valid bodies are counted;
# compressed bodies are decoded; the client's X-Token-Count is replaced.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Compress::Zlib qw(compress);
use IO::Compress::Gzip qw(gzip $GzipError);
use Test::More;
use TBTest;

my $t = TBTest->new()->write_conf(<<'EOF')->run();

%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    token_budget_encoding o200k_base %%DATADIR%%/o200k_base.tiktoken;

    token_budget_model gpt-4o* o200k_base context=128000 max_output=16384;
    token_budget_model big     o200k_base;

    client_max_body_size 64m;
    client_body_buffer_size 64m;

    server {
        listen 127.0.0.1:%%PORT_8080%%;
        server_name localhost;

        token_budget on;

        add_header X-TB-Status $token_budget_status always;
        add_header X-TB-Reason $token_budget_reason always;
        add_header X-TB-Prompt $token_budget_prompt_tokens always;

        location /v1/ {
            proxy_pass http://%%UPSTREAM%%;
        }

        location /small/ {
            token_budget_max_body 1k;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /tiny/ {
            client_max_body_size 1k;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }
    }
}

EOF

###############################################################################

my $chat = '/v1/chat/completions';
my $hello = '"messages":[{"role":"user","content":"Hello!"}]';
my $ok = qq({"model":"gpt-4o",$hello});

# [name, body, status, error code, headers...]: rejected, never forwarded

my @bad = (
    [ 'invalid json', '{"model":"gpt-4o",messages:[]}', 400, 'invalid_json' ],
    [ 'not json at all', 'Hello!', 400, 'invalid_json' ],
    [ 'trailing garbage', "$ok x", 400, 'invalid_json' ],
    [ 'two documents', "$ok$ok", 400, 'invalid_json' ],
    [ 'trailing unterminated string', "$ok \"x", 400, 'invalid_json' ],
    [ 'trailing unterminated string with a brace', "$ok \"x}", 400,
      'invalid_json' ],
    [ 'trailing partial literal', "$ok tru", 400, 'invalid_json' ],
    [ 'truncated', '{"model":"gpt-4o","messages":[{"role":"user","content":"Hel',
      400, 'invalid_json' ],
    [ 'truncated after a value', '{"model":"gpt-4o"', 400, 'invalid_json' ],
    [ 'whitespace only', "  \r\n ", 400, 'invalid_json' ],
    [ 'raw control character', qq({"model":"gpt-4o","messages":[{"role":)
      . qq("user","content":"a\x01b"}]}), 400, 'invalid_json' ],
    [ 'body an array', "[$ok]", 400, 'invalid_request' ],
    [ 'body a string', '"Hello!"', 400, 'invalid_request' ],
    [ 'messages not an array',
      '{"model":"gpt-4o","messages":"Hello!"}', 400, 'invalid_request' ],
    [ 'messages empty', '{"model":"gpt-4o","messages":[]}', 400,
      'invalid_request' ],
    [ 'messages missing', '{"model":"gpt-4o"}', 400, 'invalid_request' ],
    [ 'a message not an object', '{"model":"gpt-4o","messages":["Hello!"]}',
      400, 'invalid_request' ],
    [ 'content a number',
      '{"model":"gpt-4o","messages":[{"role":"user","content":42}]}',
      400, 'invalid_request' ],
    [ 'content part not an object',
      '{"model":"gpt-4o","messages":[{"role":"user","content":["Hi"]}]}',
      400, 'invalid_request' ],
    [ 'max_tokens -1', qq({"model":"gpt-4o","max_tokens":-1,$hello}),
      400, 'invalid_value' ],
    [ 'max_tokens 1.5', qq({"model":"gpt-4o","max_tokens":1.5,$hello}),
      400, 'invalid_value' ],
    [ 'max_tokens "10"', qq({"model":"gpt-4o","max_tokens":"10",$hello}),
      400, 'invalid_value' ],
    [ 'max_tokens 1e3', qq({"model":"gpt-4o","max_tokens":1e3,$hello}),
      400, 'invalid_value' ],
    [ 'max_tokens true', qq({"model":"gpt-4o","max_tokens":true,$hello}),
      400, 'invalid_value' ],
    [ 'max_tokens huge',
      qq({"model":"gpt-4o","max_tokens":99999999999999999999,$hello}),
      400, 'invalid_value' ],
    [ 'max_completion_tokens -5',
      qq({"model":"gpt-4o","max_completion_tokens":-5,$hello}),
      400, 'invalid_value' ],
    [ 'n 0', qq({"model":"gpt-4o","n":0,$hello}), 400, 'invalid_request' ],
    [ 'n 1000', qq({"model":"gpt-4o","n":1000,$hello}), 400,
      'invalid_request' ],
    [ 'missing model', "{$hello}", 400, 'invalid_request' ],
    [ 'model a number', qq({"model":4,$hello}), 400, 'invalid_request' ],
    [ 'unknown model', qq({"model":"gpt-9000",$hello}), 400,
      'model_not_found' ],
    [ 'model case', qq({"model":"GPT-4o",$hello}), 400, 'model_not_found' ],
    [ 'duplicate key', qq({"model":"gpt-4o","model":"big",$hello}), 400,
      'invalid_json' ],
    [ 'duplicate key by an escape',
      qq({"model":"gpt-4o","mod\\u0065l":"big",$hello}), 400,
      'invalid_json' ],
    [ 'duplicate key in a message',
      '{"model":"gpt-4o","messages":[{"role":"user","content":"Hi",'
      . '"content":"Hello, and much more text"}]}', 400, 'invalid_json' ],
    [ 'duplicate key among many',
      '{"model":"gpt-4o",' . join(',', map { qq("k$_":$_) } 1 .. 20)
      . qq(,"k7":0,$hello}), 400, 'invalid_json' ],
    [ 'invalid utf-8', qq({"model":"gpt-4o","messages":[{"role":"user",)
      . qq("content":"caf\xe9"}]}), 400, 'invalid_json' ],
    [ 'overlong utf-8', qq({"model":"gpt-4o","messages":[{"role":"user",)
      . qq("content":"\xc0\xaf"}]}), 400, 'invalid_json' ],
    [ 'utf-8 surrogate', qq({"model":"gpt-4o","messages":[{"role":"user",)
      . qq("content":"\xed\xa0\x80"}]}), 400, 'invalid_json' ],
    [ 'unpaired high surrogate escape',
      '{"model":"gpt-4o","messages":[{"role":"user","content":"\ud800"}]}',
      400, 'invalid_json' ],
    [ 'unpaired low surrogate escape',
      '{"model":"gpt-4o","messages":[{"role":"user","content":"\udc00x"}]}',
      400, 'invalid_json' ],
    [ 'high surrogate escape, then a letter',
      '{"model":"gpt-4o","messages":[{"role":"user",'
      . '"content":"\ud83d\u0041"}]}', 400, 'invalid_json' ],
    [ 'invalid utf-8 in a key', qq({"model":"gpt-4o","\xff":1,$hello}),
      400, 'invalid_json' ],
    [ 'deep nesting', '[' x 10000 . ']' x 10000, 400, 'invalid_json' ],
    [ 'deep nesting in a message',
      '{"model":"gpt-4o","messages":[{"role":"user","content":"Hi","x":'
      . '{"a":' x 10000 . '1' . '}' x 10000 . '}]}', 400, 'invalid_json' ],
    [ 'deep nesting, unclosed', '[' x 100000, 400, 'invalid_json' ],
    [ 'empty body', '', 400, 'invalid_json' ],
    [ 'no content type', $ok, 415, 'unsupported_media_type',
      'Content-Type' => '' ],
    [ 'text/plain', $ok, 415, 'unsupported_media_type',
      'Content-Type' => 'text/plain' ],
    [ 'application/jsonp', $ok, 415, 'unsupported_media_type',
      'Content-Type' => 'application/jsonp' ],
    [ 'form', $ok, 415, 'unsupported_media_type',
      'Content-Type' => 'application/x-www-form-urlencoded' ],
    [ 'br', $ok, 415, 'unsupported_media_type', 'Content-Encoding' => 'br' ],
    [ 'two encodings', gzip_of($ok), 415, 'unsupported_media_type',
      'Content-Encoding' => 'gzip', 'Content-Encoding' => 'identity' ],
    [ 'corrupt gzip', substr(gzip_of($ok), 0, 10) . 'x' x 40, 400,
      'invalid_encoding', 'Content-Encoding' => 'gzip' ],
    [ 'truncated gzip', substr(gzip_of($ok), 0, -12), 400,
      'invalid_encoding', 'Content-Encoding' => 'gzip' ],
    [ 'gzip, plain body', $ok, 400, 'invalid_encoding',
      'Content-Encoding' => 'gzip' ],
    [ 'gzip, data after', gzip_of($ok) . 'garbage', 400, 'invalid_encoding',
      'Content-Encoding' => 'gzip' ],
    [ 'gzip, invalid json inside', gzip_of("$ok x"), 400, 'invalid_json',
      'Content-Encoding' => 'gzip' ],
);

$t->plan(4 * @bad + 58);

###############################################################################

sub gzip_of {
    my ($data) = @_;

    gzip(\$data => \my $out) or die "gzip: $GzipError\n";

    return $out;
}

sub post {
    my ($uri, $body, @headers) = @_;

    upstream_reset();

    my $r = http_post($uri, $body, @headers);
    my $json = eval { TBTest::json_decode($r->{body}) } || {};
    my $reqs = upstream_requests();

    return ($r, $json, $reqs);
}

# the requests the upstream received, without their bodies: decoding
# megabytes of JSON with JSON::PP takes seconds

sub forwarded {
    my $raw = http_get('/__requests', -port => $t->upstream_port())->{body};
    my @reqs;

    while ($raw =~ /(\{"method":.*?),"raw_headers":/gs) {
        push @reqs, TBTest::json_decode("$1}");
    }

    return \@reqs;
}

sub post_large {
    my ($uri, $body, @headers) = @_;

    upstream_reset();

    my $r = http_post($uri, $body, @headers);

    return ($r, forwarded());
}

sub sent {
    my ($reqs, $name) = @_;

    return $reqs->[0] ? $reqs->[0]{headers}{$name} : undef;
}

my %todo;

for my $c (@bad) {
    my ($name, $body, $status, $code, @headers) = @$c;
    my ($r, $j, $reqs);

    local $TODO = $todo{$name};

    if (@headers == 2 && $headers[0] eq 'Content-Type' && $headers[1] eq '') {
        # no Content-Type at all

        upstream_reset();
        $r = TBTest::parse_response(http_raw("POST $chat HTTP/1.1\r\n"
            . "Host: localhost\r\nConnection: close\r\n"
            . "Content-Length: " . length($body) . "\r\n\r\n$body"));
        $j = eval { TBTest::json_decode($r->{body}) } || {};
        $reqs = upstream_requests();

    } else {
        ($r, $j, $reqs) = post($chat, $body, @headers);
    }

    is($r->{status}, $status, "$name, status");
    like($r->{headers}{'content-type'} // '', qr{^application/json},
        "$name, json");
    is($j->{error}{code}, $code, "$name, code");
    is(scalar @$reqs, 0, "$name, not forwarded");
}

my ($r, $j, $reqs);

# errors in the Anthropic shape on its path

($r, $j, $reqs) = post('/v1/messages', '{"model":"claude-x",');
is($r->{status}, 400, 'anthropic, invalid json');
is($j->{type}, 'error', 'anthropic, invalid json, shape');
is($j->{error}{type}, 'invalid_request_error', 'anthropic, invalid json, type');
like($j->{error}{message}, qr/truncated/, 'anthropic, invalid json, message');

($r, $j, $reqs) = post('/v1/messages', $ok, 'Content-Type' => 'text/plain');
is($r->{status}, 415, 'anthropic, content type');
is($j->{type}, 'error', 'anthropic, content type, shape');
is(scalar @$reqs, 0, 'anthropic, content type, not forwarded');

# the error for an unknown model names it in the variables

($r, $j) = post($chat, qq({"model":"gpt-9000",$hello}));
is($r->{headers}{'x-tb-status'}, 'ERROR', 'unknown model, status variable');
is($r->{headers}{'x-tb-reason'}, 'model_not_found',
    'unknown model, reason variable');
like($j->{error}{message}, qr/model/, 'unknown model, message');

# the same count with and without escapes in keys

($r, $j, $reqs) = post($chat,
    '{"mod\u0065l":"gpt-4o","m\u0065ssages":[{"r\u006fle":"user",'
    . '"c\u006fntent":"Hello!","n\u0061me":"bob"}]}');
is($r->{status}, 200, 'escaped keys');
is(sent($reqs, 'x-token-count'), 11, 'escaped keys, counted');

($r, $j, $reqs) = post($chat,
    '{"model":"gpt-4o","messages":[{"role":"user","content":"Hello!",'
    . '"name":"bob"}]}');
is(sent($reqs, 'x-token-count'), 11, 'escaped keys, the same plain');

# an escaped NUL is valid

($r, $j, $reqs) = post($chat,
    '{"model":"gpt-4o","messages":[{"role":"user","content":"a\u0000b"}]}');
is($r->{status}, 200, 'escaped nul');

# nesting up to a sane depth is fine

($r, $j, $reqs) = post($chat,
    '{"model":"gpt-4o","messages":[{"role":"user","content":"Hello!",'
    . '"x":' . '[' x 40 . ']' x 40 . '}]}');
is($r->{status}, 200, 'nesting 40 deep');
is(sent($reqs, 'x-token-count'), 9, 'nesting 40 deep, counted');

# a 1 MB string: 23302 sentences of 10 tokens and a space, computed with
# the tiktoken npm package (t/gen/count.js)

my $text = 'The quick brown fox jumps over the lazy dog. ' x 23302;

($r, $reqs) = post_large($chat, TBTest::json_encode({ model => 'big',
    messages => [ { role => 'user', content => $text } ] }));
is($r->{status}, 200, '1 MB string');
is(sent($reqs, 'x-token-count'), 3 + 1 + 233021 + 3, '1 MB string, counted');

# 100,000 messages of 5 tokens

my $many = '{"model":"big","messages":['
    . join(',', ('{"role":"user","content":"Hi"}') x 100000) . ']}';

($r, $reqs) = post_large($chat, $many);
is($r->{status}, 200, '100000 messages');
is(sent($reqs, 'x-token-count'), 100000 * 5 + 3, '100000 messages, counted');
is(sent($reqs, 'content-length'), length($many),
    '100000 messages, forwarded whole');

# compressed bodies: decoded, counted, forwarded decoded

($r, $j, $reqs) = post($chat, gzip_of($ok), 'Content-Encoding' => 'gzip');
is($r->{status}, 200, 'gzip');
is(sent($reqs, 'x-token-count'), 9, 'gzip, counted');
is($reqs->[0] && $reqs->[0]{body}, $ok, 'gzip, forwarded decoded');
ok($reqs->[0] && !exists $reqs->[0]{headers}{'content-encoding'},
    'gzip, no content-encoding');
is(sent($reqs, 'content-length'), length($ok), 'gzip, content-length');

($r, $j, $reqs) = post($chat, compress($ok), 'Content-Encoding' => 'deflate');
is($r->{status}, 200, 'deflate');
is(sent($reqs, 'x-token-count'), 9, 'deflate, counted');
is($reqs->[0] && $reqs->[0]{body}, $ok, 'deflate, forwarded decoded');
ok($reqs->[0] && !exists $reqs->[0]{headers}{'content-encoding'},
    'deflate, no content-encoding');

($r, $j, $reqs) = post($chat, gzip_of($ok), 'Content-Encoding' => 'GZIP');
is(sent($reqs, 'x-token-count'), 9, 'gzip, any case');

($r, $j, $reqs) = post($chat, $ok, 'Content-Encoding' => 'identity');
is(sent($reqs, 'x-token-count'), 9, 'identity');


# a gzip bomb: 100 MB of zeros in about 100 KB

my $bomb;
{
    my $z = IO::Compress::Gzip->new(\$bomb) or die "gzip: $GzipError\n";
    my $zeros = "\0" x (1024 * 1024);
    $z->print($zeros) for 1 .. 100;
    $z->close();
}

($r, $j, $reqs) = post($chat, $bomb, 'Content-Encoding' => 'gzip');
is($r->{status}, 413, 'gzip bomb');
is($j->{error}{code}, 'request_too_large', 'gzip bomb, code');
is(scalar @$reqs, 0, 'gzip bomb, not forwarded');

# token_budget_max_body: the body as sent, and decoded

my $long = TBTest::json_encode({ model => 'gpt-4o',
    messages => [ { role => 'user', content => 'x' x 2000 } ] });

($r, $j, $reqs) = post('/small/chat/completions', $long);
is($r->{status}, 413, 'max_body');
is($j->{error}{code}, 'request_too_large', 'max_body, code');
is(scalar @$reqs, 0, 'max_body, not forwarded');

($r, $j, $reqs) = post('/small/chat/completions', gzip_of($long),
    'Content-Encoding' => 'gzip');
is($r->{status}, 413, 'max_body, decoded');
is(scalar @$reqs, 0, 'max_body, decoded, not forwarded');

($r, $j, $reqs) = post('/small/chat/completions', gzip_of($ok),
    'Content-Encoding' => 'gzip');
is(sent($reqs, 'x-token-count'), 9, 'max_body, small gzip');

# over client_max_body_size: nginx refuses the body, the client still
# gets an error it can read

($r, $j, $reqs) = post('/tiny/chat/completions', $long);
is($r->{status}, 413, 'client_max_body_size');
is(scalar @$reqs, 0, 'client_max_body_size, not forwarded');

like($r->{headers}{'content-type'}, qr{^application/json},
    'client_max_body_size, json');
is($j->{error}{code}, 'request_too_large', 'client_max_body_size, code');

($r, $j, $reqs) = post('/tiny/chat/completions', $long, -chunked => 100);
is($r->{status}, 413, 'client_max_body_size, chunked');

like($r->{headers}{'content-type'}, qr{^application/json},
    'client_max_body_size, chunked, json');

is(scalar @$reqs, 0, 'client_max_body_size, chunked, not forwarded');

# Content-Type parameters

($r, $j, $reqs) = post($chat, $ok,
    'Content-Type' => 'application/json; charset=utf-8');
is(sent($reqs, 'x-token-count'), 9, 'content type with charset');

($r, $j, $reqs) = post($chat, $ok, 'Content-Type' => 'Application/JSON');
is(sent($reqs, 'x-token-count'), 9, 'content type in capitals');

# GET and other requests pass uncounted

upstream_reset();
$r = http_get($chat);
$reqs = upstream_requests();
is(scalar @$reqs, 1, 'get forwarded');
ok(!exists $r->{headers}{'x-tb-status'}, 'get not counted');

# the client's X-Token-Count is never trusted

($r, $j, $reqs) = post($chat, $ok, 'X-Token-Count' => 1);
is(sent($reqs, 'x-token-count'), 9, 'client header replaced');

($r, $j, $reqs) = post($chat, $ok, 'X-Token-Count' => 1,
    'x-token-count' => 2);
is(sent($reqs, 'x-token-count'), 9, 'client headers, one value');
is(scalar(grep { lc $_ eq 'x-token-count' }
    @{$reqs->[0] ? $reqs->[0]{raw_headers} : []}), 1,
    'client headers, one header');

($r, $j, $reqs) = post($chat, qq({"model":"gpt-9000",$hello}),
    'X-Token-Count' => 1);
is(scalar @$reqs, 0, 'client header, rejected request not forwarded');

{

    upstream_reset();
    http_get('/v1/models', 'X-Token-Count' => 1);
    $reqs = upstream_requests();
    ok(!exists $reqs->[0]{headers}{'x-token-count'},
        'client header removed from a get');

    ($r, $j, $reqs) = post('/v1/files', '{"purpose":"batch"}',
        'X-Token-Count' => 1);
    ok(!exists $reqs->[0]{headers}{'x-token-count'},
        'client header removed from another post');
}

###############################################################################

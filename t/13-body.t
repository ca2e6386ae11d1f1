#!/usr/bin/perl

# (C) The token budget authors

# Tests of reading the body: spooled to a temporary file, chunked, sent in
# pieces, over HTTP/2, and pipelined; all counted as the same body sent in
# one piece.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Encode qw(encode_utf8);
use IO::Compress::Gzip qw(gzip $GzipError);
use MIME::Base64 ();
use Test::More;
use TBTest;

my $t = TBTest->new()->write_conf(<<'EOF')->run()->plan(61);

%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    token_budget_encoding o200k_base %%DATADIR%%/o200k_base.tiktoken;

    token_budget_model gpt-4o* o200k_base context=128000 max_output=16384;

    client_max_body_size 10m;

    server {
        listen 127.0.0.1:%%PORT_8080%%;
        listen 127.0.0.1:%%PORT_8081%% http2;
        server_name localhost;

        token_budget on;

        add_header X-TB-Prompt $token_budget_prompt_tokens always;
        add_header X-TB-Status $token_budget_status always;

        location /v1/ {
            client_body_buffer_size 1m;
            proxy_pass http://%%UPSTREAM%%;
        }

        location /file/ {
            client_body_buffer_size 1k;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /nobuf/ {
            proxy_request_buffering off;
            proxy_http_version 1.1;
            client_body_buffer_size 1k;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /clamp/ {
            client_body_buffer_size 1k;
            token_budget_clamp on;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /max/ {
            token_budget_max_body 1k;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /only/ {
            client_body_in_file_only clean;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }
    }
}

EOF

###############################################################################

# 2000 sentences of 10 tokens, a space, and text whose UTF-8 and escapes
# pieces may split: counted with the tiktoken npm package (t/gen/count.js)

my $text = 'The quick brown fox jumps over the lazy dog. ' x 2000;
my $body = encode_utf8('{"model":"gpt-4o","messages":[{"role":"user",'
    . '"content":' . TBTest::json_encode($text)
    . "},{\"role\":\"user\",\"content\":\"caf\x{e9} \x{1f600} "
    . '\u00e9\ud83d\ude00\n"}]}');

my $count = 3 + 1 + 20001 + 3 + 1 + 6 + 3;

my $short = '{"model":"gpt-4o","messages":[{"role":"user","content":"Hello!"}]}';

# the requests the upstream received, their bodies as base64: decoding
# the bodies as JSON with JSON::PP takes too long

sub forwarded {
    my $raw = http_get('/__requests', -port => $t->upstream_port())->{body};
    my @reqs;

    while ($raw =~ /(\{"method":.*?),"raw_headers":.*?"body_base64":"([^"]*)"/gs)
    {
        my $r = TBTest::json_decode("$1}");
        $r->{body_base64} = $2;
        push @reqs, $r;
    }

    return \@reqs;
}

sub post {
    my ($uri, $data, @headers) = @_;

    upstream_reset();

    my $r = http_post($uri, $data, @headers);

    return ($r, forwarded());
}

# the first request went upstream with this body; not is(): a diff of
# megabytes helps no one

sub same {
    my ($reqs, $data) = @_;

    return $reqs->[0] && $reqs->[0]{body_base64} eq b64($data);
}

sub sent {
    my ($reqs, $name) = @_;

    return $reqs->[0] ? $reqs->[0]{headers}{$name} : undef;
}

# the body in one piece, in memory

my ($r, $reqs) = post('/v1/chat/completions', $body);
is($r->{headers}{'x-tb-prompt'}, $count, 'one piece');
is(sent($reqs, 'x-token-count'), $count, 'one piece, header');
ok(same($reqs, $body), 'one piece, body');

# spooled to a temporary file

($r, $reqs) = post('/file/chat/completions', $body);
is($r->{headers}{'x-tb-prompt'}, $count, 'temp file');
is(sent($reqs, 'x-token-count'), $count, 'temp file, header');
ok(same($reqs, $body), 'temp file, body');

($r, $reqs) = post('/only/chat/completions', $body);
is($r->{headers}{'x-tb-prompt'}, $count, 'file only');
ok(same($reqs, $body), 'file only, body');

($r, $reqs) = post('/only/chat/completions', $short);
is($r->{headers}{'x-tb-prompt'}, 9, 'file only, short');

# chunked

($r, $reqs) = post('/v1/chat/completions', $body, -chunked => 1000);
is($r->{headers}{'x-tb-prompt'}, $count, 'chunked');
is(sent($reqs, 'x-token-count'), $count, 'chunked, header');
ok(same($reqs, $body), 'chunked, body');

($r, $reqs) = post('/v1/chat/completions', $short, -chunked => 1);
is($r->{headers}{'x-tb-prompt'}, 9, 'chunked, a byte a chunk');

($r, $reqs) = post('/file/chat/completions', $body, -chunked => 4093);
is($r->{headers}{'x-tb-prompt'}, $count, 'chunked, temp file');
ok(same($reqs, $body), 'chunked, temp file, body');

# sent in pieces with pauses, split inside UTF-8 and escapes

sub pieces {
    my ($uri, $data, @at) = @_;

    my $delay = ref $at[0] ? ${ shift @at } : 0.05;

    my $head = "POST $uri HTTP/1.1\r\nHost: localhost\r\n"
        . "Connection: close\r\nContent-Type: application/json\r\n"
        . "Content-Length: " . length($data) . "\r\n\r\n";

    my @pieces = (substr($head, 0, 20), substr($head, 20));
    my $from = 0;

    for my $at (@at, length $data) {
        push @pieces, substr($data, $from, $at - $from);
        $from = $at;
    }

    upstream_reset();

    my $r = TBTest::parse_response(http_raw(\@pieces, -delay => $delay));

    return ($r, forwarded());
}

my $e = index($body, "\xc3\xa9");
my $s = index($body, '\ud83d');

($r, $reqs) = pieces('/v1/chat/completions', $body, 10, 40000, $e + 1,
    $s + 3, $s + 8);
is($r->{headers}{'x-tb-prompt'}, $count, 'pieces');
is(sent($reqs, 'x-token-count'), $count, 'pieces, header');
ok(same($reqs, $body), 'pieces, body');

($r, $reqs) = pieces('/file/chat/completions', $body, 1, 2, 3, 50000);
is($r->{headers}{'x-tb-prompt'}, $count, 'pieces, temp file');

($r, $reqs) = pieces('/v1/chat/completions', $short, \0.01,
    1 .. length($short) - 1);
is($r->{headers}{'x-tb-prompt'}, 9, 'pieces, a byte at a time');

# proxy_request_buffering off: the module has the whole body first

($r, $reqs) = post('/nobuf/chat/completions', $body);
is(sent($reqs, 'x-token-count'), $count, 'unbuffered');
ok(same($reqs, $body), 'unbuffered, body');

($r, $reqs) = post('/nobuf/chat/completions', $body, -chunked => 1000);
is(sent($reqs, 'x-token-count'), $count, 'unbuffered, chunked');
is(sent($reqs, 'content-length'), length($body),
    'unbuffered, chunked, length');

($r, $reqs) = post('/nobuf/chat/completions', gzipped($body),
    'Content-Encoding' => 'gzip', -chunked => 1000);
is(sent($reqs, 'x-token-count'), $count, 'unbuffered, chunked gzip');
ok(same($reqs, $body), 'unbuffered, chunked gzip, decoded');

# a compressed body in a temporary file

($r, $reqs) = post('/file/chat/completions', gzipped($body),
    'Content-Encoding' => 'gzip');
is(sent($reqs, 'x-token-count'), $count, 'temp file, gzip');
ok(same($reqs, $body), 'temp file, gzip, decoded');

($r, $reqs) = post('/file/chat/completions', gzipped($body),
    'Content-Encoding' => 'gzip', -chunked => 100);
is(sent($reqs, 'x-token-count'), $count, 'temp file, chunked gzip');

# a body from a temporary file, clamped

(my $long = $body) =~ s/^\{/{"max_tokens":999999,/;

($r, $reqs) = post('/clamp/chat/completions', $long, -chunked => 1000);
is(sent($reqs, 'x-token-count'), $count, 'temp file, clamped');
my $clamped = TBTest::json_decode($long);
$clamped->{max_tokens} = 128000 - $count;

is_deeply($reqs->[0] ? TBTest::json_decode(MIME::Base64::decode_base64(
    $reqs->[0]{body_base64})) : undef, $clamped, 'temp file, clamped body');

# token_budget_max_body at the boundary, as sent and decoded

sub sized {
    my ($size) = @_;

    my $head = '{"model":"gpt-4o","messages":[{"role":"user","content":"';
    my $tail = '"}]}';

    return $head . 'a' x ($size - length($head) - length($tail)) . $tail;
}

sub gzipped {
    my ($data) = @_;

    gzip(\$data => \my $out) or die "gzip: $GzipError\n";

    return $out;
}

($r) = post('/max/chat/completions', sized(1024));
is($r->{status}, 200, 'max_body, at the limit');

($r) = post('/max/chat/completions', sized(1025));
is($r->{status}, 413, 'max_body, a byte over');

($r) = post('/max/chat/completions', sized(1025), -chunked => 100);
is($r->{status}, 413, 'max_body, a byte over, chunked');

($r) = post('/max/chat/completions', gzipped(sized(1024)),
    'Content-Encoding' => 'gzip');
is($r->{status}, 200, 'max_body, decoded at the limit');

($r) = post('/max/chat/completions', gzipped(sized(1025)),
    'Content-Encoding' => 'gzip');
is($r->{status}, 413, 'max_body, decoded a byte over');

# pipelined on a keepalive connection, a rejected one between

sub request {
    my ($uri, $data, $close) = @_;

    return "POST $uri HTTP/1.1\r\nHost: localhost\r\n"
        . ($close ? "Connection: close\r\n" : '')
        . "Content-Type: application/json\r\n"
        . "Content-Length: " . length($data) . "\r\n\r\n" . $data;
}

my $unknown = '{"model":"gpt-9","messages":[{"role":"user","content":"Hi"}]}';

upstream_reset();

my @r = TBTest::parse_responses(http_raw(
    request('/v1/chat/completions', $body)
    . request('/file/chat/completions', $short)
    . request('/v1/chat/completions', $unknown)
    . request('/v1/chat/completions', $body, 1)));
$reqs = forwarded();

is(scalar @r, 4, 'pipelined, responses');
is(join(',', map { $_->{status} } @r), '200,200,400,200',
    'pipelined, statuses');
is(join(',', map { $_->{headers}{'x-tb-prompt'} // '-' } @r),
    "$count,9,-,$count", 'pipelined, counts');
is(join(',', map { $_->{headers}{'x-token-count'} } @$reqs),
    "$count,9,$count", 'pipelined, upstream');
ok(join(',', map { $_->{body_base64} } @$reqs)
    eq join(',', b64($body), b64($short), b64($body)), 'pipelined, bodies');

# pipelined, a chunked one and one with a gzip body in between

upstream_reset();

my $chunked = "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
    . "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    . join('', map { sprintf("%x\r\n%s\r\n", length $_, $_) }
        $short =~ /(.{1,10})/gs)
    . "0\r\n\r\n";

@r = TBTest::parse_responses(http_raw($chunked
    . request('/v1/chat/completions', $short)
    . $chunked
    . request('/v1/chat/completions', $short, 1)));
$reqs = forwarded();

is(join(',', map { $_->{status} } @r), '200,200,200,200',
    'pipelined chunked, statuses');
is(join(',', map { $_->{headers}{'x-token-count'} } @$reqs), '9,9,9,9',
    'pipelined chunked, upstream');

# keepalive requests one after another, a rejected one first

upstream_reset();

my $raw = http_raw([ request('/v1/chat/completions', $unknown),
    request('/file/chat/completions', $body),
    request('/v1/chat/completions', $short, 1) ], -delay => 0.2);
@r = TBTest::parse_responses($raw);
$reqs = forwarded();

is(join(',', map { $_->{status} } @r), '400,200,200', 'keepalive, statuses');
is(join(',', map { $_->{headers}{'x-token-count'} } @$reqs), "$count,9",
    'keepalive, upstream');

# HTTP/2

SKIP: {
    my $v = `curl --version 2>/dev/null`;
    skip 'curl without HTTP/2', 16 unless $v =~ /\bHTTP2\b/;

    $t->write_file('body.json', $body);
    $t->write_file('short.json', $short);

    my $dir = $t->testdir();

    my $curl = sub {
        my ($uri, $file, @args) = @_;

        upstream_reset();

        my $out = `curl -s -D - --http2-prior-knowledge @args \\
            -H 'Content-Type: application/json' \\
            --data-binary \@$dir/$file @{[ $t->url($uri, 8081) ]}`;

        my ($head, $rest) = split /\r\n\r\n/, $out, 2;
        my %h = map { /^([^:]+):\s*(.*?)\s*$/ ? (lc $1 => $2) : () }
            split /\r\n/, $head // '';
        my ($status) = ($head // '') =~ m{^HTTP/2 (\d+)};

        return ($status, \%h, forwarded());
    };

    my ($status, $h);

    ($status, $h, $reqs) = $curl->('/v1/chat/completions', 'body.json');
    is($status, 200, 'http2');
    is($h->{'x-tb-prompt'}, $count, 'http2, count');
    is(sent($reqs, 'x-token-count'), $count, 'http2, header');
    ok(same($reqs, $body), 'http2, body');

    ($status, $h, $reqs) = $curl->('/file/chat/completions', 'body.json');
    is($h->{'x-tb-prompt'}, $count, 'http2, temp file');
    ok(same($reqs, $body), 'http2, temp file, body');

    ($status, $h, $reqs) = $curl->('/only/chat/completions', 'body.json');
    is($h->{'x-tb-prompt'}, $count, 'http2, file only');

    ($status, $h, $reqs) = $curl->('/v1/chat/completions', 'short.json');
    is($h->{'x-tb-prompt'}, 9, 'http2, short');

    ($status, $h, $reqs) = $curl->('/v1/chat/completions', 'short.json',
        "-H 'X-Token-Count: 1'");
    is(sent($reqs, 'x-token-count'), 9, 'http2, client header replaced');

    # no content-length: the body as DATA frames until END_STREAM

    ($status, $h, $reqs) = $curl->('/v1/chat/completions', 'body.json',
        "-H 'Transfer-Encoding: chunked'");
    is($h->{'x-tb-prompt'}, $count, 'http2, no length');
    ok(same($reqs, $body), 'http2, no length, body');

    ($status, $h, $reqs) = $curl->('/file/chat/completions', 'body.json',
        "-H 'Transfer-Encoding: chunked'");
    is($h->{'x-tb-prompt'}, $count, 'http2, no length, temp file');

    $t->write_file('unknown.json', $unknown);

    ($status, $h, $reqs) = $curl->('/v1/chat/completions', 'unknown.json');
    is($status, 400, 'http2, rejected');
    is(scalar @$reqs, 0, 'http2, rejected, not forwarded');

    # several streams on one connection at once, their DATA frames
    # interleaved: curl 7.88 sends one POST body per connection only, the
    # streams come from node's http2 client

    upstream_reset();

    my $node = $ENV{TEST_NODE} || 'node';
    my $js = <<'JS';
const http2 = require('http2');
const fs = require('fs');
const [url, ...files] = process.argv.slice(2);
const session = http2.connect(url);
let left = files.length;
const out = [];
files.forEach((f, i) => {
    const req = session.request({ ':method': 'POST',
        ':path': '/v1/chat/completions', 'content-type': 'application/json' });
    req.on('response', (h) => {
        out[i] = h[':status'] + ' ' + (h['x-tb-prompt'] || '-'); });
    req.on('data', () => {});
    req.on('end', () => { if (--left === 0) {
        console.log(out.join(',')); session.close(); } });
    const body = fs.readFileSync(f);
    for (let at = 0; at < body.length; at += 16384) {
        req.write(body.subarray(at, at + 16384));
    }
    req.end();
});
JS

    $t->write_file('h2.js', $js);

    open my $fh, '-|', $node, "$dir/h2.js", $t->url('', 8081),
        map { "$dir/$_.json" } qw(body short body unknown)
        or die "cannot run $node: $!\n";
    my $out = join '', <$fh>;
    close $fh;

    $reqs = forwarded();

    is($out, "200 $count,200 9,200 $count,400 -\n", 'http2, streams, counts');
    is(join(',', sort map { $_->{headers}{'x-token-count'} } @$reqs),
        join(',', sort $count, $count, 9), 'http2, streams, upstream');
}

###############################################################################

sub b64 {
    return MIME::Base64::encode_base64($_[0], '');
}

###############################################################################

#!/usr/bin/perl

# (C) The token budget authors

# Tests of the settlement of streamed responses (server-sent events) in
# each dialect: OpenAI chat and completions chunks, Responses events and
# Anthropic messages.  With usage reported the key is charged exactly what
# the upstream reported; without it, our prompt count plus the tokens of
# the streamed text, counted as it passes.  The stream reaches the client
# byte for byte, also when its events come in pieces at every byte
# boundary, with CR LF or CR line ends, comments, event names, ids and a
# data field on two lines; and nothing stays reserved when the client
# leaves or the upstream dies in the middle of a stream.
#
# The expected counts were computed with t/gen/count.js and the official
# tiktoken npm package; when t/gen/node_modules is installed, the last test
# computes them again.

use strict;
use warnings;
use utf8;

use FindBin;
use lib "$FindBin::Bin/lib";

use Encode qw(encode_utf8);
use File::Temp qw(tempfile);
use IO::Select;
use IO::Socket::INET;
use MIME::Base64 qw(decode_base64);
use Time::HiRes qw(sleep time);

use Test::More;
use TBTest;

my $t = TBTest->new()->write_conf(<<'EOF')->run()->plan(301);

%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    token_budget_encoding cl100k_base %%DATADIR%%/cl100k_base.tiktoken;

    token_budget_model m cl100k_base context=100000 max_output=50;

    token_budget_zone $http_x_user zone=user:1m tokens=1000000 per=1h;

    log_format stream '$http_x_user $status $token_budget_count_method '
                      'c=$token_budget_completion_tokens '
                      'p=$token_budget_prompt_tokens';

    server {
        listen 127.0.0.1:%%PORT_8080%%;
        server_name localhost;

        token_budget on;

        access_log %%TESTDIR%%/stream.log stream;

        # HTTP/1.0 to the upstream: the stream ends when it closes, and
        # comes in the pieces TCP makes of it

        location /v1/ {
            token_budget_limit zone=user;
            proxy_pass http://%%UPSTREAM%%;
        }

        # HTTP/1.1: a buffer for every chunk the upstream writes

        location /ch/ {
            token_budget_limit zone=user;
            proxy_http_version 1.1;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /nb/ {
            token_budget_limit zone=user;
            proxy_http_version 1.1;
            proxy_buffering off;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /ignore/ {
            token_budget_limit zone=user;
            proxy_http_version 1.1;
            proxy_ignore_client_abort on;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /budget/ {
            token_budget_api;
        }
    }
}

EOF

###############################################################################

# the text streamed with x-mock echo=3: the prompt in pieces of three
# characters, which cut words; with characters of two, three and four
# bytes in UTF-8 (that split=N cuts) and escapes in JSON; counted as a
# whole it is 35 tokens, piece by piece many more

my $TEXT = "Streaming naïve café text: 東京タワー 🎉🎉 done\n"
    . "  12345 \"quoted\" back\\slash, tokenization!";

my @PIECES = map { join '', @$_ } chunks(3, split //, $TEXT);

# the tokens of the first N pieces, cl100k_base

my @TEXT_PREFIX = (0, 1, 1, 1, 2, 3, 4, 5, 5, 7, 10, 14, 20, 20, 22, 24,
                   25, 27, 27, 28, 29, 30, 31, 32, 33, 33, 34, 35, 35);

# the mock's own words, one token each: the first N are N tokens

my @WORDS = ('Hello', ' from', ' the', ' mock', ' upstream', ',', ' one',
             ' token', ' at', ' a', ' time', '.', ' Budget', ' me',
             ' gently', '!');

# each dialect: where, the body, what our prompt count is for "Say hello."
# and for $TEXT, the streamed text of one event, and the count method if
# not exact

my $HELLO = 'Say hello.';

my %DIALECT = (
    chat => {
        uri => 'chat/completions',
        body => sub { { model => 'm', stream => JSON::PP::true(),
            stream_options => { include_usage => JSON::PP::true() },
            max_tokens => 20,
            messages => [{ role => 'user', content => $_[0] }] } },
        prompt => { $HELLO => 10, $TEXT => 42 },
        text => sub { join '', map { text_of($_->{delta}{content}) }
                               @{$_[0]{choices} || []} },
    },

    completions => {
        uri => 'completions',
        body => sub { { model => 'm', stream => JSON::PP::true(),
            stream_options => { include_usage => JSON::PP::true() },
            max_tokens => 20, prompt => $_[0] } },
        prompt => { $HELLO => 3, $TEXT => 35 },
        text => sub { join '', map { text_of($_->{text}) }
                               @{$_[0]{choices} || []} },
    },

    responses => {
        uri => 'responses',
        body => sub { { model => 'm', stream => JSON::PP::true(),
            max_output_tokens => 20, input => $_[0] } },
        prompt => { $HELLO => 9, $TEXT => 41 },
        text => sub { ($_[0]{type} // '') =~ /\.delta$/
                      ? text_of($_[0]{delta}) : '' },
    },

    anthropic => {
        uri => 'messages',
        body => sub { { model => 'm', stream => JSON::PP::true(),
            max_tokens => 20,
            messages => [{ role => 'user', content => $_[0] }] } },
        prompt => { $HELLO => 7, $TEXT => 39 },
        method => 'estimate',
        text => sub { ($_[0]{type} // '') eq 'content_block_delta'
                      ? text_of($_[0]{delta}{text}) : '' },
    },
);

my @DIALECTS = qw(chat completions responses anthropic);

###############################################################################

sub chunks {
    my ($n, @list) = @_;

    my @out;
    push @out, [splice @list, 0, $n] while @list;

    return @out;
}

sub text_of {
    return defined $_[0] && !ref $_[0] ? $_[0] : '';
}

# the tokens of a streamed text: a prefix of the mock's words or of $TEXT

sub count_of {
    my ($text) = @_;

    for my $n (0 .. @WORDS) {
        return $n if $text eq join '', @WORDS[0 .. $n - 1];
    }

    for my $n (0 .. @PIECES) {
        return $TEXT_PREFIX[$n] if $text eq join '', @PIECES[0 .. $n - 1];
    }

    diag("no count of the text \"" . encode_utf8($text) . "\"");

    return undef;
}

# the events of a stream as a client reads them: lines end in CR LF, LF or
# CR, comments are left out, the data lines of an event are joined by a
# line feed, and an event ends at a blank line; a line or an event that
# the end of the stream cut is not an event

sub sse_events {
    my ($s) = @_;

    my (@events, @data, $event);

    while ($s =~ /\G([^\r\n]*)(?:\r\n|\r|\n)/gc) {
        my $line = $1;

        if ($line eq '') {
            push @events, { event => $event, data => join("\n", @data) }
                if @data;
            @data = ();
            undef $event;
            next;
        }

        next if $line =~ /^:/;

        my ($field, $value) = $line =~ /^([^:]*)(?::\x20?(.*))?$/s;
        $value //= '';

        push @data, $value if $field eq 'data';
        $event = $value if $field eq 'event';
    }

    return @events;
}

# the text a stream carries, by the rules of its dialect, and whether it
# ended as it should

sub stream_text {
    my ($dialect, $bytes) = @_;

    my ($text, $end) = ('', 0);

    for my $e (sse_events($bytes)) {
        if ($e->{data} eq '[DONE]') {
            $end = 1;
            next;
        }

        my $j = eval { TBTest::json_decode($e->{data}) };

        if (!$j) {
            diag("not JSON: $e->{data}");
            next;
        }

        $end = 1 if ($j->{type} // '') =~ /^(?:response\.completed|
                                              response\.incomplete|
                                              message_stop)$/x;

        $text .= $DIALECT{$dialect}{text}->($j);
    }

    return ($text, $end);
}

sub body {
    my ($dialect, $text) = @_;

    return TBTest::json_encode($DIALECT{$dialect}{body}->($text));
}

# a stream through nginx: the response, what the mock sent for it, and
# the expected count of its text

sub stream {
    my ($dialect, $loc, $user, $mock, %opts) = @_;

    my $text = $mock =~ /\becho=/ ? $TEXT : $HELLO;

    my $r = http_post("/$loc/$DIALECT{$dialect}{uri}", body($dialect, $text),
        'X-User' => $user, 'X-Mock' => $mock);

    $r->{sent} = sent($user);
    upstream_reset();
    $r->{prompt} = $DIALECT{$dialect}{prompt}{$text};
    ($r->{text}, $r->{end}) = stream_text($dialect, $r->{sent} // '');
    $r->{count} = count_of($r->{text});

    return $r;
}

# the bytes the mock wrote for the request of a key

sub sent {
    my ($user) = @_;

    for (1 .. 50) {
        my ($req) = grep { ($_->{headers}{'x-user'} // '') eq $user }
                    @{upstream_requests()};

        return decode_base64($req->{sent_base64})
            if $req && defined $req->{sent_base64};

        sleep 0.05;
    }

    return undef;
}

# a key's budget, once nothing is reserved or in flight (or after 5s)

sub key {
    my ($user) = @_;

    my $k;

    for (1 .. 100) {
        my $r = http_get("/budget/zones/user/keys/$user");
        $k = eval { TBTest::json_decode($r->{body}) } || {};

        last if defined $k->{used} && !$k->{reserved} && !$k->{in_flight};

        sleep 0.05;
    }

    return [map { $k->{$_} } qw(used reserved in_flight)];
}

# the access log line of a key: status, count method, completion and
# prompt tokens

sub logged {
    my ($user) = @_;

    for (1 .. 50) {
        for my $line (reverse split /\n/, $t->read_file('stream.log')) {
            my @f = $line =~ /^\Q$user\E (\d+) (\S+) c=(\S+) p=(\S+)$/
                or next;
            return { status => $f[0], method => $f[1], c => $f[2],
                     p => $f[3] };
        }

        sleep 0.05;
    }

    return {};
}

sub same_bytes {
    my ($got, $expected, $name) = @_;

    return ok(0, $name) || diag('nothing sent') unless defined $expected;

    return ok(1, $name) if $got eq $expected;

    my $i = 0;
    $i++ while $i < length($got) && $i < length($expected)
               && substr($got, $i, 1) eq substr($expected, $i, 1);

    ok(0, $name);
    diag(sprintf("%d bytes, %d expected, first difference at %d:\n"
                 . "got      %s\nexpected %s", length($got),
                 length($expected), $i,
                 map { my $s = substr($_, $i, 40); $s =~ s/\r/\\r/g;
                       $s =~ s/\n/\\n/g; $s } $got, $expected));
}

###############################################################################

# usage reported: exactly what the upstream reported; without it, our
# prompt count and the streamed text counted here

for my $d (@DIALECTS) {
    my $r = stream($d, 'v1', "$d-usage", 'usage=321,45');

    is($r->{status}, 200, "$d, usage, passed");
    like($r->{headers}{'content-type'}, qr{^text/event-stream},
        "$d, usage, a stream");
    ok($r->{end}, "$d, usage, the whole stream");
    same_bytes($r->{body}, $r->{sent}, "$d, usage, byte for byte");
    is_deeply(key("$d-usage"), [366, 0, 0], "$d, usage, settled");

    my $method = $DIALECT{$d}{method} // 'exact';

    my $l = logged("$d-usage");
    is($l->{method}, $method, "$d, usage, count method");
    is($l->{c}, 45, "$d, usage, completion tokens");

    $r = stream($d, 'v1', "$d-nousage", 'nousage');

    ok($r->{end} && $r->{text} eq join('', @WORDS), "$d, no usage, words");
    same_bytes($r->{body}, $r->{sent}, "$d, no usage, byte for byte");
    is_deeply(key("$d-nousage"), [$r->{prompt} + 16, 0, 0],
        "$d, no usage, prompt and text");

    $l = logged("$d-nousage");
    is($l->{method}, "$method+output_counted", "$d, no usage, count method");
    is($l->{c}, 16, "$d, no usage, completion tokens");
    is($l->{p}, $r->{prompt}, "$d, no usage, prompt tokens");
}

# the stream in pieces: split=N writes N bytes at a time, a chunk of its
# own through /ch/ and /nb/, whatever TCP makes of it through /v1/

my @variants = (
    ['v1', 'split=1'],
    ['ch', 'split=1'],
    ['nb', 'split=1'],
    ['ch', 'split=1 crlf'],
    ['nb', 'split=1 cr'],
    ['ch', 'split=2 comments events'],
    ['nb', 'split=1 multiline'],
    ['ch', 'split=5 nospace ascii'],
    ['nb', 'split=1 crlf comments events multiline nospace ascii'],
    ['ch', 'split=3 cr comments multiline ascii'],
);

for my $d (@DIALECTS) {
    my $n = 0;

    for my $v (@variants) {
        my ($loc, $mock) = @$v;
        my $user = "$d-split-" . $n++;
        my $name = "$d, /$loc/ $mock";

        my $r = stream($d, $loc, $user, "nousage echo=3 $mock");

        ok($r->{end} && $r->{text} eq $TEXT, "$name, the text");
        same_bytes($r->{body}, $r->{sent}, "$name, byte for byte");
        is_deeply(key($user), [$r->{prompt} + 35, 0, 0], "$name, settled");
        like(logged($user)->{method}, qr/\+output_counted$/,
            "$name, counted");
    }

    # usage in pieces, on two lines, escaped

    my $mock = 'usage=321,45 echo=3 split=1 crlf comments multiline ascii';
    my $r = stream($d, 'ch', "$d-split-usage", $mock);

    same_bytes($r->{body}, $r->{sent}, "$d, usage in pieces, byte for byte");
    is_deeply(key("$d-split-usage"), [366, 0, 0],
        "$d, usage in pieces, settled");
    is(logged("$d-split-usage")->{method}, $DIALECT{$d}{method} // 'exact',
        "$d, usage in pieces, count method");
}

# the mock's stream fetched directly is what nginx passed on, but for
# the ids and times of the response

{
    my $mock = 'nousage echo=3 split=1 crlf comments events multiline';
    my $body = body('chat', $TEXT);

    my $direct = http_post('/v1/chat/completions', $body,
        'X-User' => 'direct', 'X-Mock' => $mock,
        -port => $t->upstream_port());
    my $r = http_post('/nb/chat/completions', $body,
        'X-User' => 'proxied', 'X-Mock' => $mock);

    same_bytes($direct->{body}, sent('direct'),
        'direct, the mock records what it sends');

    upstream_reset();

    for ($direct->{body}, $r->{body}) {
        s/mock[0-9a-z]{8}/mockID/g;
        s/"created":\d+/"created":0/g;
    }

    ok(length $direct->{body} > 1000, 'direct, a stream');
    same_bytes($r->{body}, $direct->{body}, 'direct, through nginx');
}

# the client gone in the middle of a stream: the upstream cut, or read to
# its end with proxy_ignore_client_abort; nothing stays reserved, and the
# prompt at least is spent

{
    my %abort = (
        v1 => 'usage=500,45',
        nb => 'usage=500,45',
        ignore => 'usage=500,45',
    );

    my %s;

    for my $loc (sort keys %abort) {
        my $body = body('chat', $HELLO);

        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
            PeerPort => $t->port(8080), Proto => 'tcp')
            or die "cannot connect: $!\n";

        $s->autoflush(1);

        print $s "POST /$loc/chat/completions HTTP/1.1\r\n"
            . "Host: localhost\r\nConnection: close\r\n"
            . "Content-Type: application/json\r\n"
            . "Content-Length: " . length($body) . "\r\n"
            . "X-User: abort-$loc\r\n"
            . "X-Mock: chunkdelay=60 $abort{$loc}\r\n\r\n" . $body;

        $s{$loc} = $s;
    }

    # three events of each, then close

    my %got;
    my $sel = IO::Select->new(values %s);
    my $deadline = time() + 5;

    while ($sel->count && time() < $deadline) {
        for my $s ($sel->can_read(0.5)) {
            my ($loc) = grep { $s{$_} == $s } keys %s;

            my $n = sysread($s, my $buf, 65536);
            $got{$loc} .= $buf if $n;

            if (!$n || (() = $got{$loc} =~ /data:/g) >= 3) {
                $sel->remove($s);
                close $s;
            }
        }
    }

    for my $loc (sort keys %abort) {
        my $user = "abort-$loc";
        my $k = key($user);
        my $l = logged($user);

        like($got{$loc} // '', qr/^HTTP\/1.1 200.*data:.*data:.*data:/s,
            "abort /$loc/, part of the stream read");
        is_deeply([@$k[1, 2]], [0, 0], "abort /$loc/, nothing reserved");
        ok(($k->[0] // 0) >= 10, "abort /$loc/, the prompt at least")
            or diag("used $k->[0]");

        # the upstream is cut, with proxy_ignore_client_abort too: when
        # writing to the client fails

        my ($text, $end) = stream_text('chat', sent($user) // '');
        ok(!$end, "abort /$loc/, the upstream cut");

        if ($l->{method} =~ /\+output_counted$/) {
            is($k->[0], $l->{p} + $l->{c},
                "abort /$loc/, the prompt and the text counted");

        } else {
            is($k->[0], 545, "abort /$loc/, the usage reported");
        }
    }

    upstream_reset();
}

# the upstream gone in the middle of a stream: our prompt and the text
# counted until then

for my $d (@DIALECTS) {
    for my $loc (qw(nb ch v1)) {
        my $user = "$d-die-$loc";
        my $name = "$d, dies, /$loc/";

        my $r = stream($d, $loc, $user, 'nousage die echo=3');

        ok(!$r->{end} && length $r->{text} && $r->{text} ne $TEXT,
            "$name, part of the text");
        same_bytes($r->{body}, $r->{sent}, "$name, byte for byte");

        # HTTP/1.0: the upstream's close is the end of the stream; the
        # half event before it is lost, as it is to a client

        is_deeply(key($user),
            [$r->{prompt} + ($r->{count} // -1), 0, 0], "$name, settled");

        like(logged($user)->{method}, qr/\+output_counted$/,
            "$name, counted");
    }

    # usage reported at the end, never reached: also our prompt and the
    # text counted, since Anthropic's message_start reports the input and
    # one output token, a placeholder that message_delta would replace

    my $user = "$d-die-usage";
    my $p = $DIALECT{$d}{prompt}{$TEXT};

    my $r = stream($d, 'nb', $user, "die echo=3 usage=$p,1000");

    is_deeply(key($user), [$p + ($r->{count} // -1), 0, 0],
        "$d, dies, usage never reported, settled");
}

# the stream cut in a number of its usage: not a usage reported, whether
# nginx knows the stream was cut (HTTP/1.1, chunked) or not (HTTP/1.0)

{
    my $body = body('chat', $HELLO);
    my $full = http_post('/v1/chat/completions', $body,
        'X-User' => 'cut', 'X-Mock' => 'usage=321,45',
        -port => $t->upstream_port())->{body};

    my $at = index($full, '"completion_tokens":45');
    $at += length '"completion_tokens":4' if $at >= 0;

    for my $loc (qw(nb v1)) {
        my $user = "cut-$loc";

        my $r = http_post("/$loc/chat/completions", $body,
            'X-User' => $user, 'X-Mock' => "usage=321,45 dieat=$at");
        my $sent = sent($user) // '';

        like($sent, qr/"completion_tokens":4$/, "cut /$loc/, in the usage");
        same_bytes($r->{body}, $sent, "cut /$loc/, byte for byte");

        is_deeply(key($user), [10 + 16, 0, 0],
            "cut /$loc/, the prompt and the text counted");
    }

    upstream_reset();
}

# the expected counts again, from the tiktoken npm package

SKIP: {
    my $gen = $t->root() . '/t/gen';

    skip 'no t/gen/node_modules/tiktoken', 1
        unless -d "$gen/node_modules/tiktoken";

    my (@cases, @expected);

    for my $n (0 .. @PIECES) {
        push @cases, ['embeddings', 'cl100k_base', TBTest::json_encode(
            { input => join '', @PIECES[0 .. $n - 1] })];
        push @expected, $TEXT_PREFIX[$n];
    }

    for my $n (0 .. @WORDS) {
        push @cases, ['embeddings', 'cl100k_base', TBTest::json_encode(
            { input => join '', @WORDS[0 .. $n - 1] })];
        push @expected, $n;
    }

    for my $d (@DIALECTS) {
        for my $text ($HELLO, $TEXT) {
            push @cases, [$d eq 'anthropic' ? 'anthropic'
                          : $d eq 'completions' ? 'completions'
                          : $d eq 'responses' ? 'responses' : 'chat',
                          'cl100k_base', body($d, $text)];
            push @expected, $DIALECT{$d}{prompt}{$text};
        }
    }

    my ($fh, $file) = tempfile(DIR => $t->testdir());
    print $fh TBTest::json_encode([ map {
        [ $_->[0], $_->[1], Encode::decode_utf8($_->[2]) ] } @cases ]);
    close $fh;

    my $node = $ENV{TEST_NODE} || 'node';
    my $out = `'$node' '$gen/count.js' < '$file'`;

    is_deeply(eval { TBTest::json_decode($out) } // $out, \@expected,
        'expectations by tiktoken');
}


###############################################################################

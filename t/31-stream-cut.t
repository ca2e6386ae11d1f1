#!/usr/bin/perl

# (C) The token budget authors

# Tests of token_budget_stream_cut: a stream whose output reaches the
# output reserved for it (or, with "budget", the reservation plus what the
# zone had left) ends the way the provider ends one at its limit, OpenAI
# chat and completions with a chunk whose finish_reason is "length" (and
# the usage chunk when the client asked for it) and [DONE], Anthropic with
# content_block_stop, message_delta (stop_reason "max_tokens") and
# message_stop, the Responses API with response.incomplete; the text before
# the cut is what the upstream streamed, the key is charged the prompt and
# the output counted, and the upstream connection is closed while the mock
# is still generating.  "off" never cuts.
#
# And the usage asked for on behalf of an OpenAI client that did not ask
# for it: the client gets the stream the upstream sends without it, and
# the key is charged the usage the upstream reported.

use strict;
use warnings;
use utf8;

use FindBin;
use lib "$FindBin::Bin/lib";

use IO::Select;
use IO::Socket::INET;
use MIME::Base64 qw(decode_base64);
use Time::HiRes qw(sleep time);

use Test::More;
use TBTest;

my $t = TBTest->new()->write_conf(<<'EOF')->run()->plan(336);

%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    token_budget_encoding cl100k_base %%DATADIR%%/cl100k_base.tiktoken;

    token_budget_model m cl100k_base context=100000 max_output=50;

    token_budget_zone $http_x_user zone=user:1m tokens=1000000 per=1h;
    token_budget_zone $http_x_user zone=small:1m tokens=40 per=1h;

    log_format cut '$http_x_user $status $token_budget_count_method '
                   'c=$token_budget_completion_tokens '
                   'p=$token_budget_prompt_tokens';

    server {
        listen 127.0.0.1:%%PORT_8080%%;
        server_name localhost;

        token_budget on;

        access_log %%TESTDIR%%/cut.log cut;

        # a reservation of 5 output tokens, cut there: HTTP/1.1 unbuffered,
        # and HTTP/1.0 buffered

        location /cut/ {
            token_budget_limit zone=user;
            token_budget_reserve_output 5;
            token_budget_stream_cut reserved;
            proxy_http_version 1.1;
            proxy_buffering off;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /cutb/ {
            token_budget_limit zone=user;
            token_budget_reserve_output 5;
            token_budget_stream_cut reserved;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        # the reservation the client's max_tokens makes

        location /max/ {
            token_budget_limit zone=user;
            token_budget_stream_cut reserved;
            proxy_http_version 1.1;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /bcut/ {
            token_budget_limit zone=small;
            token_budget_reserve_output 5;
            token_budget_stream_cut budget;
            proxy_http_version 1.1;
            proxy_buffering off;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /off/ {
            token_budget_limit zone=user;
            token_budget_reserve_output 5;
            token_budget_stream_cut off;
            proxy_http_version 1.1;
            proxy_buffering off;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        # no cut: the usage asked for and taken out again

        location /inject/ {
            token_budget_limit zone=user;
            proxy_http_version 1.1;
            proxy_buffering off;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /injectb/ {
            token_budget_limit zone=user;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /budget/ {
            token_budget_api;
        }
    }
}

EOF

###############################################################################

my $HELLO = 'Say hello.';

# the mock's words, one token each, repeated for words=N

my @WORDS = ('Hello', ' from', ' the', ' mock', ' upstream', ',', ' one',
             ' token', ' at', ' a', ' time', '.', ' Budget', ' me',
             ' gently', '!');

sub words {
    my ($n) = @_;
    return join '', map { $WORDS[$_ % @WORDS] } 0 .. $n - 1;
}

# each dialect: where, the body (options: max, the output limit; usage,
# include_usage asked; stream), our prompt count for $HELLO, and the
# streamed text of one event

my %DIALECT = (
    chat => {
        uri => 'chat/completions',
        body => sub {
            my (%o) = @_;
            my $b = { model => 'm', stream => JSON::PP::true(),
                      messages => [{ role => 'user',
                                     content => $o{text} // $HELLO }] };
            $b->{max_tokens} = $o{max} if defined $o{max};
            $b->{stream_options} = { include_usage => JSON::PP::true() }
                if $o{usage};
            return $b;
        },
        prompt => 10,
        text => sub { join '', map { text_of($_->{delta}{content}) }
                               @{$_[0]{choices} || []} },
    },

    completions => {
        uri => 'completions',
        body => sub {
            my (%o) = @_;
            my $b = { model => 'm', stream => JSON::PP::true(),
                      prompt => $HELLO };
            $b->{max_tokens} = $o{max} if defined $o{max};
            $b->{stream_options} = { include_usage => JSON::PP::true() }
                if $o{usage};
            return $b;
        },
        prompt => 3,
        text => sub { join '', map { text_of($_->{text}) }
                               @{$_[0]{choices} || []} },
    },

    responses => {
        uri => 'responses',
        body => sub {
            my (%o) = @_;
            my $b = { model => 'm', stream => JSON::PP::true(),
                      input => $HELLO };
            $b->{max_output_tokens} = $o{max} if defined $o{max};
            return $b;
        },
        prompt => 9,
        text => sub { ($_[0]{type} // '') eq 'response.output_text.delta'
                      ? text_of($_[0]{delta}) : '' },
    },

    anthropic => {
        uri => 'messages',
        body => sub {
            my (%o) = @_;
            my $b = { model => 'm', stream => JSON::PP::true(),
                      messages => [{ role => 'user', content => $HELLO }] };
            $b->{max_tokens} = $o{max} if defined $o{max};
            return $b;
        },
        prompt => 7,
        text => sub { ($_[0]{type} // '') eq 'content_block_delta'
                      ? text_of($_[0]{delta}{text}) : '' },
    },
);

my @DIALECTS = qw(chat completions responses anthropic);

###############################################################################

sub text_of {
    return defined $_[0] && !ref $_[0] ? $_[0] : '';
}

# the events of a stream as a client reads them (EventSource's rules):
# lines end in CR LF, LF or CR, comments are left out, the data lines of
# an event are joined by a line feed, an event ends at a blank line

sub sse_events {
    my ($s) = @_;

    my (@events, @data, $event);

    while ($s =~ /\G([^\r\n]*)(?:\r\n|\r|\n)/gc) {
        my $line = $1;

        if ($line eq '') {
            if (@data) {
                my $e = { event => $event, data => join("\n", @data) };
                $e->{json} = eval { TBTest::json_decode($e->{data}) }
                    if $e->{data} =~ /^\{/;
                push @events, $e;
            }

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

sub stream_text {
    my ($d, @events) = @_;

    return join '', map { $_->{json} ? $DIALECT{$d}{text}->($_->{json}) : '' }
                    @events;
}

# what is wrong with the end of a stream cut after $n output tokens, for a
# prompt of $p: '' when nothing

sub ending_problems {
    my ($d, $events, $p, $n, %o) = @_;

    my @e = @$events;
    my @problems;

    return 'no events' unless @e;

    my $first = $e[0]{json} || {};

    if ($d eq 'chat' || $d eq 'completions') {
        my $object = $d eq 'chat' ? 'chat.completion.chunk'
                                  : 'text_completion';

        push @problems, 'the last event is not [DONE]'
            unless $e[-1]{data} eq '[DONE]';
        pop @e;

        my $usage;

        if ($o{usage}) {
            $usage = pop(@e) // {};
            my $j = $usage->{json} || {};

            push @problems, "the usage chunk: $usage->{data}"
                unless ref $j->{choices} eq 'ARRAY' && !@{$j->{choices}}
                    && ($j->{object} // '') eq $object
                    && ($j->{id} // '') eq ($first->{id} // '-')
                    && ($j->{usage}{prompt_tokens} // -1) == $p
                    && ($j->{usage}{completion_tokens} // -1) == $n
                    && ($j->{usage}{total_tokens} // -1) == $p + $n;
        }

        my $end = pop(@e) // {};
        my $j = $end->{json} || {};
        my $c = ref $j->{choices} eq 'ARRAY' ? $j->{choices} : [];

        push @problems, "the ending chunk: $end->{data}"
            unless @$c == 1 && ($c->[0]{finish_reason} // '') eq 'length'
                && $c->[0]{index} == 0
                && ($j->{object} // '') eq $object
                && ($j->{id} // '') eq ($first->{id} // '-')
                && ($j->{model} // '') eq ($first->{model} // '-')
                && ($j->{created} // '') eq ($first->{created} // '-')
                && ($d eq 'chat' ? ref $c->[0]{delta} eq 'HASH'
                                   && !%{$c->[0]{delta}}
                                 : defined $c->[0]{text}
                                   && $c->[0]{text} eq '');

        for my $x (@e) {
            my $xc = ($x->{json} || {})->{choices};

            push @problems, "a finish_reason before the end: $x->{data}"
                if ref $xc eq 'ARRAY'
                   && grep { defined $_->{finish_reason} } @$xc;

            push @problems, "a usage chunk before the end: $x->{data}"
                if ref $xc eq 'ARRAY' && !@$xc;
        }

        return join "\n", @problems;
    }

    my @types = map { ($_->{json} || {})->{type} // '?' } @e;

    for my $x (@e) {
        push @problems, "an event named otherwise: $x->{data}"
            if ($x->{event} // '') ne (($x->{json} || {})->{type} // '-');
    }

    if ($d eq 'anthropic') {
        push @problems, 'not message_start first' if $types[0] ne
            'message_start';
        push @problems, "the last events: @types[-2, -1]"
            unless "@types[-2, -1]" eq 'message_delta message_stop';
        push @problems, "block: before them: $types[-3]"
            unless $types[-3] eq 'content_block_stop';

        my $stops = grep { $_ eq 'content_block_stop' } @types;
        my $starts = grep { $_ eq 'content_block_start' } @types;
        push @problems, "block: $stops content_block_stop, $starts started"
            unless $stops == $starts;

        my $stop = $e[-3]{json} || {};
        push @problems, "block: content_block_stop: $e[-3]{data}"
            unless ($stop->{index} // -1) == 0;

        my $delta = $e[-2]{json} || {};
        push @problems, "message_delta: $e[-2]{data}"
            unless ($delta->{delta}{stop_reason} // '') eq 'max_tokens'
                && exists $delta->{delta}{stop_sequence}
                && ($delta->{usage}{output_tokens} // -1) == $n;

        push @problems, 'more than one message_delta'
            if 1 < grep { $_ eq 'message_delta' } @types;

        return join "\n", @problems;
    }

    # responses

    push @problems, "the last event: $types[-1]"
        unless $types[-1] eq 'response.incomplete';
    push @problems, 'response.completed'
        if grep { $_ eq 'response.completed' } @types;

    my $r = ($e[-1]{json} || {})->{response} || {};

    push @problems, "response.incomplete: $e[-1]{data}"
        unless ($r->{status} // '') eq 'incomplete'
            && ($r->{object} // '') eq 'response'
            && ($r->{incomplete_details}{reason} // '') eq 'max_output_tokens'
            && ($r->{id} // '') eq ($first->{response}{id} // '-')
            && ($r->{model} // '') eq ($first->{response}{model} // '-')
            && ($r->{usage}{input_tokens} // -1) == $p
            && ($r->{usage}{output_tokens} // -1) == $n
            && ($r->{usage}{total_tokens} // -1) == $p + $n;

    return join "\n", @problems;
}

# the mock's record of the request of a key, once the stream ended there

sub upstream_entry {
    my ($user) = @_;

    my $req;

    for (1 .. 100) {
        ($req) = reverse grep { ($_->{headers}{'x-user'} // '') eq $user
                                && defined $_->{events} }
                 @{upstream_requests()};

        last if $req && defined $req->{closed_time};

        sleep 0.05;
    }

    return $req || {};
}

# a key's budget, once nothing is reserved or in flight (or after 5s)

sub key {
    my ($zone, $user) = @_;

    my $k;

    for (1 .. 100) {
        my $r = http_get("/budget/zones/$zone/keys/$user");
        $k = eval { TBTest::json_decode($r->{body}) } || {};

        last if defined $k->{used} && !$k->{reserved} && !$k->{in_flight};

        sleep 0.05;
    }

    return [map { $k->{$_} } qw(used reserved in_flight)];
}

sub logged {
    my ($user) = @_;

    for (1 .. 50) {
        for my $line (reverse split /\n/, $t->read_file('cut.log')) {
            my @f = $line =~ /^\Q$user\E (\d+) (\S+) c=(\S+) p=(\S+)$/
                or next;
            return { status => $f[0], method => $f[1], c => $f[2],
                     p => $f[3] };
        }

        sleep 0.05;
    }

    return {};
}

# a stream through nginx, with what the mock did

sub stream {
    my ($d, $loc, $user, $mock, %o) = @_;

    my $body = TBTest::json_encode($DIALECT{$d}{body}->(%o));

    my $start = time();
    my $r = http_post("/$loc/$DIALECT{$d}{uri}", $body, 'X-User' => $user,
        'X-Mock' => $mock);
    $r->{elapsed} = time() - $start;

    $r->{events} = [sse_events($r->{body})];
    $r->{text} = stream_text($d, @{$r->{events}});
    $r->{upstream} = upstream_entry($user);
    $r->{sent} = decode_base64($r->{upstream}{sent_base64} // '');
    $r->{upstream_text} = stream_text($d, sse_events($r->{sent}));
    $r->{prompt} = $DIALECT{$d}{prompt};

    return $r;
}

# an event by its type, [DONE], or its first choice's finish_reason

sub ending_name {
    my ($e) = @_;

    return '[DONE]' if $e->{data} eq '[DONE]';

    my $j = $e->{json} || {};

    return $j->{type} if defined $j->{type};

    my $c = ref $j->{choices} eq 'ARRAY' ? $j->{choices}[0] : undef;

    return $c ? $c->{finish_reason} // '-' : '-';
}

sub is_prefix {
    my ($prefix, $s) = @_;
    return length $prefix <= length $s
           && substr($s, 0, length $prefix) eq $prefix;
}

# checks of a stream cut after $n tokens: 10 tests

sub cut_ok {
    my ($r, $d, $name, $zone, $user, $n, %o) = @_;

    my $p = $r->{prompt};

    is($r->{status}, 200, "$name, passed");

    my @problems = split /\n/, ending_problems($d, $r->{events}, $p, $n, %o);
    my @block = grep { /^block: / } @problems;
    @problems = grep { !/^block: / } @problems;

    ok(!@problems, "$name, the provider's ending")
        or diag(join "\n", @problems);

    if ($d eq 'anthropic') {
        ok(!@block, "$name, the open block closed") or diag(join "\n", @block);

    } else {
        my $ends = grep { $_->{data} eq '[DONE]'
                          || ($_->{json}{type} // '') eq 'response.incomplete' }
                   @{$r->{events}};
        is($ends, 1, "$name, one ending");
    }

    like($r->{raw}, qr/\r\n0\r\n\r\n\z/, "$name, the response complete");

    is($r->{text}, words($n), "$name, the text before the cut");
    ok(is_prefix($r->{text}, $r->{upstream_text})
       && is_prefix($r->{text}, words(16 * 4)),
        "$name, a prefix of the upstream's");

    is_deeply(key($zone, $user), [($o{spent} // 0) + $p + $n, 0, 0],
        "$name, the prompt and the output counted");

    my $l = logged($user);
    is("$l->{status} $l->{c} $l->{p}", "200 $n $p", "$name, logged");

    my $u = $r->{upstream};

    ok($u->{aborted} && !$u->{finished}
       && $u->{events_sent} < $u->{events},
        "$name, the upstream closed early")
        or diag(sprintf("aborted %s, finished %s, %s of %s events",
                        map { $_ // 'undef' } @$u{qw(aborted finished
                                                     events_sent events)}));

    if ($d eq 'chat' || $d eq 'completions') {
        if ($o{usage}) {
            like($r->{body}, qr/"usage":null/,
                "$name, usage null as asked for");

        } else {
            unlike($r->{body}, qr/"usage"/, "$name, no usage");
        }

    } else {
        unlike($r->{body}, qr/"(?:message_stop|response\.completed)".*"type"/s,
            "$name, nothing after the ending");
    }
}

###############################################################################

# the reservation of token_budget_reserve_output 5, the client setting no
# limit: the mock streams 16 words, 25 ms apart; with proxy_buffering on
# and an HTTP/1.0 upstream, nginx passes what it reads on only when a
# proxy buffer is full (or at the end), so there the mock streams more

for my $d (@DIALECTS) {
    for my $loc (qw(cut cutb)) {
        my $user = "$d-$loc";
        my $mock = $loc eq 'cut' ? 'chunkdelay=25' : 'words=64 chunkdelay=5';

        my $r = stream($d, $loc, $user, $mock);
        cut_ok($r, $d, "$d, /$loc/", 'user', $user, 5);
    }
}

# the client asked for the usage chunk: it reports what was counted

for my $d (qw(chat completions)) {
    my $user = "$d-usage";

    my $r = stream($d, 'cut', $user, 'chunkdelay=25', usage => 1);
    cut_ok($r, $d, "$d, usage asked", 'user', $user, 5, usage => 1);

    # the upstream's usage chunk never came: the ending is ours

    is((grep { ($_->{json} || {})->{usage} } @{$r->{events}}), 1,
        "$d, usage asked, one usage chunk");
}

# an upstream that ignores max_tokens: max_tokens 3, 16 words streamed

for my $d (@DIALECTS) {
    my $user = "$d-max";

    my $r = stream($d, 'max', $user, 'words=16 chunkdelay=25', max => 3);
    cut_ok($r, $d, "$d, max_tokens 3", 'user', $user, 3);
}

# text in pieces that cut words and characters of several bytes (echo=3
# streams the prompt three characters at a time): the cut comes with the
# piece that brings the count of the text so far to 5, the seventh
# ("Streaming naïve café " is 5 tokens, cl100k_base), and the usage
# reports 5

{
    my $text = "Streaming naïve café text: 東京タワー 🎉🎉 done";
    my $user = 'chat-echo';

    my $r = stream('chat', 'cut', $user, 'echo=3 chunkdelay=10',
        usage => 1, text => $text);
    my $p = logged($user)->{p};

    is($r->{text}, substr($text, 0, 21), 'echo, the text before the cut');

    my $problems = ending_problems('chat', $r->{events}, $p, 5, usage => 1);
    ok($problems eq '', 'echo, the ending and its usage') or diag($problems);

    is_deeply(key('user', $user), [$p + 5, 0, 0], 'echo, settled');
    ok($r->{upstream}{aborted}, 'echo, the upstream closed early');
}

# events in pieces, CR LF line ends, comments: the same ending

for my $d (@DIALECTS) {
    my $user = "$d-split";

    my $r = stream($d, 'cut', $user, 'split=1 crlf comments chunkdelay=25');
    cut_ok($r, $d, "$d, in pieces", 'user', $user, 5);
}

# "budget": the reservation and what the key had left, 40 tokens a key
# less 10 already spent

for my $d (@DIALECTS) {
    my $user = "$d-budget";

    my $r = http_post('/bcut/chat/completions',
        { model => 'm', max_tokens => 1,
          messages => [{ role => 'user', content => 'x' }] },
        'X-User' => $user, 'X-Mock' => 'usage=5,5');

    is_deeply(key('small', $user), [10, 0, 0], "$d, budget, 10 spent");

    my $n = 40 - 10 - $DIALECT{$d}{prompt};

    $r = stream($d, 'bcut', $user, 'words=40 chunkdelay=10');
    cut_ok($r, $d, "$d, budget", 'small', $user, $n, spent => 10);

    # all of it spent, not more

    is(http_post("/bcut/$DIALECT{$d}{uri}",
        TBTest::json_encode($DIALECT{$d}{body}->()),
        'X-User' => $user)->{status}, 429, "$d, budget, spent");
}

# "off": the whole stream, as the upstream ends it

for my $d (@DIALECTS) {
    my $user = "$d-off";

    my $r = stream($d, 'off', $user, 'chunkdelay=5');
    my $types = join ' ', map { ending_name($_) } @{$r->{events}}[-2, -1];

    is($r->{text}, words(16), "$d, off, the whole text");
    is($types, { chat => 'stop [DONE]', completions => 'stop [DONE]',
                 responses => 'response.output_item.done response.completed',
                 anthropic => 'message_delta message_stop' }->{$d},
        "$d, off, the upstream's ending");
    is_deeply(key('user', $user), [$r->{prompt} + 16, 0, 0],
        "$d, off, settled");
    ok($r->{upstream}{finished} && !$r->{upstream}{aborted},
        "$d, off, the upstream finished");
}

# the usage asked for a client that did not ask: the stream it gets is
# the one the upstream sends without include_usage, but for ids and
# times; the key is charged the usage reported

my @variants = ('', 'split=1', 'split=7 crlf events', 'cr nospace ascii');

for my $d (qw(chat completions)) {
    my $n = 0;

    for my $v (@variants) {
        for my $loc (qw(inject injectb)) {
            my $user = "$d-inject-" . $n++;
            my $name = "$d, /$loc/ $v";
            my $mock = "usage=321,45 $v";

            my $body = TBTest::json_encode($DIALECT{$d}{body}->());

            my $direct = http_post("/v1/$DIALECT{$d}{uri}", $body,
                'X-User' => "$user-direct", 'X-Mock' => $mock,
                -port => $t->upstream_port());
            my $r = http_post("/$loc/$DIALECT{$d}{uri}", $body,
                'X-User' => $user, 'X-Mock' => $mock);

            my $asked = TBTest::json_decode(upstream_entry($user)->{body});

            ok($asked->{stream_options}{include_usage}, "$name, asked");

            for ($direct->{body}, $r->{body}) {
                s/mock[0-9a-z]{8}/mockID/g;
                s/"created":\d+/"created":0/g;
            }

            ok(length $direct->{body} > 1000
               && $direct->{body} !~ /"usage"/, "$name, direct");
            same_bytes($r->{body}, $direct->{body}, "$name, the same stream");
            is_deeply(key('user', $user), [366, 0, 0], "$name, settled");
        }
    }

    # data on two lines, split where the mock finds the middle of the
    # JSON, which "usage":null moves: the same events

    my $user = "$d-inject-multiline";
    my $mock = 'usage=321,45 multiline';
    my $body = TBTest::json_encode($DIALECT{$d}{body}->());

    my $direct = http_post("/v1/$DIALECT{$d}{uri}", $body,
        'X-User' => "$user-direct", 'X-Mock' => $mock,
        -port => $t->upstream_port());
    my $r = http_post("/inject/$DIALECT{$d}{uri}", $body,
        'X-User' => $user, 'X-Mock' => $mock);

    my @got = map { $_->{json} // $_->{data} } sse_events($r->{body});
    my @expected = map { $_->{json} // $_->{data} }
                   sse_events($direct->{body});

    for (@got, @expected) {
        next unless ref;
        $_->{id} = 'ID';
        $_->{created} = 0;
    }

    is_deeply(\@got, \@expected, "$d, multiline, the same events");

    is_deeply(key('user', $user), [366, 0, 0], "$d, multiline, settled");
}

# what the client said of stream_options: the usage asked for, unless the
# client asked, and what the client did not ask for taken out again

{
    my $n = 0;

    for my $so ('null', '{}', '{"include_usage":false}',
                '{"include_usage":null}', '{"foo":1}')
    {
        my $user = 'inject-options-' . $n++;
        my $body = '{"model":"m","stream":true,"stream_options":' . $so
            . ',"messages":[{"role":"user","content":"Say hello."}]}';

        my $direct = http_post('/v1/chat/completions', $body,
            'X-User' => "$user-direct", 'X-Mock' => 'usage=321,45',
            -port => $t->upstream_port());
        my $r = http_post('/inject/chat/completions', $body,
            'X-User' => $user, 'X-Mock' => 'usage=321,45');

        my $asked = TBTest::json_decode(upstream_entry($user)->{body});
        my $expected = TBTest::json_decode($so) // {};
        $expected->{include_usage} = JSON::PP::true();

        is_deeply($asked->{stream_options}, $expected,
            "stream_options $so, asked");

        for ($direct->{body}, $r->{body}) {
            s/mock[0-9a-z]{8}/mockID/g;
            s/"created":\d+/"created":0/g;
        }

        same_bytes($r->{body}, $direct->{body},
            "stream_options $so, the same stream");
        is_deeply(key('user', $user), [366, 0, 0],
            "stream_options $so, settled");
    }
}

# the client's connection after a cut: the response said keep-alive, so
# the connection is to serve the next request

{
    my $body = TBTest::json_encode($DIALECT{chat}{body}->());

    my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
        PeerPort => $t->port(8080), Proto => 'tcp')
        or die "cannot connect: $!\n";

    $s->autoflush(1);

    my $req = sub {
        my ($loc, $user) = @_;
        print $s "POST /$loc/chat/completions HTTP/1.1\r\n"
            . "Host: localhost\r\nContent-Type: application/json\r\n"
            . "Content-Length: " . length($body) . "\r\n"
            . "X-User: $user\r\nX-Mock: chunkdelay=10\r\n\r\n" . $body;
    };

    local $SIG{PIPE} = 'IGNORE';

    $req->('cut', 'keepalive-1');

    my $raw = read_until($s, qr/\r\n0\r\n\r\n\z/);

    like($raw, qr/^HTTP\/1.1 200 .*\r\nConnection: keep-alive\r\n/si,
        'keepalive, the cut response says keep-alive');
    like($raw, qr/\r\n0\r\n\r\n\z/, 'keepalive, the cut response complete');

    sleep 0.2;

    $req->('cut', 'keepalive-2');

    $raw = read_until($s, qr/\r\n0\r\n\r\n\z/);

    like($raw, qr/^HTTP\/1.1 200 /, 'keepalive, the next request');

    close $s;
}

upstream_reset();

###############################################################################

sub read_until {
    my ($s, $end) = @_;

    my $sel = IO::Select->new($s);
    my $deadline = time() + 5;
    my $raw = '';

    while (time() < $deadline && $sel->can_read(0.5)) {
        my $n = sysread($s, my $buf, 65536);
        last unless $n;
        $raw .= $buf;
        last if $raw =~ $end;
    }

    return $raw;
}

sub same_bytes {
    my ($got, $expected, $name) = @_;

    return ok(1, $name) if $got eq $expected;

    my $i = 0;
    $i++ while $i < length($got) && $i < length($expected)
               && substr($got, $i, 1) eq substr($expected, $i, 1);

    ok(0, $name);
    diag(sprintf("%d bytes, %d expected, first difference at %d:\n"
                 . "got      %s\nexpected %s", length($got),
                 length($expected), $i,
                 map { my $s = substr($_, $i, 60); $s =~ s/\r/\\r/g;
                       $s =~ s/\n/\\n/g; $s } $got, $expected));
}

###############################################################################

#!/usr/bin/perl

# (C) The token budget authors

# Tests of windowed budgets: token_budget_zone and token_budget_limit.
# Admission until the window is spent, the 429 bodies and Retry-After, a
# request over the whole budget, an empty key, two zones at once, what is
# counted, settlement on every path, the x-ratelimit-* headers, the
# variables and dry run.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use IO::Socket::INET;
use POSIX qw(ceil floor);
use Socket qw(SOL_SOCKET SO_RCVBUF inet_aton pack_sockaddr_in);
use Time::HiRes qw(sleep time);

use Test::More;
use TBTest;

my $t = TBTest->new()->write_conf(<<'EOF')->run()->plan(141);

%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    token_budget_encoding cl100k_base %%DATADIR%%/cl100k_base.tiktoken;

    token_budget_model m cl100k_base context=100000 max_output=50;

    token_budget_zone $http_x_user zone=user:1m tokens=100 per=1h;
    token_budget_zone $http_x_tenant zone=tenant:1m tokens=150 per=1h;
    token_budget_zone $http_x_user zone=fast:1m tokens=100 per=2s;
    token_budget_zone $http_x_user zone=prompt:1m tokens=50 per=1h
                      count=prompt;
    token_budget_zone $http_x_user zone=completion:1m tokens=50 per=1h
                      count=completion;
    token_budget_zone $http_x_user zone=big:1m tokens=100000 per=1h;

    log_format zone '$http_x_user $status $token_budget_status '
                    'c=$token_budget_completion_tokens '
                    'r=$token_budget_remaining';

    server {
        listen 127.0.0.1:%%PORT_8080%%;
        server_name localhost;

        token_budget on;

        access_log %%TESTDIR%%/zone.log zone;

        add_header X-TB-Status $token_budget_status always;
        add_header X-TB-Reason $token_budget_reason always;
        add_header X-TB-Reserved $token_budget_reserved_tokens always;
        add_header X-TB-Remaining $token_budget_remaining always;

        location /v1/ {
            token_budget_limit zone=user;
            proxy_pass http://%%UPSTREAM%%;
        }

        location /two/ {
            token_budget_limit zone=user;
            token_budget_limit zone=tenant;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /rev/ {
            token_budget_limit zone=tenant;
            token_budget_limit zone=user;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /fast/ {
            token_budget_limit zone=fast;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /prompt/ {
            token_budget_limit zone=prompt;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /completion/ {
            token_budget_limit zone=completion;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /s400/ {
            token_budget_status 400;
            token_budget_limit zone=user;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /dry/ {
            token_budget_dry_run on;
            token_budget_limit zone=user;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /down/ {
            token_budget_limit zone=user;
            proxy_pass http://127.0.0.1:%%PORT_DOWN%%/v1/;
        }

        location /provider/ {
            token_budget_limit zone=user;
            proxy_pass http://127.0.0.1:%%PORT_8082%%/v1/;
        }

        location /budget/ {
            token_budget_api;
        }
    }

    # small buffers, a small send buffer: large responses go to disk

    server {
        listen 127.0.0.1:%%PORT_8083%% sndbuf=4k;
        server_name localhost;

        location /v1/ {
            token_budget on;
            token_budget_limit zone=big;

            proxy_buffers 2 4k;
            proxy_buffer_size 4k;
            proxy_busy_buffers_size 4k;
            proxy_pass http://%%UPSTREAM%%;
        }
    }

    # an upstream with rate limit headers of its own

    server {
        listen 127.0.0.1:%%PORT_8082%%;
        server_name localhost;

        location / {
            add_header x-ratelimit-limit-tokens 30000000;
            add_header x-ratelimit-remaining-tokens 29999990;
            add_header x-ratelimit-reset-tokens 0s;
            default_type application/json;
            return 200 '{"usage":{"prompt_tokens":9,"completion_tokens":1}}';
        }
    }
}

EOF

###############################################################################

# one "Hello!" message is 9 prompt tokens with cl100k_base: 3 for the
# message, 1 for the role, 2 for the text and 3 priming the reply

sub chat {
    my ($max, $n) = @_;

    return TBTest::json_encode({ model => 'm', max_tokens => $max,
        messages => [ ({ role => 'user', content => 'Hello!' }) x ($n // 1) ]
    });
}

sub post {
    my ($uri, $user, $max, $mock, @headers) = @_;

    my $r = http_post($uri, chat($max),
        (defined $user ? ('X-User' => $user) : ()),
        ($mock ? ('X-Mock' => $mock) : ()), @headers);
    $r->{json} = eval { TBTest::json_decode($r->{body}) } || {};

    return $r;
}

sub key {
    my ($zone, $key) = @_;

    my $r = http_get("/budget/zones/$zone/keys/$key");
    return { status => $r->{status} } unless $r->{status} == 200;

    return TBTest::json_decode($r->{body});
}

sub zone_info {
    my ($name) = @_;

    my $zones = TBTest::json_decode(http_get('/budget/zones')->{body});
    my ($zone) = grep { $_->{name} eq $name } @{$zones->{zones}};

    return $zone;
}

# the sliding window as documented: what a key spent in the previous
# window weighted by the part of it still inside, rounded up, plus the
# current window; spends are [amount, time]; $exact keeps the fraction

sub used_at {
    my ($spends, $at, $period, $exact) = @_;

    my $w = floor($at / $period);
    my $left = ($period - ($at - $w * $period)) / $period;
    my ($prev, $curr) = (0, 0);

    for my $s (@$spends) {
        my $sw = floor($s->[1] / $period);
        $curr += $s->[0] if $sw == $w;
        $prev += $s->[0] if $sw == $w - 1;
    }

    my $used = $prev * $left;
    $used = ceil($used - 1e-9) unless $exact;

    return $used + $curr;
}

# the first moment from $from when $amount fits: what is used only
# decreases while nothing is spent, bisect to a tenth of a millisecond

sub fits_from {
    my ($spends, $from, $amount, $limit, $period) = @_;

    my $fits = sub {
        used_at($spends, $_[0], $period, 1) + $amount <= $limit;
    };

    return $from if $fits->($from);

    my ($lo, $hi) = ($from, $from + 2 * $period);

    while ($hi - $lo > 0.0001) {
        my $mid = ($lo + $hi) / 2;

        if ($fits->($mid)) {
            $hi = $mid;
        } else {
            $lo = $mid;
        }
    }

    return $hi;
}

# the same as admission counts, the previous window's share rounded up:
# stepping by the second, then by the millisecond

sub fits_floor {
    my ($spends, $from, $amount, $limit, $period) = @_;

    my $at = $from;

    for my $step (1, 0.001) {
        $at -= $step if $at > $from;
        $at += $step
            while used_at($spends, $at, $period) + $amount > $limit
                && $at < $from + 2 * $period;
    }

    return $at;
}

# checks a 429's Retry-After against the window, for a request sent at
# $t0 and answered at $t1

sub retry_consistent {
    my ($name, $r, $t0, $t1, $spends, $amount, $limit, $period, $todo) = @_;

    my $retry = $r->{headers}{'retry-after'} // '';

    my $fit = fits_from($spends, $t0, $amount, $limit, $period);
    my $lo = ceil($fit - $t1 - 0.005);
    my $hi = ceil($fit - $t0 + 0.005);
    $lo = 1 if $lo < 1;

    ok($retry =~ /^\d+$/ && $retry >= $lo && $retry <= $hi,
        "$name, Retry-After the window implies")
        or diag("Retry-After '$retry', expected $lo to $hi");

    $retry = 0 unless $retry =~ /^\d+$/;

    ok(used_at($spends, $t0 + $retry, $period) + $amount <= $limit,
        "$name, fits at Retry-After");
    {
        local $TODO = $todo;

        ok(used_at($spends, $t1 + $retry - 1, $period) + $amount > $limit,
            "$name, not a second earlier")
            or diag(sprintf("Retry-After %ds, admitted after %.3fs",
                $retry, fits_floor($spends, $t0, $amount, $limit, $period)
                - $t0));
    }

    like($r->{json}{error}{message}, qr/try again in ${retry}s\b/,
        "$name, message");
    is($r->{headers}{'x-ratelimit-reset-tokens'}, "${retry}s",
        "$name, reset header");

    return $retry;
}

sub sleep_until {
    my ($at) = @_;

    my $left = $at - time();
    sleep($left) if $left > 0;
}

# the start of the next window of $period seconds, and a little

sub window_start {
    my ($period) = @_;

    sleep_until((floor(time() / $period) + 1) * $period + 0.05);
    return floor(time() / $period) * $period;
}

# the hour-long windows must not turn during the test

window_start(3600) if 3600 - (time() - floor(time() / 3600) * 3600) < 60;

###############################################################################

# a client gone before the upstream answers; checked at the end

my $abort_at = time();

my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
    PeerPort => $t->port(8080), Proto => 'tcp')
    or die "cannot connect: $!\n";

{
    my $body = chat(10);

    print $s "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
        . "Content-Type: application/json\r\n"
        . "Content-Length: " . length($body) . "\r\n"
        . "X-User: abort\r\nX-Mock: delay=2000\r\n\r\n" . $body;

    sleep 0.2;
    close $s;
}

# admission until the window is spent: each request reserves 9 + 10, and
# the upstream reports 20 + 5 spent

my @rem;

for my $i (1 .. 3) {
    my $r = post('/v1/chat/completions', 'admit', 10, 'usage=20,5');
    push @rem, $r->{status}, $r->{headers}{'x-ratelimit-remaining-tokens'};
}

is_deeply(\@rem, [200, 81, 200, 56, 200, 31], 'admitted, remaining');

# 75 spent: a reservation of exactly the 25 left fits

my $r = post('/v1/chat/completions', 'admit', 16, 'usage=20,5');
is($r->{status}, 200, 'admitted, the last tokens');
is($r->{headers}{'x-ratelimit-remaining-tokens'}, 0,
    'admitted, the last tokens, nothing remaining');
is(key('user', 'admit')->{used}, 100, 'spent');

upstream_reset();

my $t0 = time();
$r = post('/v1/chat/completions', 'admit', 1);
my $t1 = time();

is($r->{status}, 429, 'spent, 429');
like($r->{headers}{'content-type'}, qr{^application/json}, 'spent, type');
is($r->{json}{error}{code}, 'rate_limit_exceeded', 'spent, code');
is($r->{json}{error}{type}, 'tokens', 'spent, error type');
ok(exists $r->{json}{error}{param}, 'spent, param');
like($r->{json}{error}{message}, qr/token_budget_zone "user".*limit 100/,
    'spent, message');
is($r->{headers}{'x-tb-status'}, 'REJECTED', 'spent, status variable');
is($r->{headers}{'x-tb-reason'}, 'budget_exhausted', 'spent, reason');
is($r->{headers}{'x-ratelimit-limit-tokens'}, 100, 'spent, limit header');
is($r->{headers}{'x-ratelimit-remaining-tokens'}, 0,
    'spent, remaining header');
is($r->{headers}{'x-tb-remaining'}, 0, 'spent, remaining variable');
is(scalar @{upstream_requests()}, 0, 'spent, not forwarded');

# admission rounds the previous window's weighted share up, and
# Retry-After is the moment that share fits

retry_consistent('spent', $r, $t0, $t1, [[100, $t0]], 10, 100, 3600);

my $k = key('user', 'admit');
is_deeply([@$k{qw(used reserved in_flight remaining)}], [100, 0, 0, 0],
    'spent, the key');

# the Anthropic shape

$r = http_post('/v1/messages', TBTest::json_encode({ model => 'm',
    max_tokens => 10,
    messages => [{ role => 'user', content => 'Hello!' }] }),
    'X-User' => 'admit');
my $j = eval { TBTest::json_decode($r->{body}) } || {};

is($r->{status}, 429, 'anthropic, 429');
is($j->{type}, 'error', 'anthropic, shape');
is($j->{error}{type}, 'rate_limit_error', 'anthropic, error type');
ok(!exists $j->{error}{code}, 'anthropic, no openai code');
like($r->{headers}{'retry-after'} // '', qr/^[1-9]\d*$/,
    'anthropic, Retry-After');

# more than the whole budget can never fit

upstream_reset();

$r = post('/v1/chat/completions', 'big', 92);
is($r->{status}, 413, 'over the budget, 413');
is($r->{json}{error}{code}, 'budget_exceeded', 'over the budget, code');
is($r->{json}{error}{type}, 'invalid_request_error',
    'over the budget, error type');
like($r->{json}{error}{message}, qr/\b101 tokens\b.*\b100 tokens per 1h\b/,
    'over the budget, message');
is($r->{headers}{'x-tb-reason'}, 'budget_too_large',
    'over the budget, reason');
ok(!exists $r->{headers}{'retry-after'}, 'over the budget, no Retry-After');

$r = post('/s400/chat/completions', 'big', 92);
is($r->{status}, 400, 'over the budget, token_budget_status');
is($r->{json}{error}{code}, 'budget_exceeded',
    'over the budget, token_budget_status, code');
is(scalar @{upstream_requests()}, 0, 'over the budget, not forwarded');

$r = post('/v1/chat/completions', 'big', 91);
is($r->{status}, 200, 'the whole budget');
is($r->{headers}{'x-ratelimit-remaining-tokens'}, 0,
    'the whole budget, remaining');

# an empty key is not limited by the zone, whatever the size

my $keys = zone_info('user')->{keys};

$r = post('/v1/chat/completions', undef, 500);
is($r->{status}, 200, 'no key, passed');
is($r->{headers}{'x-tb-status'}, 'PASSED', 'no key, status');
ok(!exists $r->{headers}{'x-ratelimit-limit-tokens'}, 'no key, no headers');
ok(!exists $r->{headers}{'x-tb-remaining'}, 'no key, no remaining');
is(zone_info('user')->{keys}, $keys, 'no key, not stored');

$r = post('/v1/chat/completions', '', 500);
is($r->{status}, 200, 'empty key, passed');

# two zones, per user and per tenant: both must have room

$r = post('/two/chat/completions', 'u1', 10, 'usage=55,5', 'X-Tenant' => 'T1');
is($r->{status}, 200, 'two zones, first');
is($r->{headers}{'x-ratelimit-limit-tokens'}, 100,
    'two zones, the user is tightest');
is($r->{headers}{'x-ratelimit-remaining-tokens'}, 81,
    'two zones, the user remaining');

$r = post('/two/chat/completions', 'u2', 10, 'usage=55,5', 'X-Tenant' => 'T1');
is($r->{status}, 200, 'two zones, second');
is($r->{headers}{'x-ratelimit-limit-tokens'}, 150,
    'two zones, the tenant is tightest');
is($r->{headers}{'x-ratelimit-remaining-tokens'}, 150 - 60 - 19,
    'two zones, the tenant remaining');

is(key('tenant', 'T1')->{used}, 120, 'two zones, tenant spent');

# u2 has room (60 + 39 <= 100), the tenant has not (120 + 39 > 150)

upstream_reset();

$r = post('/two/chat/completions', 'u2', 30, undef, 'X-Tenant' => 'T1');
is($r->{status}, 429, 'two zones, refused by the second');
like($r->{json}{error}{message}, qr/token_budget_zone "tenant"/,
    'two zones, refused by the tenant');
is($r->{headers}{'x-ratelimit-limit-tokens'}, 150,
    'two zones, refused, the limit of the refusing zone');

$k = key('user', 'u2');
is_deeply([@$k{qw(used reserved in_flight)}], [60, 0, 0],
    'two zones, nothing left reserved in the first');
is(key('tenant', 'T1')->{reserved}, 0, 'two zones, nothing in the second');

# u1 has no room (60 + 49 > 100): the tenant is not even asked

$r = post('/two/chat/completions', 'u1', 40, undef, 'X-Tenant' => 'T1');
is($r->{status}, 429, 'two zones, refused by the first');
like($r->{json}{error}{message}, qr/token_budget_zone "user"/,
    'two zones, refused by the user');
is(scalar @{upstream_requests()}, 0, 'two zones, refusals not forwarded');

$k = key('tenant', 'T1');
is_deeply([@$k{qw(used reserved in_flight)}], [120, 0, 0],
    'two zones, the tenant untouched');

# a new user of T1 fits both: 19 in 100, and 19 in the 30 T1 has left

$r = post('/two/chat/completions', 'u3', 10, 'usage=9,1', 'X-Tenant' => 'T1');
is($r->{status}, 200, 'two zones, both have room');
is(key('tenant', 'T1')->{used}, 130, 'two zones, both charged, tenant');
is(key('user', 'u3')->{used}, 10, 'two zones, both charged, user');

# the second zone can never fit it: the first gives its reservation back

$r = post('/rev/chat/completions', 'u4', 110, undef, 'X-Tenant' => 'T2');
is($r->{status}, 413, 'two zones, over the second budget');
like($r->{json}{error}{message}, qr/token_budget_zone "user"/,
    'two zones, over the user budget');

$k = key('tenant', 'T2');
is_deeply([@$k{qw(used reserved in_flight)}], [0, 0, 0],
    'two zones, over the second budget, first given back');

# count=prompt: only the prompt is reserved and charged

$r = post('/prompt/chat/completions', 'cp', 1000, 'usage=20,7');
is($r->{status}, 200, 'count=prompt, a large output passes');
is($r->{headers}{'x-ratelimit-remaining-tokens'}, 50 - 9,
    'count=prompt, the prompt reserved');
is(key('prompt', 'cp')->{used}, 20, 'count=prompt, the prompt charged');

$r = post('/prompt/chat/completions', 'cp', 1, 'usage=30,0');
is($r->{status}, 200, 'count=prompt, room for a prompt');
$r = post('/prompt/chat/completions', 'cp', 1);
is($r->{status}, 429, 'count=prompt, spent');

# count=completion: only the output

$r = post('/completion/chat/completions', 'cc', 51);
is($r->{status}, 413, 'count=completion, output over the budget');

$r = post('/completion/chat/completions', 'cc', 40, 'usage=30,12');
is($r->{status}, 200, 'count=completion, passed');
is($r->{headers}{'x-ratelimit-remaining-tokens'}, 10,
    'count=completion, the output reserved');
is(key('completion', 'cc')->{used}, 12, 'count=completion, output charged');

$r = post('/completion/chat/completions', 'cc', 39);
is($r->{status}, 429, 'count=completion, no room');
$r = post('/completion/chat/completions', 'cc', 38, 'usage=1000,0');
is($r->{status}, 200, 'count=completion, room');
is(key('completion', 'cc')->{used}, 12, 'count=completion, prompt free');

# settlement: what the upstream reports, not the reservation

$r = post('/v1/chat/completions', 'settle', 40, 'usage=30,12');
is($r->{status}, 200, 'usage, passed');
is($r->{headers}{'x-tb-reserved'}, 49, 'usage, reserved');

$k = key('user', 'settle');
is_deeply([@$k{qw(used reserved in_flight remaining)}], [42, 0, 0, 58],
    'usage, settled');

# OpenAI's Responses API and Anthropic name it otherwise

$r = http_post('/v1/responses', TBTest::json_encode({ model => 'm',
    input => 'Hello!', max_output_tokens => 10 }),
    'X-User' => 'responses', 'X-Mock' => 'usage=11,4');
is($r->{status}, 200, 'usage, responses');
is(key('user', 'responses')->{used}, 15, 'usage, responses, settled');

$r = http_post('/v1/messages', TBTest::json_encode({ model => 'm',
    max_tokens => 10, messages => [{ role => 'user', content => 'Hello!' }] }),
    'X-User' => 'messages', 'X-Mock' => 'usage=13,6');
is($r->{status}, 200, 'usage, anthropic');
is(key('user', 'messages')->{used}, 19, 'usage, anthropic, settled');

# without a usage the prompt counts as spent

$r = post('/v1/chat/completions', 'nousage', 40, 'nousage');
is($r->{status}, 200, 'no usage, passed');
$k = key('user', 'nousage');
is_deeply([@$k{qw(used reserved in_flight)}], [9, 0, 0],
    'no usage, the prompt spent');

$r = post('/v1/chat/completions', 's500', 40, 'status=500');
is($r->{status}, 500, 'upstream error, passed on');
$k = key('user', 's500');
is_deeply([@$k{qw(used reserved in_flight)}], [9, 0, 0],
    'upstream error, the prompt spent');

$r = post('/v1/chat/completions', 'die', 40, 'die');
ok(length($r->{body}) < ($r->{headers}{'content-length'} // 0),
    'upstream died, truncated');
$k = key('user', 'die');
is_deeply([@$k{qw(used reserved in_flight)}], [9, 0, 0],
    'upstream died, the prompt spent');

# settled when the response is complete: a client that has it all but
# keeps its connection open holds the reservation as long as nginx keeps
# the request for a lingering close, up to lingering_timeout

my $held = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
    PeerPort => $t->port(8080), Proto => 'tcp')
    or die "cannot connect: $!\n";

{
    my $body = chat(10);

    print $held "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
        . "Connection: close\r\nContent-Type: application/json\r\n"
        . "Content-Length: " . length($body) . "\r\n"
        . "X-User: held\r\nX-Mock: usage=30,3\r\n\r\n" . $body;

    local $/;
    like(<$held> // '', qr{^HTTP/1.1 200.*"total_tokens":33}s,
        'client holds the connection, response complete');
}

{
    $k = key('user', 'held');
    is_deeply([@$k{qw(used reserved in_flight)}], [33, 0, 0],
        'client holds the connection, settled');
}

close $held;

for (1 .. 20) {
    $k = key('user', 'held');
    last unless $k->{in_flight};
    sleep 0.05;
}

is_deeply([@$k{qw(used reserved in_flight)}], [33, 0, 0],
    'client closed the connection, settled');

# the usage at the end of a large response buffered to a temporary file:
# 4000 embeddings, half a megabyte, read slowly

{
    my $body = TBTest::json_encode({ model => 'm', input => [('a') x 4000] });

    my $c = IO::Socket::INET->new(Proto => 'tcp')
        or die "cannot create a socket: $!\n";
    setsockopt($c, SOL_SOCKET, SO_RCVBUF, 4096);
    $c->connect(pack_sockaddr_in($t->port(8083), inet_aton('127.0.0.1')))
        or die "cannot connect: $!\n";

    print $c "POST /v1/embeddings HTTP/1.1\r\nHost: localhost\r\n"
        . "Connection: close\r\nContent-Type: application/json\r\n"
        . "Content-Length: " . length($body) . "\r\n"
        . "X-User: disk\r\nX-Mock: usage=3977,0\r\n\r\n" . $body;

    sleep 0.5;

    local $/;
    my $raw = <$c> // '';
    close $c;

    like($raw, qr/"usage":\{"prompt_tokens":3977,/, 'large response, usage');
}

like($t->read_file('error.log'),
    qr/an upstream response is buffered to a temporary file/,
    'large response, on disk');

for (1 .. 20) {
    $k = key('big', 'disk');
    last unless $k->{in_flight};
    sleep 0.05;
}

is_deeply([@$k{qw(used reserved in_flight)}], [3977, 0, 0],
    'large response, settled with its usage');

# an upstream that never got the request: nothing spent

$r = post('/down/chat/completions', 'down', 40);
is($r->{status}, 502, 'upstream down, 502');
$k = key('user', 'down');
is_deeply([@$k{qw(used reserved in_flight)}], [0, 0, 0],
    'upstream down, nothing spent');

# the variables, in the access log

sleep 0.1;

my $log = $t->read_file('zone.log');
like($log, qr/^settle 200 PASSED c=12 r=51$/m,
    'completion tokens variable');
like($log, qr/^nousage 200 PASSED c=- r=51$/m,
    'completion tokens variable, no usage');
like($log, qr/^admit 429 REJECTED c=- r=0$/m, 'remaining variable, 429');

# x-ratelimit-* headers on a passed response

$t0 = time();
$r = post('/v1/chat/completions', 'headers', 10, 'usage=5,5');
my $left = 3600 - ($t0 - floor($t0 / 3600) * 3600);

is($r->{headers}{'x-ratelimit-limit-tokens'}, 100, 'headers, limit');
is($r->{headers}{'x-ratelimit-remaining-tokens'}, 81, 'headers, remaining');
is($r->{headers}{'x-tb-remaining'}, 81, 'headers, remaining variable');

my ($reset) = ($r->{headers}{'x-ratelimit-reset-tokens'} // '') =~ /^(\d+)s$/;
ok(defined $reset && abs($reset - $left) <= 2, 'headers, reset')
    or diag("reset $r->{headers}{'x-ratelimit-reset-tokens'}, window $left");

# spent in this window, it is free after the next one

$r = post('/v1/chat/completions', 'headers', 10);
is($r->{headers}{'x-ratelimit-remaining-tokens'}, 100 - 10 - 19,
    'headers, remaining after spending');
($reset) = ($r->{headers}{'x-ratelimit-reset-tokens'} // '') =~ /^(\d+)s$/;
ok(defined $reset && abs($reset - $left - 3600) <= 2,
    'headers, reset after spending');

# one of each header, also when the upstream sends its own

$r = post('/provider/chat/completions', 'provider', 10);
is($r->{status}, 200, 'provider headers, passed');

{
    for my $h (qw(limit remaining reset)) {
        my @v = map { $_->[1] } grep { $_->[0] eq "x-ratelimit-$h-tokens" }
            @{$r->{header_list}};
        is(scalar @v, 1, "provider headers, one $h") or diag("@v");
    }
}

is(key('user', 'provider')->{used}, 10, 'provider, usage');

# dry run: refused requests pass, and are not charged

post('/v1/chat/completions', 'dry', 10, 'usage=90,10');

upstream_reset();

$r = post('/dry/chat/completions', 'dry', 10, 'usage=20,5');
is($r->{status}, 200, 'dry run, over the budget, passed');
is($r->{headers}{'x-tb-status'}, 'REJECTED_DRY_RUN', 'dry run, status');
is($r->{headers}{'x-tb-reason'}, 'budget_exhausted', 'dry run, reason');
ok(!exists $r->{headers}{'retry-after'}, 'dry run, no Retry-After');
is(scalar @{upstream_requests()}, 1, 'dry run, forwarded');

$k = key('user', 'dry');
is_deeply([@$k{qw(used reserved in_flight)}], [100, 0, 0],
    'dry run, not charged');

$r = post('/dry/chat/completions', 'dry2', 10, 'usage=20,5');
is($r->{headers}{'x-tb-status'}, 'PASSED', 'dry run, within the budget');
is(key('user', 'dry2')->{used}, 25, 'dry run, within the budget, charged');

like($t->read_file('error.log'),
    qr/\[warn\].*dry run, would reject: rate limit reached/,
    'dry run, logged');

###############################################################################

# Retry-After in windows of 2s, limit 100: 90 spent right after a window
# starts, then 30 asked for
#
# "ra" asks in the same window: it fits once the next window has taken
# enough of the 90 out, 2.444s after the window started
#
# "rb" asks in the next window: the 90 weigh less and less, and it fits
# 0.444s into it; both retry after the time their Retry-After said

my $w = window_start(2);

my @spent;

for my $key (qw(ra rb)) {
    $r = post('/fast/chat/completions', $key, 1, 'usage=80,10');
    push @spent, time();
}

my $ra0 = time();
my $ra = post('/fast/chat/completions', 'ra', 21);
my $ra1 = time();

is($ra->{status}, 429, 'same window, 429');
my $retry_a = retry_consistent('same window', $ra, $ra0, $ra1,
    [[90, $spent[0]]], 30, 100, 2);

# reservations in flight: a window at most

my $flight = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
    PeerPort => $t->port(8080), Proto => 'tcp')
    or die "cannot connect: $!\n";

{
    my $body = chat(51);

    print $flight "POST /fast/chat/completions HTTP/1.1\r\n"
        . "Host: localhost\r\nConnection: close\r\n"
        . "Content-Type: application/json\r\n"
        . "Content-Length: " . length($body) . "\r\n"
        . "X-User: rc\r\nX-Mock: delay=500\r\n\r\n" . $body;
}

sleep 0.1;

$r = post('/fast/chat/completions', 'rc', 41);
is($r->{status}, 429, 'in flight, 429');
ok(($r->{headers}{'retry-after'} // 0) >= 1
    && $r->{headers}{'retry-after'} <= 2, 'in flight, a window at most');

{
    local $/;
    my $raw = <$flight>;
    like($raw, qr{^HTTP/1.1 200}, 'in flight, passed');
    close $flight;
}

sleep_until($w + 2 + 0.05);

my $rb0 = time();
my $rb = post('/fast/chat/completions', 'rb', 21);
my $rb1 = time();

is($rb->{status}, 429, 'next window, 429');
my $retry_b = retry_consistent('next window', $rb, $rb0, $rb1,
    [[90, $spent[1]]], 30, 100, 2);

sleep_until($ra1 + $retry_a);
$r = post('/fast/chat/completions', 'ra', 21);
is($r->{status}, 200, 'same window, retry at Retry-After passed');

sleep_until($rb1 + $retry_b);
$r = post('/fast/chat/completions', 'rb', 21);
is($r->{status}, 200, 'next window, retry at Retry-After passed');

# the client gone before the upstream answered: the prompt spent, nothing
# left reserved or in flight

sleep_until($abort_at + 2.3);

$k = key('user', 'abort');
is_deeply([@$k{qw(used reserved in_flight)}], [9, 0, 0],
    'client abort, settled');
like($t->read_file('zone.log'), qr/^abort 499 PASSED/m, 'client abort, 499');

###############################################################################

#!/usr/bin/perl

# (C) The token budget authors

# Tests of a zone's keys over time and reloads: eviction never frees a key
# with spent budget, a zone full of such keys refuses new keys with
# token_budget_full_status, logged once; nginx -s reload keeps the counters
# when the zone's size and key are unchanged, its budget or period
# changed, refuses a new key for the same size, and starts the zone anew
# with a new size.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use IO::Socket::INET;
use POSIX qw(floor);
use Time::HiRes qw(sleep time);

use Test::More;
use TBTest;
use TBTest qw(parse_responses);

my $t = TBTest->new();

# the zone "kept" as each configuration has it

sub conf {
    my ($key, $size, $tokens, $models, $per) = @_;

    my $conf = <<'EOF';

%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    token_budget_encoding cl100k_base %%DATADIR%%/cl100k_base.tiktoken;

    MODELS
    token_budget_model m cl100k_base context=100000 max_output=50;

    token_budget_zone KEY zone=kept:SIZE tokens=TOKENS per=PER;
    token_budget_zone $http_x_user zone=small:32k tokens=100 per=1h;

    server {
        listen 127.0.0.1:%%PORT_8080%%;
        server_name localhost;

        token_budget on;

        add_header X-TB-Reason $token_budget_reason always;

        location /v1/ {
            token_budget_limit zone=kept;
            proxy_pass http://%%UPSTREAM%%;
        }

        location /small/ {
            token_budget_limit zone=small;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /full429/ {
            token_budget_full_status 429;
            token_budget_limit zone=small;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /budget/ {
            token_budget_api;
        }
    }
}

EOF

    $conf =~ s/KEY/$key/;
    $conf =~ s/SIZE/$size/;
    $conf =~ s/TOKENS/$tokens/;
    $conf =~ s/PER/$per \/\/ '1h'/e;
    $conf =~ s/MODELS\n/$models ? "$models\n" : ''/e;

    return $conf;
}

$t->write_conf(conf('$http_x_user', '1m', 100))->run()->plan(56);

###############################################################################

my $CHAT = TBTest::json_encode({ model => 'm', max_tokens => 1,
    messages => [{ role => 'user', content => 'Hello!' }] });

sub post {
    my ($uri, $user, $max, $mock, @headers) = @_;

    my $body = TBTest::json_encode({ model => 'm', max_tokens => $max,
        messages => [{ role => 'user', content => 'Hello!' }] });

    my $r = http_post($uri, $body, (defined $user ? ('X-User' => $user) : ()),
        ($mock ? ('X-Mock' => $mock) : ()), @headers);
    $r->{json} = eval { TBTest::json_decode($r->{body}) } || {};

    return $r;
}

# requests of new keys, pipelined on one connection: 10 tokens reserved
# each, and what the upstream reports

sub flood {
    my ($uri, $mock, @users) = @_;

    my $raw = '';

    for my $i (0 .. $#users) {
        $raw .= "POST $uri HTTP/1.1\r\nHost: localhost\r\n"
            . "Connection: " . ($i == $#users ? 'close' : 'keep-alive')
            . "\r\nContent-Type: application/json\r\n"
            . "Content-Length: " . length($CHAT) . "\r\n"
            . "X-User: $users[$i]\r\nX-Mock: $mock\r\n\r\n$CHAT";
    }

    return map { $_->{status} } parse_responses(http_raw($raw));
}

sub key {
    my ($zone, $key) = @_;

    my $r = http_get("/budget/zones/$zone/keys/$key");
    return { status => $r->{status} } unless $r->{status} == 200;

    return TBTest::json_decode($r->{body});
}

sub delete_key {
    my ($zone, $key) = @_;

    return $t->http_request('DELETE', "/budget/zones/$zone/keys/$key", undef)
        ->{status};
}

sub zone_info {
    my ($name) = @_;

    my $zones = TBTest::json_decode(http_get('/budget/zones')->{body});
    my ($zone) = grep { $_->{name} eq $name } @{$zones->{zones}};

    return $zone;
}

sub passed_total {
    my ($n) = http_get('/budget/metrics')->{body}
        =~ /^token_budget_requests_total\{decision="passed"\} (\d+)$/m;
    return $n;
}

sub model_requests {
    my ($model) = @_;

    my $name = qr/token_budget_model_requests_total\{model="\Q$model\E"\}/;
    my ($n) = http_get('/budget/metrics')->{body} =~ /^$name (\d+)$/m;

    return $n;
}

# the lines of the error log as expected: counted, then taken out for the
# checks at the end, which fail on any [alert] or [emerg]

sub expected_log {
    my ($re) = @_;

    my $log = $t->read_file('error.log');
    my @lines = $log =~ /^(.*$re.*)$/mg;

    $log =~ s/^.*$re.*\n//mg;
    $t->write_file('error.log', $log);

    return @lines;
}

# a reload, done when the error log says so: the old worker shutting down
# after a new one started, or the reload failing; loading the vocabulary
# takes a while

sub reload {
    my ($conf, $re) = @_;

    my $n = () = $t->read_file('error.log') =~ /$re/g;

    $t->write_conf($conf)->reload();

    for (1 .. 200) {
        my $m = () = $t->read_file('error.log') =~ /$re/g;
        return 1 if $m > $n;
        sleep 0.05;
    }

    return 0;
}

# the hour-long windows must not turn during the test

{
    my $left = 3600 - (time() - floor(time() / 3600) * 3600);
    sleep($left + 0.1) if $left < 30;
}

###############################################################################

# a small zone: a throttled key, then a flood of new keys with nothing
# spent, which can be freed; the throttled key cannot

post('/small/chat/completions', 'throttled', 10, 'usage=90,10');

my $r = post('/small/chat/completions', 'throttled', 10);
is($r->{status}, 429, 'throttled');

my @status;

for my $b (1 .. 3) {
    push @status, flood('/small/chat/completions', 'usage=0,0',
        map { "free$b-$_" } 1 .. 200);
}

is(scalar(grep { $_ eq '200' } @status), 600, 'flood of free keys, passed');

my $z = zone_info('small');
ok($z->{keys} < 600, "flood of free keys, freed: $z->{keys} left");
is($z->{full}, 0, 'flood of free keys, zone never full');

$r = post('/small/chat/completions', 'throttled', 10);
is($r->{status}, 429, 'throttled after the flood');

my $k = key('small', 'throttled');
is_deeply([@$k{qw(used reserved in_flight)}], [100, 0, 0],
    'throttled after the flood, still spent');

# a flood of new keys that spend: the zone fills and then refuses new keys

@status = flood('/small/chat/completions', 'usage=1,0',
    map { "spend$_" } 1 .. 300);

my $stored = grep { $_ eq '200' } @status;

ok($stored > 100, "spending keys, $stored stored");
is(join(',', @status[$stored .. $#status]),
    join(',', ('503') x (300 - $stored)),
    'spending keys, then every new one refused');

$z = zone_info('small');
is($z->{keys}, $stored + 1, 'spending keys, the zone holds them all');
is($z->{free_pages}, 0, 'spending keys, no free pages');

$r = post('/small/chat/completions', 'newcomer', 10);
is($r->{status}, 503, 'full, 503');
like($r->{headers}{'content-type'}, qr{^application/json}, 'full, type');
is($r->{json}{error}{code}, 'budget_unavailable', 'full, code');
is($r->{json}{error}{type}, 'server_error', 'full, error type');
like($r->{json}{error}{message}, qr/token_budget_zone "small"/,
    'full, message');
is($r->{headers}{'x-tb-reason'}, 'zone_full', 'full, reason');

$r = http_post('/small/messages', TBTest::json_encode({ model => 'm',
    max_tokens => 10, messages => [{ role => 'user', content => 'Hi' }] }),
    'X-User' => 'newcomer');
my $j = eval { TBTest::json_decode($r->{body}) } || {};
is($r->{status}, 503, 'full, anthropic, 503');
is($j->{error}{type}, 'overloaded_error', 'full, anthropic, error type');

$r = post('/full429/chat/completions', 'newcomer', 10);
is($r->{status}, 429, 'full, token_budget_full_status');
is($r->{json}{error}{code}, 'budget_unavailable',
    'full, token_budget_full_status, code');

# the keys it holds are served as before

is(post('/small/chat/completions', 'throttled', 10)->{status}, 429,
    'full, throttled key still throttled');
is(post('/small/chat/completions', 'spend1', 10)->{status}, 200,
    'full, a stored key passes');

$z = zone_info('small');
is($z->{full}, 300 - $stored + 3, 'full, counted');

my @alerts = expected_log(qr/\[alert\].*token_budget_zone "small" is full/);
is(scalar @alerts, 1, 'full, logged once');

{
    $r = http_post('/budget/zones/small/keys/newcomer?tokens=10', '');
    is($r->{status}, 503, 'full, top-up of a new key');
}

# a reset key has nothing spent: it makes room

is(delete_key('small', 'spend2'), 200,
    'full, reset a key');
is(post('/small/chat/completions', 'newcomer', 10)->{status}, 200,
    'full, the reset key freed');
is(key('small', 'spend2')->{status}, 404, 'full, the reset key gone');
is(key('small', 'throttled')->{used}, 100, 'full, throttled key kept');


###############################################################################

# a reload keeps the counters when the size and key are unchanged; the
# budget may change, and a request in flight settles in the new one

post('/v1/chat/completions', 'kept', 10, 'usage=50,10');
is(key('kept', 'kept')->{used}, 60, 'before reload, spent');

my $passed = passed_total();
my $m_requests = model_requests('m');

my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
    PeerPort => $t->port(8080), Proto => 'tcp')
    or die "cannot connect: $!\n";

print $s "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
    . "Connection: close\r\nContent-Type: application/json\r\n"
    . "Content-Length: " . length($CHAT) . "\r\n"
    . "X-User: flight\r\nX-Mock: delay=1000 usage=30,3\r\n\r\n$CHAT";

# admitted, even on a slow machine (a sanitizer build)

for (1 .. 40) {
    my $f = key('kept', 'flight');
    last if ref $f && ($f->{in_flight} // 0) == 1;
    sleep 0.05;
}

# the new configuration has a model more, named before m

my $first = 'token_budget_model first cl100k_base context=100000;';

ok(reload(conf('$http_x_user', '1m', 200, $first),
    qr/gracefully shutting down/), 'reload');

$k = key('kept', 'kept');
is_deeply([@$k{qw(limit used remaining)}], [200, 60, 140],
    'reload, counters kept, new budget');
is(key('kept', 'flight')->{in_flight}, 1, 'reload, in flight');

$r = post('/v1/chat/completions', 'kept', 91, 'usage=90,10');
is($r->{status}, 200, 'reload, the new budget applies');
is(key('kept', 'kept')->{used}, 160, 'reload, spent on');

{
    local $/;
    like(<$s> // '', qr{^HTTP/1.1 200}, 'reload, in flight passed');
    close $s;
}

# the old worker settles once the connection is closed; it is another
# process than the one answering the API

for (1 .. 40) {
    $k = key('kept', 'flight');
    last unless $k->{in_flight};
    sleep 0.05;
}

is_deeply([@$k{qw(used reserved in_flight)}], [33, 0, 0],
    'reload, in flight settled');

ok(passed_total() > $passed, 'reload, metrics kept');

{
    is(model_requests('first'), 0, 'reload, a new model counts nothing');
    ok(model_requests('m') > $m_requests, 'reload, the counters of m kept');
}
is(key('small', 'throttled')->{used}, 100, 'reload, other zone kept');
is(post('/small/chat/completions', 'throttled', 10)->{status}, 429,
    'reload, other zone still throttled');

# a new key for the same size: the reload fails, the old one runs on

reload(conf('$http_x_tenant', '1m', 300, $first), qr/\[emerg\]/);

my @emerg = expected_log(qr/\[emerg\]/);

is(scalar @emerg, 1, 'new key, reload failed');
my $message = 'token_budget_zone "kept" uses the "$http_x_tenant" key '
    . 'while previously it used the "$http_x_user" key';

like($emerg[0] // '', qr/\Q$message\E/, 'new key, message');

$z = zone_info('kept');
is_deeply([@$z{qw(key limit)}], ['$http_x_user', 200],
    'new key, the old configuration runs');
is(key('kept', 'kept')->{used}, 160, 'new key, counters kept');

$r = post('/v1/chat/completions', 'kept', 50);
is($r->{status}, 429, 'new key, the old key limits');

# a new size starts the zone anew

ok(reload(conf('$http_x_tenant', '2m', 300, $first),
    qr/gracefully shutting down/), 'new size, reload');

$z = zone_info('kept');
is_deeply([@$z{qw(key limit keys spent)}], ['$http_x_tenant', 300, 0, 0],
    'new size, anew');
is(key('kept', 'kept')->{status}, 404, 'new size, keys gone');

$r = post('/v1/chat/completions', 'kept', 10, 'usage=5,5',
    'X-Tenant' => 't1');
is($r->{status}, 200, 'new size, passed');
is(key('kept', 't1')->{used}, 10, 'new size, the new key counts');

is(key('small', 'throttled')->{used}, 100, 'new size, other zone kept');

# a new period, the size and key unchanged

ok(reload(conf('$http_x_tenant', '2m', 300, $first, '1d'),
    qr/gracefully shutting down/), 'new period, reload');
is(zone_info('kept')->{per}, '1d', 'new period, applied');

{
    is(key('kept', 't1')->{used}, 10, 'new period, counters kept');
}

###############################################################################

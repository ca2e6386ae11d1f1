#!/usr/bin/perl

# (C) The token budget authors

# Tests of token_budget_api: the zones in JSON, the metrics in the
# Prometheus text format with the values of the traffic sent, one key's
# budget, its reset and top-up, the errors, and allow/deny in front of it.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use POSIX qw(floor);
use Time::HiRes qw(sleep time);

use Test::More;
use TBTest;

my $t = TBTest->new()->write_conf(<<'EOF')->run()->plan(86);

%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    token_budget_encoding cl100k_base %%DATADIR%%/cl100k_base.tiktoken;

    token_budget_model m      cl100k_base context=100000 max_output=50;
    token_budget_model other* cl100k_base context=100000 max_output=50;

    token_budget_zone $http_x_user zone=a:1m tokens=100 per=1h;
    token_budget_zone $http_x_user zone=b:1m tokens=1000 per=1m count=prompt;

    server {
        listen 127.0.0.1:%%PORT_8080%%;
        server_name localhost;

        token_budget on;

        location /v1/ {
            token_budget_limit zone=a;
            proxy_pass http://%%UPSTREAM%%;
        }

        location /b/ {
            token_budget_limit zone=b;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /dry/ {
            token_budget_dry_run on;
            token_budget_max_input 5;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /budget/ {
            allow 127.0.0.1;
            deny all;
            token_budget_api;
        }

        location /closed/ {
            allow 192.0.2.1;
            deny all;
            token_budget_api;
        }

        location = /metrics {
            token_budget_api;
        }
    }
}

EOF

###############################################################################

sub post {
    my ($uri, $user, $max, $mock, $model) = @_;

    my $body = TBTest::json_encode({ model => $model // 'm',
        max_tokens => $max,
        messages => [{ role => 'user', content => 'Hello!' }] });

    return http_post($uri, $body, (defined $user ? ('X-User' => $user) : ()),
        ($mock ? ('X-Mock' => $mock) : ()));
}

sub api {
    my ($method, $path) = @_;

    my $r = $t->http_request($method, "/budget$path", undef);
    $r->{json} = eval { TBTest::json_decode($r->{body}) };

    return $r;
}

sub zones {
    my $r = api('GET', '/zones');
    return { map { $_->{name} => $_ } @{$r->{json}{zones} // []} };
}

sub metrics {
    my ($body) = @_;

    my (%m, @bad);

    for my $line (split /\n/, $body) {
        next if $line =~ /^# (?:HELP|TYPE) \w+ .+$/;

        if ($line =~ /^([a-zA-Z_:][a-zA-Z0-9_:]*(?:\{[^}]*\})?) (\S+)$/) {
            $m{$1} = $2;
            push @bad, $line unless $2 =~ /^-?\d+(?:\.\d+)?$/;
            next;
        }

        push @bad, $line;
    }

    return (\%m, \@bad);
}

# the metric families in the order their lines come, each once if they
# are grouped

sub families {
    my ($body) = @_;

    my (%histogram, @order);

    for my $line (split /\n/, $body) {
        my $name;

        if ($line =~ /^# (HELP|TYPE) (\w+)(?: (\w+))?/) {
            $name = $2;
            $histogram{$name} = 1
                if $1 eq 'TYPE' && ($3 // '') =~ /^(?:histogram|summary)$/;

        } elsif ($line =~ /^(\w+)/) {
            $name = $1;
            my ($base) = $name =~ /^(\w+)_(?:bucket|count|sum)$/;
            $name = $base if defined $base && $histogram{$base};
        }

        push @order, $name if !@order || $order[-1] ne $name;
    }

    my %seen;
    return grep { $seen{$_}++ } @order;
}

# the hour-long window of zone "a" must not turn during the test

{
    my $left = 3600 - (time() - floor(time() / 3600) * 3600);
    sleep($left + 0.1) if $left < 30;
}

###############################################################################

# empty zones

my $r = api('GET', '/zones');
like($r->{headers}{'content-type'}, qr{^application/json}, 'zones, type');

my $z = zones();

is_deeply([sort keys %$z], ['a', 'b'], 'zones, names');
is_deeply({ map { $_ => $z->{a}{$_} } qw(key limit per per_seconds count
    keys admitted rejected full spent top) },
    { key => '$http_x_user', limit => 100, per => '1h',
      per_seconds => 3600, count => 'total', keys => 0, admitted => 0,
      rejected => 0, full => 0, spent => 0, top => [] },
    'zones, empty');
is_deeply([@{$z->{b}}{qw(per per_seconds count)}], ['1m', 60, 'prompt'],
    'zones, count and period');

my $free = $z->{a}{free_pages};
ok($free > 200, "zones, free pages $free");

# traffic: users u01 to u12 spend 3 * i, reported with a prompt of 2 * i
# for the 9 counted; u12 then spends the rest, and is refused

my (@reported, $completion);

for my $i (1 .. 12) {
    my $user = sprintf('u%02d', $i);
    post('/v1/chat/completions', $user, 10,
        sprintf('usage=%d,%d', 2 * $i, $i));
    push @reported, 2 * $i;
    $completion += $i;
}

post('/v1/chat/completions', 'u12', 10, 'usage=54,10');
push @reported, 54;
$completion += 10;

$r = post('/v1/chat/completions', 'u12', 10);
is($r->{status}, 429, 'traffic, spent');

$r = post('/v1/chat/completions', 'u13', 92);
is($r->{status}, 413, 'traffic, over the budget');

$r = http_post('/v1/chat/completions', '{"model":', 'X-User' => 'u14');
is($r->{status}, 400, 'traffic, bad json');

# the mock reports what it was sent as counted, and 10 of output

$r = post('/dry/chat/completions', 'u15', 10);
is($r->{status}, 200, 'traffic, dry run');
push @reported, 9;
$completion += 10;

$r = post('/v1/chat/completions', 'o1', 10, undef, 'other-1');
is($r->{status}, 200, 'traffic, another model');
push @reported, 9;

$r = post('/b/chat/completions', 'u01', 10, 'usage=5,5');
is($r->{status}, 200, 'traffic, zone b');
push @reported, 5;
$completion += 5;

# the zones now

$z = zones();

is_deeply([@{$z->{a}}{qw(keys admitted rejected full spent)}],
    [13, 14, 1, 0, 3 * 78 + 64 + 19], 'zones, counters');
is_deeply([@{$z->{b}}{qw(keys admitted rejected full spent)}],
    [1, 1, 0, 0, 5], 'zones, counters of b');
ok($z->{a}{free_pages} <= $free, 'zones, no more free pages');

is_deeply($z->{a}{top}, [
    { key => 'u12', used => 100 }, { key => 'u11', used => 33 },
    { key => 'u10', used => 30 }, { key => 'u09', used => 27 },
    { key => 'u08', used => 24 }, { key => 'u07', used => 21 },
    { key => 'o1', used => 19 }, { key => 'u06', used => 18 },
    { key => 'u05', used => 15 }, { key => 'u04', used => 12 } ],
    'zones, top keys');

# metrics: Prometheus text, the values of the traffic

$r = api('GET', '/metrics');
is($r->{status}, 200, 'metrics');
like($r->{headers}{'content-type'}, qr{^text/plain; version=0\.0\.4},
    'metrics, type');
like($r->{body}, qr/\n\z/, 'metrics, last line ends');

my ($m, $bad) = metrics($r->{body});
is("@$bad", '', 'metrics, every line parses');

{
    is(join(' ', families($r->{body})), '',
        'metrics, each metric in one group');
}

is_deeply([map { $m->{"token_budget_requests_total{decision=\"$_\"}"} }
    qw(passed rejected rejected_dry_run error)], [15, 2, 1, 1],
    'metrics, requests by decision');

my %model;

for my $c (qw(requests prompt_tokens reserved_tokens completion_tokens
    rejected))
{
    for my $n ('m', 'other*') {
        $model{$n}{$c} = $m->{"token_budget_model_${c}_total{model=\"$n\"}"};
    }
}

is_deeply($model{m}, { requests => 17, prompt_tokens => 15 * 9,
    reserved_tokens => 15 * 19, completion_tokens => $completion,
    rejected => 2 }, 'metrics, model m');
is_deeply($model{'other*'}, { requests => 1, prompt_tokens => 9,
    reserved_tokens => 19, completion_tokens => 10, rejected => 0 },
    'metrics, model pattern other*');

is_deeply([map { $m->{"token_budget_zone_${_}"} }
    'keys{zone="a"}', 'requests_total{zone="a",decision="admitted"}',
    'requests_total{zone="a",decision="rejected"}',
    'requests_total{zone="a",decision="full"}',
    'spent_tokens_total{zone="a"}'],
    [13, 14, 1, 0, 317], 'metrics, zone a');
is($m->{'token_budget_zone_free_pages{zone="a"}'}, $z->{a}{free_pages},
    'metrics, free pages');
is($m->{'token_budget_zone_spent_tokens_total{zone="b"}'}, 5,
    'metrics, zone b');

# the drift, our 9 less what was reported, in cumulative buckets

my @bounds = (-100, -10, -3, -1, 0, 1, 3, 10, 100);
my (@expected, @got);

for my $le (@bounds, '+Inf') {
    push @expected,
        scalar grep { $le eq '+Inf' || 9 - $_ <= $le } @reported;
    push @got, $m->{"token_budget_prompt_drift_tokens_bucket{le=\"$le\"}"};
}

is_deeply(\@got, \@expected, 'metrics, drift buckets');
is($m->{token_budget_prompt_drift_tokens_count}, scalar @reported,
    'metrics, drift count');

my ($abs, $sum) = (0, 0);
$abs += abs(9 - $_) for @reported;
$sum += 9 - $_ for @reported;
is($m->{token_budget_prompt_drift_abs_tokens_total}, $abs,
    'metrics, drift absolute sum');
is($m->{token_budget_prompt_drift_tokens_sum}, $sum, 'metrics, drift sum');

$r = http_get('/metrics');
like($r->{body}, qr/^token_budget_requests_total\{decision="passed"\} 15$/m,
    'metrics, exact location');

# one key

$r = api('GET', '/zones/a/keys/u05');
is($r->{status}, 200, 'key');
like($r->{headers}{'content-type'}, qr{^application/json}, 'key, type');
is_deeply($r->{json}, { zone => 'a', key => 'u05', limit => 100,
    per => '1h', used => 15, reserved => 0, in_flight => 0,
    remaining => 85 }, 'key, state');

$r = api('HEAD', '/zones/a/keys/u05');
is($r->{status}, 200, 'key, head');
is($r->{body}, '', 'key, head, no body');

# keys are the URI decoded: a space, a slash, a quote

post('/v1/chat/completions', 'a b', 10, 'usage=1,1');
post('/v1/chat/completions', 'team/1', 10, 'usage=1,2');
post('/v1/chat/completions', 'q"x', 10, 'usage=60,50');

is(api('GET', '/zones/a/keys/a%20b')->{json}{used}, 2, 'key, escaped');
is(api('GET', '/zones/a/keys/team/1')->{json}{used}, 3, 'key, slash');

$r = api('GET', '/zones/a/keys/q%22x');
is($r->{json}{key}, 'q"x', 'key, quote');
is(zones()->{a}{top}[0]{key}, 'q"x', 'zones, top key with a quote');

# a reset

$r = post('/v1/chat/completions', 'u12', 1);
is($r->{status}, 429, 'reset, before');

$r = api('DELETE', '/zones/a/keys/u12');
is($r->{status}, 200, 'reset');
is_deeply([@{$r->{json}}{qw(used reserved remaining)}], [0, 0, 100],
    'reset, state');
is(api('GET', '/zones/a/keys/u12')->{json}{used}, 0, 'reset, kept');

$r = post('/v1/chat/completions', 'u12', 10, 'usage=90,10');
is($r->{status}, 200, 'reset, passes again');

# a top-up

$r = post('/v1/chat/completions', 'u12', 10);
is($r->{status}, 429, 'top-up, before');

$r = api('POST', '/zones/a/keys/u12?tokens=30');
is($r->{status}, 200, 'top-up');
is_deeply([@{$r->{json}}{qw(used remaining)}], [70, 30], 'top-up, state');

$r = post('/v1/chat/completions', 'u12', 21, 'usage=20,10');
is($r->{status}, 200, 'top-up, passes again');
is(api('GET', '/zones/a/keys/u12')->{json}{used}, 100, 'top-up, spent');

$r = post('/v1/chat/completions', 'u12', 1);
is($r->{status}, 429, 'top-up, spent again');

# a top-up of an unknown key makes it, with credit

$r = api('POST', '/zones/a/keys/new?tokens=30');
is($r->{status}, 200, 'top-up, new key');
is($r->{json}{remaining}, 130, 'top-up, new key, credit');

$r = post('/v1/chat/completions', 'new', 91, 'usage=50,50');
is($r->{status}, 200, 'top-up, new key, spends');
$r = post('/v1/chat/completions', 'new', 21);
is($r->{status}, 200, 'top-up, new key, spends the credit');

for my $q ('', '?tokens=0', '?tokens=-5', '?tokens=abc', '?token=5') {
    $r = api('POST', "/zones/a/keys/u01$q");
    is($r->{status}, 400, "top-up, bad '$q'");
}

like(api('POST', '/zones/a/keys/u01')->{json}{error}{message},
    qr/tokens=N/, 'top-up, bad, message');

# keys take pages: 64 more, of 128 bytes each, take at least one

$free = zones()->{a}{free_pages};
my $keys = zones()->{a}{keys};

api('POST', sprintf('/zones/a/keys/fill%02d?tokens=1', $_)) for 1 .. 64;

$z = zones();
is($z->{a}{keys}, $keys + 64, 'zones, more keys');
ok($z->{a}{free_pages} < $free,
    "zones, fewer free pages, $free then $z->{a}{free_pages}");

# not found

for my $path ('/zones/c/keys/u01', '/zones/a/keys/nobody', '/zones/a',
    '/zones/a/keys/', '/zones/a/users/u01', '/zones/', '/nothing', '/')
{
    $r = api('GET', $path);
    is($r->{status}, 404, "not found, $path");
}

is(api('GET', '/zones/c/keys/u01')->{json}{error}{message}, 'no such zone',
    'not found, zone, message');
is(api('GET', '/zones/a/keys/nobody')->{json}{error}{message},
    'no such key in the zone', 'not found, key, message');
is(api('DELETE', '/zones/a/keys/nobody')->{status}, 404,
    'not found, reset');
is(api('GET', '/zones/a/keys/nobody')->{status}, 404,
    'not found, not made by a reset');

# not allowed

for my $req (['POST', '/zones'], ['DELETE', '/zones'], ['PUT', '/metrics'],
    ['PUT', '/zones/a/keys/u01'], ['PATCH', '/zones/a/keys/u01'])
{
    $r = api(@$req);
    is($r->{status}, 405, "not allowed, @$req");
}

like(api('POST', '/zones')->{body}, qr/"method not allowed"/,
    'not allowed, body');

# allow and deny run first

$r = http_get('/closed/zones');
is($r->{status}, 403, 'denied');
unlike($r->{body}, qr/"zones"/, 'denied, nothing said');

$r = http_get('/closed/zones/a/keys/u01', 'X-Forwarded-For' => '192.0.2.1');
is($r->{status}, 403, 'denied, whatever the headers');

$r = $t->http_request('DELETE', '/closed/zones/a/keys/u01', undef);
is($r->{status}, 403, 'denied, reset');
is(api('GET', '/zones/a/keys/u01')->{json}{used}, 3, 'denied, not reset');

###############################################################################

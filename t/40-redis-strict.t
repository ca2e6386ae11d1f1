#!/usr/bin/perl

# (C) The token budget authors

# Budgets shared by three nginx hosts through a real redis-server, in
# strict mode: every admission is one round trip to Redis.  Under
# concurrent load on three hosts, then two, the fleet never admits more than
# the budget; what the upstream reports settles exactly once; a host that
# dies leaves reservations that expire by themselves; Redis' script cache
# emptied (SCRIPT FLUSH) is refilled by EVAL; Retry-After is computed for
# the request from Redis' state.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Time::HiRes qw(sleep time);

use Test::More;
use TBTest;
use TBRedis;

my $redis = TBRedis->new();

my $conf = <<'EOF';

%%TEST_GLOBALS%%

worker_processes 2;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    token_budget_encoding cl100k_base %%DATADIR%%/cl100k_base.tiktoken;

    token_budget_model m cl100k_base context=100000 max_output=50;

    token_budget_zone $http_x_user zone=fleet:1m tokens=2000 per=1h
                      redis=127.0.0.1:%%REDIS%% timeout=1s fail=closed;

    token_budget_zone $http_x_user zone=held:1m tokens=100 per=1h
                      redis=127.0.0.1:%%REDIS%% hold=1500ms fail=closed;

    server {
        listen 127.0.0.1:%%PORT_8080%%;
        server_name localhost;

        token_budget on;

        add_header X-TB-Status $token_budget_status always;
        add_header X-TB-Reason $token_budget_reason always;

        location /fleet/ {
            token_budget_limit zone=fleet;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /held/ {
            token_budget_limit zone=held;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /budget/ {
            token_budget_api;
        }
    }
}

EOF

$conf =~ s/%%REDIS%%/$redis->port()/ge;

my @hosts = map { TBTest->new()->write_conf($conf)->run() } 1 .. 3;

###############################################################################

# "Hello!": 9 tokens of prompt; with max_tokens 41, 50 reserved

sub request {
    my ($host, $uri, $user, $mock, $max) = @_;

    return {
        port => $host->port(8080),
        uri => $uri,
        body => { model => 'm', max_tokens => $max // 41,
                  messages => [ { role => 'user', content => 'Hello!' } ] },
        headers => [ 'X-User' => $user, 'X-Mock' => $mock ],
    };
}

# 90 clients at once, 30 on each host, all in flight for 1.5s: the budget
# of 2000 holds 40 reservations of 50

my @r = TBRedis::parallel(map {
    request($hosts[$_ % 3], '/fleet/chat/completions', 'alice',
            'delay=1500 usage=9,41')
} 0 .. 89);

my @ok = grep { $_->{status} == 200 } @r;
my @refused = grep { $_->{status} == 429 } @r;

is(scalar @ok, 40, 'the fleet admitted what the budget holds, no more');
is(scalar @refused, 50, 'the others were refused');
is(scalar(grep { $_->{status} != 200 && $_->{status} != 429 } @r), 0,
   'nothing else');

my %per_host;
$per_host{$_->{req}{port}}++ for @ok;
ok(keys %per_host >= 2, 'admissions on several hosts');

like($refused[0]{body}, qr/"code":"rate_limit_exceeded"/,
     'refusal is provider-shaped');
ok($refused[0]{headers}{'retry-after'}
   && $refused[0]{headers}{'retry-after'} >= 1
   && $refused[0]{headers}{'retry-after'} <= 3600,
   'refusal has a Retry-After within the window');

my $s = $redis->state('fleet', 'alice');
is($s->{c}, 2000, 'redis holds exactly what the upstream reported');
is($s->{r}, 0, 'no reservation left');
is($redis->cli('ZCARD', 'tb:{fleet:alice}:r'), 0, 'reservation set empty');

# two hosts: 60 clients, 30 on each

@r = TBRedis::parallel(map {
    request($hosts[$_ % 2], '/fleet/chat/completions', 'erin',
            'delay=1500 usage=9,41')
} 0 .. 59);

is(scalar(grep { $_->{status} == 200 } @r), 40,
   'two hosts admitted what the budget holds, no more');
is(scalar(grep { $_->{status} == 429 } @r), 20, 'two hosts refused the rest');
is($redis->state('fleet', 'erin')->{c}, 2000, 'two hosts: settled exactly');

# what the upstream reports replaces the reservation: 9 + 11 = 20 each

$redis->cli('DEL', map { "tb:{fleet:bob}$_" } '', ':r', ':a', ':h');

@r = TBRedis::parallel(map {
    request($hosts[$_ % 3], '/fleet/chat/completions', 'bob',
            'usage=9,11')
} 0 .. 29);

is(scalar(grep { $_->{status} == 200 } @r), 30, 'thirty admitted');
is($redis->state('fleet', 'bob')->{c}, 600, 'each settled once, as used');

my $left = 2000 - 600;
like(http_get_on($hosts[0], '/budget/zones'), qr/"name":"fleet"/,
     'zone in the API');

# the script cache emptied: EVALSHA answers NOSCRIPT, EVAL goes

$redis->cli('CONFIG', 'RESETSTAT');
$redis->cli('SCRIPT', 'FLUSH');

@r = TBRedis::parallel(map {
    request($hosts[$_], '/fleet/chat/completions', 'bob', 'usage=9,11')
} 0 .. 2);

is(join(',', map { $_->{status} } @r), '200,200,200',
   'admitted after SCRIPT FLUSH');
like($redis->cli('INFO', 'commandstats'), qr/cmdstat_eval:calls=[1-9]/,
     'the scripts went by EVAL');
is($redis->state('fleet', 'bob')->{c}, 660, 'and settled');

# a host that dies holds nothing for long: its reservation expires after
# "hold"; here the whole budget of 100, held by a request on host 3

my ($held) = TBRedis::parallel(request($hosts[2], '/held/chat/completions',
    'carol', 'delay=300 usage=9,41', 91));
is($held->{status}, 200, 'a request taking the whole budget');

my @slow = ();
my $pid = fork();
die "fork: $!" unless defined $pid;

if ($pid == 0) {
    TBRedis::parallel(request($hosts[2], '/held/chat/completions',
        'dave', 'delay=10000 usage=9,41', 91));
    POSIX::_exit(0);
}

sleep 0.5;

is($redis->cli('ZCARD', 'tb:{held:dave}:r'), 1, 'reserved in redis');

# host 3 dies: its master and workers, at once

my $master = $hosts[2]{nginx_pid};
my @workers = split /\s+/, `pgrep -P $master`;
kill 'KILL', $master, @workers;
waitpid($master, 0);
$hosts[2]{nginx_pid} = undef;

kill 'KILL', $pid;
waitpid($pid, 0);

my ($r) = TBRedis::parallel(request($hosts[0], '/held/chat/completions',
    'dave', 'usage=9,41', 91));
is($r->{status}, 429, 'the dead host\'s reservation holds');

sleep 1.6;

($r) = TBRedis::parallel(request($hosts[0], '/held/chat/completions',
    'dave', 'usage=9,41', 91));
is($r->{status}, 200, 'and expires after hold');
is($redis->state('held', 'dave')->{r}, 0, 'nothing reserved any more');

###############################################################################

sub http_get_on {
    my ($host, $uri) = @_;
    return $host->http_get($uri)->{body};
}

$_->finish() for @hosts;

done_testing();

###############################################################################

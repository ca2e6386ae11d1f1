#!/usr/bin/perl

# (C) The token budget authors

# Redis failing under two nginx hosts: killed, restarted (its script cache
# empty, its data kept by the append-only file), paused with SIGSTOP, and
# slowed with CLIENT PAUSE.  No request waits past its latency bound,
# each zone's fail= is honoured (closed: 503 with a JSON body; open:
# admitted; local: the host's share enforced on what it knows), the
# metrics tell the degraded mode, and once Redis is back it holds exactly
# what the upstream reported, nothing lost and nothing counted twice.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use POSIX ();
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

    token_budget_zone $http_x_user zone=closed:1m tokens=1000000 per=1h
        redis=127.0.0.1:%%REDIS%% timeout=200ms fail=closed sync=200ms;

    token_budget_zone $http_x_user zone=open:1m tokens=1000000 per=1h
        redis=127.0.0.1:%%REDIS%% timeout=200ms fail=open sync=200ms;

    token_budget_zone $http_x_user zone=local:1m tokens=1000 per=1h
        redis=127.0.0.1:%%REDIS%% timeout=200ms fail=local share=50%
        sync=200ms;

    token_budget_zone $http_x_user zone=bclosed:1m tokens=1000000 per=1h
        redis=127.0.0.1:%%REDIS%% mode=batched sync=100ms timeout=200ms
        fail=closed;

    server {
        listen 127.0.0.1:%%PORT_8080%%;
        server_name localhost;

        token_budget on;

        add_header X-TB-Status $token_budget_status always;
        add_header X-TB-Reason $token_budget_reason always;

%%LOCATIONS%%
        location /budget/ {
            token_budget_api;
        }
    }
}

EOF

# one location per zone: nginx cannot pick a zone by a variable

my $locations = '';

for my $z (qw(closed open local bclosed)) {
    $locations .= <<"EOF";
        location /$z/ {
            token_budget_limit zone=$z;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

EOF
}

$conf =~ s/%%LOCATIONS%%\n/$locations/;
$conf =~ s/%%REDIS%%/$redis->port()/ge;

my @hosts = map { TBTest->new()->write_conf($conf)->run() } 1 .. 2;

my $BOUND = 0.2 + 0.5;      # timeout, and room for a slow machine
my %spent;                  # what the upstream reported, by zone

###############################################################################

sub send_to {
    my ($host, $zone, %opts) = @_;

    my ($r) = TBRedis::parallel({
        port => $hosts[$host]->port(8080),
        uri => "/$zone/chat/completions",
        body => { model => 'm', max_tokens => 41,
                  messages => [ { role => 'user', content => 'Hello!' } ] },
        headers => [ 'X-User' => 'k',
                     'X-Mock' => 'usage=9,41 ' . ($opts{mock} // '') ],
    });

    $spent{$zone} += 50 if $r->{status} == 200;

    return $r;
}

sub zone_api {
    my ($host, $name) = @_;

    my $zones = TBTest::json_decode(
        $hosts[$host]->http_get('/budget/zones')->{body});
    my ($zone) = grep { $_->{name} eq $name } @{$zones->{zones}};

    return $zone;
}

# until each worker of both hosts has a connection that answers: a
# request to the closed zone is admitted on each, several times

sub wait_back {
    my $deadline = time() + 8;

    while (time() < $deadline) {
        my $ok = 0;

        for my $h (0, 1) {
            for (1 .. 4) {
                my $r = send_to($h, 'closed');
                $ok++ if $r->{status} == 200;
            }
        }

        return 1 if $ok == 8;

        sleep 0.2;
    }

    return 0;
}

sub flushed {
    my $deadline = time() + 5;

    while (time() < $deadline) {
        my $pending = 0;

        for my $h (0, 1) {
            for my $z (qw(closed open local bclosed)) {
                $pending += zone_api($h, $z)->{redis}{pending_tokens};
            }
        }

        return 1 if $pending == 0;
        sleep 0.1;
    }

    for my $h (0, 1) {
        diag("host $h: " . $hosts[$h]->http_get('/budget/zones')->{body});
    }

    return 0;
}

sub exact {
    my ($what) = @_;

    ok(flushed(), "$what: every delta told");

    for my $z (qw(closed open local bclosed)) {
        is($redis->state($z, 'k')->{c}, $spent{$z} // 0,
           "$what: redis holds what $z spent");
    }
}

###############################################################################

# before: every zone admits through Redis

for my $h (0, 1) {
    for my $z (qw(closed open local bclosed)) {
        is(send_to($h, $z)->{status}, 200, "$z admitted on host $h");
    }
}

# Redis killed

$redis->crash();

my $r = send_to(0, 'closed');
is($r->{status}, 503, 'killed: fail=closed refuses');
like($r->{body}, qr/"code":"budget_unavailable"/, 'with a JSON body');
is($r->{headers}{'retry-after'}, 1, 'and Retry-After');
ok($r->{elapsed} < $BOUND, 'killed: refused at once');

is(send_to(1, 'bclosed')->{status}, 503, 'killed: batched fail=closed');

my @open = map { send_to($_ % 2, 'open') } 1 .. 6;
is(join(',', map { $_->{status} } @open), '200,200,200,200,200,200',
   'killed: fail=open admits');
ok(!(grep { $_->{elapsed} >= $BOUND } @open), 'killed: at once');

# fail=local: 50% of 1000 on this host, which spent 50 already

my @local = map { send_to(0, 'local') } 1 .. 12;
is(scalar(grep { $_->{status} == 200 } @local), 9,
   'killed: fail=local admits the host\'s share');
is($local[-1]{status}, 429, 'and refuses beyond it');

my $z = zone_api(0, 'open');
is($z->{redis}{up}, JSON::PP::false, 'api: redis down');
ok($z->{redis}{fail_open} >= 3, 'api: degraded decisions counted');
ok($z->{redis}{pending_tokens} > 0, 'api: tokens pending');

my $metrics = $hosts[0]->http_get('/budget/metrics')->{body};
like($metrics, qr/^token_budget_zone_redis_up\{zone="open"\} 0$/m,
     'metrics: redis down');
like($metrics,
     qr/^token_budget_zone_degraded_total\{zone="local",fail="local"\} \d/m,
     'metrics: degraded');

# Redis back, with what it had; the script cache is empty

$redis->start();

ok(wait_back(), 'restarted: admitted again on every worker');
exact('restarted');

# a settle due while Redis is away is told once it is back

my $child = fork();
die "fork: $!" unless defined $child;

if ($child == 0) {
    $redis->{owner} = 0;
    my $r = send_to(0, 'closed', mock => 'delay=800');
    POSIX::_exit($r->{status} == 200 ? 0 : 1);
}

sleep 0.4;
$redis->crash();
waitpid($child, 0);
is($?, 0, 'admitted before the crash, answered after it');
$spent{closed} += 50;

$redis->start();
ok(wait_back(), 'back again');
exact('settle after a crash');

# a settle due while Redis is away, on a worker that a reload retires:
# handed to the new workers as a delta

$child = fork();
die "fork: $!" unless defined $child;

if ($child == 0) {
    $redis->{owner} = 0;
    my $r = send_to(1, 'closed', mock => 'delay=600');
    POSIX::_exit($r->{status} == 200 ? 0 : 1);
}

sleep 0.3;
$redis->crash();
waitpid($child, 0);
is($?, 0, 'admitted, answered while redis is down');
$spent{closed} += 50;

$hosts[1]->reload();
$redis->start();
ok(wait_back(), 'back after a reload');
exact('settle across a reload');

# Redis paused: commands sit in its socket; replies never come

my $slow = fork();
die "fork: $!" unless defined $slow;

if ($slow == 0) {
    $redis->{owner} = 0;
    my $r = send_to(1, 'open', mock => 'delay=300');
    POSIX::_exit($r->{status} == 200 ? 0 : 1);
}

sleep 0.15;
$redis->pause();

my @paused = (send_to(0, 'closed'), send_to(1, 'closed'));
is(join(',', map { $_->{status} } @paused), '503,503',
   'paused: fail=closed refuses');
ok(!(grep { $_->{elapsed} >= $BOUND } @paused), 'paused: within the bound');

@open = map { send_to($_ % 2, 'open') } 1 .. 4;
is(join(',', map { $_->{status} } @open), '200,200,200,200',
   'paused: fail=open admits');
ok(!(grep { $_->{elapsed} >= $BOUND } @open), 'paused: within the bound');

waitpid($slow, 0);
is($?, 0, 'a request whose settle went while paused');
$spent{open} += 50;

sleep 0.5;
$redis->resume();

ok(wait_back(), 'resumed');
exact('paused and resumed');

# Redis slowed: writes wait 600ms, more than the timeout

$redis->cli('CLIENT', 'PAUSE', 600, 'WRITE');

my @slowed = (send_to(0, 'closed'), send_to(1, 'open'), send_to(0, 'open'));
is(join(',', map { $_->{status} } @slowed), '503,200,200',
   'slowed: each zone\'s fail mode');
ok(!(grep { $_->{elapsed} >= $BOUND } @slowed), 'slowed: within the bound');

sleep 0.7;

ok(wait_back(), 'writes go again');
exact('slowed');

###############################################################################

$_->finish() for @hosts;

done_testing();

###############################################################################

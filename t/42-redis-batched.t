#!/usr/bin/perl

# (C) The token budget authors

# Budgets shared by two and three nginx hosts through a real redis-server,
# in batched mode: each host decides from its shared memory and tells
# Redis its deltas every "sync", learning what the fleet spent.  The
# overshoot is bounded by what the hosts admit before the others learn
# of it: a host tells its spending at its next sync, the others learn it
# at their next sync after that, so within two intervals and a round
# trip.  In the end Redis holds exactly what the upstream reported.

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

my $SYNC = 0.1;
my $LIMIT = 3000;
my $EACH = 50;

my $conf = <<'EOF';

%%TEST_GLOBALS%%

worker_processes 2;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    token_budget_encoding cl100k_base %%DATADIR%%/cl100k_base.tiktoken;

    token_budget_model m cl100k_base context=100000 max_output=50;

    token_budget_zone $http_x_user zone=fleet:1m tokens=3000 per=1h
        redis=127.0.0.1:%%REDIS%% mode=batched sync=100ms;

    server {
        listen 127.0.0.1:%%PORT_8080%%;
        server_name localhost;

        token_budget on;

        location /fleet/ {
            token_budget_limit zone=fleet;
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

# a client per host, one request after another, 20ms apart, until a
# second after its first refusal; each reserves and spends 50

sub client {
    my ($host, $user, $file) = @_;

    my (@log, $refused);
    my $end = time() + 10;

    while (time() < $end) {
        my ($r) = TBRedis::parallel({
            port => $host->port(8080),
            uri => '/fleet/chat/completions',
            body => { model => 'm', max_tokens => 41, messages => [
                { role => 'user', content => 'Hello!' } ] },
            headers => [ 'X-User' => $user, 'X-Mock' => 'usage=9,41' ],
        });

        push @log, sprintf("%.4f %d", time(), $r->{status});

        $refused //= time() if $r->{status} == 429;
        last if $refused && time() > $refused + 1;

        sleep 0.02;
    }

    open my $fh, '>', $file or die "$file: $!";
    print $fh join("\n", @log), "\n";
    close $fh;
}

sub round {
    my ($user, @hosts) = @_;

    my @pids;

    for my $i (0 .. $#hosts) {
        my $pid = fork();
        die "fork: $!" unless defined $pid;

        if ($pid == 0) {
            $redis->{owner} = 0;
            client($hosts[$i], $user, $hosts[0]->testdir() . "/c$user$i");
            POSIX::_exit(0);
        }

        push @pids, $pid;
    }

    waitpid($_, 0) for @pids;

    my (@admitted, $refused);

    for my $i (0 .. $#hosts) {
        open my $fh, '<', $hosts[0]->testdir() . "/c$user$i" or die;
        my @times;

        while (<$fh>) {
            my ($t, $status) = split;
            push @times, $t if $status == 200;
            $refused++ if $status == 429;
        }

        push @admitted, \@times;
    }

    # the most each host admitted within two syncs and a round trip

    my $window = 2 * $SYNC + 0.05;
    my $bound = 0;

    for my $times (@admitted) {
        my ($max, $j) = (0, 0);

        for my $i (0 .. $#$times) {
            $j++ while $times->[$i] - $times->[$j] > $window;
            $max = $i - $j + 1 if $i - $j + 1 > $max;
        }

        $bound += $max * $EACH;
    }

    my $total = 0;
    $total += @$_ * $EACH for @admitted;

    return ($total, $bound, $refused);
}

for my $n (2, 3) {
    my ($total, $bound, $refused) = round("u$n", @hosts[0 .. $n - 1]);
    my $over = $total - $LIMIT;

    diag("$n hosts: admitted $total of $LIMIT, overshoot $over, "
         . "bound $bound");

    ok($refused, "$n hosts: the budget refused in the end");
    ok($total >= $LIMIT - $n * $EACH, "$n hosts: the budget was usable");
    ok($over <= $bound, "$n hosts: overshoot within its bound");

    # every host told its deltas: Redis holds exactly what was spent

    my $deadline = time() + 3;
    sleep 0.1 while time() < $deadline
                    && $redis->state('fleet', "u$n")->{c} != $total;

    is($redis->state('fleet', "u$n")->{c}, $total,
       "$n hosts: redis holds what was spent");
}

###############################################################################

$_->finish() for @hosts;

done_testing();

###############################################################################

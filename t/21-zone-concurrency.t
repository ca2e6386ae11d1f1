#!/usr/bin/perl

# (C) The token budget authors

# Tests of windowed budgets under concurrency: 50 clients at once, with
# mixed prompt sizes, against two workers, the upstream slow enough that
# every admitted request is in flight while the others are decided.  The
# reservations never exceed the budget, the refused requests did not fit,
# client aborts settle at once, and in the end the zone holds exactly what
# the upstream reported.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use IO::Select;
use IO::Socket::INET;
use POSIX qw(floor);
use Time::HiRes qw(sleep time);

use Test::More;
use TBTest;

my $t = TBTest->new()->write_conf(<<'EOF')->run()->plan(33);

%%TEST_GLOBALS%%

worker_processes 2;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    token_budget_encoding cl100k_base %%DATADIR%%/cl100k_base.tiktoken;

    token_budget_model m cl100k_base context=100000 max_output=50;

    token_budget_zone $http_x_user zone=one:1m tokens=1000 per=1h;
    token_budget_zone $http_x_user zone=many:1m tokens=200 per=1h;

    server {
        listen 127.0.0.1:%%PORT_8080%%;
        server_name localhost;

        token_budget on;

        add_header X-TB-Reserved $token_budget_reserved_tokens always;

        location /one/ {
            token_budget_limit zone=one;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /many/ {
            token_budget_limit zone=many;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /budget/ {
            token_budget_api;
        }
    }
}

EOF

###############################################################################

my $CLIENTS = 50;
my $DELAY = 1.5;
my ($P, $C) = (7, 3);

sub key {
    my ($zone, $key) = @_;

    my $r = http_get("/budget/zones/$zone/keys/$key");
    return { used => -1, reserved => -1, in_flight => -1 }
        unless $r->{status} == 200;

    return TBTest::json_decode($r->{body});
}

sub zone_info {
    my ($name) = @_;

    my $zones = TBTest::json_decode(http_get('/budget/zones')->{body});
    my ($zone) = grep { $_->{name} eq $name } @{$zones->{zones}};

    return $zone;
}

# client $i: 1 to 4 "Hello!" messages, 6 tokens each and 3 priming, and
# 10 to 66 tokens of output; every 7th closes its connection early

sub client {
    my ($i, $key) = @_;

    my $n = 1 + $i % 4;
    my $max = 10 + 7 * ($i % 9);

    my $body = TBTest::json_encode({ model => 'm', max_tokens => $max,
        messages => [ ({ role => 'user', content => 'Hello!' }) x $n ] });

    return {
        key => $key,
        prompt => 6 * $n + 3,
        reserve => 6 * $n + 3 + $max,
        abort => ($i % 7 == 3),
        raw => '',
        request => "POST /v1/chat/completions HTTP/1.1\r\n"
            . "Host: localhost\r\nConnection: close\r\n"
            . "Content-Type: application/json\r\n"
            . "Content-Length: " . length($body) . "\r\n"
            . "X-User: $key\r\n"
            . "X-Mock: delay=" . $DELAY * 1000 . " usage=$P,$C\r\n\r\n"
            . $body,
    };
}

# all clients at once; the aborting ones close 0.2s in, once every
# request has been decided; the zone is looked at while they are in flight

sub round {
    my ($uri, $zone, @keys) = @_;

    my @clients = map { client($_, $keys[$_ % @keys]) } 0 .. $CLIENTS - 1;
    my (%sock, @flight);

    my $sel = IO::Select->new();
    my $z0 = zone_info($zone);
    my $start = time();

    for my $c (@clients) {
        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
            PeerPort => $t->port(8080), Proto => 'tcp')
            or die "cannot connect: $!\n";

        $c->{request} =~ s{^POST /v1/}{POST $uri};
        $s->autoflush(1);
        print $s $c->{request};
        binmode $s;

        $c->{sock} = $s;
        $sel->add($s);
        $sock{fileno $s} = $c;
    }

    my $aborted = 0;
    my $decided = 0;

    while ($sel->count() && time() < $start + $DELAY + 5) {
        for my $s ($sel->can_read(0.02)) {
            my $c = $sock{fileno $s};
            my $n = sysread($s, my $buf, 65536);

            if ($n) {
                $c->{raw} .= $buf;
                next;
            }

            $sel->remove($s);
            close $s;
        }

        my $now = time();

        if (!$decided) {
            my $z = zone_info($zone);
            $decided = 1 if $z->{admitted} + $z->{rejected}
                            >= $z0->{admitted} + $z0->{rejected} + $CLIENTS;
        }

        # in flight: every admitted request reserved

        if ($decided && !$aborted) {
            push @flight, { map { $_ => key($zone, $_) } @keys };
        }

        if ($decided && !$aborted && $now >= $start + 0.2) {
            for my $c (grep { $_->{abort} && $_->{raw} eq '' } @clients) {
                $sel->remove($c->{sock});
                close $c->{sock};
                $c->{aborted} = 1;
            }

            $aborted = 1;

            # nginx sees the aborts and settles them at once

            sleep 0.2;
            push @flight, { after => 1, map { $_ => key($zone, $_) } @keys };
        }
    }

    # the last connections closed are settled in their worker, which may
    # not be the one answering the API

    for (1 .. 40) {
        last unless grep { key($zone, $_)->{in_flight} } @keys;
        sleep 0.05;
    }

    for my $c (@clients) {
        my $r = TBTest::parse_response($c->{raw});
        $c->{status} = $c->{aborted} ? 'aborted' : $r->{status};
        $c->{reserved} = $r->{headers}{'x-tb-reserved'};
    }

    return (\@clients, \@flight);
}

sub sum {
    my $s = 0;
    $s += $_ for @_;
    return $s;
}

# the hour-long windows must not turn during the test

{
    my $left = 3600 - (time() - floor(time() / 3600) * 3600);
    sleep($left + 0.1) if $left < 30;
}

###############################################################################

# what a round must show, key by key, from what each key had used before

sub check {
    my ($name, $zone, $limit, $keys, $clients, $flight, $before) = @_;

    my (%by, %sum, %gone, %prompt, @over, @waste, @counted);

    push @{$by{$_->{key}}{$_->{status}}}, $_ for @$clients;

    for my $key (@$keys) {
        note("$name, $key: " . join ', ',
            map { "$_ " . scalar @{$by{$key}{$_}} } sort keys %{$by{$key}});
    }

    is(scalar(grep { $_->{status} !~ /^(?:200|429|aborted)$/ } @$clients),
        0, "$name, all answered")
        or diag(join ' ', map { $_->{status} } @$clients);

    for my $key (@$keys) {
        my @adm = (@{$by{$key}{200} // []}, @{$by{$key}{aborted} // []});

        $sum{$key} = sum(map { $_->{reserve} } @adm);
        $gone{$key} = sum(map { $_->{reserve} } @{$by{$key}{aborted} // []});
        $prompt{$key} = sum(map { $_->{prompt} } @{$by{$key}{aborted} // []});

        push @over, "$key $before->{$key}+$sum{$key}"
            if $before->{$key} + $sum{$key} > $limit;

        push @waste, map { "$key $_->{reserve}" }
            grep { $_->{reserve} <= $limit - $before->{$key} - $sum{$key} }
            @{$by{$key}{429} // []};

        push @counted, grep { ($_->{reserved} // -1) != $_->{reserve} }
            @{$by{$key}{200} // []};
    }

    is("@over", '', "$name, reservations within the budget");
    is("@waste", '', "$name, refused only what did not fit");
    is(scalar @counted, 0, "$name, reservations as counted");

    # while in flight, and just after the aborts

    my @during = grep { !$_->{after} } @$flight;
    my ($after) = grep { $_->{after} } @$flight;

    my $state = sub {
        my ($f) = @_;
        return [map { [$_, @{$f->{$_}}{qw(reserved in_flight used)}] }
            @$keys];
    };

    ok(@during, "$name, looked at in flight");

    is_deeply([map { $state->($_) } @during],
        [map { [map { [$_, $sum{$_},
            @{$by{$_}{200} // []} + @{$by{$_}{aborted} // []},
            $before->{$_}] } @$keys] } @during],
        "$name, in flight, every reservation held");

    is_deeply($after ? $state->($after) : [],
        [map { [$_, $sum{$_} - $gone{$_}, scalar @{$by{$_}{200} // []},
            $before->{$_} + $prompt{$_}] } @$keys],
        "$name, aborts settled at once");

    # in the end: what the upstream reported, the prompt of the aborted

    is_deeply([map { [$_, @{key($zone, $_)}{qw(used reserved in_flight)}] }
        @$keys],
        [map { [$_, $before->{$_} + ($P + $C) * @{$by{$_}{200} // []}
            + $prompt{$_}, 0, 0] } @$keys],
        "$name, settled exactly");

    is(scalar @{upstream_requests()},
        scalar(grep { $_->{status} =~ /^(?:200|aborted)$/ } @$clients),
        "$name, the admitted forwarded");

    upstream_reset();

    return \%by;
}

sub used {
    my ($zone, @keys) = @_;

    return { map { my $k = key($zone, $_);
        $_ => $k->{used} < 0 ? 0 : $k->{used} } @keys };
}

# one key, a budget of 1000

my $z0 = zone_info('one');
my ($clients, $flight) = round('/one/', 'one', 'k');
my $by = check('one key', 'one', 1000, ['k'], $clients, $flight, { k => 0 });

ok(@{$by->{k}{200} // []} > 5 && @{$by->{k}{429} // []} > 5,
    'one key, some passed, some refused');
ok(@{$by->{k}{aborted} // []}, 'one key, some aborted in flight');

my $z = zone_info('one');
is_deeply([map { $z->{$_} - $z0->{$_} } qw(admitted rejected)],
    [@{$by->{k}{200}} + @{$by->{k}{aborted} // []}, scalar @{$by->{k}{429}}],
    'one key, zone counters');
is($z->{spent}, key('one', 'k')->{used}, 'one key, zone spent');

# five keys, a budget of 200 each, ten clients a key

my @keys = map { "key$_" } 1 .. 5;

($clients, $flight) = round('/many/', 'many', @keys);
$by = check('many keys', 'many', 200, \@keys, $clients, $flight,
    { map { $_ => 0 } @keys });

is(scalar(grep { $by->{$_}{200} && $by->{$_}{429} } @keys), 5,
    'many keys, some passed, some refused, every key');

# again, from what they spent: what is left fits

my $before = used('many', @keys);

($clients, $flight) = round('/many/', 'many', @keys);
check('spent keys', 'many', 200, \@keys, $clients, $flight, $before);

$z = zone_info('many');
is($z->{spent}, sum(map { key('many', $_)->{used} } @keys),
    'spent keys, zone spent');

###############################################################################

#!/usr/bin/perl

# (C) The token budget authors

# A zone shared through a Redis that speaks TLS only: the certificate
# verified against a CA and the server's name, a name that does not
# match refused (the zone falls back, and says why), and TLS without
# verification.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Time::HiRes qw(sleep);

use Test::More;
use TBTest;
use TBRedis;

plan(skip_all => 'no openssl') unless -x '/usr/bin/openssl';

my $redis = TBRedis->new(tls => 1);
my $port = $redis->port();
my $ca = $redis->ca();

my $conf = <<'EOF';

%%TEST_GLOBALS%%

worker_processes 1;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    token_budget_encoding cl100k_base %%DATADIR%%/cl100k_base.tiktoken;

    token_budget_model m cl100k_base context=100000 max_output=50;

    token_budget_zone $http_x_user zone=verified:1m tokens=1000 per=1h
        redis=127.0.0.1:%%REDIS%% redis_tls=on redis_tls_ca=%%CA%%
        redis_tls_name=localhost fail=closed;

    token_budget_zone $http_x_user zone=wrongname:1m tokens=1000 per=1h
        redis=127.0.0.1:%%REDIS%% redis_tls=on redis_tls_ca=%%CA%%
        redis_tls_name=redis.example.com fail=closed;

    token_budget_zone $http_x_user zone=unverified:1m tokens=1000 per=1h
        redis=127.0.0.1:%%REDIS%% redis_tls=on fail=closed;

    token_budget_zone $http_x_user zone=plain:1m tokens=1000 per=1h
        redis=127.0.0.1:%%REDIS%% fail=closed timeout=300ms;

    server {
        listen 127.0.0.1:%%PORT_8080%%;
        server_name localhost;

        token_budget on;

%%LOCATIONS%%    }
}

EOF

my $locations = '';

for my $z (qw(verified wrongname unverified plain)) {
    $locations .= "        location /$z/ {\n"
        . "            token_budget_limit zone=$z;\n"
        . "            proxy_pass http://%%UPSTREAM%%/v1/;\n"
        . "        }\n\n";
}

$conf =~ s/%%LOCATIONS%%/$locations/;
$conf =~ s/%%REDIS%%/$port/g;
$conf =~ s/%%CA%%/$ca/g;

my $t = TBTest->new()->write_conf($conf)->run();

###############################################################################

sub post {
    my ($zone) = @_;

    return $t->http_post("/$zone/chat/completions",
        { model => 'm', max_tokens => 41,
          messages => [ { role => 'user', content => 'Hello!' } ] },
        'X-User' => 'k', 'X-Mock' => 'usage=9,41');
}

my $r;

for (1 .. 20) {
    $r = post('verified');
    last if $r->{status} == 200;
    sleep 0.1;
}

is($r->{status}, 200, 'verified TLS: admitted');
is($redis->cli('HGET', 'tb:{verified:k}', 'c'), 50, 'verified TLS: counted');

is(post('unverified')->{status}, 200, 'TLS without verification');
is($redis->cli('HGET', 'tb:{unverified:k}', 'c'), 50, 'and counted');

is(post('wrongname')->{status}, 503, 'another name: refused by fail=closed');
like($t->read_file('error.log'),
     qr/certificate does not match "redis\.example\.com"/,
     'another name: logged');

is(post('plain')->{status}, 503, 'no TLS to a TLS port: fail=closed');

###############################################################################

$t->done_testing();

###############################################################################

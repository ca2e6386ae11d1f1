#!/usr/bin/perl

# (C) The token budget authors

# Zones shared through Redis: what nginx -t refuses, a Redis with a
# password and a database other than 0, a wrong password (the zone falls
# back, and says why), and a reload, whose old workers hand what they
# could not tell Redis to the new ones.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Time::HiRes qw(sleep time);

use Test::More;
use TBTest;
use TBRedis;

my $redis = TBRedis->new(password => 'sesame');
my $port = $redis->port();

my $conf = <<'EOF';

%%TEST_GLOBALS%%

worker_processes 2;

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    token_budget_encoding cl100k_base %%DATADIR%%/cl100k_base.tiktoken;

    token_budget_model m cl100k_base context=100000 max_output=50;

    token_budget_zone $http_x_user zone=auth:1m tokens=1000 per=1h
        redis=127.0.0.1:%%REDIS%% redis_password=sesame redis_db=3
        fail=closed;

    token_budget_zone $http_x_user zone=wrong:1m tokens=1000 per=1h
        redis=127.0.0.1:%%REDIS%% redis_password=nope fail=closed;

    server {
        listen 127.0.0.1:%%PORT_8080%%;
        server_name localhost;

        token_budget on;

        location /auth/ {
            token_budget_limit zone=auth;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /wrong/ {
            token_budget_limit zone=wrong;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /budget/ {
            token_budget_api;
        }
    }
}

EOF

$conf =~ s/%%REDIS%%/$port/g;

my $t = TBTest->new()->write_conf($conf)->run();

###############################################################################

sub post {
    my ($zone, $usage) = @_;

    return $t->http_post("/$zone/chat/completions",
        { model => 'm', max_tokens => 41,
          messages => [ { role => 'user', content => 'Hello!' } ] },
        'X-User' => 'k', 'X-Mock' => "usage=$usage");
}

# a password and a database

my $r = post('auth', '9,41');
is($r->{status}, 200, 'password and database: admitted');
is($redis->cli('-n', 3, 'HGET', 'tb:{auth:k}', 'c'), 50,
   'the budget is in database 3');
is($redis->cli('HGET', 'tb:{auth:k}', 'c'), '', 'not in database 0');

# a wrong password: the handshake fails, the zone falls back

$r = post('wrong', '9,41');
is($r->{status}, 503, 'wrong password: fail=closed refuses');
like($t->read_file('error.log'), qr/refused the handshake: WRONGPASS/,
     'wrong password: logged');

# a reload: the counters and the connection come back with new workers

$t->reload();

for (1 .. 20) {
    last if post('auth', '9,41')->{status} == 200;
    sleep 0.1;
}

is($redis->cli('-n', 3, 'HGET', 'tb:{auth:k}', 'c'), 100,
   'after a reload: admitted and settled');

# nginx -t

my @bad = (
    [ 'mode=strict', 'need the "redis" parameter' ],
    [ 'redis=127.0.0.1:1 mode=fast', 'invalid parameter "mode=fast"' ],
    [ 'redis=127.0.0.1:1 share=0', 'invalid parameter "share=0"' ],
    [ 'redis=127.0.0.1:1 share=101%', 'invalid parameter "share=101%"' ],
    [ 'redis=127.0.0.1:1 timeout=soon', 'invalid parameter "timeout=soon"' ],
    [ 'redis=127.0.0.1:1 sync=0', 'invalid parameter "sync=0"' ],
    [ 'redis=127.0.0.1:1 fail=maybe', 'invalid parameter "fail=maybe"' ],
    [ 'redis=127.0.0.1:99999', 'invalid port in redis address' ],
    [ 'redis=no-such-host.invalid', 'in redis address' ],
    [ 'redis_db=x redis=127.0.0.1:1', 'invalid parameter "redis_db=x"' ],
);

for my $case (@bad) {
    my ($params, $message) = @$case;

    my ($rc, $out) = $t->nginx_t(<<"EOF");
%%TEST_GLOBALS%%
events {
}
http {
    %%TEST_GLOBALS_HTTP%%
    token_budget_zone \$remote_addr zone=z:1m tokens=10 per=1m $params;
}
EOF

    ok($rc != 0, "nginx -t refuses $params");
    like($out, qr/\Q$message\E/, "and says $message");
}

my ($rc, $out) = $t->nginx_t(<<'EOF');
%%TEST_GLOBALS%%
events {
}
http {
    %%TEST_GLOBALS_HTTP%%
    token_budget_zone $remote_addr zone=z:1m tokens=10 per=1m
        redis=127.0.0.1:1 mode=batched sync=50ms timeout=20ms hold=1m
        fail=local share=25%;
}
EOF

is($rc, 0, 'nginx -t takes every option');

###############################################################################

$t->done_testing();

###############################################################################

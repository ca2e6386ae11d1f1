#!/usr/bin/perl

# (C) The token budget authors

# Tests of internal redirects and subrequests: a request is counted once,
# the upstream gets one count, the variables survive the redirect, and
# subrequests are neither counted nor broken.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use TBTest;

my $t = TBTest->new()->write_conf(<<'EOF')->run()->plan(45);

%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    token_budget_encoding o200k_base %%DATADIR%%/o200k_base.tiktoken;

    token_budget_model gpt-4o* o200k_base context=128000 max_output=16384;

    log_format tb '$uri $token_budget_status $token_budget_prompt_tokens';

    server {
        listen 127.0.0.1:%%PORT_8080%%;
        server_name localhost;

        token_budget on;

        access_log %%TESTDIR%%/tb.log tb;

        add_header X-TB-Prompt $token_budget_prompt_tokens always;
        add_header X-TB-Status $token_budget_status always;
        add_header X-TB-Model $token_budget_model always;
        add_header X-TB-Format $token_budget_format always;

        location /v1/ {
            proxy_pass http://%%UPSTREAM%%;
        }

        # rewrite ... last, before counting

        location /api/ {
            rewrite ^/api/(.*)$ /v1/$1 last;
        }

        # try_files to a named location, counted here or there

        location /try/ {
            token_budget_max_input 100;
            try_files /nonexistent @up;
        }

        location @up {
            rewrite ^/try/(.*)$ /v1/$1 break;
            proxy_pass http://%%UPSTREAM%%;
        }

        # an upstream error and error_page to a named location: the
        # request goes upstream again, counted once

        location /retry/ {
            rewrite ^/retry/(.*)$ /v1/$1 break;
            proxy_pass http://%%UPSTREAM%%;
            proxy_intercept_errors on;
            error_page 503 = @fallback;
        }

        # decided already: a limit here would refuse the request

        location @fallback {
            token_budget_max_input 5;
            proxy_set_header X-Mock "";
            proxy_pass http://%%UPSTREAM%%;
        }

        # a counted request redirected to a location without the module

        location /off/ {
            rewrite ^/off/(.*)$ /v1/$1 break;
            proxy_pass http://%%UPSTREAM%%;
            proxy_intercept_errors on;
            error_page 503 = @off;
        }

        location @off {
            token_budget off;
            proxy_set_header X-Mock "";
            proxy_pass http://%%UPSTREAM%%;
        }

        # a rejection redirected by error_page

        location /limit/ {
            token_budget_max_input 5;
            rewrite ^/limit/(.*)$ /v1/$1 break;
            proxy_pass http://%%UPSTREAM%%;
            error_page 413 = @limit;
        }

        location @limit {
            return 429 '{"prompt":"$token_budget_prompt_tokens"}';
        }

        # subrequests: mirror and auth_request

        location /mirror/ {
            mirror /mirrored;
            rewrite ^/mirror/(.*)$ /v1/$1 break;
            proxy_pass http://%%UPSTREAM%%;
        }

        location = /mirrored {
            internal;
            proxy_pass http://%%UPSTREAM%%/v1/chat/completions?mirror=1;
        }

        location /auth/ {
            auth_request /check;
            rewrite ^/auth/(.*)$ /v1/$1 break;
            proxy_pass http://%%UPSTREAM%%;
        }

        location = /check {
            internal;
            add_header X-Check $token_budget_status;
            return 204;
        }
    }
}

EOF

###############################################################################

my $body = '{"model":"gpt-4o","messages":[{"role":"user","content":"Hello!"}]}';
my $long = '{"model":"gpt-4o","messages":['
    . join(',', ('{"role":"user","content":"Hello!"}') x 20) . ']}';

sub post {
    my ($uri, $data, @headers) = @_;

    upstream_reset();

    my $r = http_post($uri, $data, @headers);

    return ($r, upstream_requests());
}

# the X-Token-Count headers a request arrived with

sub counts {
    my ($req) = @_;

    my @raw = @{$req ? $req->{raw_headers} : []};
    my @values;

    while (my ($name, $value) = splice @raw, 0, 2) {
        push @values, $value if lc $name eq 'x-token-count';
    }

    return join ',', @values;
}

my ($r, $reqs);

# rewrite ... last

($r, $reqs) = post('/api/chat/completions', $body, 'X-Token-Count' => 1);
is($r->{status}, 200, 'rewrite');
is(scalar @$reqs, 1, 'rewrite, one request');
is(counts($reqs->[0]), '9', 'rewrite, one count');
is($reqs->[0] && $reqs->[0]{path}, '/v1/chat/completions', 'rewrite, path');
is($r->{headers}{'x-tb-prompt'}, 9, 'rewrite, variable');
is($r->{headers}{'x-tb-format'}, 'chat', 'rewrite, format');

# try_files

($r, $reqs) = post('/try/chat/completions', $body, 'X-Token-Count' => 1);
is($r->{status}, 200, 'try_files');
is(scalar @$reqs, 1, 'try_files, one request');
is(counts($reqs->[0]), '9', 'try_files, one count');
is($reqs->[0] && $reqs->[0]{body}, $body, 'try_files, body');
is($r->{headers}{'x-tb-prompt'}, 9, 'try_files, prompt variable');
is($r->{headers}{'x-tb-status'}, 'PASSED', 'try_files, status variable');
is($r->{headers}{'x-tb-model'}, 'gpt-4o', 'try_files, model variable');

($r, $reqs) = post('/try/chat/completions', $long);
is($r->{status}, 413, 'try_files, rejected by the first location');
is(scalar @$reqs, 0, 'try_files, rejected, not forwarded');

# error_page to a named location after an upstream error

($r, $reqs) = post('/retry/chat/completions', $body, 'X-Mock' => 'status=503',
    'X-Token-Count' => 1);
is($r->{status}, 200, 'error_page');
is(scalar @$reqs, 2, 'error_page, two requests');
is(counts($reqs->[0]), '9', 'error_page, first, one count');
is(counts($reqs->[1]), '9', 'error_page, second, one count');
is($reqs->[1] && $reqs->[1]{body}, $body, 'error_page, second, body');
is($reqs->[1] && $reqs->[1]{path}, '/v1/chat/completions',
    'error_page, second, path');
is($r->{headers}{'x-tb-prompt'}, 9, 'error_page, prompt variable');
is($r->{headers}{'x-tb-status'}, 'PASSED', 'error_page, status variable');
is($r->{headers}{'x-tb-format'}, 'chat', 'error_page, format variable');

($r, $reqs) = post('/off/chat/completions', $body, 'X-Mock' => 'status=503');
is($r->{status}, 200, 'error_page, module off');
is(counts($reqs->[1]), '9', 'error_page, module off, one count');
is($r->{headers}{'x-tb-prompt'}, 9, 'error_page, module off, variable');

# a rejection and error_page: the module answers with its own JSON body,
# or error_page does, never the upstream

($r, $reqs) = post('/limit/chat/completions', $body);
is(scalar @$reqs, 0, 'rejection, not forwarded');
ok($r->{status} == 413 || $r->{status} == 429, 'rejection, status');
is($r->{headers}{'x-tb-status'}, 'REJECTED', 'rejection, status variable');

# mirror: the subrequest is not counted, and not given the client's count

($r, $reqs) = post('/mirror/chat/completions', $body, 'X-Token-Count' => 1);

for (1 .. 20) {
    last if @$reqs >= 2;
    select undef, undef, undef, 0.1;
    $reqs = upstream_requests();
}

my ($main) = grep { $_->{path} !~ /mirror=1/ } @$reqs;
my ($mirror) = grep { $_->{path} =~ /mirror=1/ } @$reqs;

is($r->{status}, 200, 'mirror');
is(scalar @$reqs, 2, 'mirror, two requests');
is(counts($main), '9', 'mirror, main, one count');
is($main && $main->{body}, $body, 'mirror, main, body');
is($mirror && $mirror->{body}, $body, 'mirror, mirrored body');
ok(counts($mirror) eq '9' || counts($mirror) eq '',
    'mirror, mirrored, not the client count');
is($r->{headers}{'x-tb-prompt'}, 9, 'mirror, variable');

# auth_request runs before the body is read

($r, $reqs) = post('/auth/chat/completions', $body, 'X-Token-Count' => 1);
is($r->{status}, 200, 'auth_request');
is(scalar @$reqs, 1, 'auth_request, one request');
is(counts($reqs->[0]), '9', 'auth_request, one count');
is($reqs->[0] && $reqs->[0]{body}, $body, 'auth_request, body');
is($r->{headers}{'x-tb-prompt'}, 9, 'auth_request, variable');

($r, $reqs) = post('/auth/chat/completions', '{"model":"gpt-9"}');
is($r->{status}, 400, 'auth_request, bad request');
is(scalar @$reqs, 0, 'auth_request, bad request, not forwarded');

# counted once: a line per request in the access log, the variables as
# they were when the request ended

$t->stop();

is($t->read_file('tb.log'), <<'EOF', 'access log');
/v1/chat/completions PASSED 9
/v1/chat/completions PASSED 9
/try/chat/completions REJECTED 123
/v1/chat/completions PASSED 9
/v1/chat/completions PASSED 9
/v1/chat/completions REJECTED 9
/v1/chat/completions PASSED 9
/v1/chat/completions PASSED 9
/v1/chat/completions ERROR -
EOF

###############################################################################

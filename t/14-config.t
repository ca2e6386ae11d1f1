#!/usr/bin/perl

# (C) The token budget authors

# Tests of the configuration: nginx -t fails with a clear message for each
# mistake, and passes with data/models.conf.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use MIME::Base64 qw(encode_base64);
use Test::More;
use TBTest;

my $t = TBTest->new();

###############################################################################

# small vocabularies: the 256 bytes, loaded in no time

sub vocabulary {
    my (@tokens) = @_;

    my $rank = 0;

    return join '', map { encode_base64($_, '') . ' ' . $rank++ . "\n" }
        @tokens;
}

my @bytes = map { chr } 0 .. 255;

$t->write_file('tiny.tiktoken', vocabulary(@bytes, 'ab', 'abc'));
$t->write_file('garbage.tiktoken', "this is not a vocabulary\n" x 300);

my $truncated = vocabulary(@bytes);
$truncated =~ s/^(\S+) 99$/substr($1, 0, 3) . ' 99'/me;
$t->write_file('truncated.tiktoken', $truncated);

$t->write_file('cut.tiktoken', substr(vocabulary(@bytes), 0, 1000));
$t->write_file('nobyte.tiktoken',
    vocabulary(grep({ $_ ne 'A' } @bytes), 'ab', 'abc'));
$t->write_file('badb64.tiktoken', vocabulary(@bytes) . "!!!! 256\n");
$t->write_file('duprank.tiktoken', vocabulary(@bytes) . "YWI= 255\n");
$t->write_file('few.tiktoken', vocabulary(@bytes[0 .. 99]));
$t->write_file('empty.tiktoken', '');

my $tiny = '%%TESTDIR%%/../tiny.tiktoken';

sub conf {
    my ($http) = @_;

    return <<"EOF";
%%TEST_GLOBALS%%
events {
}
http {
    %%TEST_GLOBALS_HTTP%%
$http
    server {
        listen 127.0.0.1:%%PORT_8090%%;
        location / {
            return 200;
        }
    }
}
EOF
}

# nginx -t fails, with [emerg] and the message

sub fails {
    my ($name, $http, $re, $todo) = @_;

    my ($rc, $out) = nginx_t(conf($http));

    TODO: {
        local $TODO = $todo;

        is($rc, 1, "$name, fails");
        like($out, qr/\[emerg\].*$re/, "$name, message");
    }

    unlike($out, qr/signal|core dumped|\[alert\]/, "$name, no crash");
}

sub passes {
    my ($name, $http) = @_;

    my ($rc, $out) = nginx_t(conf($http));

    is($rc, 0, "$name, passes") or diag($out);
}

my @fails = (
    [ 'missing vocabulary file',
      "token_budget_encoding cl100k_base %%TESTDIR%%/no-such.tiktoken;",
      qr/cannot load encoding "cl100k_base": cannot open ".*no-such\.tiktoken"/ ],
    [ 'garbage vocabulary',
      "token_budget_encoding cl100k_base %%TESTDIR%%/../garbage.tiktoken;",
      qr/cannot load encoding "cl100k_base": invalid (?:rank in )?vocabulary line 1\b/ ],
    [ 'truncated base64',
      "token_budget_encoding cl100k_base %%TESTDIR%%/../truncated.tiktoken;",
      qr/cannot load encoding "cl100k_base": invalid vocabulary line 100\b/ ],
    [ 'truncated file',
      "token_budget_encoding cl100k_base %%TESTDIR%%/../cut.tiktoken;",
      qr/cannot load encoding "cl100k_base": (?:invalid vocabulary line|invalid rank|vocabulary has \d+ tokens, too few)/ ],
    [ 'invalid base64',
      "token_budget_encoding cl100k_base %%TESTDIR%%/../badb64.tiktoken;",
      qr/cannot load encoding "cl100k_base": invalid token of rank 256/ ],
    [ 'missing a byte',
      "token_budget_encoding cl100k_base %%TESTDIR%%/../nobyte.tiktoken;",
      qr/cannot load encoding "cl100k_base": vocabulary lacks the byte 0x41/ ],
    [ 'duplicate rank',
      "token_budget_encoding cl100k_base %%TESTDIR%%/../duprank.tiktoken;",
      qr/cannot load encoding "cl100k_base": duplicate rank 255/ ],
    [ 'too few tokens',
      "token_budget_encoding cl100k_base %%TESTDIR%%/../few.tiktoken;",
      qr/vocabulary has 100 tokens, too few/ ],
    [ 'empty vocabulary',
      "token_budget_encoding cl100k_base %%TESTDIR%%/../empty.tiktoken;",
      qr/cannot load encoding "cl100k_base": / ],
    [ 'vocabulary a directory',
      "token_budget_encoding cl100k_base %%TESTDIR%%;",
      qr/cannot load encoding "cl100k_base": / ],
    [ 'unknown encoding',
      "token_budget_encoding gpt2_base $tiny;",
      qr/unknown encoding "gpt2_base", expected r50k_base, p50k_base, cl100k_base or o200k_base/ ],
    [ 'duplicate encoding',
      "token_budget_encoding cl100k_base $tiny;\n"
      . "token_budget_encoding cl100k_base $tiny;",
      qr/"token_budget_encoding" directive is duplicate/ ],
    [ 'encoding not loaded',
      "token_budget_encoding cl100k_base $tiny;\n"
      . "token_budget_model gpt-4o* o200k_base;",
      qr/model "gpt-4o\*" uses encoding "o200k_base", which no "token_budget_encoding" before it loads/ ],
    [ 'encoding loaded after',
      "token_budget_model gpt-4* cl100k_base;\n"
      . "token_budget_encoding cl100k_base $tiny;",
      qr/model "gpt-4\*" uses encoding "cl100k_base", which no/ ],
    [ 'context=abc',
      "token_budget_encoding cl100k_base $tiny;\n"
      . "token_budget_model gpt-4 cl100k_base context=abc;",
      qr/invalid parameter "context=abc"/ ],
    [ 'context=0',
      "token_budget_encoding cl100k_base $tiny;\n"
      . "token_budget_model gpt-4 cl100k_base context=0;",
      qr/invalid parameter "context=0"/ ],
    [ 'max_output=-1',
      "token_budget_encoding cl100k_base $tiny;\n"
      . "token_budget_model gpt-4 cl100k_base max_output=-1;",
      qr/invalid parameter "max_output=-1"/ ],
    [ 'estimate=0%',
      "token_budget_encoding cl100k_base $tiny;\n"
      . "token_budget_model claude cl100k_base estimate=0%;",
      qr/invalid parameter "estimate=0%"/ ],
    [ 'estimate=abc%',
      "token_budget_encoding cl100k_base $tiny;\n"
      . "token_budget_model claude cl100k_base estimate=abc%;",
      qr/invalid parameter "estimate=abc%"/ ],
    [ 'unknown parameter',
      "token_budget_encoding cl100k_base $tiny;\n"
      . "token_budget_model gpt-4 cl100k_base window=100;",
      qr/invalid parameter "window=100"/ ],
    [ 'star not at the end',
      "token_budget_encoding cl100k_base $tiny;\n"
      . "token_budget_model gpt-*-mini cl100k_base;",
      qr/invalid model pattern "gpt-\*-mini", only a trailing "\*" is allowed/ ],
    [ 'two stars',
      "token_budget_encoding cl100k_base $tiny;\n"
      . "token_budget_model gpt** cl100k_base;",
      qr/invalid model pattern "gpt\*\*"/ ],
    [ 'max_output over context',
      "token_budget_encoding cl100k_base $tiny;\n"
      . "token_budget_model gpt-4 cl100k_base context=100 max_output=101;",
      qr/model "gpt-4": max_output is larger than its context/ ],
    [ 'model in a server',
      "token_budget_encoding cl100k_base $tiny;\n"
      . "server { token_budget_model gpt-4 cl100k_base; }",
      qr/"token_budget_model" directive is not allowed here/ ],
    [ 'on without models',
      "token_budget_encoding cl100k_base $tiny;\ntoken_budget on;",
      qr/"token_budget" is on, but no "token_budget_model" is defined/ ],
    [ 'on in a location without models',
      "server { location /v1/ { token_budget on; } }",
      qr/"token_budget" is on, but no "token_budget_model" is defined/ ],
    [ 'status 200',
      "token_budget_status 200;",
      qr/value must be between 400 and 599 in \S+nginx\.conf:\d+/ ],
    [ 'status 600',
      "token_budget_status 600;",
      qr/value must be between 400 and 599/ ],
    [ 'status abc',
      "token_budget_status abc;",
      qr/"token_budget_status" directive invalid number/ ],
    [ 'header with a colon',
      "token_budget_header X-Token:Count;",
      qr/invalid header name "X-Token:Count"/ ],
    [ 'header with a space',
      "token_budget_header 'X Token';",
      qr/invalid header name "X Token"/ ],
    [ 'format',
      "token_budget_format gemini;",
      qr/invalid value "gemini" in \S+nginx\.conf:\d+/ ],
    [ 'margin',
      "token_budget_estimate_margin 150%;",
      qr/invalid margin "150%", expected 0% to 100%/ ],
    [ 'margin abc',
      "token_budget_estimate_margin abc;",
      qr/invalid margin "abc"/ ],
    [ 'max_body',
      "token_budget_max_body lots;",
      qr/"token_budget_max_body" directive invalid value/ ],
    [ 'max_input',
      "token_budget_max_input -5;",
      qr/"token_budget_max_input" directive invalid number/ ],
    [ 'flag',
      "token_budget maybe;",
      qr/invalid value "maybe" in "token_budget" directive, it must be "on" or "off"/ ],
    [ 'empty header name',
      "token_budget_header '';",
      qr/invalid header name ""/ ],
);

$t->plan(3 * @fails + 6);

for my $c (@fails) {
    fails(@$c);
}

passes('tiny vocabulary',
    "token_budget_encoding cl100k_base $tiny;\n"
    . "token_budget_model gpt-4 cl100k_base context=100 max_output=100;\n"
    . "token_budget_model claude-* cl100k_base estimate=120%;\n"
    . "token_budget_model * cl100k_base;\n"
    . "token_budget on;");

passes('every directive',
    "token_budget_encoding cl100k_base $tiny;\n"
    . "token_budget_model gpt-4 cl100k_base;\n"
    . "server { location / { token_budget on; token_budget_format chat;\n"
    . "token_budget_max_input 1000; token_budget_reserve_output 10;\n"
    . "token_budget_header X-Prompt-Tokens; token_budget_dry_run on;\n"
    . "token_budget_status 429; token_budget_clamp on;\n"
    . "token_budget_image_tokens 2000; token_budget_estimate_margin 5%;\n"
    . "token_budget_max_body 1m; } }");

passes('header off', "token_budget_header off;");

passes('off without models', "token_budget off;");

# the distributed models

my $data = $t->datadir();

passes('data/models.conf',
    "token_budget_encoding cl100k_base $data/cl100k_base.tiktoken;\n"
    . "token_budget_encoding o200k_base $data/o200k_base.tiktoken;\n"
    . "include $data/models.conf;\n"
    . "token_budget on;");

my ($rc, $out) = nginx_t(conf("token_budget_encoding cl100k_base $tiny;\n"
    . "include $data/models.conf;"));
like($out, qr/model "gpt-5\*" uses encoding "o200k_base".*models\.conf:\d+/,
    'data/models.conf without o200k_base, where');

###############################################################################

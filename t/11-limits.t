#!/usr/bin/perl

# (C) The token budget authors

# Tests of the limits: token_budget_max_input, the model's context window,
# the error bodies, token_budget_status, the estimate margin,
# token_budget_dry_run and token_budget_clamp.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Encode ();
use Test::More;
use TBTest;

my $t = TBTest->new()->write_conf(<<'EOF')->run()->plan(90);

%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    token_budget_encoding cl100k_base %%DATADIR%%/cl100k_base.tiktoken;

    token_budget_model gpt-big     cl100k_base context=128000 max_output=16384;
    token_budget_model small       cl100k_base context=100 max_output=50;
    token_budget_model tight       cl100k_base context=100 max_output=100;
    token_budget_model embed       cl100k_base context=10;
    token_budget_model claude-test cl100k_base context=100 max_output=10;
    token_budget_model claude-high cl100k_base context=100 max_output=10
                                   estimate=120%;

    server {
        listen 127.0.0.1:%%PORT_8080%%;
        server_name localhost;

        token_budget on;

        add_header X-TB-Status $token_budget_status always;
        add_header X-TB-Reason $token_budget_reason always;
        add_header X-TB-Prompt $token_budget_prompt_tokens always;
        add_header X-TB-Reserved $token_budget_reserved_tokens always;

        location /v1/ {
            proxy_pass http://%%UPSTREAM%%;
        }

        location /max/ {
            token_budget_max_input 20;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /s400/ {
            token_budget_status 400;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /s429/ {
            token_budget_status 429;
            token_budget_max_input 20;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /nomargin/ {
            token_budget_estimate_margin 0;
            token_budget_max_input 16;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /dry/ {
            token_budget_dry_run on;
            token_budget_max_input 20;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /clamp/ {
            token_budget_clamp on;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }
    }
}

EOF

###############################################################################

# n chat messages of "Hello!": 6 tokens each and 3 priming

sub chat {
    my ($model, $n, %extra) = @_;

    return TBTest::json_encode({ model => $model, %extra,
        messages => [ ({ role => 'user', content => 'Hello!' }) x $n ] });
}

# a request, its decoded error body, and whether it went upstream

sub post {
    my ($uri, $body) = @_;

    upstream_reset();

    my $r = http_post($uri, $body);
    my $json = eval { TBTest::json_decode($r->{body}) } || {};
    my $reqs = upstream_requests();

    return ($r, $json, $reqs);
}

# token_budget_max_input

my ($r, $j, $reqs) = post('/max/chat/completions', chat('gpt-big', 2));

is($r->{status}, 200, 'max_input, under');
is($reqs->[0] && $reqs->[0]{headers}{'x-token-count'}, 15,
    'max_input, under, counted');

($r, $j, $reqs) = post('/max/chat/completions', chat('gpt-big', 3));

is($r->{status}, 413, 'max_input, over');
like($r->{headers}{'content-type'}, qr{^application/json}, 'max_input, type');
is($j->{error}{code}, 'max_input_exceeded', 'max_input, code');
is($j->{error}{type}, 'invalid_request_error', 'max_input, error type');
ok(exists $j->{error}{param}, 'max_input, param');
like($j->{error}{message}, qr/\b21 tokens\b.*\b20 tokens\b/,
    'max_input, message');
is(scalar @$reqs, 0, 'max_input, not forwarded');
is($r->{headers}{'x-tb-status'}, 'REJECTED', 'max_input, status variable');
is($r->{headers}{'x-tb-reason'}, 'max_input', 'max_input, reason variable');
is($r->{headers}{'x-tb-prompt'}, 21, 'max_input, prompt variable');

# the context window: prompt and output

($r, $j, $reqs) = post('/v1/chat/completions',
    chat('small', 1, max_tokens => 91));

is($r->{status}, 200, 'context, exactly full');
is($r->{headers}{'x-tb-reserved'}, 100, 'context, exactly full, reserved');

($r, $j, $reqs) = post('/v1/chat/completions',
    chat('small', 1, max_tokens => 92));

is($r->{status}, 413, 'context, over');
is($j->{error}{code}, 'context_length_exceeded', 'context, code');
is($j->{error}{type}, 'invalid_request_error', 'context, error type');
my $m = 'maximum context length is 100 tokens, however you requested '
    . '101 tokens (9 in the messages, 92 in the completion)';
like($j->{error}{message}, qr/\Q$m\E/, 'context, message numbers');
is(scalar @$reqs, 0, 'context, not forwarded');
is($r->{headers}{'x-tb-reason'}, 'context_length_exceeded',
    'context, reason variable');

# the model's max_output when the request does not say

($r, $j, $reqs) = post('/v1/chat/completions', chat('small', 6));
is($r->{status}, 200, 'context, default output fits');
is($r->{headers}{'x-tb-reserved'}, 89, 'context, default output reserved');

# without a limit in the body the model writes at most what fits: the
# reservation shrinks to the rest of the context, nothing is refused

($r, $j, $reqs) = post('/v1/chat/completions', chat('small', 9));
is($r->{status}, 200, 'context, default output shrinks to fit');
is($r->{headers}{'x-tb-reserved'}, 100,
    'context, default output shrinks to the context');

# n choices share the window, each is within it

($r) = post('/v1/chat/completions', chat('small', 1, max_tokens => 91,
    n => 4));
is($r->{status}, 200, 'context, n');
is($r->{headers}{'x-tb-reserved'}, 9 + 4 * 91, 'context, n, reserved');

# the prompt alone over the window

($r, $j) = post('/v1/chat/completions', chat('small', 20, max_tokens => 0));
is($r->{status}, 413, 'context, prompt alone');
like($j->{error}{message}, qr/requested 123 tokens/, 'context, prompt alone, message');

# embeddings: each input within the window, nothing reserved

($r, $j, $reqs) = post('/v1/embeddings',
    '{"model":"embed","input":[[1,2,3,4,5,6,7,8,9,10],[1,2,3]]}');
is($r->{status}, 200, 'embeddings, inputs within');
is($reqs->[0] && $reqs->[0]{headers}{'x-token-count'}, 13,
    'embeddings, inputs within, counted');

($r, $j, $reqs) = post('/v1/embeddings',
    '{"model":"embed","input":[[1,2,3],[1,2,3,4,5,6,7,8,9,10,11]]}');
is($r->{status}, 413, 'embeddings, an input over');
is($j->{error}{code}, 'context_length_exceeded', 'embeddings, code');
like($j->{error}{message}, qr/\b10 tokens.*an input has 11 tokens/,
    'embeddings, message');
is(scalar @$reqs, 0, 'embeddings, not forwarded');

# the Anthropic shape

my $poet = '"system":"You are a poet.","messages":[{"role":"user",'
    . '"content":"Write a haiku about nginx."}]';

($r, $j, $reqs) = post('/max/messages',
    qq({"model":"claude-test","max_tokens":1,$poet}));
is($r->{status}, 200, 'anthropic, 16 tokens under max_input');

($r, $j, $reqs) = post('/v1/messages',
    qq({"model":"claude-test","max_tokens":200,$poet}));
is($r->{status}, 413, 'anthropic, over');
is($j->{type}, 'error', 'anthropic, shape');
is($j->{error}{type}, 'request_too_large', 'anthropic, error type');
like($j->{error}{message},
    qr/maximum context length is 100 tokens.*\b216 tokens/,
    'anthropic, message');
ok(!exists $j->{error}{code}, 'anthropic, no openai code');
is(scalar @$reqs, 0, 'anthropic, not forwarded');

# token_budget_status

($r, $j, $reqs) = post('/s400/chat/completions',
    chat('small', 1, max_tokens => 92));
is($r->{status}, 400, 'status 400');
is($j->{error}{code}, 'context_length_exceeded', 'status 400, code');
is($j->{error}{type}, 'invalid_request_error', 'status 400, type');
is(scalar @$reqs, 0, 'status 400, not forwarded');

($r, $j, $reqs) = post('/s400/messages',
    qq({"model":"claude-test","max_tokens":200,$poet}));
is($r->{status}, 400, 'status 400, anthropic');
is($j->{error}{type}, 'invalid_request_error', 'status 400, anthropic type');

($r, $j, $reqs) = post('/s429/chat/completions', chat('gpt-big', 3));
is($r->{status}, 429, 'status 429');
is($j->{error}{type}, 'tokens', 'status 429, type');
is($j->{error}{code}, 'max_input_exceeded', 'status 429, code');

# the estimate margin: an Anthropic count is an estimate, 16 tokens here

($r, $j, $reqs) = post('/v1/messages',
    qq({"model":"claude-test","max_tokens":84,$poet}));
is($r->{status}, 200, 'estimate, at the limit');

($r, $j, $reqs) = post('/v1/messages',
    qq({"model":"claude-test","max_tokens":94,$poet}));
is($r->{status}, 200, 'estimate, 10% over, within the margin');
is($reqs->[0] && $reqs->[0]{headers}{'x-token-count'}, 16,
    'estimate, within the margin, counted');

($r, $j, $reqs) = post('/v1/messages',
    qq({"model":"claude-test","max_tokens":95,$poet}));
is($r->{status}, 413, 'estimate, just over the margin');

($r, $j, $reqs) = post('/v1/messages',
    qq({"model":"claude-test","max_tokens":500,$poet}));
is($r->{status}, 413, 'estimate, far over');
is(scalar @$reqs, 0, 'estimate, far over, not forwarded');

($r) = post('/nomargin/messages',
    qq({"model":"claude-test","max_tokens":84,$poet}));
is($r->{status}, 200, 'margin 0, at the limit');

($r) = post('/nomargin/messages',
    qq({"model":"claude-test","max_tokens":85,$poet}));
is($r->{status}, 413, 'margin 0, one over');

# max_input: 16 estimated tokens, the limit 16, or 20 with the margin

($r) = post('/max/messages', qq({"model":"claude-high","max_tokens":1,$poet}));
is($r->{status}, 200, 'estimate=, max_input within the margin');
is($r->{headers}{'x-tb-prompt'}, 20, 'estimate=, raised count');

($r) = post('/nomargin/messages',
    qq({"model":"claude-high","max_tokens":1,$poet}));
is($r->{status}, 413, 'estimate=, max_input without a margin');

# an exact count gets no margin

($r) = post('/v1/chat/completions', chat('small', 1, max_tokens => 95));
is($r->{status}, 413, 'exact, no margin');

# token_budget_dry_run

($r, $j, $reqs) = post('/dry/chat/completions', chat('gpt-big', 3));
is($r->{status}, 200, 'dry run, forwarded');
is($r->{headers}{'x-tb-status'}, 'REJECTED_DRY_RUN', 'dry run, status');
is($r->{headers}{'x-tb-reason'}, 'max_input', 'dry run, reason');
is(scalar @$reqs, 1, 'dry run, upstream got it');
is($reqs->[0] && $reqs->[0]{headers}{'x-token-count'}, 21,
    'dry run, counted');

($r, $j, $reqs) = post('/dry/chat/completions', chat('gpt-big', 2));
is($r->{headers}{'x-tb-status'}, 'PASSED', 'dry run, passed');

# a dry run forwards a body it cannot count too, without any count

upstream_reset();
$r = http_post('/dry/chat/completions', '{"model":"gpt-9","messages":[]}',
    'X-Token-Count' => 5);
$reqs = upstream_requests();
is($r->{headers}{'x-tb-status'}, 'ERROR', 'dry run, bad body, status');
is($r->{headers}{'x-tb-reason'}, 'model_not_found', 'dry run, bad body, reason');
is(scalar @$reqs, 1, 'dry run, bad body, forwarded');
ok($reqs->[0] && !exists $reqs->[0]{headers}{'x-token-count'},
    'dry run, bad body, no count');

# token_budget_clamp

($r, $j, $reqs) = post('/clamp/chat/completions',
    chat('small', 1, max_tokens => 1000, temperature => 0.5));
is($r->{status}, 200, 'clamp, forwarded');
is($r->{headers}{'x-tb-status'}, 'PASSED', 'clamp, status');
is($r->{headers}{'x-tb-reserved'}, 100, 'clamp, reserved');

my $sent = $reqs->[0] ? TBTest::json_decode($reqs->[0]{body}) : {};
is($sent->{max_tokens}, 91, 'clamp, max_tokens lowered');
is($sent->{temperature}, 0.5, 'clamp, the rest kept');
is_deeply($sent->{messages}, [{ role => 'user', content => 'Hello!' }],
    'clamp, messages kept');
is($reqs->[0] && $reqs->[0]{headers}{'content-length'},
    length($reqs->[0]{body}), 'clamp, content length');

# without a limit in the body nothing needs clamping: the body goes as is

($r, $j, $reqs) = post('/clamp/chat/completions', chat('tight', 1));
$sent = $reqs->[0] ? TBTest::json_decode($reqs->[0]{body}) : {};
ok(!exists $sent->{max_completion_tokens}, 'clamp, chat, nothing added');

($r, $j, $reqs) = post('/clamp/completions',
    '{"model":"tight","prompt":"Once upon a time"}');
$sent = $reqs->[0] ? TBTest::json_decode($reqs->[0]{body}) : {};
ok(!exists $sent->{max_tokens}, 'clamp, completions, nothing added');

($r, $j, $reqs) = post('/clamp/responses',
    '{"model":"tight","input":"Tell me a joke.","max_output_tokens":200}');
$sent = $reqs->[0] ? TBTest::json_decode($reqs->[0]{body}) : {};
is($sent->{max_output_tokens}, 89, 'clamp, responses, lowered');

($r, $j, $reqs) = post('/clamp/chat/completions',
    chat('small', 1, max_completion_tokens => 1000));
$sent = $reqs->[0] ? TBTest::json_decode($reqs->[0]{body}) : {};
is($sent->{max_completion_tokens}, 91, 'clamp, max_completion_tokens');

($r, $j, $reqs) = post('/clamp/completions',
    '{"model":"tight","prompt":"Once upon a time","max_tokens":500}');
$sent = $reqs->[0] ? TBTest::json_decode($reqs->[0]{body}) : {};
is($sent->{max_tokens}, 96, 'clamp, completions, lowered');

($r, $j, $reqs) = post('/clamp/chat/completions',
    chat('small', 1, max_tokens => 10));
is($reqs->[0] && $reqs->[0]{body}, chat('small', 1, max_tokens => 10),
    'clamp, fitting body untouched');

# the body written again keeps what it said, escapes decoded or not

my $odd = '{"model":"small","max_tokens":1000,"temperature":0.50,'
    . '"m\u0065tadata":{"k":[1,2.5e3,true,false,null,{}]},'
    . '"messages":[{"role":"user","content":'
    . '"caf\u00e9 \ud83d\ude00 \"q\" \\\\ \/ \n\t\u0001 \u0000"}]}';

($r, $j, $reqs) = post('/clamp/chat/completions', $odd);
my $want = TBTest::json_decode($odd);
$want->{max_tokens} = 100 - $r->{headers}{'x-tb-prompt'};

is_deeply($reqs->[0]
    ? TBTest::json_decode(Encode::encode_utf8($reqs->[0]{body})) : {},
    $want, 'clamp, the body kept');
like($reqs->[0] ? $reqs->[0]{body} : '', qr/"temperature":0\.50,/,
    'clamp, numbers as written');

($r, $j, $reqs) = post('/clamp/chat/completions',
    chat('small', 20, max_tokens => 10));
is($r->{status}, 413, 'clamp, prompt alone over');
is(scalar @$reqs, 0, 'clamp, prompt alone over, not forwarded');

($r, $j, $reqs) = post('/clamp/messages',
    qq({"model":"claude-test","max_tokens":500,$poet}));
is($r->{status}, 413, 'clamp, not an estimate');

###############################################################################

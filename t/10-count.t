#!/usr/bin/perl

# (C) The token budget authors

# Tests of counting through the module: the count the upstream receives in
# X-Token-Count for each API format, and the module's variables.
#
# The expected counts were computed with t/gen/count.js, which counts by
# the published recipes with the official tiktoken npm package; when
# t/gen/node_modules is installed, the last test computes them again.

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Encode qw(encode_utf8);
use MIME::Base64 qw(encode_base64);
use File::Temp qw(tempfile);
use Test::More;
use TBTest;

my $t = TBTest->new()->write_conf(<<'EOF')->run();

%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    token_budget_encoding cl100k_base %%DATADIR%%/cl100k_base.tiktoken;
    token_budget_encoding o200k_base %%DATADIR%%/o200k_base.tiktoken;

    token_budget_model gpt-4o*      o200k_base  context=128000 max_output=16384;
    token_budget_model gpt-4        cl100k_base context=8192   max_output=4096;
    token_budget_model instruct     cl100k_base context=4096   max_output=256;
    token_budget_model embed        cl100k_base context=8192;
    token_budget_model claude-*     cl100k_base context=200000 max_output=1000
                                    estimate=120%;
    token_budget_model plain-claude cl100k_base context=200000 max_output=1000;

    server {
        listen 127.0.0.1:%%PORT_8080%%;
        server_name localhost;

        token_budget on;

        add_header X-TB-Prompt $token_budget_prompt_tokens always;
        add_header X-TB-Reserved $token_budget_reserved_tokens always;
        add_header X-TB-Output $token_budget_output_tokens always;
        add_header X-TB-Model $token_budget_model always;
        add_header X-TB-Method $token_budget_count_method always;
        add_header X-TB-Status $token_budget_status always;
        add_header X-TB-Format $token_budget_format always;

        location /v1/ {
            proxy_pass http://%%UPSTREAM%%;
        }

        location /reserve/ {
            token_budget_reserve_output 500;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /img/ {
            token_budget_image_tokens 100;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /named/ {
            token_budget_header X-Prompt-Tokens;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /noheader/ {
            token_budget_header off;
            proxy_pass http://%%UPSTREAM%%/v1/;
        }

        location /custom/ {
            token_budget_format chat;
            proxy_pass http://%%UPSTREAM%%/v1/chat/completions;
        }
    }
}

EOF

###############################################################################

# [name, uri, format, encoding, body (JSON text), expected count, estimate]

my @cases = (
    [ 'one user message', '/v1/chat/completions', 'chat', 'o200k_base',
      '{"model":"gpt-4o","messages":[{"role":"user","content":"Hello!"}]}',
      9 ],
    [ 'one user message, cl100k_base', '/v1/chat/completions', 'chat',
      'cl100k_base',
      '{"model":"gpt-4","messages":[{"role":"user","content":"Hello!"}]}',
      9 ],
    [ 'name adds one', '/v1/chat/completions', 'chat', 'o200k_base',
      '{"model":"gpt-4o","messages":[{"role":"user","name":"alice",'
      . '"content":"Hello!"}]}',
      11 ],
    [ 'several messages', '/v1/chat/completions', 'chat', 'o200k_base',
      '{"model":"gpt-4o","messages":['
      . '{"role":"system","content":"You are a helpful assistant."},'
      . '{"role":"user","content":"What is 2+2?"},'
      . '{"role":"assistant","content":"4"},'
      . '{"role":"user","content":"And 3+3?"}]}',
      39 ],
    [ 'empty and null content', '/v1/chat/completions', 'chat',
      'o200k_base',
      '{"model":"gpt-4o","messages":[{"role":"user","content":""},'
      . '{"role":"assistant","content":null}]}',
      11 ],
    [ 'array content parts', '/v1/chat/completions', 'chat', 'o200k_base',
      '{"model":"gpt-4o","messages":[{"role":"user","content":['
      . '{"type":"text","text":"Hello"},'
      . '{"type":"text","text":" world, twice."}]}]}',
      12 ],
    [ 'escapes decoded', '/v1/chat/completions', 'chat', 'o200k_base',
      '{"model":"gpt-4o","messages":[{"role":"user","content":'
      . '"caf\u00e9 \ud83d\ude00\nnew line \"quoted\" \\\\ back\/slash\t"}]}',
      21 ],
    [ 'utf-8 as the escapes', '/v1/chat/completions', 'chat', 'o200k_base',
      encode_utf8('{"model":"gpt-4o","messages":[{"role":"user","content":'
      . qq{"caf\x{e9} \x{1f600}\\nnew line \\"quoted\\" \\\\ back/slash\\t"}
      . '}]}'),
      21 ],
    [ 'model by prefix', '/v1/chat/completions', 'chat', 'o200k_base',
      '{"model":"gpt-4o-mini","messages":[{"role":"user",'
      . '"content":"Count me, please."}]}',
      12 ],
    [ 'text part for an image', '/v1/chat/completions', 'chat', 'o200k_base',
      '{"model":"gpt-4o","messages":[{"role":"user","content":['
      . '{"type":"text","text":"What is in this image?"}]}]}',
      13 ],
    [ 'format by directive', '/custom/', 'chat', 'o200k_base',
      '{"model":"gpt-4o","messages":[{"role":"user","content":"Hello!"}]}',
      9 ],

    [ 'prompt string', '/v1/completions', 'completions', 'cl100k_base',
      '{"model":"instruct","prompt":"Once upon a time"}',
      4 ],
    [ 'prompt strings', '/v1/completions', 'completions', 'cl100k_base',
      '{"model":"instruct","prompt":["Once upon a time",'
      . '"In a galaxy far, far away"]}',
      11 ],
    [ 'prompt token ids', '/v1/completions', 'completions', 'cl100k_base',
      '{"model":"instruct","prompt":[9906,11,1917]}',
      3 ],
    [ 'prompt arrays of token ids', '/v1/completions', 'completions',
      'cl100k_base',
      '{"model":"instruct","prompt":[[1,2,3],[4,5]]}',
      5 ],
    [ 'prompt and suffix', '/v1/completions', 'completions', 'cl100k_base',
      '{"model":"instruct","prompt":"def add(a, b):","suffix":"\n\nprint(add(1, 2))"}',
      15 ],

    [ 'input string', '/v1/embeddings', 'embeddings', 'cl100k_base',
      '{"model":"embed","input":"The food was delicious and the waiter..."}',
      8 ],
    [ 'input strings', '/v1/embeddings', 'embeddings', 'cl100k_base',
      '{"model":"embed","input":["first text","second, longer text"]}',
      6 ],
    [ 'input token ids', '/v1/embeddings', 'embeddings', 'cl100k_base',
      '{"model":"embed","input":[1,2,3,4]}',
      4 ],
    [ 'input arrays of token ids', '/v1/embeddings', 'embeddings',
      'cl100k_base',
      '{"model":"embed","input":[[1,2],[3,4,5]]}',
      5 ],

    [ 'responses input string', '/v1/responses', 'responses', 'o200k_base',
      '{"model":"gpt-4o","input":"Tell me a joke."}',
      11 ],
    [ 'responses instructions', '/v1/responses', 'responses', 'o200k_base',
      '{"model":"gpt-4o","instructions":"Talk like a pirate.",'
      . '"input":"Tell me a joke."}',
      19 ],
    [ 'responses items', '/v1/responses', 'responses', 'o200k_base',
      '{"model":"gpt-4o","input":[{"role":"user","content":"Hi"},'
      . '{"role":"assistant","content":"Hello, how can I help?"}]}',
      19 ],
    [ 'responses item parts', '/v1/responses', 'responses', 'o200k_base',
      '{"model":"gpt-4o","instructions":"Be brief.","input":['
      . '{"role":"user","content":[{"type":"input_text",'
      . '"text":"What is the capital of France?"}]}]}',
      20 ],

    [ 'anthropic system string', '/v1/messages', 'anthropic',
      'cl100k_base',
      '{"model":"claude-sonnet-4-5","max_tokens":10,'
      . '"system":"You are a poet.",'
      . '"messages":[{"role":"user","content":"Write a haiku about nginx."}]}',
      20, 120 ],
    [ 'anthropic system blocks', '/v1/messages', 'anthropic',
      'cl100k_base',
      '{"model":"claude-sonnet-4-5","max_tokens":10,'
      . '"system":[{"type":"text","text":"You are a poet."},'
      . '{"type":"text","text":"Rhyme.",'
      . '"cache_control":{"type":"ephemeral"}}],'
      . '"messages":[{"role":"user","content":[{"type":"text",'
      . '"text":"Write a haiku about nginx."}]},'
      . '{"role":"assistant","content":"Workers wait"}]}',
      30, 120 ],
    [ 'anthropic without estimate=', '/v1/messages', 'anthropic',
      'cl100k_base',
      '{"model":"plain-claude","max_tokens":10,'
      . '"system":"You are a poet.",'
      . '"messages":[{"role":"user","content":"Write a haiku about nginx."}]}',
      16 ],
);

$t->plan(2 * @cases + 59);

###############################################################################

# what the upstream received, and the response

sub post {
    my ($uri, $body, @headers) = @_;

    upstream_reset();

    my $r = http_post($uri, $body, @headers);
    my $reqs = upstream_requests();

    return ($r, $reqs);
}

for my $c (@cases) {
    my ($name, $uri, $format, $enc, $body, $expected) = @$c;

    my ($r, $reqs) = post($uri, $body);

    is($reqs->[0] && $reqs->[0]{headers}{'x-token-count'}, $expected, $name);
    is($r->{headers}{'x-tb-prompt'}, $expected, "$name, variable");
}

# the variables

my ($r, $reqs) = post('/v1/chat/completions', $cases[0][4]);
my $h = $r->{headers};

is($r->{status}, 200, 'chat status');
is($h->{'x-tb-prompt'}, 9, 'chat prompt tokens');
is($h->{'x-tb-reserved'}, 9 + 16384, 'chat reserved is max_output');
is($h->{'x-tb-output'}, 16384, 'chat output tokens');
is($h->{'x-tb-model'}, 'gpt-4o', 'chat model');
is($h->{'x-tb-method'}, 'exact', 'chat count method');
is($h->{'x-tb-status'}, 'PASSED', 'chat status variable');
is($h->{'x-tb-format'}, 'chat', 'chat format');
is($reqs->[0]{body}, $cases[0][4], 'chat body forwarded as sent');

my $hello = '"messages":[{"role":"user","content":"Hello!"}]';

($r) = post('/v1/chat/completions',
    qq({"model":"gpt-4o","max_tokens":100,$hello}));
is($r->{headers}{'x-tb-reserved'}, 109, 'reserved with max_tokens');

($r) = post('/v1/chat/completions',
    qq({"model":"gpt-4o","max_completion_tokens":50,$hello}));
is($r->{headers}{'x-tb-reserved'}, 59, 'reserved with max_completion_tokens');

($r) = post('/v1/chat/completions',
    qq({"model":"gpt-4o","max_tokens":100,"max_completion_tokens":50,$hello}));
is($r->{headers}{'x-tb-reserved'}, 59,
    'max_completion_tokens before max_tokens');

($r) = post('/v1/chat/completions',
    qq({"model":"gpt-4o","max_tokens":10,"n":3,$hello}));
is($r->{headers}{'x-tb-reserved'}, 39, 'reserved times n');
is($r->{headers}{'x-tb-output'}, 30, 'output times n');

($r) = post('/v1/chat/completions',
    qq({"model":"gpt-4o","max_tokens":0,$hello}));
is($r->{headers}{'x-tb-reserved'}, 9, 'reserved with max_tokens 0');

($r) = post('/v1/chat/completions',
    qq({"model":"gpt-4o","max_tokens":null,$hello}));
is($r->{headers}{'x-tb-reserved'}, 9 + 16384, 'max_tokens null');

($r) = post('/v1/chat/completions',
    qq({"model":"gpt-4o-2024-08-06",$hello}));
is($r->{headers}{'x-tb-model'}, 'gpt-4o-2024-08-06',
    'model variable is the name asked for');

# token_budget_reserve_output

($r) = post('/reserve/chat/completions', qq({"model":"gpt-4o",$hello}));
is($r->{headers}{'x-tb-reserved'}, 509, 'reserve_output');

($r) = post('/reserve/chat/completions',
    qq({"model":"gpt-4o","max_tokens":7,$hello}));
is($r->{headers}{'x-tb-reserved'}, 16, 'max_tokens before reserve_output');

($r, $reqs) = post('/custom/', $cases[0][4]);
is($r->{headers}{'x-tb-format'}, 'chat', 'format by directive variable');
is($reqs->[0]{path}, '/v1/chat/completions', 'format by directive path');

# completions

($r) = post('/v1/completions', '{"model":"instruct","prompt":"Once upon a time"}');
$h = $r->{headers};
is($h->{'x-tb-format'}, 'completions', 'completions format');
is($h->{'x-tb-reserved'}, 4 + 256, 'completions reserved');
is($h->{'x-tb-method'}, 'exact', 'completions method');

($r) = post('/v1/completions',
    '{"model":"instruct","prompt":"Once upon a time","max_tokens":10,'
    . '"best_of":3}');
is($r->{headers}{'x-tb-reserved'}, 34, 'completions reserved times best_of');

($r) = post('/v1/completions',
    '{"model":"instruct","prompt":"Once upon a time","max_tokens":10,'
    . '"n":2,"best_of":3}');
is($r->{headers}{'x-tb-reserved'}, 34, 'best_of over n');

# embeddings reserve nothing

($r) = post('/v1/embeddings', '{"model":"embed","input":[1,2,3,4]}');
$h = $r->{headers};
is($h->{'x-tb-format'}, 'embeddings', 'embeddings format');
is($h->{'x-tb-reserved'}, 4, 'embeddings reserved');
is($h->{'x-tb-output'}, 0, 'embeddings output');
is($h->{'x-tb-status'}, 'PASSED', 'embeddings status');

# responses

($r) = post('/v1/responses',
    '{"model":"gpt-4o","input":"Tell me a joke.","max_output_tokens":20}');
$h = $r->{headers};
is($h->{'x-tb-format'}, 'responses', 'responses format');
is($h->{'x-tb-reserved'}, 31, 'responses reserved with max_output_tokens');

($r) = post('/v1/responses',
    '{"model":"gpt-4o","input":"Tell me a joke.","max_tokens":20}');
is($r->{headers}{'x-tb-reserved'}, 11 + 16384,
    'responses ignore max_tokens');

# anthropic

my $anthropic = (grep { $_->[0] eq 'anthropic system string' } @cases)[0];

($r, $reqs) = post('/v1/messages', $anthropic->[4]);
$h = $r->{headers};
is($h->{'x-tb-format'}, 'anthropic', 'anthropic format');
is($h->{'x-tb-method'}, 'estimate', 'anthropic method');
is($h->{'x-tb-reserved'}, 30, 'anthropic reserved');
is($h->{'x-tb-model'}, 'claude-sonnet-4-5', 'anthropic model');
is($reqs->[0]{headers}{'x-token-count'}, 20, 'anthropic header');

($r) = post('/v1/messages', (grep { $_->[0] eq 'anthropic without estimate=' }
    @cases)[0][4]);
is($r->{headers}{'x-tb-method'}, 'estimate',
    'anthropic without estimate= is an estimate');

# images: OpenAI's published formula when the size is in a data URL, 85 at
# low detail, else token_budget_image_tokens as a bound

sub png {
    my ($w, $h) = @_;

    return encode_base64("\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR"
        . pack('NN', $w, $h) . "\x08\x06\0\0\0" . "\0" x 30, '');
}

sub image {
    my ($image) = @_;

    return '{"model":"gpt-4o","messages":[{"role":"user","content":['
        . '{"type":"text","text":"What is in this image?"},'
        . qq({"type":"image_url","image_url":$image}]}]});
}

my $png = png(1024, 1024);

($r) = post('/img/chat/completions',
    image('{"url":"https://example.com/a.png"}'));
is($r->{headers}{'x-tb-prompt'}, 13 + 100, 'image url, bound');
is($r->{headers}{'x-tb-method'}, 'image_bound', 'image url, method');

($r) = post('/img/chat/completions', image('"https://example.com/a.png"'));
is($r->{headers}{'x-tb-prompt'}, 13 + 100, 'image url string, bound');

($r) = post('/v1/chat/completions',
    image('{"url":"https://example.com/a.png"}'));
is($r->{headers}{'x-tb-prompt'}, 13 + 1600, 'image url, default bound');

($r) = post('/img/chat/completions',
    image('{"url":"https://example.com/a.png","detail":"low"}'));
is($r->{headers}{'x-tb-prompt'}, 13 + 85, 'image, low detail');
is($r->{headers}{'x-tb-method'}, 'exact', 'image, low detail, method');

($r) = post('/img/chat/completions',
    image(qq({"url":"data:image/png;base64,$png"})));
is($r->{headers}{'x-tb-prompt'}, 13 + 4 * 170 + 85,
    'image, 1024 x 1024 data url');
is($r->{headers}{'x-tb-method'}, 'exact', 'image, data url, method');

($r) = post('/img/chat/completions',
    image(qq({"url":"data:image/png;base64,@{[ png(4096, 1024) ]}"})));
is($r->{headers}{'x-tb-prompt'}, 13 + 4 * 170 + 85,
    'image, 4096 x 1024 data url');

($r) = post('/img/chat/completions',
    image('{"url":"data:image/png;base64,AAAA"}'));
is($r->{headers}{'x-tb-method'}, 'image_bound', 'image, unreadable data url');

($r) = post('/img/messages', '{"model":"plain-claude","max_tokens":5,'
    . '"messages":[{"role":"user","content":[{"type":"image","source":'
    . '{"type":"base64","media_type":"image/png","data":"'
    . png(200, 200) . '"}},{"type":"text","text":"Hello!"}]}]}');
is($r->{headers}{'x-tb-prompt'}, 3 + 1 + 2 + 54,
    'anthropic image, 200 x 200');

# token_budget_header: another name, or none; a client's header of that
# name is replaced, other headers are the client's business

($r, $reqs) = post('/named/chat/completions', $cases[0][4],
    'X-Prompt-Tokens' => 1, 'X-Token-Count' => 2);
is($reqs->[0] && $reqs->[0]{headers}{'x-prompt-tokens'}, 9, 'header name');
is($reqs->[0] && $reqs->[0]{headers}{'x-token-count'}, 2,
    'header name, the default left alone');

($r, $reqs) = post('/noheader/chat/completions', $cases[0][4]);
ok($reqs->[0] && !exists $reqs->[0]{headers}{'x-token-count'},
    'header off');
is($r->{headers}{'x-tb-prompt'}, 9, 'header off, still counted');

# not counted: no variables

$r = http_get('/v1/models');
ok(!exists $r->{headers}{'x-tb-status'}, 'get, no status');
ok(!exists $r->{headers}{'x-tb-prompt'}, 'get, no prompt tokens');

($r, $reqs) = post('/v1/files', '{"purpose":"batch"}');
ok(!exists $r->{headers}{'x-tb-status'}, 'other post, no status');
ok(!exists $reqs->[0]{headers}{'x-token-count'}, 'other post, no header');

# the expected counts again, from the tiktoken npm package

SKIP: {
    my $gen = $t->root() . '/t/gen';

    skip 'no t/gen/node_modules/tiktoken', 1
        unless -d "$gen/node_modules/tiktoken";

    my ($fh, $file) = tempfile(DIR => $t->testdir());
    print $fh TBTest::json_encode([ map {
        [ $_->[2], $_->[3], Encode::decode_utf8($_->[4]), $_->[6] // 0 ]
    } @cases ]);
    close $fh;

    my $node = $ENV{TEST_NODE} || 'node';
    my $out = `'$node' '$gen/count.js' < '$file'`;

    is_deeply(eval { TBTest::json_decode($out) } // $out,
        [ map { $_->[5] } @cases ], 'expectations by tiktoken');
}

###############################################################################

#!/usr/bin/perl

# (C) The token budget authors

# Tests for the prompt count: every request body of t/corpus/bodies goes
# through nginx with the module, models.conf and both encodings loaded, and
# the count the upstream receives in X-Token-Count must be the one
# t/gen/bodies.js computed with the tiktoken npm package and the published
# recipes (t/corpus/bodies/expected.txt).

use strict;
use warnings;

use FindBin;
use lib "$FindBin::Bin/lib";

use Test::More;
use TBTest;

###############################################################################

my $dir = "$FindBin::Bin/corpus/bodies";

open my $fh, '<', "$dir/expected.txt" or die "cannot open expected.txt: $!\n";
my %expected = map { /^(\S+) (\d+)$/ or die "bad line: $_"; ($1, $2) }
    grep { /\S/ } <$fh>;
close $fh;

opendir my $dh, $dir or die "cannot open $dir: $!\n";
my @files = sort grep { /\.json\z/ } readdir $dh;
closedir $dh;

my %paths = (
    chat => '/v1/chat/completions',
    completions => '/v1/completions',
    embeddings => '/v1/embeddings',
    responses => '/v1/responses',
    anthropic => '/v1/messages',
);

# how each count was made: an image given by URL is not sized, counts the
# bound; Claude's counts are estimates

my %methods = ('chat-images-gpt-4o.json' => 'image_bound');

my $t = TBTest->new()->write_conf(<<'EOF')->run();

%%TEST_GLOBALS%%

events {
}

http {
    %%TEST_GLOBALS_HTTP%%

    token_budget_encoding cl100k_base %%DATADIR%%/cl100k_base.tiktoken;
    token_budget_encoding o200k_base %%DATADIR%%/o200k_base.tiktoken;

    include %%DATADIR%%/models.conf;

    server {
        listen 127.0.0.1:%%PORT_8080%%;
        server_name localhost;

        location /v1/ {
            token_budget on;

            add_header X-TB-Status $token_budget_status always;
            add_header X-TB-Method $token_budget_count_method always;

            proxy_pass http://%%UPSTREAM%%;
        }
    }
}

EOF

$t->plan(2 + 3 * @files);

###############################################################################

is(join(' ', @files), join(' ', sort keys %expected),
    'a count for every body, a body for every count');

for my $file (@files) {
    my ($kind) = $file =~ /^([a-z]+)-/;
    my $path = $paths{$kind // ''} or die "$file: no endpoint\n";

    my $method = $methods{$file}
        // ($kind eq 'anthropic' ? 'estimate' : 'exact');

    open my $bh, '<:raw', "$dir/$file" or die "cannot open $file: $!\n";
    my $body = do { local $/; <$bh> };
    close $bh;

    $t->upstream_reset();

    my $r = $t->http_post($path, $body);

    is($r->{status}, 200, "$file passed")
        or diag("$r->{headers}{'x-tb-status'}: $r->{body}");

    my $reqs = $t->upstream_requests();
    my $count = @$reqs ? $reqs->[-1]{headers}{'x-token-count'} : undef;

    is($count, $expected{$file}, "$file count");
    is($r->{headers}{'x-tb-method'}, $method, "$file method");
}

# the cookbook's request as published, without max_tokens: OpenAI answers
# it, the output is what room the context leaves

{
    open my $bh, '<:raw', "$dir/chat-cookbook-tools-gpt-4.json" or die;
    my $body = TBTest::json_decode(do { local $/; <$bh> });
    close $bh;

    delete $body->{max_tokens};

    my $r = $t->http_post('/v1/chat/completions', $body);
    is($r->{status}, 200, 'gpt-4 without max_tokens passed');
}

###############################################################################

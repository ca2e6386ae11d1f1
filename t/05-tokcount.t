#!/usr/bin/perl

# (C) The token budget authors

# Tests of tokcount, the command line tool: counts, ids, encodings by name
# and by model, several files, the data directory, and its errors.

use strict;
use warnings;

use FindBin;
use File::Temp qw(tempdir);
use Test::More;

my $root = "$FindBin::Bin/..";
my $tc = "$root/build/tokcount";

plan(skip_all => 'build/tokcount is not built') unless -x $tc;
plan(tests => 22);

my $dir = tempdir(CLEANUP => 1);

sub put {
    my ($name, $text) = @_;

    open my $fh, '>:raw', "$dir/$name" or die "$name: $!";
    print $fh $text;
    close $fh;

    return "$dir/$name";
}

sub run {
    my ($cmd) = @_;

    my $out = `$cmd 2>$dir/stderr`;
    my $rc = $? >> 8;

    open my $fh, '<', "$dir/stderr" or die;
    my $err = do { local $/; <$fh> };
    close $fh;

    return ($out, $rc, $err);
}

my $hello = put('hello.txt', 'Hello, world');
my $xml = put('xml.txt', 'XMLHttpRequest');

# one input: just the number; ids as tiktoken gives them

my ($out, $rc, $err) = run("$tc -e cl100k_base $hello");
is($out, "3\n", 'one file, the count');
is($rc, 0, 'one file, exit 0');

($out) = run("$tc -e cl100k_base --ids $hello");
is($out, "9906 11 1917\n", 'ids');

($out) = run("printf 'Hello, world' | $tc -e cl100k_base");
is($out, "3\n", 'standard input');

($out) = run("printf 'Hello, world' | $tc -e cl100k_base -");
is($out, "3\n", 'standard input as -');

# the encodings differ where o200k splits at a case change (the ids are
# those of the tiktoken npm package)

($out) = run("$tc -e cl100k_base --ids $xml");
is($out, "10833 27459\n", 'cl100k_base ids');

($out) = run("$tc -e o200k_base --ids $xml");
is($out, "13836 4682 2303\n", 'o200k_base ids');

($out) = run("$tc $xml");
is($out, "3\n", 'o200k_base is the default');

# by model, as tiktoken's encoding_for_model

($out) = run("$tc -m gpt-4o-2024-08-06 --ids $xml");
is($out, "13836 4682 2303\n", 'model gpt-4o-..., o200k_base');

($out) = run("$tc -m gpt-4-0613 --ids $xml");
is($out, "10833 27459\n", 'model gpt-4-..., cl100k_base');

($out) = run("$tc -m gpt-3.5-turbo --ids $hello");
is($out, "9906 11 1917\n", 'model gpt-3.5-turbo, cl100k_base');

($out, $rc) = run("$tc -m text-davinci-003 $hello");
is($rc, 0, 'model text-davinci-003, p50k_base');

# several files: COUNT<TAB>FILE

($out) = run("$tc -e cl100k_base $hello $xml");
is($out, "3\t$hello\n2\t$xml\n", 'several files');

# the data directory from a flag, from the environment

($out) = run("$tc -d $root/data -e cl100k_base $hello");
is($out, "3\n", 'data directory flag');

($out) = run("TOKCOUNT_DATA=$root/data $tc -e cl100k_base $hello");
is($out, "3\n", 'data directory from the environment');

# errors: one line, a non-zero exit

($out, $rc, $err) = run("$tc -e cl100k_base $dir/missing.txt");
ok($rc != 0 && $err =~ /^tokcount: cannot open ".*missing.txt": .*\n\z/,
    'missing file');

($out, $rc, $err) = run("$tc -e cl999k $hello");
ok($rc != 0 && $err eq "tokcount: unknown encoding \"cl999k\"\n",
    'unknown encoding');

($out, $rc, $err) = run("$tc -m no-such-model $hello");
ok($rc != 0 && $err eq "tokcount: unknown model \"no-such-model\"\n",
    'unknown model');

my $bad = tempdir(CLEANUP => 1);
put('x', '');
open my $fh, '>', "$bad/cl100k_base.tiktoken" or die;
print $fh "not base64 at all\n";
close $fh;

($out, $rc, $err) = run("$tc -d $bad -e cl100k_base $hello");
ok($rc != 0 && $err =~ /^tokcount: invalid vocabulary line 1\n\z/,
    'corrupt vocabulary');

open $fh, '>', "$bad/o200k_base.tiktoken" or die;
print $fh "QQ== 0\n";
close $fh;

($out, $rc, $err) = run("$tc -d $bad -e o200k_base $hello");
ok($rc != 0 && $err =~ /^tokcount: vocabulary has 1 tokens, too few\n\z/,
    'truncated vocabulary');

($out, $rc, $err) = run("$tc -d $dir -e cl100k_base $hello");
ok($rc != 0 && $err =~ /^tokcount: cannot open .*cl100k_base.tiktoken/,
    'no vocabulary in the data directory');

($out, $rc, $err) = run("$tc --bogus $hello");
ok($rc != 0 && $err =~ /^tokcount: unknown option "--bogus"/,
    'unknown option');

#!/bin/sh

# Copyright (C) The token budget authors
#
# The tokenizer benchmark, "make bench": generates the inputs in
# build/bench/, measures build/tk_bench and the official tiktoken npm
# package (t/gen/bench.js) on them, checks that both count the same tokens,
# and prints Markdown tables for the README.
#
# Inputs, about 1 MB each, made by repeating the corpus in t/corpus:
#   english       english.txt
#   code          code.c, script.py, script.sh
#   cjk           zh.txt, ja.txt, ko.txt
#   multilingual  mixed.txt, ru.txt, ar.txt, he.txt, emoji.txt
# and pathological ones of exactly 1 MiB, each a single long piece or
# many short ones: "a" repeated, base64 of pseudo-random bytes on one line,
# one emoji repeated, spaces, pseudo-random digits, pseudo-random lowercase
# letters.  tiktoken is quadratic in the length of a piece, so it is given
# only their first 16 KiB and 64 KiB, and its figures are for those.
#
# Times are processor time of the process measured, so that other load
# disturbs them less, of the median call after one to warm up.  Set
# BENCH_ENCODINGS to measure other encodings and BENCH_NODE=no to skip
# tiktoken.  Exits with 1 on a count mismatch.

set -e

cd "$(dirname "$0")/../.."

B=build/bench
C=t/corpus
DATA=${DATADIR:-data}
ENCODINGS=${BENCH_ENCODINGS:-cl100k_base o200k_base}
MIB=1048576

NORMAL="english code cjk multilingual"
PATHO="a base64 emoji spaces digits letters"

make build/tk_bench build/tokcount >&2

mkdir -p $B


# repeat FILE TIMES OUT: OUT is FILE repeated, by doubling

repeat() {
    n=$2
    cp "$1" "$3.p"
    : > "$3"

    while [ "$n" -gt 0 ]; do
        if [ $((n % 2)) -eq 1 ]; then
            cat "$3.p" >> "$3"
        fi

        n=$((n / 2))

        if [ "$n" -gt 0 ]; then
            cat "$3.p" "$3.p" > "$3.q"
            mv "$3.q" "$3.p"
        fi
    done

    rm -f "$3.p"
}


# corpus NAME FILE...: the files repeated to at least 1 MiB, whole

corpus() {
    name=$1
    shift
    cat "$@" > $B/unit
    size=$(wc -c < $B/unit)
    repeat $B/unit $(((MIB + size - 1) / size)) $B/$name
    rm -f $B/unit
}


# one STRING BYTES NAME: STRING repeated to exactly 1 MiB

one() {
    printf "$1" > $B/unit
    repeat $B/unit $((MIB / $2)) $B/$3
    rm -f $B/unit
}


# random ALPHABET BYTES NAME: 1 MiB of "minimal standard" pseudo-random
# characters of ALPHABET, or of bytes when ALPHABET is empty

random() {
    LC_ALL=C awk -v alphabet="$1" -v n="$2" 'BEGIN {
        x = 1; s = ""; k = length(alphabet)
        for (i = 0; i < n; i++) {
            x = (x * 48271) % 2147483647
            if (k) {
                s = s substr(alphabet, int(x * k / 2147483647) + 1, 1)
            } else {
                s = s sprintf("%c", int(x * 256 / 2147483647))
            }
            if (length(s) >= 4096) { printf "%s", s; s = "" }
        }
        printf "%s", s
    }' > $B/$3
}


echo "generating inputs in $B" >&2

corpus english $C/english.txt
corpus code $C/code.c $C/script.py $C/script.sh
corpus cjk $C/zh.txt $C/ja.txt $C/ko.txt
corpus multilingual $C/mixed.txt $C/ru.txt $C/ar.txt $C/he.txt $C/emoji.txt

one a 1 a
one '\360\237\231\202' 4 emoji
one ' ' 1 spaces
random "" $((MIB * 3 / 4)) bytes
base64 -w 0 $B/bytes > $B/base64
rm -f $B/bytes
random 0123456789 $MIB digits
random abcdefghijklmnopqrstuvwxyz $MIB letters

for p in $PATHO; do
    head -c 16384 $B/$p > $B/$p-16k
    head -c 65536 $B/$p > $B/$p-64k
done


node=yes

if [ "$BENCH_NODE" = no ] || ! command -v node > /dev/null; then
    echo "bench: no node, tiktoken is not measured" >&2
    node=no

elif [ ! -d t/gen/node_modules/tiktoken ]; then
    (cd t/gen && npm ci --no-audit --no-fund) >&2
fi


for e in $ENCODINGS; do
    args=
    for f in $NORMAL $PATHO; do
        args="$args $f=$B/$f"
    done

    echo "tk_bench $e" >&2
    build/tk_bench $DATA $e $args > $B/ours-$e

    : > $B/slices-$e
    for p in $PATHO; do
        for s in 16k 64k; do
            n=$(build/tokcount -e $e -d $DATA < $B/$p-$s)
            echo "$e $p-$s $n" >> $B/slices-$e
        done
    done

    : > $B/tiktoken-$e
    if [ $node = yes ]; then
        args=
        for f in $NORMAL; do
            args="$args $f=$B/$f"
        done
        for p in $PATHO; do
            args="$args $p-16k=$B/$p-16k $p-64k=$B/$p-64k"
        done

        echo "tiktoken $e" >&2
        node t/gen/bench.js $e $args > $B/tiktoken-$e
    fi
done


# the tables, and the count check

status=0

for e in $ENCODINGS; do
    sed 's/^/tk /' $B/ours-$e
    sed 's/^/slice /' $B/slices-$e
    sed 's/^/tiktoken /' $B/tiktoken-$e
done | awk -v normal="$NORMAL" -v patho="$PATHO" -v encs="$ENCODINGS" '

function mbs(v) {
    return v >= 100 ? sprintf("%.0f", v) \
           : v >= 1 ? sprintf("%.1f", v) : sprintf("%.3f", v)
}

function ms(v) {
    return v >= 100 ? sprintf("%.0f", v) : sprintf("%.1f", v)
}

# tk_bench: "ENC load 12.3 ms, 4.5 MB", then "ENC NAME BYTES TOKENS MB/s
# tokens/s"; tokcount of the slices: "ENC NAME TOKENS"; bench.js: "ENC load
# MS", then "ENC NAME BYTES TOKENS MB/s MS"

$1 == "tk" && $3 == "load" {
    load[$2] = $4; mem[$2] = $6
    next
}

$1 == "tk" {
    bytes[$2, $3] = $4; tokens[$2, $3] = $5; speed[$2, $3] = $6
    tps[$2, $3] = $7
    next
}

$1 == "slice" {
    tokens[$2, $3] = $4
    next
}

$1 == "tiktoken" && $3 == "load" {
    tload[$2] = $4
    next
}

$1 == "tiktoken" {
    tt[$2, $3] = $5; tspeed[$2, $3] = $6; tms[$2, $3] = $7
    next
}

END {
    ne = split(encs, enc, " ")
    nn = split(normal, nor, " ")
    np = split(patho, pat, " ")
    bad = 0

    for (i = 1; i <= ne; i++) {
        e = enc[i]
        for (j = 1; j <= nn; j++) {
            check(e, nor[j])
        }
        for (j = 1; j <= np; j++) {
            check(e, pat[j] "-16k")
            check(e, pat[j] "-64k")
        }
    }

    print ""
    print "| class | encoding | tk MB/s | tiktoken MB/s | ratio " \
          "| tk tokens/s | tk ms, 1 MB input | tiktoken ms |"
    print "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"

    for (j = 1; j <= nn; j++) {
        for (i = 1; i <= ne; i++) {
            row(nor[j], enc[i], nor[j], "")
        }
    }

    for (j = 1; j <= np; j++) {
        for (i = 1; i <= ne; i++) {
            row(pat[j], enc[i], pat[j] "-64k", pat[j] "-16k")
        }
    }

    print ""
    print "| encoding | tk load ms | tk memory MB | tiktoken load ms |"
    print "| --- | ---: | ---: | ---: |"

    for (i = 1; i <= ne; i++) {
        e = enc[i]
        printf "| %s | %s | %s | %s |\n", e, load[e], mem[e], \
               (e in tload) ? tload[e] : "-"
    }

    print ""
    print "Normal inputs are about 1 MB; the pathological ones are 1 MiB for"
    print "tk, and tiktoken, quadratic on long pieces, is measured on their"
    print "first 16 KiB and 64 KiB only: its MB/s and ratio are those of the"
    print "64 KiB slice.  Processor time of each process, single thread,"
    print "the median call after one to warm up."

    exit bad
}

function check(e, name) {
    if (!((e, name) in tt)) {
        return
    }

    if (tokens[e, name] != tt[e, name]) {
        printf "MISMATCH: %s %s: tk counts %s tokens, tiktoken %s\n", \
               e, name, tokens[e, name], tt[e, name] > "/dev/stderr"
        bad = 1

    } else {
        printf "counts agree: %s %s: %s tokens\n", e, name, \
               tokens[e, name] > "/dev/stderr"
    }
}

function row(class, e, key, small,    ours, theirs, r, t) {
    ours = speed[e, class]

    if ((e, key) in tspeed) {
        theirs = mbs(tspeed[e, key])
        r = tspeed[e, key] > 0 ? sprintf("%.1fx", ours / tspeed[e, key]) \
                               : "-"
        if (small != "") {
            theirs = theirs " (64 KiB)"
            t = "16 KiB: " ms(tms[e, small]) ", 64 KiB: " ms(tms[e, key])
        } else {
            t = ms(tms[e, key])
        }

    } else {
        theirs = "-"; r = "-"; t = "-"
    }

    printf "| %s | %s | %s | %s | %s | %.3g M | %s | %s |\n", class, e, \
           mbs(ours), theirs, r, tps[e, class] / 1e6, \
           ms(bytes[e, class] / (ours * 1e6) * 1e3), t
}
' || status=$?

if [ $status -ne 0 ]; then
    echo >&2
    echo "bench: ***** MISMATCH: tk and tiktoken count differently *****" >&2
    exit 1
fi

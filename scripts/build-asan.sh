#!/bin/bash
# Token budget: build build/asan/sbin/nginx, nginx from Debian's source
# package with the module compiled in, under AddressSanitizer and
# UndefinedBehaviorSanitizer, for scripts/test-asan.sh.
#
# The .orig tarball comes from "apt-get source --download-only nginx"; a
# deb-src entry is added for the machine's Debian suites if there is none.
# Everything is cached: the download in build/asan/src, configure until
# "config", this script or the set of module sources changes, and the
# whole build until a module or tokenizer source is newer than the binary.

set -e

cd "$(dirname "$0")/.."

repo=$PWD
asan=$repo/build/asan
dl=$asan/src
nginx=$asan/sbin/nginx
log=$asan/configure.log

# The modules the tests may use, from Debian's set; --with-debug as in
# Debian's binary, so that the module's debug logging is compiled too.

modules="--with-debug
         --with-threads
         --with-http_ssl_module
         --with-http_v2_module
         --with-http_realip_module
         --with-http_auth_request_module
         --with-http_sub_module
         --with-http_stub_status_module"

# NGX_DEBUG_PALLOC makes every pool allocation a malloc() of its own,
# so that ASan sees the bounds of each one rather than of a 16k block.
#
# NGX_HAVE_NONALIGNED=0 makes the HTTP/2 code and the request parser
# handle bytes instead of 16 and 32 bit words at unaligned addresses,
# which UBSan's alignment check reports on the first HTTP/2 request
# ("store to misaligned address" in ngx_http_v2.c).
#
# -fno-sanitize=nonnull-attribute: nginx 1.22 passes the NULL data of
# empty strings to memcpy() with a length of 0 all over its core, for
# one in ngx_pstrdup() from ngx_init_cycle() on every "nginx -t".

ccopt="-fsanitize=address,undefined -fno-omit-frame-pointer"
ccopt="$ccopt -fno-sanitize-recover=undefined -fno-sanitize=nonnull-attribute"
ccopt="$ccopt -g -O1 -DNGX_DEBUG_PALLOC=1 -DNGX_HAVE_NONALIGNED=0"
ldopt="-fsanitize=address,undefined"

# configure runs test programs; a leak report would fail a feature test.

export ASAN_OPTIONS=detect_leaks=0

# nginx adds its own warning flags, -Werror among them, only when CFLAGS
# is not in the environment.
unset CFLAGS


sources=$(ls ngx_http_token_budget_module/*.[ch] 2>/dev/null || true)

if [ -x "$nginx" ] \
   && [ "$sources" = "$(cat "$asan/tb_sources" 2>/dev/null)" ] \
   && [ -z "$(find config scripts/build-asan.sh \
                   ngx_http_token_budget_module tokenizer \
                   -maxdepth 1 -type f -newer "$nginx" 2>/dev/null)" ]
then
    echo "build-asan: $nginx is up to date"
    exit 0
fi


# deb-src entries for the machine's Debian suites, next to its own
# entries, in a file of ours: deb822 stanzas from *.sources, one-line
# entries from *.list

add_deb_src() {
    local codename f out

    codename=$(. /etc/os-release && echo "$VERSION_CODENAME")

    if [ -z "$codename" ]; then
        echo "build-asan: no VERSION_CODENAME in /etc/os-release" >&2
        return 1
    fi

    if apt-get indextargets --no-release-info --format '$(RELEASE)' \
           'Identifier: Sources' 2>/dev/null | grep -qx "$codename"
    then
        return 0
    fi

    out=/etc/apt/sources.list.d/token-budget-deb-src
    echo "build-asan: adding deb-src entries for $codename in $out.*"

    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        [ "$f" = "$out.sources" ] && continue

        awk -v codename="$codename" '
            function flush(   i) {
                if (n > 0 && deb && suites != "") {
                    print "Types: deb-src"
                    print "Suites:" suites
                    for (i = 1; i <= n; i++) {
                        print line[i]
                    }
                    print ""
                }
                n = 0; deb = 0; suites = ""; keep = 0
            }

            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            /^[ \t]/ { if (keep) { line[++n] = $0 }; next }

            {
                i = index($0, ":")
                field = tolower(substr($0, 1, i - 1))
                value = substr($0, i + 1)
                keep = 0

                if (field == "types") {
                    if (value ~ /(^|[ \t])deb([ \t]|$)/) {
                        deb = 1
                    }
                    next
                }

                if (field == "suites") {
                    k = split(value, s, /[ \t]+/)
                    for (j = 1; j <= k; j++) {
                        if (s[j] == codename || s[j] == codename "-updates" \
                            || s[j] == codename "-security")
                        {
                            suites = suites " " s[j]
                        }
                    }
                    next
                }

                keep = 1
                line[++n] = $0
            }

            END { flush() }
        ' "$f"
    done > "$out.sources.tmp"

    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        [ "$f" = "$out.list" ] && continue

        # deb [options] uri suite components
        awk -v codename="$codename" '
            $1 == "deb" {
                i = 2
                if ($2 ~ /^\[/) {
                    while (i <= NF && $i !~ /\]$/) { i++ }
                    i++
                }
                s = $(i + 1)
                if (s == codename || s == codename "-updates" \
                    || s == codename "-security")
                {
                    sub(/^deb/, "deb-src")
                    print
                }
            }
        ' "$f"
    done > "$out.list.tmp"

    for f in "$out.sources" "$out.list"; do
        if [ -s "$f.tmp" ]; then
            mv "$f.tmp" "$f"
        else
            rm -f "$f.tmp"
        fi
    done

    if [ ! -f "$out.sources" ] && [ ! -f "$out.list" ]; then
        echo "build-asan: no Debian $codename entry in the apt sources" >&2
        return 1
    fi
}


download() {
    local tmp orig sum

    add_deb_src

    echo "build-asan: apt-get update"
    apt-get update -q >/dev/null

    # apt drops root to _apt for downloads and warns when _apt cannot
    # write the directory: download into one _apt owns, then move.

    tmp=$(mktemp -d /tmp/tb-asan-src.XXXXXX)
    trap 'rm -rf "$tmp"' EXIT

    if [ "$(id -u)" = 0 ] && id _apt >/dev/null 2>&1; then
        chown _apt "$tmp"
    fi

    echo "build-asan: apt-get source --download-only nginx"

    # Only the .orig tarball is needed.  apt checks every file against
    # the signed Sources index as it arrives; a mirror missing the .dsc
    # or the Debian diff fails the command but leaves a good tarball,
    # checked once more here against apt-cache showsrc.

    if ! (cd "$tmp" && apt-get source -q --download-only nginx); then
        orig=$(ls "$tmp"/nginx_*.orig.tar.gz 2>/dev/null | head -n 1)

        sum=$(sha256sum "$orig" 2>/dev/null | cut -d' ' -f1)

        if [ -z "$orig" ] \
           || ! apt-cache showsrc --only-source nginx \
                | grep -q "^ $sum [0-9]* ${orig##*/}\$"
        then
            echo "build-asan: apt-get source failed" >&2
            exit 1
        fi

        echo "build-asan: apt-get source failed for the other files," \
             "${orig##*/} is there and its sha256 matches"
    fi

    mkdir -p "$dl"
    mv "$tmp"/* "$dl"/
    rm -rf "$tmp"
    trap - EXIT
}


tarball=$(ls "$dl"/nginx_*.orig.tar.gz 2>/dev/null | sort -V | tail -n 1)

if [ -z "$tarball" ]; then
    download
    tarball=$(ls "$dl"/nginx_*.orig.tar.gz 2>/dev/null | sort -V | tail -n 1)

    if [ -z "$tarball" ]; then
        echo "build-asan: no nginx_*.orig.tar.gz in $dl" >&2
        exit 1
    fi
fi

version=${tarball##*/nginx_}
version=${version%.orig.tar.gz}
src=$asan/nginx-$version
builddir=$asan/objs

if [ ! -f "$src/configure" ]; then
    echo "build-asan: unpacking ${tarball##*/}"
    rm -rf "$src" "$builddir"
    mkdir -p "$src.tmp"
    tar -xzf "$tarball" -C "$src.tmp" --strip-components=1
    mv "$src.tmp" "$src"
fi

if [ ! -f "$builddir/Makefile" ] \
   || [ config -nt "$builddir/Makefile" ] \
   || [ scripts/build-asan.sh -nt "$builddir/Makefile" ] \
   || [ "$sources" != "$(cat "$asan/tb_sources" 2>/dev/null)" ]
then
    echo "build-asan: configure nginx $version (log in $log)"

    # shellcheck disable=SC2086
    if ! (cd "$src" && ./configure \
              --prefix="$asan" \
              --builddir="$builddir" \
              $modules \
              --with-cc-opt="$ccopt" \
              --with-ld-opt="$ldopt" \
              --add-module="$repo") > "$log" 2>&1
    then
        tail -n 20 "$log" >&2
        rm -f "$builddir/Makefile"
        exit 1
    fi

    echo "$sources" > "$asan/tb_sources"
fi

echo "build-asan: make"
make -s -j"$(nproc 2>/dev/null || echo 2)" -C "$src" >/dev/null
make -s -C "$src" install >/dev/null

# make install copies only when the binary changed; the cache check
# above compares against the binary's time

touch "$nginx"

echo "build-asan: $nginx"

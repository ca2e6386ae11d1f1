#!/bin/bash
# Token budget: build build/ngx_http_token_budget_module.so against
# Debian's nginx, from the headers and configure script in nginx-dev,
# the way Debian builds its own dynamic modules.  Re-runs configure only
# when "config" or the set of module sources changed.

set -e

cd "$(dirname "$0")/.."

repo=$PWD
src=${NGX_DEV_SRC:-/usr/share/nginx/src}
builddir=$repo/build/nginx
log=$repo/build/nginx-configure.log

if [ ! -f "$src/conf_flags" ]; then
    echo "build-module: $src/conf_flags not found;" \
         "install nginx-dev (sh scripts/deps.sh)" >&2
    exit 1
fi

# nginx adds its own warning flags, -Werror among them, only when CFLAGS
# is not in the environment.
unset CFLAGS

sources=$(ls ngx_http_token_budget_module/*.[ch] 2>/dev/null || true)

if [ ! -f "$builddir/Makefile" ] \
   || [ config -nt "$builddir/Makefile" ] \
   || [ "$sources" != "$(cat "$builddir/tb_sources" 2>/dev/null)" ]
then
    . "$src/conf_flags"

    ccopt="-fPIC"
    ldopt="-fPIC"
    if command -v dpkg-buildflags >/dev/null 2>&1; then
        ccopt="$(dpkg-buildflags --get CFLAGS) -fPIC"
        ccopt="$ccopt $(dpkg-buildflags --get CPPFLAGS)"
        ldopt="$(dpkg-buildflags --get LDFLAGS) -fPIC"
    fi

    mkdir -p build
    echo "build-module: configure (log in $log)"

    if ! (cd "$src" && ./configure \
              --with-cc-opt="$ccopt" --with-ld-opt="$ldopt" \
              "${NGX_CONF_FLAGS[@]}" \
              --add-dynamic-module="$repo" \
              --builddir="$builddir") > "$log" 2>&1
    then
        tail -n 20 "$log" >&2
        rm -f "$builddir/Makefile"
        exit 1
    fi

    echo "$sources" > "$builddir/tb_sources"
fi

make -s -j"$(nproc 2>/dev/null || echo 2)" \
     -f "$builddir/Makefile" -C "$src" modules

cp "$builddir/ngx_http_token_budget_module.so" \
   build/ngx_http_token_budget_module.so.tmp
mv build/ngx_http_token_budget_module.so.tmp \
   build/ngx_http_token_budget_module.so

echo "build-module: build/ngx_http_token_budget_module.so"

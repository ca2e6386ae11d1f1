# Token budget: what the benchmarks' nginx.conf files share, for the
# scripts to source; $repo is the repository, $dir the benchmark's
# directory.  Used in a here-document:
#
#   cat > "$dir/nginx.conf" <<END
#   $(bench_conf_head)
#       token_budget_zone ...
#   $(bench_conf_paths)
#       server { ... }
#   }
#   END


# the main context, and the http block up to the vocabularies and models

bench_conf_head() {
    cat <<END
load_module $repo/build/ngx_http_token_budget_module.so;
$( [ "$(id -u)" = 0 ] && echo "user root;" )
worker_processes 1;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 1024; }
http {
    token_budget_encoding o200k_base $repo/data/o200k_base.tiktoken;
    token_budget_encoding cl100k_base $repo/data/cl100k_base.tiktoken;
    include $repo/data/models.conf;
END
}


# no access log, and the temporary files in $dir

bench_conf_paths() {
    cat <<END
    access_log off;
    client_body_temp_path $dir/client_body_temp;
    proxy_temp_path $dir/proxy_temp;
    fastcgi_temp_path $dir/fastcgi_temp;
    uwsgi_temp_path $dir/uwsgi_temp;
    scgi_temp_path $dir/scgi_temp;
END
}

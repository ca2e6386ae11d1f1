package TBTest;

# (C) The token budget authors
#
# A small test harness in the shape of nginx-tests' Test::Nginx: each test
# file starts a real nginx from a heredoc configuration on free ports,
# optionally behind the mock upstream in t/upstream/server.js, and checks
# the error log for alerts and sanitizer reports when it ends, and the
# output of every nginx -t for sanitizer reports.
#
#     use FindBin;
#     use lib "$FindBin::Bin/lib";
#     use Test::More;
#     use TBTest;
#
#     my $t = TBTest->new()->write_conf(<<'EOF')->run()->plan(2);
#     %%TEST_GLOBALS%%
#     events {
#     }
#     http {
#         %%TEST_GLOBALS_HTTP%%
#         server {
#             listen 127.0.0.1:%%PORT_8080%%;
#             location / {
#                 token_budget on;
#                 proxy_pass http://%%UPSTREAM%%;
#             }
#         }
#     }
#     EOF
#
#     my $r = $t->http_post('/v1/chat/completions', { model => 'gpt-4o' });
#     is($r->{status}, 200, 'passed');
#
# Placeholders: %%PORT_name%% (a free port per name), %%TESTDIR%%,
# %%MODULE%% (the module's .so), %%DATADIR%% (the repository's data/),
# %%UPSTREAM%% (host:port of the mock upstream, started on demand),
# %%TEST_GLOBALS%% (main context: user, pid, error_log at info, and
# load_module unless TEST_NGINX_STATIC=1) and %%TEST_GLOBALS_HTTP%% (http
# context: access_log and every *_temp_path in the test directory).
#
# The HTTP helpers, nginx_t() and the upstream_*() helpers are methods,
# and are also exported as functions acting on the latest TBTest object:
# http_get('/') is $t->http_get('/').
#
# $t->plan(N) plans N tests plus the harness' two log checks.  A file
# whose configuration needs the module is skipped when the .so is missing,
# unless TBTest->new(module => 'optional').
#
# Environment: TEST_NGINX_BINARY (default /usr/sbin/nginx),
# TEST_NGINX_STATIC=1 (the module is compiled in: no load_module),
# TEST_NGINX_MODULE (path of the .so), TEST_NGINX_LEAVE=1 (keep the test
# directory), TEST_NGINX_VERBOSE=1 (diagnostics), TEST_NODE (node binary).

use strict;
use warnings;

use Test::More ();

use Exporter qw(import);

use Cwd qw(abs_path);
use Errno qw(EINTR);
use File::Basename qw(dirname);
use File::Path qw(make_path);
use File::Spec;
use File::Temp qw(tempdir);
use IO::Select;
use IO::Socket::INET;
use JSON::PP ();
use POSIX qw(WNOHANG);
use Socket qw(SOL_SOCKET SO_REUSEADDR);
use Time::HiRes qw(sleep time);


our $ROOT = abs_path(dirname(__FILE__) . '/../..');

our $NGINX = $ENV{TEST_NGINX_BINARY} || '/usr/sbin/nginx';
our $MODULE = $ENV{TEST_NGINX_MODULE}
              || "$ROOT/build/ngx_http_token_budget_module.so";
our $STATIC = $ENV{TEST_NGINX_STATIC} ? 1 : 0;
our $NODE = $ENV{TEST_NODE} || 'node';

our @EXPORT = qw(http_get http_post http_raw nginx_t upstream_requests
                 upstream_reset);
our @EXPORT_OK = qw(parse_response parse_responses json_decode json_encode);

my $json = JSON::PP->new->utf8->canonical;

my @instances;
my %used_ports;


sub new {
    my ($class, %opts) = @_;

    my $self = bless {
        pid => $$,
        module => $opts{module} || 'required',
        ports => {},
        conf => undef,
        nginx_pid => undef,
        upstream_pid => undef,
        upstream_port => undef,
        checked => 0,
        tests => 0,
        reports => [],
    }, $class;

    if (!-x $NGINX) {
        Test::More::plan(skip_all => "no nginx binary $NGINX");
    }

    if ($self->{module} eq 'required' && !$self->has_module()) {
        Test::More::plan(skip_all =>
            "module not built: $MODULE (run make module)");
    }

    $self->{dir} = tempdir('tbtest-XXXXXXXX', TMPDIR => 1,
                           CLEANUP => !$ENV{TEST_NGINX_LEAVE});
    chmod 0755, $self->{dir};

    Test::More::diag("test directory $self->{dir}")
        if $ENV{TEST_NGINX_LEAVE} || $ENV{TEST_NGINX_VERBOSE};

    push @instances, $self;

    return $self;
}


# the object a helper called as a function acts on

sub self_or_latest {
    my ($args) = @_;

    if (@$args && ref $args->[0] && UNIVERSAL::isa($args->[0], __PACKAGE__)) {
        return shift @$args;
    }

    die "no TBTest object\n" unless @instances;

    return $instances[-1];
}


sub has_module {
    return $STATIC || -f $MODULE;
}


sub testdir {
    return $_[0]->{dir};
}


sub datadir {
    return "$ROOT/data";
}


sub root {
    return $ROOT;
}


# free ports

sub port {
    my ($self, $name) = @_;

    $name = 8080 unless defined $name;

    return $self->{ports}{$name} //= free_port();
}


sub free_port {
    for (1 .. 100) {
        my $s = IO::Socket::INET->new(
            LocalAddr => '127.0.0.1',
            LocalPort => 0,
            Proto => 'tcp',
            Listen => 1,
        ) or die "cannot allocate a port: $!\n";

        my $port = $s->sockport();
        close $s;

        next if $used_ports{$port}++;

        return $port;
    }

    die "cannot allocate a port\n";
}


# configuration

sub expand {
    my ($self, $text, $dir) = @_;

    $dir = $self->{dir} unless defined $dir;

    $text =~ s/%%TEST_GLOBALS%%/$self->globals($dir)/ge;
    $text =~ s/%%TEST_GLOBALS_HTTP%%/$self->globals_http($dir)/ge;
    $text =~ s/%%PORT_(\w+)%%/$self->port($1)/ge;
    $text =~ s/%%UPSTREAM%%/'127.0.0.1:' . $self->upstream_port()/ge;
    $text =~ s/%%TESTDIR%%/$dir/g;
    $text =~ s/%%MODULE%%/$MODULE/g;
    $text =~ s/%%DATADIR%%/$self->datadir()/ge;

    return $text;
}


sub globals {
    my ($self, $dir) = @_;

    my $s = '';

    $s .= "user root;\n" if $> == 0;
    $s .= "pid $dir/nginx.pid;\n";
    $s .= "error_log $dir/error.log info;\n";

    if (!$STATIC && -f $MODULE) {
        $s .= "load_module $MODULE;\n";
    }

    return $s;
}


sub globals_http {
    my ($self, $dir) = @_;

    my $s = "access_log $dir/access.log;\n";

    for my $t (qw(client_body proxy fastcgi uwsgi scgi)) {
        $s .= "${t}_temp_path $dir/${t}_temp;\n";
    }

    return $s;
}


sub write_conf {
    my ($self, $template) = @_;

    $self->{conf} = $self->expand($template);
    $self->write_file('nginx.conf', $self->{conf});

    return $self;
}


sub write_file {
    my ($self, $name, $content) = @_;

    my $path = File::Spec->rel2abs($name, $self->{dir});

    make_path(dirname($path));

    open my $fh, '>', $path or die "cannot write $path: $!\n";
    binmode $fh;
    print $fh $content;
    close $fh;

    return $self;
}


sub read_file {
    my ($self, $name) = @_;

    my $path = File::Spec->rel2abs($name, $self->{dir});

    open my $fh, '<', $path or return '';
    binmode $fh;
    local $/;
    my $content = <$fh>;
    close $fh;

    return defined $content ? $content : '';
}


# nginx -t on a configuration, in a directory of its own; returns the
# exit code and everything nginx said, or a hash reference in scalar
# context

sub nginx_t {
    my $self = self_or_latest(\@_);
    my ($template) = @_;

    my $dir = "$self->{dir}/t-" . ++$self->{nginx_t};
    make_path("$dir/logs");

    my $conf = "$dir/nginx.conf";

    open my $fh, '>', $conf or die "cannot write $conf: $!\n";
    print $fh $self->expand($template, $dir);
    close $fh;

    my $out = `'$NGINX' -t -p '$dir/' -c '$conf' 2>&1`;
    my $rc = $? >> 8;

    my $log = "$dir/error.log";
    if (-f $log) {
        open my $lh, '<', $log or die "cannot read $log: $!\n";
        local $/;
        $out .= <$lh> // '';
        close $lh;
    }

    # a sanitizer report fails the checks at the end, whatever the test
    # expects of nginx -t

    push @{$self->{reports}}, $out =~ /^.*(?:Sanitizer|runtime error:).*$/mg;

    return wantarray ? ($rc, $out) : { rc => $rc, output => $out };
}


# processes

sub run {
    my ($self) = @_;

    die "write_conf() first\n" unless defined $self->{conf};

    $self->run_upstream() if $self->{conf_needs_upstream};

    my $dir = $self->{dir};

    # "logs" for the error log a binary opens before it reads the
    # configuration, unless it was built with --error-log-path=stderr

    for my $t (qw(logs client_body_temp proxy_temp fastcgi_temp uwsgi_temp
                  scgi_temp))
    {
        make_path("$dir/$t");
    }

    my $pid = fork();
    die "fork: $!\n" unless defined $pid;

    if ($pid == 0) {
        open STDIN, '<', '/dev/null';
        open STDOUT, '>>', "$dir/stderr.log";
        open STDERR, '>>', "$dir/stderr.log";
        exec($NGINX, '-p', "$dir/", '-c', "$dir/nginx.conf",
             '-g', 'daemon off;')
            or print STDERR "exec $NGINX: $!\n";
        POSIX::_exit(127);
    }

    $self->{nginx_pid} = $pid;

    my @ports = $self->listen_ports();

    for my $p (@ports) {
        my ($host, $port) = @$p;

        next if $host =~ /^\[/;

        if (!$self->wait_port($host, $port, $pid)) {
            my $err = $self->read_file('stderr.log')
                      . $self->read_file('error.log');
            $self->stop_nginx();
            die "cannot start nginx on $host:$port:\n$err";
        }
    }

    if (!@ports) {
        for (1 .. 100) {
            last if -f "$dir/nginx.pid";
            sleep 0.05;
        }
    }

    return $self;
}


# [host, port] of every listen directive of the configuration

sub listen_ports {
    my ($self) = @_;

    my @ports;

    while (($self->{conf} // '') =~ /(?:^|[;{])\s*listen\s+
                                     (?:(\[?[\w.:*]+\]?):)?(\d+)\b/gmx)
    {
        my $host = $1 // '127.0.0.1';
        $host = '127.0.0.1' if $host eq '*' || $host eq '0.0.0.0';

        push @ports, [$host, $2];
    }

    return @ports;
}


sub wait_port {
    my ($self, $host, $port, $pid) = @_;

    my $deadline = time() + 10;

    while (time() < $deadline) {
        return 0 if defined $pid && waitpid($pid, WNOHANG) == $pid;

        my $s = IO::Socket::INET->new(
            PeerAddr => $host,
            PeerPort => $port,
            Proto => 'tcp',
        );

        if ($s) {
            close $s;
            return 1;
        }

        sleep 0.05;
    }

    return 0;
}


sub reload {
    my ($self) = @_;

    my $pid = $self->{nginx_pid} or die "nginx is not running\n";

    my $count = () = $self->read_file('error.log') =~ /reconfiguring/g;

    kill 'HUP', $pid;

    for (1 .. 200) {
        my $n = () = $self->read_file('error.log') =~ /reconfiguring/g;
        last if $n > $count;
        sleep 0.05;
    }

    # let the old workers go and the new ones start

    sleep 0.3;

    return $self;
}


sub stop_pid {
    my ($pid, $first) = @_;

    return unless $pid;

    for my $signal ($first, 'TERM', 'KILL') {
        kill $signal, $pid;

        for (1 .. 100) {
            my $r = waitpid($pid, WNOHANG);
            return if $r == $pid || $r == -1;
            sleep 0.05;
        }
    }
}


sub stop_nginx {
    my ($self) = @_;

    stop_pid($self->{nginx_pid}, 'QUIT');
    $self->{nginx_pid} = undef;

    return $self;
}


sub stop {
    my ($self) = @_;

    $self->stop_nginx();

    stop_pid($self->{upstream_pid}, 'TERM');
    $self->{upstream_pid} = undef;

    return $self;
}


# the mock upstream

sub upstream_port {
    my ($self) = @_;

    $self->{conf_needs_upstream} = 1;

    return $self->{upstream_port} //= free_port();
}


sub run_upstream {
    my ($self) = @_;

    return $self if $self->{upstream_pid};

    my $port = $self->upstream_port();
    my $dir = $self->{dir};

    my $pid = fork();
    die "fork: $!\n" unless defined $pid;

    if ($pid == 0) {
        open STDIN, '<', '/dev/null';
        open STDOUT, '>>', "$dir/upstream.log";
        open STDERR, '>>', "$dir/upstream.log";
        exec($NODE, "$ROOT/t/upstream/server.js", $port)
            or print STDERR "exec $NODE: $!\n";
        POSIX::_exit(127);
    }

    $self->{upstream_pid} = $pid;

    if (!$self->wait_port('127.0.0.1', $port, $pid)) {
        my $log = $self->read_file('upstream.log');
        $self->stop();
        die "cannot start the mock upstream on port $port:\n$log";
    }

    return $self;
}


sub upstream_requests {
    my $self = self_or_latest(\@_);

    my $r = $self->http_get('/__requests', -port => $self->upstream_port());

    die "mock upstream: $r->{status}\n" unless $r->{status} == 200;

    return $json->decode($r->{body});
}


sub upstream_reset {
    my $self = self_or_latest(\@_);

    $self->http_post('/__reset', '', -port => $self->upstream_port());

    return $self;
}


# HTTP/1.x clients: options start with "-", everything else is a header
#
#   -port      a port name as in %%PORT_name%% or a number (default: the
#              first listen port of the configuration)
#   -timeout   seconds to wait for the response (default 10)
#   -chunked   send the body chunked, in pieces of this size
#   -version   "1.0" or "1.1" (default)
#
# In list context they return (status, headers, body), headers a hash
# reference with lowercased names; in scalar context a hash reference
# with status, headers, header_list, body and raw.

sub http_get {
    my $self = self_or_latest(\@_);
    my ($path, @args) = @_;

    return $self->http_request('GET', $path, undef, @args);
}


sub http_post {
    my $self = self_or_latest(\@_);
    my ($path, $body, @args) = @_;

    return $self->http_request('POST', $path, $body, @args);
}


sub http_request {
    my ($self, $method, $path, $body, @args) = @_;

    my (%opts, @headers);

    while (@args) {
        my ($name, $value) = splice @args, 0, 2;

        if ($name =~ /^-/) {
            $opts{$name} = $value;
        } else {
            push @headers, [$name, $value];
        }
    }

    my %have = map { lc($_->[0]) => 1 } @headers;

    if (ref $body) {
        $body = $json->encode($body);
    }

    my $version = $opts{-version} || '1.1';
    my $req = "$method $path HTTP/$version\r\n";

    $req .= "Host: localhost\r\n" unless $have{host};
    $req .= "Connection: close\r\n" unless $have{connection};

    if (defined $body) {
        $req .= "Content-Type: application/json\r\n"
            unless $have{'content-type'};

        if ($opts{-chunked}) {
            $req .= "Transfer-Encoding: chunked\r\n"
                unless $have{'transfer-encoding'};

        } elsif (!$have{'content-length'}) {
            $req .= "Content-Length: " . length($body) . "\r\n";
        }
    }

    $req .= "$_->[0]: $_->[1]\r\n" for @headers;
    $req .= "\r\n";

    if (defined $body) {
        if ($opts{-chunked}) {
            my $size = $opts{-chunked};
            for (my $i = 0; $i < length($body); $i += $size) {
                my $piece = substr($body, $i, $size);
                $req .= sprintf("%x\r\n%s\r\n", length($piece), $piece);
            }
            $req .= "0\r\n\r\n";

        } else {
            $req .= $body;
        }
    }

    my $raw = $self->http_raw($req, %opts);
    my $r = parse_response($raw);

    return wantarray ? ($r->{status}, $r->{headers}, $r->{body}) : $r;
}


# sends bytes as they are: a string, or a reference to an array of pieces
# sent -delay seconds apart (default 0.1); returns all the bytes read
# until the server closes the connection or -timeout passes

sub http_raw {
    my $self = self_or_latest(\@_);
    my ($data, %opts) = @_;

    my $port = $self->resolve_port($opts{-port});
    my $timeout = $opts{-timeout} || 10;
    my $delay = $opts{-delay} // 0.1;

    my $s = IO::Socket::INET->new(
        PeerAddr => '127.0.0.1',
        PeerPort => $port,
        Proto => 'tcp',
        Timeout => $timeout,
    ) or die "cannot connect to 127.0.0.1:$port: $!\n";

    binmode $s;
    $s->autoflush(1);

    my @pieces = ref $data ? @$data : ($data);

    local $SIG{PIPE} = 'IGNORE';

    PIECE: for my $i (0 .. $#pieces) {
        sleep $delay if $i > 0 && $delay > 0;

        my $piece = $pieces[$i];

        while (length $piece) {
            my $n = syswrite($s, $piece);
            last PIECE unless defined $n;
            substr($piece, 0, $n, '');
        }
    }

    my $sel = IO::Select->new($s);
    my $deadline = time() + $timeout;
    my $raw = '';

    while (1) {
        my $left = $deadline - time();
        last if $left <= 0;

        my @ready = $sel->can_read($left);
        if (!@ready) {
            next if $! == EINTR;
            last;
        }

        my $n = sysread($s, my $buf, 65536);
        last unless $n;

        $raw .= $buf;
    }

    close $s;

    return $raw;
}


sub resolve_port {
    my ($self, $port) = @_;

    if (!defined $port) {
        my ($first) = $self->listen_ports()
            or die "no listen port in the configuration\n";

        return $first->[1];
    }

    return exists $self->{ports}{$port} ? $self->{ports}{$port} : $port;
}


sub url {
    my ($self, $path, $port) = @_;

    return 'http://127.0.0.1:' . $self->resolve_port($port) . $path;
}


# parses one HTTP/1.x response; in list context also returns the bytes
# after it (pipelined responses), see parse_responses()

sub parse_response {
    my ($raw) = @_;

    my $r = { status => 0, headers => {}, header_list => [], body => '',
              raw => $raw };

    my $end = index($raw, "\r\n\r\n");
    return wantarray ? ($r, '') : $r if $end < 0;

    my ($status_line, @lines) = split /\r\n/, substr($raw, 0, $end);

    if ($status_line =~ m{^HTTP/\d\.\d\s+(\d{3})}) {
        $r->{status} = $1;
    }

    for my $line (@lines) {
        my ($name, $value) = $line =~ /^([^:]+):\s*(.*?)\s*$/ or next;
        $name = lc $name;

        push @{$r->{header_list}}, [$name, $value];

        $r->{headers}{$name} = exists $r->{headers}{$name}
                               ? "$r->{headers}{$name}, $value" : $value;
    }

    my $rest = substr($raw, $end + 4);
    my $h = $r->{headers};

    if (($h->{'transfer-encoding'} // '') =~ /chunked/i) {
        my $body = '';

        while ($rest =~ s/^([0-9a-fA-F]+)[^\r\n]*\r\n//) {
            my $size = hex $1;

            if ($size == 0) {
                $rest =~ s/^(?:[^\r\n]+\r\n)*\r\n//;
                last;
            }

            $body .= substr($rest, 0, $size);
            $rest = length($rest) >= $size + 2
                    ? substr($rest, $size + 2) : '';
        }

        $r->{body} = $body;

    } elsif (defined $h->{'content-length'}) {
        $r->{body} = substr($rest, 0, $h->{'content-length'});
        $rest = length($rest) > $h->{'content-length'}
                ? substr($rest, $h->{'content-length'}) : '';

    } elsif ($r->{status} == 204 || $r->{status} == 304
             || $r->{status} < 200)
    {
        # no body

    } else {
        $r->{body} = $rest;
        $rest = '';
    }

    return wantarray ? ($r, $rest) : $r;
}


sub parse_responses {
    my ($raw) = @_;

    my @responses;

    while (length $raw) {
        my ($r, $rest) = parse_response($raw);
        last unless $r->{status};

        push @responses, $r;
        $raw = $rest;
    }

    return @responses;
}


# helpers for tests that speak JSON

sub json_decode {
    return $json->decode($_[0]);
}


sub json_encode {
    return $json->encode($_[0]);
}


# planning and the checks at the end

sub plan {
    my ($self, $n) = @_;

    Test::More::plan(tests => $n + 2);

    return $self;
}


sub done_testing {
    my ($self) = @_;

    $self->finish();
    Test::More::done_testing();
}


sub finish {
    my ($self) = @_;

    return if $self->{checked}++ || $self->{pid} != $$;

    $self->stop();

    my $log = $self->read_file('error.log') . $self->read_file('stderr.log');

    my @alerts = $log =~ /^.*\[(?:alert|emerg|crit)\].*$/mg;
    Test::More::is(join("\n", @alerts), '', 'no alerts');

    my @sanitizer = ($log =~ /^.*(?:Sanitizer|runtime error:).*$/mg,
                     @{$self->{reports}});
    Test::More::is(join("\n", @sanitizer), '', 'no sanitizer errors');
}


END {
    local $?;

    for my $t (@instances) {
        next if $t->{pid} != $$;

        my $tb = Test::More->builder();

        if ($tb->has_plan && $tb->has_plan ne 'no_plan'
            && $tb->has_plan ne 'skip_all' && !$t->{checked})
        {
            $t->finish();
        }

        $t->stop();
    }
}


1;

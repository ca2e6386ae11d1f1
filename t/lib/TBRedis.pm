package TBRedis;

# (C) The token budget authors
#
# A real redis-server for the tests that share budgets through Redis:
# started on a free port in its own directory, with the append-only file
# on (fsync always) so that a restart keeps what Redis had, and stopped,
# killed, paused and restarted on demand.  Also a few helpers: redis-cli
# calls, and many HTTP requests at once to several nginx hosts.
#
#     my $redis = TBRedis->new();          # skips the file without redis
#     my $redis = TBRedis->new(password => 'secret');
#     my $redis = TBRedis->new(tls => 1);  # its CA: $redis->ca()
#     $redis->cli('HGETALL', 'tb:{zone:key}');
#     $redis->crash(); $redis->start();    # SIGKILL, then start again
#     $redis->pause(); $redis->resume();   # SIGSTOP, SIGCONT
#
#     my @r = TBRedis::parallel(@requests);
#
# Each request: { port, uri, body (a reference), headers => [n, v, ...] };
# each result: { status, headers, body, elapsed }.

use strict;
use warnings;

use File::Temp qw(tempdir);
use IO::Select;
use IO::Socket::INET;
use POSIX qw(WNOHANG);
use Time::HiRes qw(sleep time);

use TBTest;


our $SERVER = $ENV{TEST_REDIS_SERVER} || '/usr/bin/redis-server';
our $CLI = $ENV{TEST_REDIS_CLI} || '/usr/bin/redis-cli';


sub new {
    my ($class, %opts) = @_;

    if (!-x $SERVER || !-x $CLI) {
        Test::More::plan(skip_all => "no redis-server or redis-cli");
    }

    my $self = bless {
        dir => tempdir('tbredis-XXXXXXXX', TMPDIR => 1,
                       CLEANUP => !$ENV{TEST_NGINX_LEAVE}),
        port => TBTest::free_port(),
        password => $opts{password},
        tls => $opts{tls},
        pid => undef,
        owner => $$,
    }, $class;

    $self->certificates() if $self->{tls};
    $self->start();

    return $self;
}


sub port { $_[0]{port} }


sub start {
    my ($self) = @_;

    my $pid = fork();
    die "fork: $!\n" unless defined $pid;

    if ($pid == 0) {
        open STDIN, '<', '/dev/null';
        open STDOUT, '>>', "$self->{dir}/redis.out";
        open STDERR, '>>', "$self->{dir}/redis.out";
        my @port = $self->{tls}
                   ? ('--port', 0, '--tls-port', $self->{port},
                      '--tls-cert-file', "$self->{dir}/server.pem",
                      '--tls-key-file', "$self->{dir}/server.key",
                      '--tls-ca-cert-file', "$self->{dir}/ca.pem",
                      '--tls-auth-clients', 'no')
                   : ('--port', $self->{port});

        exec($SERVER, @port, '--bind', '127.0.0.1',
             '--dir', $self->{dir}, '--save', '', '--appendonly', 'yes',
             '--appendfsync', 'always', '--logfile', 'redis.log',
             defined $self->{password}
             ? ('--requirepass', $self->{password}) : ())
            or print STDERR "exec $SERVER: $!\n";
        POSIX::_exit(127);
    }

    $self->{pid} = $pid;

    my $deadline = time() + 10;

    while (time() < $deadline) {
        die "redis-server exited\n" if waitpid($pid, WNOHANG) == $pid;

        my $pong = $self->cli('PING') // '';
        return $self if $pong eq 'PONG';

        sleep 0.05;
    }

    die "redis-server did not start\n";
}


sub stop {
    my ($self, $signal) = @_;

    my $pid = delete $self->{pid} or return;

    CORE::kill($signal || 'TERM', $pid);
    CORE::kill('CONT', $pid);

    for (1 .. 200) {
        return if waitpid($pid, WNOHANG) == $pid;
        sleep 0.05;
    }

    CORE::kill('KILL', $pid);
    waitpid($pid, 0);
}


sub crash { $_[0]->stop('KILL') }
sub pause { CORE::kill('STOP', $_[0]{pid}) }
sub resume { CORE::kill('CONT', $_[0]{pid}) }


# redis-cli's answer, a line per element; undef when it cannot connect

sub cli {
    my ($self, @args) = @_;

    open my $err, '>&', \*STDERR or die "dup: $!\n";
    open STDERR, '>', '/dev/null';
    my @auth = defined $self->{password}
               ? ('--no-auth-warning', '-a', $self->{password}) : ();

    push @auth, '--tls', '--cacert', "$self->{dir}/ca.pem", '--sni',
                'localhost'
        if $self->{tls};
    my $ok = open my $fh, '-|', $CLI, '-p', $self->{port}, @auth, '--raw',
                  @args;
    open STDERR, '>&', $err;
    die "cannot run $CLI: $!\n" unless $ok;
    local $/;
    my $out = <$fh>;
    close $fh;

    return undef if !defined $out || $out =~ /Could not connect/;

    $out =~ s/\n\z//;
    return $out;
}


# a CA, and a certificate for "localhost" it signed

sub certificates {
    my ($self) = @_;

    my $d = $self->{dir};

    open my $fh, '>', "$d/ext.cnf" or die "$d/ext.cnf: $!\n";
    print $fh "subjectAltName=DNS:localhost\n";
    close $fh;

    for my $cmd (
        "req -x509 -newkey rsa:2048 -nodes -keyout $d/ca.key -out $d/ca.pem"
        . " -days 2 -subj /CN=tbtest-ca",
        "req -newkey rsa:2048 -nodes -keyout $d/server.key"
        . " -out $d/server.csr -subj /CN=localhost",
        "x509 -req -in $d/server.csr -CA $d/ca.pem -CAkey $d/ca.key"
        . " -CAcreateserial -out $d/server.pem -days 2 -extfile $d/ext.cnf")
    {
        system("openssl $cmd >>$d/openssl.log 2>&1") == 0
            or die "openssl $cmd failed\n";
    }
}


sub ca { "$_[0]{dir}/ca.pem" }


# a budget subject's state in Redis

sub state {
    my ($self, $zone, $key) = @_;

    my %h = split /\n/, $self->cli('HGETALL', "tb:{$zone:$key}") // '';

    return { map { $_ => $h{$_} // 0 } qw(w p c r x) };
}


sub DESTROY {
    my ($self) = @_;

    $self->stop() if $self->{owner} == $$;
}


# many requests at once; returns when all are answered or after 30s

sub parallel {
    my (@reqs) = @_;

    my $sel = IO::Select->new();
    my %by;

    for my $q (@reqs) {
        my $body = ref $q->{body} ? TBTest::json_encode($q->{body})
                                  : $q->{body};
        my @h = @{$q->{headers} || []};
        my $req = "POST $q->{uri} HTTP/1.1\r\nHost: localhost\r\n"
            . "Connection: close\r\nContent-Type: application/json\r\n"
            . "Content-Length: " . length($body) . "\r\n";

        while (my ($n, $v) = splice @h, 0, 2) {
            $req .= "$n: $v\r\n";
        }

        my $s = IO::Socket::INET->new(PeerAddr => '127.0.0.1',
            PeerPort => $q->{port}, Proto => 'tcp')
            or die "cannot connect to $q->{port}: $!\n";

        $q->{start} = time();
        $q->{raw} = '';

        $s->autoflush(1);
        binmode $s;
        print $s $req . "\r\n" . $body;

        $sel->add($s);
        $by{fileno $s} = [$q, $s];
    }

    my $deadline = time() + 30;

    while ($sel->count() && time() < $deadline) {
        for my $s ($sel->can_read(0.05)) {
            my $q = $by{fileno $s}[0];
            my $n = sysread($s, my $buf, 65536);

            if ($n) {
                $q->{raw} .= $buf;
                next;
            }

            $q->{elapsed} = time() - $q->{start};
            $sel->remove($s);
            close $s;
        }
    }

    return map {
        my $r = TBTest::parse_response($_->{raw});
        $r->{elapsed} = $_->{elapsed} // 30;
        $r->{req} = $_;
        $r;
    } @reqs;
}


1;

# Token budget: the tokenizer, its CLI, tests and benchmark, and the
# nginx module built against Debian's nginx-dev.

CC ?= cc
CFLAGS ?= -O2 -g
TK_CFLAGS = -std=c99 -D_POSIX_C_SOURCE=200809L -W -Wall -Wextra -Werror \
	-Wpointer-arith -Wno-unused-parameter -Itokenizer
DATADIR ?= $(CURDIR)/data
PREFIX ?= /usr/local

TK_SRCS = tokenizer/tk_unicode.c tokenizer/tk_scan.c tokenizer/tk_bpe.c \
	tokenizer/tk_encoding.c tokenizer/tk_counter.c
TK_DEPS = tokenizer/tk.h tokenizer/tk_internal.h
TK_OBJS = $(TK_SRCS:tokenizer/%.c=build/tk/%.o)

all: build/tokcount build/ngx_http_token_budget_module.so

build/tk/%.o: tokenizer/%.c $(TK_DEPS)
	@mkdir -p build/tk
	$(CC) $(CFLAGS) $(TK_CFLAGS) -fPIC -c -o $@ $<

build/libtk.a: $(TK_OBJS)
	rm -f $@
	ar rcs $@ $(TK_OBJS)

build/tokcount: tokenizer/tokcount.c build/libtk.a $(TK_DEPS)
	$(CC) $(CFLAGS) $(TK_CFLAGS) \
		-DTK_DATADIR='"$(DATADIR)"' -DTK_INSTALL_DATADIR='"$(PREFIX)/share/token-budget"' \
		-o $@ tokenizer/tokcount.c build/libtk.a

build/tk_test: tokenizer/test/tk_test.c build/libtk.a $(TK_DEPS)
	$(CC) $(CFLAGS) $(TK_CFLAGS) -o $@ tokenizer/test/tk_test.c build/libtk.a

build/tk_bench: tokenizer/test/tk_bench.c build/libtk.a $(TK_DEPS)
	$(CC) -O2 -g $(TK_CFLAGS) -o $@ tokenizer/test/tk_bench.c build/libtk.a

build/tk_fuzz: tokenizer/test/tk_fuzz.c $(TK_SRCS) $(TK_DEPS)
	clang -g -O1 -fsanitize=fuzzer,address,undefined \
		-fno-sanitize-recover=all $(TK_CFLAGS) \
		-DTK_BT_TOKENS=4 -DTK_BT_SPAN=64 -DTK_BT_DEAD=4096 -o $@ \
		tokenizer/test/tk_fuzz.c $(TK_SRCS)

build/ngx_http_token_budget_module.so: config scripts/build-module.sh \
		$(wildcard ngx_http_token_budget_module/*.[ch]) $(TK_SRCS) $(TK_DEPS)
	bash scripts/build-module.sh

module: build/ngx_http_token_budget_module.so

tk-test: build/tk_test build/tokcount
	build/tk_test $(DATADIR)

fuzz: build/tk_fuzz
	sh tokenizer/test/fuzz.sh

bench: build/tk_bench
	sh tokenizer/test/bench.sh

test: all tk-test
	prove -r t/

install: build/tokcount
	install -D -m 755 build/tokcount $(DESTDIR)$(PREFIX)/bin/tokcount
	install -d $(DESTDIR)$(PREFIX)/share/token-budget
	install -m 644 data/*.tiktoken data/models.conf \
		$(DESTDIR)$(PREFIX)/share/token-budget/

clean:
	rm -rf build

.PHONY: all module tk-test fuzz bench test install clean

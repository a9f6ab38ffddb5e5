#!/usr/bin/env python3
"""Helpers for bench/run.sh (standard library only).

Subcommands:
  port                          print a free TCP port on 127.0.0.1
  genlayer PATH MIB             write MIB MiB of random bytes to PATH, print its sha256 digest
  genconfig PATH LAYER_DIGEST   write an image config JSON to PATH, print its sha256 digest
  manifest PATH CFG_DIGEST CFG_SIZE LAYER_DIGEST LAYER_SIZE
                                write a Docker schema2 manifest to PATH
  upstream-gets LOG OFFSET REPO DIGEST
                                from a docker-registry access log (lines after OFFSET), print
                                "<GETs with 200> <bytes sent by them> <HEADs>" for that blob
  load URL SECONDS CONNS ACCEPT bounded HTTP/1.1 keep-alive loader (fallback when wrk is
                                missing); prints "rps=<float> total=<n> non2xx=<n> errors=<n>"
  report RESULTS MARKDOWN_OUT   print the result table and write the markdown snippet
"""

import hashlib
import http.client
import json
import os
import re
import socket
import statistics
import sys
import threading
import time
import urllib.parse


def cmd_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    print(s.getsockname()[1])
    s.close()


def cmd_genlayer(path, mib):
    h = hashlib.sha256()
    chunk = 1 << 20
    with open(path, "wb") as f:
        for _ in range(int(mib)):
            b = os.urandom(chunk)
            h.update(b)
            f.write(b)
    print("sha256:" + h.hexdigest())


def cmd_genconfig(path, layer_digest):
    cfg = {
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "history": [{"created_by": "pullgate bench (random layer)"}],
    }
    data = json.dumps(cfg, separators=(",", ":")).encode()
    with open(path, "wb") as f:
        f.write(data)
    print("sha256:" + hashlib.sha256(data).hexdigest())


def cmd_manifest(path, cfg_digest, cfg_size, layer_digest, layer_size):
    m = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {
            "mediaType": "application/vnd.docker.container.image.v1+json",
            "size": int(cfg_size),
            "digest": cfg_digest,
        },
        "layers": [
            {
                "mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "size": int(layer_size),
                "digest": layer_digest,
            }
        ],
    }
    with open(path, "wb") as f:
        f.write(json.dumps(m, indent=3).encode())


def cmd_upstream_gets(log, offset, repo, digest):
    # Combined log format: ... "GET /v2/<repo>/blobs/<digest> HTTP/1.1" 200 <bytes> "ref" "ua"
    pat = re.compile(
        r'"(GET|HEAD) /v2/' + re.escape(repo) + r"/blobs/" + re.escape(digest)
        + r'(?:\?[^ "]*)? HTTP/[0-9.]+" (\d{3}) (\d+|-)'
    )
    gets = heads = 0
    sent = 0
    with open(log, "r", errors="replace") as f:
        for i, line in enumerate(f):
            if i < int(offset):
                continue
            m = pat.search(line)
            if not m:
                continue
            if m.group(1) == "HEAD":
                heads += 1
            elif m.group(2) == "200":
                gets += 1
                if m.group(3) != "-":
                    sent += int(m.group(3))
    print(gets, sent, heads)


def cmd_load(url, seconds, conns, accept):
    u = urllib.parse.urlsplit(url)
    path = u.path + ("?" + u.query if u.query else "")
    deadline = time.monotonic() + float(seconds)
    lock = threading.Lock()
    tot = {"ok": 0, "non2xx": 0, "errors": 0}

    def worker():
        ok = non2xx = errors = 0
        c = None
        while time.monotonic() < deadline:
            try:
                if c is None:
                    c = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
                c.request("GET", path, headers={"Accept": accept})
                r = c.getresponse()
                r.read()
                if 200 <= r.status < 300:
                    ok += 1
                else:
                    non2xx += 1
            except Exception:
                errors += 1
                c = None
        with lock:
            tot["ok"] += ok
            tot["non2xx"] += non2xx
            tot["errors"] += errors

    start = time.monotonic()
    ts = [threading.Thread(target=worker) for _ in range(int(conns))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout=float(seconds) + 30)
    elapsed = time.monotonic() - start
    total = tot["ok"] + tot["non2xx"]
    print(f"rps={total / elapsed:.1f} total={total} non2xx={tot['non2xx']} errors={tot['errors']}")


# ---------------------------------------------------------------------------------------------
# report


def cmd_sha_time(path, runs="3"):
    """Seconds to sha256 a file on one core (OpenSSL's hashlib, SHA extensions when the CPU
    has them, as pullgate's sha2 crate uses), best-of nothing: one figure per run."""
    import hashlib
    import time
    out = []
    for _ in range(int(runs)):
        h = hashlib.sha256()
        t0 = time.perf_counter()
        with open(path, "rb", buffering=0) as f:
            while True:
                b = f.read(1 << 20)
                if not b:
                    break
                h.update(b)
        out.append(f"{time.perf_counter() - t0:.3f}")
    print(" ".join(out))


def read_results(path):
    r = {}
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            if not line or "=" not in line:
                continue
            k, v = line.split("=", 1)
            r[k] = v
    return r


def floats(s):
    return [float(x) for x in s.split()] if s else []


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def fmt(x, nd=1):
    if x is None or x != x:
        return "n/a"
    return f"{x:.{nd}f}"


def cmd_report(results_path, md_out):
    r = read_results(results_path)
    size_mib = float(r["size_mib"])
    size_b = size_mib * 1024 * 1024

    rows = []  # (metric, pullgate, peer, direct, ratio, target, verdict)

    # 1. warm throughput
    pg_w = [size_mib / t for t in floats(r.get("warm_pg_s", "")) if t > 0]
    peer_w = [size_mib / t for t in floats(r.get("warm_peer_s", "")) if t > 0]
    pg_wm, peer_wm = med(pg_w), med(peer_w)
    ratio1 = pg_wm / peer_wm if peer_w and pg_w else float("nan")
    ok1 = ratio1 >= 1.5 and r.get("warm_ok") == "1"
    rows.append((
        f"1. Warm blob GET ({int(size_mib)} MiB), median of {len(pg_w)}, MiB/s",
        fmt(pg_wm), fmt(peer_wm), "", f"{fmt(ratio1, 2)}x pullgate/peer",
        ">= 1.5x", ok1,
    ))

    # 1b. 16 concurrent warm clients, aggregate; workers N vs 1
    agg_pg, agg_pg1, agg_peer = (med(floats(r.get(k, ""))) for k in ("agg_pg", "agg_pg1", "agg_peer"))
    nagg = r.get("agg_clients", "16")
    ratio_agg = agg_pg / agg_peer if agg_peer > 0 else float("nan")
    rows.append((
        f"1b. Warm, {nagg} concurrent clients, aggregate MiB/s (median of {len(floats(r.get('agg_pg', '')))})",
        fmt(agg_pg), fmt(agg_peer), "", f"{fmt(ratio_agg, 2)}x pullgate/peer", ">= 1.5x",
        ratio_agg >= 1.5,
    ))
    ratio_w = agg_pg / agg_pg1 if agg_pg1 > 0 else float("nan")
    rows.append((
        f"1c. Same load, pullgate workers = {r.get('pg_workers', '?')} vs workers = 1, MiB/s",
        f"{fmt(agg_pg)} (workers {r.get('pg_workers', '?')})", f"{fmt(agg_pg1)} (pullgate, workers 1)", "",
        f"{fmt(ratio_w, 2)}x N/1", "> 1x", ratio_w > 1.0,
    ))

    # 2. cold time, against the floor: max(direct, sha256 of the layer on one core)
    pg_c, peer_c, dir_c = (floats(r.get(k, "")) for k in ("cold_pg_s", "cold_peer_s", "cold_direct_s"))
    pg_cm, peer_cm, dir_cm = med(pg_c), med(peer_c), med(dir_c)
    sha_m = med(floats(r.get("cold_sha_s", "")))
    floor = max(dir_cm, sha_m) if sha_m == sha_m else dir_cm
    ratio2 = pg_cm / floor if pg_c and floor > 0 else float("nan")
    ratio2p = peer_cm / floor if peer_c and floor > 0 else float("nan")
    ok2 = ratio2 <= 1.15 and pg_cm <= peer_cm and r.get("cold_ok") == "1"
    rows.append((
        f"2. Cold blob GET, median of {len(pg_c)}, s",
        fmt(pg_cm, 3), fmt(peer_cm, 3), fmt(dir_cm, 3),
        f"{fmt(ratio2, 2)}x pullgate/floor (peer/floor {fmt(ratio2p, 2)}x)",
        "<= 1.15x floor, <= peer", ok2,
    ))
    rows.append((
        "2b. Cold floor: max(direct, sha256 of the layer on one core), s",
        fmt(floor, 3), "", f"direct {fmt(dir_cm, 3)}, sha256 {fmt(sha_m, 3)}", "", "(reference)", None,
    ))
    # 2c. What the cores allow: the direct GET's own CPU (the upstream sending, curl receiving)
    # plus one sha256 of the layer, spread over every core. A cache that did nothing but hash
    # could not finish sooner; above 1.15x the floor, the 1.15x target is out of reach here.
    ncpu = float(r.get("nproc", "nan"))
    dcpu_m = med(floats(r.get("cold_direct_cpu", "")))
    bound = max(floor, (dcpu_m + sha_m) / ncpu) if ncpu > 0 and dcpu_m == dcpu_m else float("nan")
    ratio2c = bound / floor if floor > 0 else float("nan")
    reach = "the 1.15x target is out of reach here" if ratio2c > 1.15 else "the 1.15x target is reachable"
    rows.append((
        f"2c. Cold bound on {r.get('nproc', '?')} cores: (direct GET's CPU + one sha256) / cores, s",
        fmt(bound, 3), "", f"direct CPU {fmt(dcpu_m, 3)} s", f"{fmt(ratio2c, 2)}x bound/floor: {reach}",
        "(reference)", None,
    ))

    # 3. upstream transfers for N concurrent cold pulls
    n = r.get("conc_n", "8")
    pg_g, peer_g = int(r.get("conc_pg_gets", "-1")), int(r.get("conc_peer_gets", "-1"))
    pg_bytes, peer_bytes = float(r.get("conc_pg_bytes", "0")), float(r.get("conc_peer_bytes", "0"))
    pg_okn, peer_okn = r.get("conc_pg_sha_ok", "0"), r.get("conc_peer_sha_ok", "0")
    ok3 = pg_g == 1 and pg_okn == n
    rows.append((
        f"3. Upstream blob GETs for {n} concurrent cold pulls",
        f"{pg_g} ({fmt(pg_bytes / size_b, 2)} layers sent; sha256 ok {pg_okn}/{n})",
        f"{peer_g} ({fmt(peer_bytes / size_b, 2)} layers sent; sha256 ok {peer_okn}/{n})",
        "", f"{pg_g} vs {peer_g}", "pullgate = 1", ok3,
    ))

    # 4. manifest requests/s, and the ceiling
    pg_rps, peer_rps = float(r.get("mf_pg_rps", "nan")), float(r.get("mf_peer_rps", "nan"))
    bare_rps = float(r.get("mf_bare_rps", "nan"))
    ratio4 = pg_rps / peer_rps if peer_rps > 0 else float("nan")
    ok4 = ratio4 >= 3.0 and r.get("mf_pg_non2xx") == "0" and r.get("mf_ok") == "1"
    load = f"{r.get('mf_tool', '?')} {r.get('mf_secs', '?')} s, {r.get('mf_threads', '?')} threads x {r.get('mf_conns', '?')} conns"
    rows.append((
        f"4. Warm manifest-by-tag GET, {load}, req/s",
        f"{fmt(pg_rps, 0)} (non-2xx {r.get('mf_pg_non2xx', '?')})",
        f"{fmt(peer_rps, 0)} (non-2xx {r.get('mf_peer_non2xx', '?')})",
        "", f"{fmt(ratio4, 2)}x pullgate/peer", ">= 3x", ok4,
    ))
    ratio4b = pg_rps / bare_rps if bare_rps > 0 else float("nan")
    rows.append((
        "4b. Ceiling: bare multi-threaded hyper server, same manifest, req/s",
        fmt(pg_rps, 0), "", f"bare {fmt(bare_rps, 0)}", f"{fmt(ratio4b, 2)}x pullgate/bare", ">= 0.6x",
        ratio4b >= 0.6,
    ))

    # 5. peak RSS
    pg_rss, peer_rss = float(r.get("rss_pg_kb", "nan")) / 1024, float(r.get("rss_peer_kb", "nan")) / 1024
    pg16, peer16 = float(r.get("rss16_pg_kb", "nan")) / 1024, float(r.get("rss16_peer_kb", "nan")) / 1024
    up_rss = float(r.get("rss_up_kb", "nan")) / 1024
    rows.append((
        f"5. Peak RSS (VmHWM) under the {nagg}-client warm load, MiB",
        fmt(pg16), fmt(peer16), "",
        f"{fmt(pg16 / peer16 if peer16 > 0 else float('nan'), 2)}x pullgate/peer",
        "pullgate <= 64 MiB", pg16 <= 64,
    ))
    rows.append((
        "5b. Peak RSS (VmHWM) over the whole run, MiB",
        fmt(pg_rss), fmt(peer_rss), f"(upstream {fmt(up_rss)})",
        f"{fmt(pg_rss / peer_rss if peer_rss > 0 else float('nan'), 2)}x pullgate/peer",
        "(reference)", None,
    ))

    # 6. CPU per GiB
    for label, key in (("warm", "warm"), ("cold", "cold")):
        a, b = float(r.get(f"cpu_{key}_pg", "nan")), float(r.get(f"cpu_{key}_peer", "nan"))
        rows.append((
            f"6. CPU seconds per GiB served, {label} (utime + stime of the server)",
            fmt(a, 3), fmt(b, 3), "", f"{fmt(a / b if b > 0 else float('nan'), 2)}x pullgate/peer",
            "(reference)", None,
        ))

    headers = ("Measurement", "pullgate", "peer (registry proxy)", "direct upstream", "ratio", "target", "result")
    verdict = lambda x: x if isinstance(x, str) else ("-" if x is None else ("PASS" if x else "FAIL"))
    srows = [tuple(verdict(x) for x in row) for row in rows]

    details = [
        f"warm pullgate MiB/s: {' '.join(fmt(x) for x in pg_w)} (best {fmt(max(pg_w) if pg_w else None)})",
        f"warm peer MiB/s:     {' '.join(fmt(x) for x in peer_w)} (best {fmt(max(peer_w) if peer_w else None)})",
        f"cold pullgate s: {' '.join(fmt(x, 3) for x in pg_c)}",
        f"cold peer s:     {' '.join(fmt(x, 3) for x in peer_c)}",
        f"cold direct s:   {' '.join(fmt(x, 3) for x in dir_c)}",
        f"{n} concurrent cold pulls, wall time until all done: pullgate {fmt(float(r.get('conc_pg_wall', 'nan')), 2)} s, "
        f"peer {fmt(float(r.get('conc_peer_wall', 'nan')), 2)} s; upstream HEADs: pullgate {r.get('conc_pg_heads', '?')}, "
        f"peer {r.get('conc_peer_heads', '?')}; pullgate metrics: upstream requests +{r.get('conc_pg_metric_upstream', '?')}, "
        f"coalesced waits +{r.get('conc_pg_metric_coalesced', '?')}",
        f"warm {r.get('agg_clients', '?')}-client aggregate MiB/s: pullgate {r.get('agg_pg', '?')}; "
        f"pullgate (1 worker) {r.get('agg_pg1', '?')}; peer {r.get('agg_peer', '?')}",
        f"sha256 of one layer on one core, s: {r.get('cold_sha_s', '?')}",
        f"cold GETs: CPU of the direct transfer (upstream + curl), s: {r.get('cold_direct_cpu', '?')}; "
        f"CPU each cache used after its answer ended, s: pullgate {r.get('cold_pg_after', '?')}, "
        f"peer {r.get('cold_peer_after', '?')} (the peer commits a proxied blob after the client has it)",
        f"cold breakdown (medians): the upstream transfer alone (direct) {fmt(dir_cm, 3)} s and one core's "
        f"sha256 {fmt(sha_m, 3)} s run concurrently in a fill, so the floor is {fmt(floor, 3)} s; pullgate took "
        f"{fmt(pg_cm, 3)} s, {fmt(pg_cm - floor, 3)} s above it (receiving, hashing, writing and sending on the "
        f"same cores as the upstream and the client: see row 2c); the peer took {fmt(peer_cm, 3)} s",
        f"manifest load: upstream registry saw {r.get('mf_peer_upstream_reqs', '?')} manifest requests from the peer "
        f"and {r.get('mf_pg_upstream_reqs', '?')} from pullgate during the load",
    ]

    machine = [
        f"Machine: {r.get('nproc', '?')} CPUs ({r.get('cpu_model', '?')}), {r.get('mem', '?')} RAM, Linux {r.get('kernel', '?')}",
        f"Versions: {r.get('pullgate_version', '?')}; {r.get('registry_version', '?')}; {r.get('loader_version', '?')}; {r.get('curl_version', '?')}",
        f"Date: {r.get('date', '?')}; layer {int(size_mib)} MiB of random bytes; all traffic on 127.0.0.1; "
        f"one run, figures side by side (the machine is shared and noisy: read the ratios, not the absolutes)",
    ]

    # text table
    widths = [max(len(h), *(len(row[i]) for row in srows)) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.ljust(widths[i]) for i, c in enumerate(cells)).rstrip()
    out = ["", "=" * 30 + " pullgate benchmark " + "=" * 30]
    out += machine
    out.append("")
    out.append(line(headers))
    out.append(line(["-" * w for w in widths]))
    out += [line(row) for row in srows]
    out.append("")
    out += ["  " + d for d in details]
    passed = sum(1 for row in rows if row[-1] is True)
    targets = sum(1 for row in rows if row[-1] is not None)
    out.append("")
    out.append(f"{passed}/{targets} targets met")
    print("\n".join(out))

    # markdown
    md = ["<!-- generated by bench/run.sh; do not edit by hand -->", "### Benchmark", ""]
    md.append(f"`{r.get('command', 'bench/run.sh')}` — " + machine[0][len('Machine: '):] + ".")
    md.append("")
    md.append(machine[1] + ".")
    md.append("")
    md.append("Peer: Debian's `docker-registry` (distribution) in proxy mode (pull-through cache, filesystem "
              "storage). Upstream: a second plain `docker-registry`. "
              f"Layers of {int(size_mib)} MiB of random bytes; all traffic on 127.0.0.1; one run, figures side "
              "by side (the machine is shared and noisy: read the ratios, not the absolutes).")
    md.append("")
    md.append("| " + " | ".join(headers) + " |")
    md.append("|" + "|".join(["---"] * len(headers)) + "|")
    for row in srows:
        md.append("| " + " | ".join(c.replace("|", "\\|") for c in row) + " |")
    md.append("")
    md.append(f"Run on {r.get('date', '?')}; {passed}/{targets} targets met. Samples:")
    md.append("")
    md += [f"- {d}" for d in details]
    md.append("")
    # The profile (bench/profile.md, written by hand from `perf record` runs): where the time
    # goes, kept next to the figures it explains.
    profile = os.path.join(os.path.dirname(os.path.abspath(__file__)), "profile.md")
    if os.path.exists(profile):
        with open(profile) as f:
            md.append(f.read().rstrip("\n"))
            md.append("")
    with open(md_out, "w") as f:
        f.write("\n".join(md))
    print(f"\nmarkdown written to {md_out}")


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    cmd, args = sys.argv[1], sys.argv[2:]
    fn = {
        "port": cmd_port,
        "genlayer": cmd_genlayer,
        "genconfig": cmd_genconfig,
        "manifest": cmd_manifest,
        "upstream-gets": cmd_upstream_gets,
        "load": cmd_load,
        "report": cmd_report,
        "sha-time": cmd_sha_time,
    }.get(cmd)
    if fn is None:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    fn(*args)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Measurement helpers for the bench/ scripts (standard library only).

  measure.py load --pids P[,P…] --label L --out FILE [--cpu N] -- CLIENT ARGS…
      Runs the load client (pinned to CPU N with taskset when given) while sampling the
      server processes' utime+stime (/proc/PID/stat, in clock ticks of CLK_TCK) and RSS
      every 20 ms. From the client's --json report (connect_s, duration_s, drain_s) it
      finds the sending phase: [client start + connect_s + 0.01 s, + duration_s] (the
      client starts its schedule 10 ms after the connect phase ends) and writes the report
      plus: cpu_send_s (server CPU in the sending phase), cpu_per_delivery_us (that ÷
      delivered, the issue's definition), cpu_send_drain_s / cpu_per_delivery_drain_us
      (sending phase + drain, which also counts deliveries that were late), the load
      average before and after, and the server RSS.
  measure.py rss PID…                 sum of VmRSS in KiB
  measure.py cpu PID…                 sum of utime+stime in seconds
  measure.py fds PID…                 sum of open file descriptors
  measure.py wait-fds BASE N TIMEOUT PID…
                                      wait until fds ≥ BASE+N and unchanged for 1 s
  measure.py table SCENARIO A.json B.json [C.json…]
                                      a markdown table, side by side, ratios to the last
  measure.py field FILE KEY[.KEY]     one field of a result file
  measure.py nodes-ratio MANY.json ONE.json NODES
                                      the multi-node figure: sustained deliveries/s, NODES ÷ 1
  measure.py server-side < METRICS    from wschat's /metrics text: its commits, send → ack
                                      and commit → outboxes (the server's share of latency)
"""

import json
import os
import subprocess
import sys
import threading
import time

TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def proc_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    rest = s[s.rindex(")") + 2 :].split()
    # fields 14 and 15 (1-based) are utime, stime; rest starts at field 3
    return int(rest[11]) + int(rest[12])


def proc_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def proc_fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_busy_ticks():
    v = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return sum(v) - v[3] - v[4]  # all but idle and iowait


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


class Sampler(threading.Thread):
    def __init__(self, pids, period=0.02):
        super().__init__(daemon=True)
        self.pids = pids
        self.period = period
        self.samples = []  # (time, ticks, rss_kib)
        self.last_ticks = {}  # pid → its ticks at its last reading
        self.gone = set()  # pids found exited: not read again (the number may be reused)
        self.stop = threading.Event()

    def take(self):
        # Each process on its own: one that has exited keeps the CPU of its last reading
        # (and no RSS), so the others' samples go on (a cluster whose one node stops).
        t = time.time()
        ticks = rss = 0
        for p in self.pids:
            if p not in self.gone:
                try:
                    self.last_ticks[p] = proc_ticks(p)
                    rss += proc_rss_kib(p)
                except (FileNotFoundError, ProcessLookupError, ValueError):
                    self.gone.add(p)
            ticks += self.last_ticks.get(p, 0)
        self.samples.append((t, ticks, rss))

    def run(self):
        while not self.stop.is_set():
            self.take()
            time.sleep(self.period)
        self.take()

    def ticks_at(self, t):
        s = self.samples
        if not s:
            return 0.0
        if t <= s[0][0]:
            return float(s[0][1])
        for (t0, k0, _), (t1, k1, _) in zip(s, s[1:]):
            if t0 <= t <= t1:
                return k0 + (k1 - k0) * ((t - t0) / (t1 - t0) if t1 > t0 else 0)
        return float(s[-1][1])

    def rss_max(self, t0, t1):
        v = [r for (t, _, r) in self.samples if t0 <= t <= t1]
        return max(v) if v else 0


def cmd_load(argv):
    opts = {"--cpu": None, "--pids": None, "--label": "", "--out": None}
    i = 0
    while i < len(argv) and argv[i] != "--":
        opts[argv[i]] = argv[i + 1]
        i += 2
    client = argv[i + 1 :]
    pids = [int(p) for p in opts["--pids"].split(",") if p]
    if opts["--cpu"] not in (None, "", "-"):
        client = ["taskset", "-c", opts["--cpu"]] + client
    sampler = Sampler(pids)
    sampler.start()
    time.sleep(0.1)
    load_before = loadavg()
    t_start = time.time()
    err_path = opts["--out"] + ".stderr"
    busy0 = cpu_busy_ticks()
    with open(err_path, "w") as err, open(opts["--out"] + ".stdout", "w+") as out:
        child = subprocess.Popen(client, stdout=out, stderr=err, text=True)
        _, status, ru = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        stdout = out.read()
    t_end = time.time()
    busy1 = cpu_busy_ticks()
    client_cpu_s = ru.ru_utime + ru.ru_stime
    load_after = loadavg()
    time.sleep(0.05)
    sampler.stop.set()
    sampler.join()
    lines = [l for l in stdout.splitlines() if l.strip().startswith("{")]
    if not lines:
        sys.stderr.write(f"{opts['--label']}: the client printed no JSON (exit {child.returncode}); see {err_path}\n")
        sys.stderr.write(open(err_path).read()[-3000:])
        sys.exit(1)
    r = json.loads(lines[-1])
    # The send phase as the client timed it; an older client without that field: from
    # when it was started (which takes in its own start-up, tens of milliseconds).
    send0 = r.get("send_start_unix_s") or t_start + r["connect_s"] + 0.01
    send1 = send0 + r["duration_s"]
    drain1 = send1 + r["drain_s"]
    cpu_send = (sampler.ticks_at(send1) - sampler.ticks_at(send0)) / TCK
    cpu_drain = (sampler.ticks_at(drain1) - sampler.ticks_at(send0)) / TCK
    cpu_connect = (sampler.ticks_at(send0 - 0.01) - sampler.ticks_at(t_start)) / TCK
    d = max(r["delivered"], 1)
    # What the connect phase connected (a client without the field: every connection ever
    # up, retries after the phase included).
    connected_in_phase = r.get("connected_at_send_start", r["connected"])
    wall = t_end - t_start
    server_run_s = (sampler.ticks_at(t_end) - sampler.ticks_at(t_start)) / TCK
    other_cores = ((busy1 - busy0) / TCK - server_run_s - client_cpu_s) / wall
    r.update(
        {
            "label": opts["--label"],
            "client_exit": child.returncode,
            "client_cpu_s": client_cpu_s,
            "wall_s": wall,
            "server_cpu_run_s": server_run_s,
            "other_cores_busy": other_cores,
            "client_cpu": opts["--cpu"],
            "server_pids": pids,
            "clk_tck": TCK,
            "cpu_connect_s": cpu_connect,
            "connected_in_connect_phase": connected_in_phase,
            "connect_rate": connected_in_phase / r["connect_s"] if r["connect_s"] else 0,
            "cpu_send_s": cpu_send,
            "cpu_send_drain_s": cpu_drain,
            "cpu_per_delivery_us": cpu_send / d * 1e6,
            "cpu_per_delivery_drain_us": cpu_drain / d * 1e6,
            "server_cpu_share_send": cpu_send / r["duration_s"] if r["duration_s"] else 0,
            "server_rss_kib_start": sampler.samples[0][2] if sampler.samples else 0,
            "server_rss_kib_max": sampler.rss_max(t_start, t_end),
            "loadavg_before": load_before,
            "loadavg_after": load_after,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        }
    )
    with open(opts["--out"], "w") as f:
        json.dump(r, f)
    print(
        f"{opts['--label']}: delivered {r['delivered']}/{r['expected']} lost {r['lost']} "
        f"p50 {r['latency_ms']['p50']:.2f} p99 {r['latency_ms']['p99']:.2f} ms "
        f"(client send lag p99 {(r.get('send_lag_ms') or {}).get('p99', float('nan')):.2f}), "
        f"{r['delivery_rate']:.0f} deliveries/s, server CPU {cpu_send:.2f} s in the send phase "
        f"= {r['cpu_per_delivery_us']:.2f} µs/delivery (incl. drain {r['cpu_per_delivery_drain_us']:.2f}); "
        f"client CPU {client_cpu_s:.1f} s; other processes {other_cores:.2f} cores; load avg {load_before} → {load_after}",
        file=sys.stderr,
    )


def fmt(v, nd=2):
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def sustained(r):
    """Deliveries a second the server kept up with: what arrived after the send phase
    (a server behind) lengthens the time they took."""
    return r["delivered"] / (r["duration_s"] + r["last_delivery_after_send_s"])


def cmd_nodes_ratio(argv):
    """MANY.json ONE.json NODES: the multi-node figure, NODES nodes' sustained
    deliveries/s over one node's (the issue asks ≥ 0.80, nothing lost)."""
    many, one = (json.load(open(f)) for f in argv[:2])
    ratio = sustained(many) / sustained(one)
    verdict = "met" if ratio >= 0.8 and many["lost"] == 0 else "NOT met"
    print(f"wschat {argv[2]} nodes ÷ 1 node, sustained deliveries/s: {sustained(many):,.0f} ÷ "
          f"{sustained(one):,.0f} = {ratio:.2f} (issue: ≥ 0.80): {verdict}.")


def cmd_table(argv):
    scenario, files = argv[0], argv[1:]
    rs = [json.load(open(f)) for f in files]
    base = rs[-1]
    rows = [
        ("connected", lambda r: r["connected"], False),
        ("failed connects", lambda r: r["failed_connects"], False),
        ("sent", lambda r: r["sent"], False),
        ("expected", lambda r: r["expected"], False),
        ("delivered", lambda r: r["delivered"], True),
        ("lost", lambda r: r["lost"], False),
        ("duplicated", lambda r: r["duplicated"], False),
        ("out of order", lambda r: r["out_of_order"], False),
        ("deliveries/s (delivered ÷ send phase)", lambda r: r["delivered"] / r["duration_s"], True),
        ("deliveries/s sustained (delivered ÷ (send phase + last delivery after it))", sustained, True),
        ("drain after the send phase, s", lambda r: r["drain_s"], False),
        ("latency p50 ms", lambda r: r["latency_ms"]["p50"], True),
        ("latency p99 ms", lambda r: r["latency_ms"]["p99"], True),
        ("latency p99.9 ms", lambda r: r["latency_ms"]["p999"], True),
        ("latency max ms", lambda r: r["latency_ms"]["max"], True),
        ("client send lag p99 ms (inside the latency)", lambda r: (r.get("send_lag_ms") or {}).get("p99"), True),
        ("server CPU in send phase, s", lambda r: r["cpu_send_s"], True),
        ("CPU per delivery µs (send phase)", lambda r: r["cpu_per_delivery_us"], True),
        ("CPU per delivery µs (send+drain)", lambda r: r["cpu_per_delivery_drain_us"], True),
        ("server RSS max MiB", lambda r: r["server_rss_kib_max"] / 1024, True),
        ("load client CPU s", lambda r: r.get("client_cpu_s", 0), False),
        ("other processes, cores busy (mean over the run)", lambda r: r.get("other_cores_busy", 0), False),
        ("load avg before → after", lambda r: f"{r['loadavg_before']} → {r['loadavg_after']}", False),
    ]
    head = [f"{r['label']}" for r in rs]
    ratio_cols = [f"{r['label']} ÷ {base['label']}" for r in rs[:-1]]
    print(f"\n#### {scenario}\n")
    print("| figure | " + " | ".join(head + ratio_cols) + " |")
    print("|---" * (1 + len(head) + len(ratio_cols)) + "|")
    for name, get, ratio in rows:
        vals = [get(r) for r in rs]
        cells = [fmt(v) for v in vals]
        for v in vals[:-1]:
            b = vals[-1]
            if ratio and isinstance(v, (int, float)) and isinstance(b, (int, float)) and b:
                cells.append(f"{v / b:.2f}")
            else:
                cells.append("")
        print(f"| {name} | " + " | ".join(cells) + " |")
    if any(r.get("close_codes") or r.get("errors") or r.get("connect_errors") for r in rs):
        for r in rs:
            extra = {k: r.get(k) for k in ("close_codes", "errors", "connect_errors") if r.get(k)}
            if extra:
                print(f"\n{r['label']}: {json.dumps(extra)}")


def cmd_field(argv):
    r = json.load(open(argv[0]))
    for k in argv[1].split("."):
        r = r[k]
    print(r)


def cmd_wait_fds(argv):
    base, n, timeout = int(argv[0]), int(argv[1]), float(argv[2])
    pids = [int(p) for p in argv[3:]]
    deadline = time.time() + timeout
    last, since = -1, time.time()
    while time.time() < deadline:
        c = sum(proc_fds(p) for p in pids)
        if c != last:
            last, since = c, time.time()
        elif c >= base + n and time.time() - since >= 1.0:
            print(c)
            return
        time.sleep(0.1)
    print(last)
    sys.exit(1)


def histograms(text):
    """Prometheus histograms in `text`: name → {"sum", "count", "buckets": [(le, n)]}."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, _, value = line.rpartition(" ")
        name, _, labels = key.partition("{")
        suffix = next((x for x in ("_bucket", "_sum", "_count") if name.endswith(x)), None)
        if suffix is None:
            continue
        h = out.setdefault(name[: -len(suffix)], {"sum": 0.0, "count": 0.0, "buckets": []})
        if suffix != "_bucket":
            h[suffix[1:]] = float(value)
        elif 'le="' in labels:
            le = labels.split('le="', 1)[1].split('"', 1)[0]
            h["buckets"].append((float(le), float(value)))
    return out


def share_within(h, limit):
    """Percent of the observations at most `limit` (a bucket bound)."""
    n = dict(h["buckets"]).get(limit)
    return None if n is None or not h["count"] else 100.0 * n / h["count"]


def cmd_server_side(text):
    hs = histograms(text)
    need = ("wschat_commit_seconds", "wschat_commit_batch_size", "wschat_send_ack_seconds",
            "wschat_fanout_seconds")
    if any(hs.get(n, {}).get("count", 0) == 0 for n in need):
        print("server side: no commits in /metrics")
        return
    c, b, a, f = (hs[n] for n in need)

    def timing(h):
        parts = [f"mean {1000 * h['sum'] / h['count']:.1f} ms"]
        for limit in (0.01, 0.025):
            p = share_within(h, limit)
            if p is not None:
                parts.append(f"≤ {limit * 1000:g} ms {p:.1f} %")
        return ", ".join(parts)

    print(
        f"wschat, its own histograms (/metrics, whole run): {c['count']:,.0f} commits of "
        f"{b['sum'] / b['count']:.1f} messages on average, {1000 * c['sum'] / c['count']:.2f} ms "
        f"each; send → ack (queue + commit) {timing(a)}; commit end → every outbox, per "
        f"commit, {timing(f)}"
    )


def main():
    cmd, argv = sys.argv[1], sys.argv[2:]
    if cmd == "load":
        cmd_load(argv)
    elif cmd == "rss":
        print(sum(proc_rss_kib(int(p)) for p in argv))
    elif cmd == "cpu":
        print(sum(proc_ticks(int(p)) for p in argv) / TCK)
    elif cmd == "fds":
        print(sum(proc_fds(int(p)) for p in argv))
    elif cmd == "wait-fds":
        cmd_wait_fds(argv)
    elif cmd == "table":
        cmd_table(argv)
    elif cmd == "field":
        cmd_field(argv)
    elif cmd == "nodes-ratio":
        cmd_nodes_ratio(argv)
    elif cmd == "server-side":
        cmd_server_side(sys.stdin.read())
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()

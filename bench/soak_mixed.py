"""Mixed soak: one real `flowmon agent` (cluster mode: TLS, bearer tokens, policy pushes) under churn.

    sudo flock /work/netns.lock .venv/bin/python -m bench.soak_mixed \\
        [--minutes 30] [--connections 100000] [--peers 1000000] [--scrapers 500]

For --minutes, all at once, against the product's `flowmon agent` process as a DaemonSet runs it
(--policy-file, TLS pair, admin token file; its pods from an --inventory file of the lab's namespaces):
- known traffic: --connections short TCP connections from pod `cli` to pod `srv` (--bytes each), paced
  over the run;
- external churn: --peers connections from distinct addresses of 100.64.0.0/10 (bench/soak_peers.py's
  AnyIP clients in pod `ext`) to pod `peer`, paced over the run: the kernel folds them;
- --scrapers concurrent scrapers (aiohttp, TLS, the monitor's bearer token, each from its own
  127.1.x.y source, a new connection per scrape as the agent's caps allow), one scrape per
  --scrape-interval each;
- a policy push every --push-interval through the operator's push path (flowmon_operator.push:
  AgentChannel.sync), alternating two policies (a second monitor comes and goes);
- --slow-clients connections that dribble a request head one byte per second, and as many that ask for
  a scrape and read its answer 64 bytes a second: the server must shed both (header, idle timeouts).
Reports the agent's RSS curve (every --sample s), poll time p50/p99 (the agent's own
flowmon_agent_poll_duration_seconds histogram, interpolated in its buckets), scrape time p50/p99 and
failures by kind, how slow clients ended, and whether the agent's counter for cli → srv (read by a real
scrape at the end) equals the bytes the clients sent. Every loop is bounded by the run's deadline;
the lab, the agent and the clients are torn down at the end (also on failure).

--profile PATH samples the agent process with py-spy for the whole run (raw collapsed stacks, one line
per stack with its count, idle threads included: a poll waiting for the GIL is still the poll's time)
and reports the poll's samples (stacks through `poll_once`) by the functions they spend in.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench.scrape_time import write_serving_files
from bench.soak_peers import CLIENT, SERVER, SOURCES, percentile, rss_mb
from flowmon_agent.main import host_objects
from flowmon_cli.topview import histogram_quantile  # as PromQL computes it, one copy
from flowmon_contract.policy import canonical_json, compile_policy, token_sha256
from flowmon_contract.spec import FlowMonitor
from flowmon_lab.network import Lab, Pod
from flowmon_lab.prometheus import free_port
from flowmon_operator.push import AgentChannel, AgentPod, PushTarget

NODE = "soak-node"
ADMIN_TOKEN = "soak-admin-token"
SCRAPE_TOKEN = "soak-scrape-token"
MONITOR = ("flowmon-system", "soak")
KNOWN_PORT, PEER_PORT = 8080, 9090
SENT_BYTES = "flowmon_tcp_sent_bytes_total"


# --- pure parts -------------------------------------------------------------------------------------


def monitor(namespace: str, name: str) -> FlowMonitor:
    """Every flow, the default groupBy (as the agent's default monitor)."""
    return FlowMonitor.model_validate({"metadata": {"namespace": namespace, "name": name}})


def policies() -> list[tuple[str, str]]:
    """Two policies the pushes alternate between, (canonical JSON, hash): the soak monitor, then also
    another."""
    hashes = [token_sha256(SCRAPE_TOKEN)]
    main, extra = monitor(*MONITOR), monitor("flowmon-system", "extra")
    first = compile_policy([main], token_hashes={main.key: hashes})
    second = compile_policy([main, extra], token_hashes={main.key: hashes, extra.key: hashes})
    return [(canonical_json(p), p.hash) for p in (first, second)]


def samples(text: str, prefix: str) -> list[tuple[str, dict[str, str], float]]:
    """(sample name, labels, value) of the samples whose name starts with `prefix` in an exposition."""
    return [
        (s.name, s.labels, s.value)
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name.startswith(prefix)
    ]


def poll_buckets(text: str) -> list[tuple[float, float]]:
    rows = samples(text, "flowmon_agent_poll_duration_seconds_bucket")
    return sorted((float(labels["le"]), v) for _, labels, v in rows)


def pair_bytes(text: str, client: str, server: str, port: int) -> float:
    """The monitor's sent-bytes counter for client workload → server workload:port (0 if absent)."""
    return sum(
        v
        for n, labels, v in samples(text, SENT_BYTES)
        if n == SENT_BYTES
        and labels.get("client_workload") == client
        and labels.get("server_workload") == server
        and labels.get("server_port") == str(port)
    )


def failure_kind(exc: BaseException) -> str:
    """A scrape's failure, by kind: timeouts, TLS, refused connects, resets (the agent's connection caps
    reset connections), the rest by class."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, (ssl.SSLError, aiohttp.ClientSSLError)):
        return "tls"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect"
    if isinstance(exc, (aiohttp.ServerDisconnectedError, ConnectionResetError, aiohttp.ClientOSError)):
        return "reset"
    return type(exc).__name__


def ms_summary(seconds: list[float]) -> dict[str, float | int]:
    if not seconds:
        return {"count": 0}
    return {
        "count": len(seconds),
        "p50_ms": round(percentile(seconds, 0.5) * 1000, 1),
        "p99_ms": round(percentile(seconds, 0.99) * 1000, 1),
        "max_ms": round(max(seconds) * 1000, 1),
    }


@dataclass
class Tally:
    """What the loops saw; plain counters and lists, appended to from one event loop."""

    scrape_seconds: list[float] = field(default_factory=list)
    scrape_failures: Counter = field(default_factory=Counter)  # "429", "503", "reset", "timeout", ...
    pushes: Counter = field(default_factory=Counter)  # "pushed", "unchanged", or the error
    slow: Counter = field(default_factory=Counter)  # how slow clients ended
    curve: list[tuple[float, float]] = field(default_factory=list)  # (seconds, agent RSS MB)


def thinned(curve: list, columns: int = 13) -> list:
    """At most `columns` points of a curve, evenly spaced, the first and the last kept."""
    if len(curve) <= columns:
        return list(curve)
    step = (len(curve) - 1) / (columns - 1)
    return [curve[round(i * step)] for i in range(columns)]


def render(result: dict) -> str:
    """The Markdown rows docs/BENCHMARKS.md records: the RSS curve (thinned) and one summary table."""
    curve = thinned(result["rss_curve"])
    lines = ["| minute | " + " | ".join(f"{t / 60:.1f}" for t, _ in curve) + " |"]
    lines.append("| --- |" + " --- |" * len(curve))
    lines.append("| agent RSS, MB | " + " | ".join(f"{mb:.0f}" for _, mb in curve) + " |")
    poll, scrape = result["poll"], result["scrape"]
    failures = ", ".join(f"{k}: {v}" for k, v in sorted(result["scrape_failures"].items())) or "none"
    lines += [
        "",
        "| poll p50 / p99, ms | scrapes | scrape p50 / p99 / max, ms | scrape failures | pushes | "
        "slow clients | bytes exact |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| {poll.get('p50_ms')} / {poll.get('p99_ms')} | {scrape['count']} | "
        f"{scrape.get('p50_ms')} / {scrape.get('p99_ms')} / {scrape.get('max_ms')} | {failures} | "
        f"{dict(result['pushes'])} | {dict(result['slow_clients'])} | "
        f"{'yes' if result['bytes_exact'] else 'no'} ({result['bytes_counted']:.0f} of "
        f"{result['bytes_sent']} B) |",
    ]
    return "\n".join(lines)


# --- the run ----------------------------------------------------------------------------------------


@dataclass
class Agent:
    proc: subprocess.Popen
    port: int
    ca: Path

    def context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def url(self, path: str) -> str:
        return f"https://localhost:{self.port}{path}"


def start_agent(tmp: Path, lab: Lab, first_policy: str, log) -> Agent:
    """`flowmon agent` as the DaemonSet runs it (policy file, TLS, admin token), this lab's pods."""
    write_serving_files(tmp, ADMIN_TOKEN)
    objects = host_objects(NODE, ["127.0.0.1"], {p.netns: [str(p.ipv4)] for p in lab.pods})
    (tmp / "inventory.json").write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
    (tmp / "policy.json").write_text(first_policy)
    port = free_port()
    argv = [sys.executable, "-m", "flowmon_cli.main", "agent", "--policy-file", str(tmp / "policy.json")]
    argv += ["--inventory", str(tmp / "inventory.json"), "--node", NODE, "--listen", f"127.0.0.1:{port}"]
    argv += ["--tls-cert-file", str(tmp / "tls.crt"), "--tls-key-file", str(tmp / "tls.key")]
    argv += ["--admin-token-file", str(tmp / "admin"), "--log-level", "WARNING"]
    proc = subprocess.Popen(argv, stdout=log, stderr=log, start_new_session=True)
    return Agent(proc, port, tmp / "ca.crt")


async def get(session: aiohttp.ClientSession, agent: Agent, path: str, token: str) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"}
    async with session.get(agent.url(path), headers=headers, ssl=agent.context()) as resp:
        return resp.status, await resp.text()


async def wait_ready(agent: Agent, timeout: float = 120.0) -> None:
    """Until the agent answers /readyz 200 (BPF compiled and attached, first poll done), bounded."""
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        while time.monotonic() < deadline:
            if agent.proc.poll() is not None:
                raise RuntimeError(f"agent exited with {agent.proc.returncode}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                if (await get(session, agent, "/readyz", ADMIN_TOKEN))[0] == 200:
                    return
            await asyncio.sleep(0.5)
    raise RuntimeError("agent not ready in time")


def scraper_source(i: int) -> str:
    return f"127.1.{i // 250}.{i % 250 + 1}"


async def scraper(i: int, agent: Agent, deadline: float, interval: float, tally: Tally) -> None:
    """Scrape the soak monitor every `interval` (random phase) until `deadline`; a new connection each
    time, from this scraper's own source address."""
    path = "/metrics/{}/{}".format(*MONITOR)
    context = agent.context()
    await asyncio.sleep(random.uniform(0, interval))
    while time.monotonic() < deadline:
        started = time.monotonic()
        connector = aiohttp.TCPConnector(ssl=context, local_addr=(scraper_source(i), 0), force_close=True)
        try:
            async with aiohttp.ClientSession(
                connector=connector, timeout=aiohttp.ClientTimeout(total=30)
            ) as s:
                status, _ = await get(s, agent, path, SCRAPE_TOKEN)
            if status == 200:
                tally.scrape_seconds.append(time.monotonic() - started)
            else:
                tally.scrape_failures[str(status)] += 1
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            tally.scrape_failures[failure_kind(exc)] += 1
        await asyncio.sleep(max(0.0, started + interval - time.monotonic()))


async def pusher(agent: Agent, deadline: float, interval: float, tally: Tally) -> None:
    """The operator's push path: one channel kept open, a round every `interval`, alternating policies."""
    documents = policies()
    target = PushTarget(
        port=agent.port, server_name="localhost", ca_pem=agent.ca.read_text(), token=ADMIN_TOKEN, timeout=10
    )
    pods = [AgentPod("agent", "127.0.0.1", ready=True)]
    rounds = 0
    async with AgentChannel() as channel:
        while time.monotonic() < deadline:
            document, policy_hash = documents[(rounds + 1) % 2]  # the file holds the first
            for report in await channel.sync(pods, target, document, policy_hash):
                tally.pushes[report.error or ("pushed" if report.pushed else "unchanged")] += 1
            rounds += 1
            await asyncio.sleep(max(0.0, min(interval, deadline - time.monotonic())))


async def slow_client(agent: Agent, deadline: float, tally: Tally, *, slow_reader: bool) -> None:
    """One connection at a time until `deadline`: either dribble a request head (a byte a second) or send
    a scrape request and read its answer 64 bytes a second. Counts how each ended: `shed` (the server
    closed it), `answered` (the dribbler's whole head went out: the server did not shed it), `alive`
    (still open at the deadline)."""
    request = f"GET /metrics/{MONITOR[0]}/{MONITOR[1]} HTTP/1.1\r\nHost: x\r\n"
    request += f"Authorization: Bearer {SCRAPE_TOKEN}\r\n\r\n"
    while time.monotonic() < deadline:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    "127.0.0.1", agent.port, ssl=agent.context(), server_hostname="localhost",
                    local_addr=("127.2.0.1" if slow_reader else "127.2.0.2", 0),
                ),
                10,
            )  # fmt: skip
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            tally.slow[f"connect_{failure_kind(exc)}"] += 1
            await asyncio.sleep(1)
            continue
        ended = "alive"
        try:
            if slow_reader:
                writer.write(request.encode())
                await writer.drain()
                while time.monotonic() < deadline:
                    if not await reader.read(64):
                        ended = "shed"
                        break
                    await asyncio.sleep(1)
            else:
                for byte in request.encode():
                    if time.monotonic() >= deadline:
                        break
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(1)
                    if reader.at_eof():
                        ended = "shed"
                        break
                else:
                    ended = "answered"
        except (OSError, ssl.SSLError):
            ended = "shed"
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)
        tally.slow[("slow_reader_" if slow_reader else "dribble_") + ended] += 1


async def sample_rss(agent: Agent, started: float, deadline: float, every: float, tally: Tally) -> None:
    while time.monotonic() < deadline:
        tally.curve.append((round(time.monotonic() - started, 1), round(rss_mb(agent.proc.pid), 1)))
        await asyncio.sleep(max(0.0, min(every, deadline - time.monotonic())))


def start_traffic(lab: Lab, args: argparse.Namespace, seconds: float) -> dict[str, list[subprocess.Popen]]:
    """Servers, then the known clients (cli → srv) and the AnyIP peer clients (ext → peer), paced so that
    their counts are spread over `seconds`."""
    cli, srv, ext, peer = (lab.pod(n) for n in ("cli", "srv", "ext", "peer"))
    lab.run(ext, ["ip", "route", "add", "local", str(SOURCES), "dev", "lo"])
    lab.run(peer, ["ip", "route", "add", str(SOURCES), "via", str(ext.ipv4)])
    for pod in (cli, ext):
        lab.sysctl(pod, "net.ipv4.tcp_tw_reuse", 1)
    lab.sysctl(cli, "net.ipv4.ip_local_port_range", "10000 65000")
    for pod, port in ((srv, KNOWN_PORT), (peer, PEER_PORT)):
        lab.popen(pod, [sys.executable, "-c", SERVER, str(pod.ipv4), str(port)])
    time.sleep(0.5)  # the servers bind
    deadline = time.time() + seconds + 60  # a paced client a little behind may finish

    def clients(pod: Pod, server: Pod, port: int, first: int, step: int, total: int, n: int) -> list:
        procs = []
        for j in range(n):
            count = total // n + (1 if j < total % n else 0)
            rate = count / seconds
            argv = [server.ipv4, port, first + j * step, step * n, count, args.bytes, deadline, rate]
            command = [sys.executable, "-c", CLIENT, *map(str, argv)]
            procs.append(lab.popen(pod, command, stdout=subprocess.PIPE, text=True))
        return procs

    return {
        "known": clients(cli, srv, KNOWN_PORT, int(cli.ipv4), 0, args.connections, 1),
        "peers": clients(ext, peer, PEER_PORT, int(SOURCES.network_address) + 1, 1, args.peers, 2),
    }


def finished_count(procs: list[subprocess.Popen], timeout: float) -> int:
    """Connections the clients made (they print it when done); kills stragglers after `timeout`."""
    done = 0
    end = time.monotonic() + timeout
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(1.0, end - time.monotonic()))
            done += int(out.strip() or 0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
    return done


async def final_counts(agent: Agent, lab: Lab, expected: int, timeout: float = 30.0) -> tuple[float, str]:
    """Scrape until the cli → srv counter reaches `expected` (the last closes are in the next poll) or
    `timeout`; then the agent's own metrics. (counted bytes, admin /metrics text)"""
    cli, srv = lab.pod("cli").netns, lab.pod("srv").netns
    path = "/metrics/{}/{}".format(*MONITOR)
    counted = 0.0
    end = time.monotonic() + timeout
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        while True:
            status, text = await get(session, agent, path, SCRAPE_TOKEN)
            if status == 200:
                counted = pair_bytes(text, cli, srv, KNOWN_PORT)
            if counted >= expected or time.monotonic() > end:
                break
            await asyncio.sleep(1)
        _, own = await get(session, agent, "/metrics", ADMIN_TOKEN)
    return counted, own


def poll_shares(raw: str, depth: int = 3) -> tuple[int, Counter]:
    """From py-spy's raw stacks: the samples inside a poll (stacks through `Agent.poll_once`), and how
    many of them each call path below it holds (its first `depth` functions, without line numbers)."""
    total, shares = 0, Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [frame.split(" (")[0] for frame in stack.split(";")]
        if "Agent.poll_once" not in frames:
            continue
        below = frames[frames.index("Agent.poll_once") + 1 :][:depth]
        total += int(count)
        shares[" > ".join(below) or "Agent.poll_once"] += int(count)
    return total, shares


def start_profiler(agent: Agent, path: Path, seconds: float) -> subprocess.Popen:
    """py-spy on the agent process for `seconds` (root: it reads the process's memory)."""
    py_spy = Path(sys.executable).with_name("py-spy")
    argv = [str(py_spy), "record", "--pid", str(agent.proc.pid), "--duration", str(int(seconds))]
    argv += ["--format", "raw", "--idle", "--threads", "--rate", "50", "--output", str(path)]
    return subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


async def soak(agent: Agent, lab: Lab, args: argparse.Namespace) -> dict:
    await wait_ready(agent)
    seconds = args.minutes * 60
    tally = Tally()
    started = time.monotonic()
    deadline = started + seconds
    profiler = start_profiler(agent, args.profile, seconds) if args.profile else None
    traffic = start_traffic(lab, args, seconds)
    loops = [sample_rss(agent, started, deadline, args.sample, tally)]
    loops += [pusher(agent, deadline, args.push_interval, tally)]
    loops += [scraper(i, agent, deadline, args.scrape_interval, tally) for i in range(args.scrapers)]
    for _ in range(args.slow_clients):
        loops += [slow_client(agent, deadline, tally, slow_reader=r) for r in (False, True)]
    await asyncio.wait_for(asyncio.gather(*loops), seconds + 120)
    known = await asyncio.to_thread(finished_count, traffic["known"], 90)
    peers = await asyncio.to_thread(finished_count, traffic["peers"], 90)
    counted, own = await final_counts(agent, lab, known * args.bytes)
    tally.curve.append((round(time.monotonic() - started, 1), round(rss_mb(agent.proc.pid), 1)))
    if profiler is not None:
        await asyncio.to_thread(profiler.communicate, timeout=60)
    buckets = poll_buckets(own)
    poll = {f"p{round(q * 100)}_ms": histogram_quantile(q, dict(buckets)) for q in (0.5, 0.99)}
    return {
        "minutes": args.minutes,
        "connections": known,
        "peers": peers,
        "scrapers": args.scrapers,
        "polls": int(buckets[-1][1]) if buckets else 0,
        "poll": {k: None if v is None else round(v * 1000, 1) for k, v in poll.items()},
        "scrape": ms_summary(tally.scrape_seconds),
        "scrape_failures": dict(tally.scrape_failures),
        "pushes": dict(tally.pushes),
        "slow_clients": dict(tally.slow),
        "http": {
            name + json.dumps(labels) * bool(labels): v
            for name, labels, v in samples(own, "flowmon_agent_http")
        },
        "flows_dropped": {  # the flow map's churn: evicted (LRU), forgotten (gone, idle)
            labels["reason"]: v for _, labels, v in samples(own, "flowmon_agent_flows_dropped_total")
        },
        "bytes_sent": known * args.bytes,
        "bytes_counted": counted,
        "bytes_exact": counted == known * args.bytes,
        "rss_curve": tally.curve,
        "rss_mb_max": max(mb for _, mb in tally.curve),
        "agent_alive": agent.proc.poll() is None,
    }


def stop(agent: Agent) -> None:
    if agent.proc.poll() is None:
        os.killpg(agent.proc.pid, signal.SIGTERM)
        try:
            agent.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(agent.proc.pid, signal.SIGKILL)
            agent.proc.wait(10)


def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp, Lab("mx", ["cli", "srv", "ext", "peer"]) as lab:
        log = open(Path(tmp) / "agent.log", "w+")  # noqa: SIM115 (read back below)
        agent = start_agent(Path(tmp), lab, policies()[0][0], log)
        try:
            result = asyncio.run(soak(agent, lab, args))
        finally:
            stop(agent)
            log.seek(0)
            text = log.read()
            log.close()
            if agent.proc.returncode not in (0, -signal.SIGTERM):
                print(text[-4000:], file=sys.stderr)  # why it failed
        errors = [line for line in text.splitlines() if "Traceback" in line or "ERROR" in line]
        result["agent_exit"] = agent.proc.returncode
        result["agent_log_errors"] = errors[:20]
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--connections", type=int, default=100_000, help="known cli → srv connections")
    parser.add_argument("--peers", type=int, default=1_000_000, help="distinct external addresses")
    parser.add_argument("--scrapers", type=int, default=500)
    parser.add_argument("--scrape-interval", type=float, default=15.0, help="per scraper, seconds")
    parser.add_argument("--push-interval", type=float, default=10.0)
    parser.add_argument("--slow-clients", type=int, default=4, help="dribblers (and as many slow readers)")
    parser.add_argument("--bytes", type=int, default=100, help="sent per connection")
    parser.add_argument("--sample", type=float, default=30.0, help="RSS sample period, seconds")
    parser.add_argument("--profile", type=Path, help="py-spy the agent for the run: raw stacks to this file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    print(json.dumps(result))
    print(render(result))
    if args.profile:
        total, shares = poll_shares(args.profile.read_text())
        print(f"\npoll samples (py-spy, 50 Hz): {total}")
        for path, count in shares.most_common(15):
            print(f"{count:6d} {100 * count / max(total, 1):5.1f}%  {path}")
    return 0 if result["bytes_exact"] and result["agent_alive"] else 1


if __name__ == "__main__":
    sys.exit(main())

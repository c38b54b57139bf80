//! Monitor benchmark (not a test): three monitors in this process on loopback, plaintext gRPC.
//!
//! 1. Proposals: concurrent operator writes (join-token creation, one Raft entry each) for a
//!    fixed time; prints proposals/s and p50/p99 commit latency, median of several runs.
//! 2. Reports: N simulated agents (groups of three PostgreSQL nodes) each reporting every
//!    500 ms to the leader; prints the achieved rate and p50/p99 round trip for growing N.
//!    Reports are soft state, not Raft writes, so this measures the leader's report path.
//!
//! Run: `cargo bench -p ha-monitor --bench monitor` (`BENCH_AGENTS=1000,5000` to choose N,
//! `BENCH_CLIENTS=1,16` the proposal clients, empty for none, `BENCH_SECONDS` for the length
//! of each step). Each step starts once the catalog has settled
//! after registering the new nodes (the leader's commit index stands still for a second). The load generator shares the machine with
//! the monitors, so figures are lower bounds for a monitor on its own host. The monitors and
//! the generator run on separate runtimes (threads `ha-monitor*` and `raft-*` against `load*`),
//! and each report step also prints the CPU time the three monitors spent per report: that
//! figure barely moves with whatever else the machine is doing, where latencies do.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ha_monitor::config::MonitorConfig;
use ha_proto::v1::agent_service_client::AgentServiceClient;
use ha_proto::v1::operator_service_client::OperatorServiceClient;
use ha_proto::v1::{self, NodeKind};
use tokio::net::TcpListener;
use tokio::sync::Mutex;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

struct Cluster {
    _dir: tempfile::TempDir,
    addrs: Vec<String>,
    shutdown: CancellationToken,
}

async fn start_cluster() -> Cluster {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut listeners = Vec::new();
    for _ in 0..3 {
        listeners.push(TcpListener::bind("127.0.0.1:0").await.expect("bind"));
    }
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().expect("addr").to_string())
        .collect();
    let members: Vec<String> = addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{{ id = {}, address = \"{a}\" }}", i + 1))
        .collect();
    let shutdown = CancellationToken::new();
    for (i, listener) in listeners.into_iter().enumerate() {
        let id = i + 1;
        let text = format!(
            "id = {id}\ndev = true\ndata_dir = \"{}\"\nlisten = \"{}\"\nmembers = [{}]\n",
            dir.path().join(format!("m{id}")).display(),
            addrs[i],
            members.join(", ")
        );
        let config = MonitorConfig::parse(&text, std::path::Path::new("bench"), true)
            .expect("bench config is valid");
        let token = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = ha_monitor::server::run(config, listener, token).await {
                eprintln!("monitor {id} failed: {e}");
            }
        });
    }
    Cluster {
        _dir: dir,
        addrs,
        shutdown,
    }
}

async fn channel(addr: &str) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .expect("valid uri")
        .connect()
        .await
        .expect("connect")
}

async fn leader(cluster: &Cluster) -> String {
    let end = Instant::now() + Duration::from_secs(20);
    loop {
        for a in &cluster.addrs {
            let mut c = OperatorServiceClient::new(channel(a).await);
            if c.status(v1::StatusRequest { linearizable: true })
                .await
                .is_ok()
            {
                return a.clone();
            }
        }
        assert!(Instant::now() < end, "no leader");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn proposals(
    leader: &str,
    clients: usize,
    seconds: u64,
    run: usize,
) -> (f64, Duration, Duration) {
    let stop = Arc::new(AtomicBool::new(false));
    let lat = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    let ch = channel(leader).await;
    for c in 0..clients {
        let (stop, lat, ch) = (stop.clone(), lat.clone(), ch.clone());
        tasks.push(tokio::spawn(async move {
            let mut client = OperatorServiceClient::new(ch);
            let mut mine = Vec::new();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let r = client
                    .create_join_token(v1::CreateJoinTokenRequest {
                        request_id: format!("bench-{run}-{c}-{i}"),
                        kind: NodeKind::Postgres.into(),
                        ttl_ms: 60_000,
                        group: "bench".into(),
                        node: format!("bench{c}x{i}"),
                        address: "127.0.0.1".into(),
                    })
                    .await;
                if r.is_ok() {
                    mine.push(t.elapsed());
                }
                i += 1;
            }
            lat.lock().await.extend(mine);
        }));
    }
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.expect("task");
    }
    let mut lat = lat.lock().await.clone();
    lat.sort();
    (
        lat.len() as f64 / seconds as f64,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
    )
}

fn node_name(i: usize) -> String {
    format!("n{i}")
}

/// Registers postgres nodes `from..n` through join tokens, 64 at a time, each followed by
/// its first report, as an agent does when it starts.
async fn register(leader: &str, from: usize, n: usize) {
    let ch = channel(leader).await;
    let mut next = from;
    while next < n {
        let batch: Vec<usize> = (next..(next + 64).min(n)).collect();
        next += batch.len();
        let mut tasks = Vec::new();
        for i in batch {
            let ch = ch.clone();
            tasks.push(tokio::spawn(async move {
                let mut op = OperatorServiceClient::new(ch.clone());
                let token = op
                    .create_join_token(v1::CreateJoinTokenRequest {
                        request_id: format!("reg-token-{i}"),
                        kind: NodeKind::Postgres.into(),
                        ttl_ms: 600_000,
                        group: format!("g{}", i / 3),
                        node: node_name(i),
                        address: "127.0.0.1".into(),
                    })
                    .await
                    .expect("token")
                    .into_inner()
                    .token;
                let mut agent = AgentServiceClient::new(ch);
                agent
                    .join(v1::JoinRequest {
                        token,
                        node: node_name(i),
                        kind: NodeKind::Postgres.into(),
                        endpoint: Some(v1::Endpoint {
                            host: "127.0.0.1".into(),
                            port: 1,
                        }),
                        csr_pem: String::new(),
                        group: String::new(),
                    })
                    .await
                    .expect("join");
                agent.report(report(i)).await.expect("first report");
            }));
        }
        for t in tasks {
            t.await.expect("register task");
        }
    }
}

/// Waits until the leader's commit index stays put for a second: registration and the first
/// reports leave the decide loop with goals for every new group to commit, and that backlog
/// is not part of the steady report load being measured. Returns the wait.
async fn settle(leader: &str) -> Duration {
    let t = Instant::now();
    let (mut last, mut still) = (None, 0);
    while still < 2 && t.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let commit = commit_index(leader).await;
        still = if commit.is_some() && commit == last {
            still + 1
        } else {
            0
        };
        last = commit;
    }
    t.elapsed()
}

/// The leader's Raft commit index, as its status says.
async fn commit_index(leader: &str) -> Option<u64> {
    let mut op = OperatorServiceClient::new(channel(leader).await)
        .max_decoding_message_size(256 * 1024 * 1024);
    let status = op
        .status(v1::StatusRequest {
            linearizable: false,
        })
        .await
        .expect("status")
        .into_inner();
    status
        .monitors
        .iter()
        .find(|m| m.leader)
        .map(|m| m.commit_index)
}

fn report(i: usize) -> v1::ReportRequest {
    v1::ReportRequest {
        observed: Some(v1::ObservedState {
            node: node_name(i),
            kind: NodeKind::Postgres.into(),
            epoch: 0,
            detail: Some(v1::observed_state::Detail::Postgres(
                v1::PostgresObservation {
                    role: v1::PgRole::Stopped.into(),
                    ..Default::default()
                },
            )),
            ..Default::default()
        }),
    }
}

/// `n` agents report every 500 ms for a second of warm-up and then `seconds` measured;
/// returns (reports/s, p50, p99, errors) of the measured part.
async fn reports(leader: &str, n: usize, seconds: u64) -> (f64, Duration, Duration, usize) {
    let connections = 16;
    let mut channels = Vec::new();
    for _ in 0..connections {
        channels.push(channel(leader).await);
    }
    // The first second is warm-up, not measured: every agent's first report of a step finds
    // fresh connections and grows the leader's maps, which a running cluster did long ago.
    let warm = Instant::now() + Duration::from_secs(1);
    let end = warm + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for i in 0..n {
        let ch = channels[i % connections].clone();
        tasks.push(tokio::spawn(async move {
            let mut client = AgentServiceClient::new(ch);
            // Spread the agents over the interval, as real agents started at different times.
            let offset = Duration::from_micros((i as u64 * 500_000) / n as u64);
            let mut tick =
                tokio::time::interval_at(Instant::now() + offset, Duration::from_millis(500));
            let (mut lat, mut errors) = (Vec::new(), 0usize);
            loop {
                let at = tick.tick().await;
                if at >= end {
                    break;
                }
                let t = Instant::now();
                let result = client.report(report(i)).await;
                if at < warm {
                    continue;
                }
                match result {
                    Ok(_) => lat.push(t.elapsed()),
                    Err(_) => errors += 1,
                }
            }
            (lat, errors)
        }));
    }
    let (mut all, mut errors) = (Vec::new(), 0);
    for t in tasks {
        let (lat, e) = t.await.expect("agent task");
        all.extend(lat);
        errors += e;
    }
    all.sort();
    (
        all.len() as f64 / seconds as f64,
        percentile(&all, 0.5),
        percentile(&all, 0.99),
        errors,
    )
}

/// CPU seconds (user + system) spent so far by this process's threads, split into the
/// monitors' threads and the rest (the load generator and the main thread).
fn cpu_seconds() -> (f64, f64) {
    // /proc reports times in USER_HZ, which the kernel ABI fixes at 100 per second.
    const TICKS: f64 = 100.0;
    let (mut monitors, mut rest) = (0.0, 0.0);
    let tasks = std::fs::read_dir("/proc/self/task").expect("read /proc/self/task");
    for task in tasks.flatten() {
        // A thread that ended between the listing and the read counts for nothing.
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let name = &stat[open + 1..close];
        // After the name: state is field 3, utime and stime are fields 14 and 15.
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        let ticks: f64 =
            fields[11].parse::<f64>().unwrap_or(0.0) + fields[12].parse::<f64>().unwrap_or(0.0);
        if name.starts_with("ha-monitor") || name.starts_with("raft-") {
            monitors += ticks / TICKS;
        } else {
            rest += ticks / TICKS;
        }
    }
    (monitors, rest)
}

fn main() {
    let monitors = tokio::runtime::Builder::new_multi_thread()
        .thread_name("ha-monitor")
        .enable_all()
        .build()
        .expect("monitor runtime");
    let cluster = monitors.block_on(start_cluster());
    let load = tokio::runtime::Builder::new_multi_thread()
        .thread_name("load")
        .enable_all()
        .build()
        .expect("load runtime");
    load.block_on(async {
        let seconds: u64 = std::env::var("BENCH_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(5);
        let agents: Vec<usize> = std::env::var("BENCH_AGENTS")
            .ok()
            .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
            .unwrap_or_else(|| vec![1000, 2500, 5000, 10_000]);
        let leader = leader(&cluster).await;
        println!("3 monitors on loopback, leader at {leader}");

        println!("\n== proposals (join-token creation, one Raft entry each), {seconds}s per run");
        let client_counts: Vec<usize> = std::env::var("BENCH_CLIENTS")
            .ok()
            .map(|s| s.split(',').filter_map(|x| x.trim().parse().ok()).collect())
            .unwrap_or_else(|| vec![1, 16, 64]);
        for clients in client_counts {
            let mut rates = Vec::new();
            let mut p50s = Vec::new();
            let mut p99s = Vec::new();
            for run in 0..3 {
                let (rate, p50, p99) = proposals(&leader, clients, seconds, run * 100 + clients).await;
                rates.push(rate);
                p50s.push(p50.as_secs_f64() * 1e3);
                p99s.push(p99.as_secs_f64() * 1e3);
            }
            println!(
                "clients {clients:>3}: {:>7.0} proposals/s, commit p50 {:>6.1} ms, p99 {:>6.1} ms (median of 3 runs)",
                median(rates),
                median(p50s),
                median(p99s)
            );
        }

        println!("\n== agent reports every 500 ms to one leader, {seconds}s per step");
        let mut registered = 0;
        for n in agents {
            if n > registered {
                let t = Instant::now();
                register(&leader, registered, n).await;
                let registered_in = t.elapsed();
                let settled_in = settle(&leader).await;
                println!(
                    "(registered {n} nodes in {:.1}s, catalog settled {:.1}s later)",
                    registered_in.as_secs_f64(),
                    settled_in.as_secs_f64()
                );
                registered = n;
            }
            let (before, commit_before) = (cpu_seconds(), commit_index(&leader).await);
            let (rate, p50, p99, errors) = reports(&leader, n, seconds).await;
            let (after, commit_after) = (cpu_seconds(), commit_index(&leader).await);
            let target = n as f64 * 2.0;
            // The CPU figures span the warm-up second too: count its reports at the same rate.
            let sent = rate * (seconds + 1) as f64;
            println!(
                "agents {n:>6}: {rate:>8.0} reports/s of {target:>6.0} wanted ({:>5.1}%), round trip p50 {:>6.1} ms, p99 {:>6.1} ms, errors {errors}{}",
                100.0 * rate / target,
                p50.as_secs_f64() * 1e3,
                p99.as_secs_f64() * 1e3,
                if p99 < Duration::from_millis(50) && rate >= target * 0.95 { "  sustained" } else { "  NOT sustained" }
            );
            println!(
                "               CPU per report: monitors {:>5.1} us, load generator {:>5.1} us; {} Raft entries committed meanwhile",
                (after.0 - before.0) / sent * 1e6,
                (after.1 - before.1) / sent * 1e6,
                commit_after.unwrap_or(0).saturating_sub(commit_before.unwrap_or(0)),
            );
        }
        cluster.shutdown.cancel();
        tokio::time::sleep(Duration::from_millis(500)).await;
    });
}

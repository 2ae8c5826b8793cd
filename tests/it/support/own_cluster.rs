//! A Redis Cluster of a test's own: redis-server processes with
//! `--cluster-enabled yes` on free ports (their cluster-bus ports, +10000,
//! free too), joined by `redis-cli --cluster create`, killed and their
//! folders deleted on drop. Tests that reshard or fail over a cluster use
//! one of these, never the shared one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::*;

/// Node timeout of a cluster that is not failed over on purpose: long
/// enough that a busy machine never fails a node over by accident.
const QUIET_NODE_TIMEOUT_MS: u64 = 5_000;

pub struct OwnCluster {
    masters: usize,
    replicas: usize,
    nodes: BTreeMap<u16, Child>,
    dir: PathBuf,
}

impl OwnCluster {
    /// `masters` primaries with `replicas_per_master` replicas each.
    pub async fn start(masters: usize, replicas_per_master: usize) -> Self {
        Self::start_with(masters, replicas_per_master, QUIET_NODE_TIMEOUT_MS).await
    }

    /// As `start`, with the cluster's node timeout (how long a master may
    /// be silent before its replica takes over).
    pub async fn start_with(
        masters: usize,
        replicas_per_master: usize,
        node_timeout_ms: u64,
    ) -> Self {
        let count = masters * (1 + replicas_per_master);
        let ports = free_cluster_ports(count);
        let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("own-cluster-{}", unique_namespace("c")));
        let mut nodes = BTreeMap::new();
        for &port in &ports {
            let node_dir = dir.join(port.to_string());
            std::fs::create_dir_all(&node_dir).unwrap();
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--cluster-enabled", "yes"])
                .args(["--cluster-config-file", "nodes.conf"])
                .args(["--cluster-node-timeout", &node_timeout_ms.to_string()])
                .args(["--save", "", "--appendonly", "no"])
                // A replica's first sync at once, not after 5 s.
                .args(["--repl-diskless-sync-delay", "0"])
                .args(["--logfile", "redis.log"])
                .arg("--dir")
                .arg(&node_dir)
                .stdout(Stdio::null())
                .spawn()
                .expect("redis-server on PATH (scripts/dev-services installs it)");
            nodes.insert(port, child);
        }
        let cluster = Self {
            masters,
            replicas: replicas_per_master,
            nodes,
            dir,
        };
        for &port in &ports {
            eventually(
                Duration::from_secs(10),
                "a cluster node to answer",
                || async move { node_query::<String>(port, &["PING"]).await },
            )
            .await;
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = tokio::process::Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", &replicas_per_master.to_string()])
            .arg("--cluster-yes")
            .output()
            .await
            .expect("redis-cli on PATH");
        assert!(
            created.status.success(),
            "redis-cli --cluster create: {}",
            String::from_utf8_lossy(&created.stdout)
        );
        cluster.wait_agreed().await;
        cluster
    }

    /// The seed list stockd takes (`--redis-url` with `--redis-cluster`).
    pub fn url(&self) -> String {
        self.nodes
            .keys()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Ports of the nodes still running.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.keys().copied().collect()
    }

    /// Waits (30 s at most) until every running node says cluster_state:ok
    /// and all of them agree on which nodes are masters serving slots and
    /// on their replicas (a client that reads the slot map from any of
    /// them routes the same way), and every replica has synced.
    pub async fn wait_agreed(&self) {
        let ports = self.ports();
        let (masters, replicas) = (self.masters, self.replicas);
        eventually(
            Duration::from_secs(30),
            "the cluster's nodes to agree",
            || {
                let ports = ports.clone();
                async move {
                    let mut views = BTreeSet::new();
                    for port in ports {
                        let info: String = node_query(port, &["CLUSTER", "INFO"]).await?;
                        if !info.contains("cluster_state:ok") {
                            return None;
                        }
                        // A replica that never synced does not take over
                        // (its data is too old to): wait until it has.
                        let replication: String =
                            node_query(port, &["INFO", "replication"]).await?;
                        if replication.contains("role:slave")
                            && !replication.contains("master_link_status:up")
                        {
                            return None;
                        }
                        let view = NodesView::of(port).await?;
                        if view.masters.len() != masters || view.replicas < masters * replicas {
                            return None;
                        }
                        views.insert(view.masters);
                    }
                    (views.len() == 1).then_some(())
                }
            },
        )
        .await;
    }

    /// The masters serving slots, as a running node sees them.
    pub async fn masters(&self) -> Vec<Master> {
        let view = NodesView::of(self.any_port()).await.expect("CLUSTER NODES");
        view.masters.into_iter().collect()
    }

    /// The hash slot of `key`.
    pub async fn slot_of(&self, key: &str) -> u16 {
        node_query(self.any_port(), &["CLUSTER", "KEYSLOT", key])
            .await
            .expect("CLUSTER KEYSLOT")
    }

    /// The port of the master serving `key`'s slot.
    pub async fn master_of(&self, key: &str) -> u16 {
        let slot = self.slot_of(key).await;
        self.masters()
            .await
            .iter()
            .find(|m| m.serves(slot))
            .map(|m| m.port)
            .unwrap_or_else(|| panic!("no master serves slot {slot}"))
    }

    /// The node id of the node on `port`.
    pub async fn node_id(&self, port: u16) -> String {
        node_query(port, &["CLUSTER", "MYID"])
            .await
            .expect("CLUSTER MYID")
    }

    /// How many slots the master on `port` serves.
    pub async fn slot_count(&self, port: u16) -> usize {
        self.masters()
            .await
            .iter()
            .find(|m| m.port == port)
            .map_or(0, |m| m.slots().count())
    }

    /// kill -9 of the node on `port`; it stays dead (its replica, if any,
    /// takes over after the node timeout).
    pub fn kill9(&mut self, port: u16) {
        let mut child = self.nodes.remove(&port).expect("a node of this cluster");
        let _ = child.kill();
        let _ = child.wait();
        // A killed master is replaced by its replica: as many masters,
        // fewer replicas for `wait_agreed` to wait for.
        self.replicas = 0;
    }

    /// The port of a replica of the master on `port`.
    pub async fn replica_of(&self, port: u16) -> u16 {
        let master = self.node_id(port).await;
        let text: String = node_query(self.any_port(), &["CLUSTER", "NODES"])
            .await
            .expect("CLUSTER NODES");
        text.lines()
            .map(|line| line.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.len() > 3 && f[2].contains("slave") && f[3] == master)
            .and_then(|f| node_port(f[1]))
            .unwrap_or_else(|| panic!("no replica of {port}"))
    }

    /// SIGSTOP (`true`) or SIGCONT (`false`) of the node on `port`: a
    /// stopped replica falls behind its master without being told.
    pub fn pause(&self, port: u16, stopped: bool) {
        let pid = self.nodes[&port].id().to_string();
        let signal = if stopped { "-STOP" } else { "-CONT" };
        let status = Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }

    /// `redis-cli --cluster reshard`: moves `slots` slots from the master
    /// on `from` to the master on `to`, keys and all, while clients go on.
    pub async fn reshard(&self, from: u16, to: u16, slots: usize) -> std::process::Output {
        let (from_id, to_id) = (self.node_id(from).await, self.node_id(to).await);
        tokio::process::Command::new("redis-cli")
            .args(["--cluster", "reshard", &format!("127.0.0.1:{from}")])
            .args(["--cluster-from", &from_id, "--cluster-to", &to_id])
            .args(["--cluster-slots", &slots.to_string()])
            .args(["--cluster-pipeline", "100"])
            .arg("--cluster-yes")
            .output()
            .await
            .expect("redis-cli on PATH")
    }

    fn any_port(&self) -> u16 {
        *self.nodes.keys().next().expect("a running node")
    }
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        for child in self.nodes.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// One command to one node (not through the cluster's routing).
pub async fn node_query<T: redis::FromRedisValue>(port: u16, words: &[&str]) -> Option<T> {
    let mut cmd = redis::cmd(words[0]);
    cmd.arg(&words[1..]);
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).ok()?;
    let mut conn = tokio::time::timeout(
        Duration::from_secs(2),
        client.get_multiplexed_async_connection(),
    )
    .await
    .ok()?
    .ok()?;
    tokio::time::timeout(Duration::from_secs(2), cmd.query_async(&mut conn))
        .await
        .ok()?
        .ok()
}

/// A master as one node's `CLUSTER NODES` shows it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Master {
    pub id: String,
    pub port: u16,
    pub slots: Vec<(u16, u16)>,
}

impl Master {
    pub fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    }

    /// Its slots in ascending order (the order `reshard` takes them in).
    pub fn slots(&self) -> impl Iterator<Item = u16> + '_ {
        let mut ranges = self.slots.clone();
        ranges.sort();
        ranges.into_iter().flat_map(|(a, b)| a..=b)
    }
}

/// One node's view: the masters that serve slots and are not failed, and
/// how many connected replicas it knows.
struct NodesView {
    masters: BTreeSet<Master>,
    replicas: usize,
}

impl NodesView {
    async fn of(port: u16) -> Option<Self> {
        let text: String = node_query(port, &["CLUSTER", "NODES"]).await?;
        let mut masters = BTreeSet::new();
        let mut replicas = 0;
        for line in text.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 8 || fields[2].contains("fail") {
                continue;
            }
            if fields[2].contains("slave") && fields[7] == "connected" {
                replicas += 1;
            }
            if fields[2].contains("master") && fields.len() > 8 {
                // Slot fields "a-b" or "a", migrating ones "[..]".
                let node_port = node_port(fields[1])?;
                let slots = fields[8..]
                    .iter()
                    .filter(|f| !f.starts_with('['))
                    .filter_map(|f| match f.split_once('-') {
                        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                        None => f.parse().ok().map(|a| (a, a)),
                    })
                    .collect();
                masters.insert(Master {
                    id: fields[0].to_owned(),
                    port: node_port,
                    slots,
                });
            }
        }
        Some(Self { masters, replicas })
    }
}

/// The port of a `CLUSTER NODES` address, `ip:port@bus`.
fn node_port(address: &str) -> Option<u16> {
    address.split('@').next()?.rsplit(':').next()?.parse().ok()
}

/// `count` ports free for cluster nodes: each and its bus port (+10000).
fn free_cluster_ports(count: usize) -> Vec<u16> {
    let mut ports = Vec::new();
    let mut held = Vec::new();
    while ports.len() < count {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let Some(bus) = port.checked_add(10_000) else {
            continue;
        };
        if (7000..7006).contains(&port) || (17000..17006).contains(&port) {
            continue;
        }
        if let Ok(bus_listener) = std::net::TcpListener::bind(("127.0.0.1", bus)) {
            // Held until every port is chosen, so none is picked twice.
            held.push(listener);
            held.push(bus_listener);
            ports.push(port);
        }
    }
    ports
}

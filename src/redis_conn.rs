//! The one Redis handle every component uses, on a standalone Redis or a
//! Redis Cluster.
//!
//! Standalone: a multiplexed connection that reconnects by itself, so that
//! concurrent requests share it and pipeline (one round trip per request,
//! however many are in flight). Cluster: the redis crate's cluster client,
//! one multiplexed connection per node, following MOVED and ASK during
//! resharding and failover.
//!
//! On a cluster every command (and every script) must touch keys of one
//! hash slot, and so must a pipeline. Every key of a partition carries the
//! partition's hash tag, so "one partition" is "one slot". Work that spans
//! partitions goes through a [`CommandBatch`]: one pipeline on a standalone Redis,
//! one pipeline per slot, sent concurrently, on a cluster.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::future::join_all;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{MultipleNodeRoutingInfo, RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, Pipeline, RedisFuture, RedisResult, Script, ScriptInvocation, Value};

/// A Redis connection: cheap to clone, every clone shares the sockets.
#[derive(Clone)]
pub enum RedisConn {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

impl RedisConn {
    /// Connects to `url` (a comma-separated list of seed nodes for a
    /// cluster). A command that cannot finish within `timeout` fails (and
    /// the request answers UNAVAILABLE); a lost connection is made again by
    /// the next command.
    pub async fn connect(url: &str, cluster: bool, timeout: Duration) -> RedisResult<Self> {
        if cluster {
            let seeds: Vec<&str> = url
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .collect();
            let client = redis::cluster::ClusterClientBuilder::new(seeds)
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .retries(3)
                .min_retry_wait(50)
                .max_retry_wait(1_000)
                .build()?;
            return Ok(Self::Cluster(client.get_async_connection().await?));
        }
        let client = redis::Client::open(url)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(2)
            .set_max_delay(Duration::from_secs(2));
        Ok(Self::Standalone(
            ConnectionManager::new_with_config(client, config).await?,
        ))
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// Sends `cmd` to every primary (the one server when standalone) and
    /// returns each one's answer, by node.
    pub async fn on_every_primary(&self, cmd: &Cmd) -> RedisResult<Vec<(String, Value)>> {
        match self {
            Self::Standalone(conn) => {
                let value = cmd.query_async(&mut conn.clone()).await?;
                Ok(vec![("standalone".to_owned(), value)])
            }
            Self::Cluster(conn) => {
                let value = conn
                    .clone()
                    .route_command(
                        cmd.clone(),
                        RoutingInfo::MultiNode((MultipleNodeRoutingInfo::AllMasters, None)),
                    )
                    .await?;
                match value {
                    Value::Map(pairs) => Ok(pairs
                        .into_iter()
                        .map(|(node, v)| (redis::from_redis_value(node).unwrap_or_default(), v))
                        .collect()),
                    other => Ok(vec![("cluster".to_owned(), other)]),
                }
            }
        }
    }
}

/// Where a SCAN over every primary stands: the node (by address order)
/// and that node's cursor. Written `<node>.<cursor>`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanCursor {
    pub node: usize,
    pub cursor: u64,
}

impl std::fmt::Display for ScanCursor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.node, self.cursor)
    }
}

impl std::str::FromStr for ScanCursor {
    type Err = ();

    /// `<node>.<cursor>`, or a bare cursor (node 0).
    fn from_str(s: &str) -> Result<Self, ()> {
        let (node, cursor) = s.split_once('.').unwrap_or(("0", s));
        Ok(Self {
            node: node.parse().map_err(|_| ())?,
            cursor: cursor.parse().map_err(|_| ())?,
        })
    }
}

impl RedisConn {
    /// The primaries' addresses, sorted (one entry, unused, when standalone).
    ///
    /// Read from `CLUSTER SLOTS`, the slot map the cluster client itself
    /// routes by: a primary that serves slots is one the client holds a
    /// connection to. (`CLUSTER NODES` of a node that has not yet heard
    /// the latest gossip can still call a fresh replica a master, and
    /// routing to it fails with "connection not found".) A primary
    /// without slots holds no keys, so skipping it misses nothing.
    async fn primaries(&self) -> RedisResult<Vec<(String, u16)>> {
        let Self::Cluster(conn) = self else {
            return Ok(vec![(String::new(), 0)]);
        };
        // Each entry: [first slot, last slot, [host, port, id, ...], replicas...].
        let ranges: Vec<Vec<Value>> = redis::cmd("CLUSTER")
            .arg("SLOTS")
            .query_async(&mut conn.clone())
            .await?;
        let mut primaries = Vec::new();
        for range in ranges {
            if let Some(Value::Array(node)) = range.get(2)
                && let [host, port, ..] = node.as_slice()
            {
                primaries.push((
                    redis::from_redis_value::<String>(host.clone())?,
                    redis::from_redis_value::<u16>(port.clone())?,
                ));
            }
        }
        primaries.sort();
        primaries.dedup();
        Ok(primaries)
    }

    /// One SCAN step over every primary: the keys matching `pattern` and
    /// where to go on (`None` when every node was scanned). A node that
    /// left meanwhile ends the scan early; callers that must see every key
    /// scan again.
    pub async fn scan_step(
        &self,
        at: ScanCursor,
        pattern: &str,
        count: usize,
    ) -> RedisResult<(Vec<String>, Option<ScanCursor>)> {
        let primaries = self.primaries().await?;
        let Some((host, port)) = primaries.get(at.node) else {
            return Ok((Vec::new(), None));
        };
        let mut scan = redis::cmd("SCAN");
        scan.arg(at.cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(count);
        let value = match self {
            Self::Standalone(conn) => scan.query_async(&mut conn.clone()).await?,
            Self::Cluster(conn) => {
                conn.clone()
                    .route_command(
                        scan,
                        RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                            host: host.clone(),
                            port: *port,
                        }),
                    )
                    .await?
            }
        };
        let (next, keys): (u64, Vec<String>) = redis::from_redis_value(value)?;
        let next = match (next, at.node + 1 < primaries.len()) {
            (0, true) => Some(ScanCursor {
                node: at.node + 1,
                cursor: 0,
            }),
            (0, false) => None,
            (cursor, _) => Some(ScanCursor {
                node: at.node,
                cursor,
            }),
        };
        Ok((keys, next))
    }
}

/// Times one Redis round trip: `stockd_redis_duration_seconds{kind}`.
/// Blocking reads (Watch's `XREAD BLOCK`) wait by design and are left out.
fn timed<'a, T: Send + 'a>(kind: &'static str, work: RedisFuture<'a, T>) -> RedisFuture<'a, T> {
    Box::pin(async move {
        let started = std::time::Instant::now();
        let result = work.await;
        let outcome = if result.is_ok() { "ok" } else { "error" };
        metrics::histogram!("stockd_redis_duration_seconds", "kind" => kind, "outcome" => outcome)
            .record(started.elapsed().as_secs_f64());
        result
    })
}

/// Whether a command waits for data by design (`XREAD ... BLOCK`).
fn blocks(cmd: &Cmd) -> bool {
    cmd.args_iter()
        .any(|arg| matches!(arg, redis::Arg::Simple(a) if a.eq_ignore_ascii_case(b"BLOCK")))
}

impl ConnectionLike for RedisConn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        let work = match self {
            Self::Standalone(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        };
        if blocks(cmd) {
            work
        } else {
            timed("command", work)
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        timed(
            "pipeline",
            match self {
                Self::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
                Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
            },
        )
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Standalone(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// One command of a [`CommandBatch`].
enum Item {
    Cmd(Cmd),
    Script(&'static Script, ScriptInvocation<'static>),
}

/// Commands that may belong to different partitions, answered in order.
/// Each is given with a key it touches, which says where it goes.
#[derive(Default)]
pub struct CommandBatch {
    items: Vec<(String, Item)>,
}

impl CommandBatch {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Adds a command that touches `key` (and only keys of its slot).
    pub fn cmd(&mut self, key: impl Into<String>, cmd: Cmd) -> &mut Self {
        self.items.push((key.into(), Item::Cmd(cmd)));
        self
    }

    /// Adds a script call whose keys are all in `key`'s slot.
    pub fn script(
        &mut self,
        key: impl Into<String>,
        script: &'static Script,
        invocation: ScriptInvocation<'static>,
    ) -> &mut Self {
        self.items
            .push((key.into(), Item::Script(script, invocation)));
        self
    }

    /// Runs the batch; the first error reply fails it.
    pub async fn query(&self, conn: &RedisConn) -> RedisResult<Vec<Value>> {
        self.query_each(conn).await?.into_iter().collect()
    }

    /// Runs the batch; one result per command, in order.
    pub async fn query_each(&self, conn: &RedisConn) -> RedisResult<Vec<RedisResult<Value>>> {
        if self.items.is_empty() {
            return Ok(Vec::new());
        }
        // Commands by hash tag, which decides the slot (everything in one
        // group when standalone), in their order within each group.
        let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, (key, _)) in self.items.iter().enumerate() {
            let tag = if conn.is_cluster() { hash_tag(key) } else { "" };
            groups.entry(tag).or_default().push(i);
        }
        let replies = join_all(
            groups
                .values()
                .map(|members| self.query_group(conn, members)),
        )
        .await;
        let mut out: Vec<Option<RedisResult<Value>>> = self.items.iter().map(|_| None).collect();
        for (members, reply) in groups.values().zip(replies) {
            let values = reply?;
            for (&i, value) in members.iter().zip(values) {
                out[i] = Some(value);
            }
        }
        Ok(out
            .into_iter()
            .map(|v| v.expect("every command answered"))
            .collect())
    }

    /// One group's pipeline; scripts the node does not have (a restarted
    /// or promoted node has an empty script cache) are loaded and the group
    /// is sent once more.
    async fn query_group(
        &self,
        conn: &RedisConn,
        members: &[usize],
    ) -> RedisResult<Vec<RedisResult<Value>>> {
        for attempt in 0..2 {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for &i in members {
                match &self.items[i].1 {
                    Item::Cmd(cmd) => {
                        pipe.add_command(cmd.clone());
                    }
                    Item::Script(_, invocation) => {
                        pipe.invoke_script(invocation);
                    }
                }
            }
            let values: Vec<RedisResult<Value>> = pipe.query_async(&mut conn.clone()).await?;
            let missing_script = values
                .iter()
                .any(|v| matches!(v, Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript)));
            if !missing_script || attempt == 1 {
                return Ok(values);
            }
            // SCRIPT LOAD goes to every primary.
            for &i in members {
                if let Item::Script(script, _) = &self.items[i].1 {
                    script
                        .prepare_invoke()
                        .load_async(&mut conn.clone())
                        .await?;
                }
            }
        }
        unreachable!("the loop returns on its second attempt")
    }
}

/// The part of a key that decides its slot: the text between the first
/// `{` and the next `}` when that is not empty, else the whole key (the
/// Redis Cluster rule).
pub fn hash_tag(key: &str) -> &str {
    if let Some(open) = key.find('{')
        && let Some(len) = key[open + 1..].find('}')
        && len > 0
    {
        return &key[open + 1..open + 1 + len];
    }
    key
}

#[cfg(test)]
mod tests {
    use super::hash_tag;

    #[test]
    fn scan_cursors_round_trip() {
        use super::ScanCursor;
        let at = ScanCursor {
            node: 2,
            cursor: 77,
        };
        assert_eq!(at.to_string().parse::<ScanCursor>(), Ok(at));
        assert_eq!(
            "15".parse::<ScanCursor>(),
            Ok(ScanCursor {
                node: 0,
                cursor: 15
            })
        );
        assert!("x.1".parse::<ScanCursor>().is_err());
    }

    #[test]
    fn hash_tags_follow_the_cluster_rule() {
        assert_eq!(hash_tag("ns:{p07}:events"), "p07");
        assert_eq!(hash_tag("ns:{meta}:rewarm"), "meta");
        assert_eq!(hash_tag("plain"), "plain");
        assert_eq!(hash_tag("a{}b{c}"), "a{}b{c}");
        // User parts are encoded, so a brace can never come before the tag.
        assert_eq!(hash_tag("ns:{p01}:stock:%7Bx%7D:y"), "p01");
    }
}

/// The connections' reply parser is redis-rs' with a direct path for
/// complete replies (vendor/README.md): whatever the replies and however
/// the bytes arrive, it must decode exactly what redis-rs' own parser does.
#[cfg(test)]
mod reply_parser {
    use bytes::BytesMut;
    use proptest::prelude::*;
    use tokio_util::codec::Decoder;

    /// One reply as Redis would send it, of the types stockd gets (and a
    /// few RESP3 ones, which the direct path leaves to combine, also inside
    /// an array it started).
    fn reply() -> impl Strategy<Value = Vec<u8>> {
        let bulk = proptest::collection::vec(any::<u8>(), 0..40).prop_map(|bytes| {
            let mut out = format!("${}\r\n", bytes.len()).into_bytes();
            out.extend(bytes);
            out.extend(b"\r\n");
            out
        });
        let leaf = prop_oneof![
            Just(b"+OK\r\n".to_vec()),
            "[a-zA-Z0-9 é\r]{0,12}".prop_map(|s| format!("+{s}\r\n").into_bytes()),
            "(ERR|NOGROUP|NOSCRIPT|LOADING|MOVED) [a-z0-9 ]{0,10}"
                .prop_map(|s| format!("-{s}\r\n").into_bytes()),
            any::<i64>().prop_map(|n| format!(":{n}\r\n").into_bytes()),
            Just(b"$-1\r\n".to_vec()),
            Just(b"*-1\r\n".to_vec()),
            Just(b"_\r\n".to_vec()),
            bulk.clone(),
            bulk,
            (-1000.0f64..1000.0).prop_map(|d| format!(",{d}\r\n").into_bytes()),
            Just(b"#t\r\n".to_vec()),
        ];
        leaf.prop_recursive(4, 64, 6, |inner| {
            prop_oneof![
                3 => proptest::collection::vec(inner.clone(), 0..6).prop_map(|items| {
                    let mut out = format!("*{}\r\n", items.len()).into_bytes();
                    items.into_iter().for_each(|item| out.extend(item));
                    out
                }),
                1 => proptest::collection::vec((inner.clone(), inner), 0..3).prop_map(|pairs| {
                    let mut out = format!("%{}\r\n", pairs.len()).into_bytes();
                    for (k, v) in pairs {
                        out.extend(k);
                        out.extend(v);
                    }
                    out
                }),
            ]
        })
    }

    proptest! {
        #[test]
        fn replies_split_anywhere_decode_as_redis_rs_parses_them(
            replies in proptest::collection::vec(reply(), 1..5),
            chunks in proptest::collection::vec(1usize..48, 0..24),
        ) {
            let expected: Vec<redis::Value> = replies
                .iter()
                .map(|r| redis::parse_redis_value(r).expect("a well-formed reply"))
                .collect();
            let wire: Vec<u8> = replies.concat();
            // The bytes arrive in these chunks (the rest at once).
            let mut cuts = Vec::new();
            let mut at = 0;
            for size in chunks {
                at += size;
                if at >= wire.len() {
                    break;
                }
                cuts.push(at);
            }
            cuts.push(wire.len());
            let mut codec = redis::ValueCodec::default();
            let mut buffer = BytesMut::new();
            let mut decoded = Vec::new();
            let mut from = 0;
            for cut in cuts {
                buffer.extend_from_slice(&wire[from..cut]);
                from = cut;
                while let Some(value) = codec.decode(&mut buffer).expect("decodes") {
                    decoded.push(value);
                }
            }
            prop_assert!(buffer.is_empty(), "{} bytes left", buffer.len());
            prop_assert_eq!(decoded, expected);
        }
    }

    /// A reply the direct path cannot take whole is left to combine, and
    /// what follows it is decoded as before.
    #[test]
    fn malformed_and_partial_replies_behave_as_before() {
        let mut codec = redis::ValueCodec::default();
        // A bulk string whose CRLF is missing is an error, as with combine.
        let mut wrong = BytesMut::from(&b"$3\r\nabcXY"[..]);
        assert!(codec.decode(&mut wrong).is_err());
        // A partial reply waits for the rest.
        let mut codec = redis::ValueCodec::default();
        let mut buffer = BytesMut::from(&b"*2\r\n$3\r\nab"[..]);
        assert_eq!(codec.decode(&mut buffer).unwrap(), None);
        buffer.extend_from_slice(b"c\r\n:7\r\n+OK\r\n");
        assert_eq!(
            codec.decode(&mut buffer).unwrap(),
            Some(redis::Value::Array(vec![
                redis::Value::BulkString(b"abc".to_vec()),
                redis::Value::Int(7)
            ]))
        );
        assert_eq!(codec.decode(&mut buffer).unwrap(), Some(redis::Value::Okay));
        assert_eq!(codec.decode(&mut buffer).unwrap(), None);
    }
}

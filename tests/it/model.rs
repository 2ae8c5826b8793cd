//! Property test: random sequences of operations, with retries and reuse of
//! the same ids, run against the real scripts in Redis and against an
//! in-memory model of DESIGN.md's stock rules. After every step the outcome
//! and the state of every item must agree.

use std::collections::HashMap;

use proptest::prelude::*;
use stockd::domain::{Delta, Item, Level, Lines, RequestId, Ttl};
use stockd::engine::{Changed, Engine, EngineSettings};
use stockd::error::{Error, Shortage};
use stockd::keys::Keyspace;

use crate::support::{
    delete_namespace, establish_markers, redis_cluster, shared_redis, unique_namespace,
};

const SKUS: [&str; 3] = ["apple", "pear", "fig"];
const LOCATIONS: [&str; 2] = ["default", "oslo"];
const ITEMS: usize = SKUS.len() * LOCATIONS.len();

fn item(i: usize) -> (String, String) {
    (
        SKUS[i % SKUS.len()].to_owned(),
        LOCATIONS[i / SKUS.len()].to_owned(),
    )
}

#[derive(Debug, Clone)]
enum Op {
    Set {
        id: u8,
        item: usize,
        available: i64,
        expected: Option<i64>,
    },
    Reserve {
        id: u8,
        lines: Vec<(usize, i64)>,
    },
    Commit {
        id: u8,
    },
    Release {
        id: u8,
    },
    Decrement {
        id: u8,
        lines: Vec<(usize, i64)>,
    },
    Adjust {
        id: u8,
        item: usize,
        delta: i64,
    },
}

fn lines() -> impl Strategy<Value = Vec<(usize, i64)>> {
    proptest::sample::subsequence((0..ITEMS).collect::<Vec<_>>(), 1..=3)
        .prop_flat_map(|items| {
            let n = items.len();
            (Just(items), proptest::collection::vec(1i64..=6, n))
        })
        .prop_map(|(items, qty)| items.into_iter().zip(qty).collect())
}

fn op() -> impl Strategy<Value = Op> {
    // Few ids, so that retries and reuse with another payload happen often.
    let id = 0u8..4;
    prop_oneof![
        2 => (id.clone(), 0..ITEMS, 0i64..12, proptest::option::of(0i64..4))
            .prop_map(|(id, item, available, expected)| Op::Set { id, item, available, expected }),
        4 => (id.clone(), lines()).prop_map(|(id, lines)| Op::Reserve { id, lines }),
        2 => id.clone().prop_map(|id| Op::Commit { id }),
        2 => id.clone().prop_map(|id| Op::Release { id }),
        2 => (id.clone(), lines()).prop_map(|(id, lines)| Op::Decrement { id, lines }),
        1 => (id, 0..ITEMS, prop_oneof![-5i64..=-1, 1i64..=5])
            .prop_map(|(id, item, delta)| Op::Adjust { id, item, delta }),
    ]
}

/// What an operation answered, in a form both sides can produce.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    Ok {
        levels: Vec<(usize, i64, i64, i64)>,
        replayed: bool,
    },
    NotFound,
    Short(Vec<(usize, i64, i64)>),
    AlreadyExists,
    WrongState,
    VersionMismatch,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    Held,
    Committed,
    Released,
    /// Refused for short stock: the id's outcome is that refusal.
    Refused,
}

/// A definite outcome is the id's only one (one outcome per id): a
/// refusal for short stock or a version mismatch is replayed like a
/// success; an unknown item is not an outcome (the item may be created).
fn is_definite(answer: &Answer) -> bool {
    matches!(
        answer,
        Answer::Ok { .. } | Answer::Short(_) | Answer::VersionMismatch
    )
}

#[derive(Default)]
struct Model {
    /// On a Redis Cluster a decrement spanning partitions is a hold and its
    /// commit: two versions per item (docs/design.md, "Cluster mode").
    cluster: Option<Keyspace>,
    /// item -> (available, reserved, version)
    stock: HashMap<usize, (i64, i64, i64)>,
    /// reservation id -> (payload, state, reserve outcome, finish outcome)
    reservations: HashMap<u8, (String, State, Answer, Option<Answer>)>,
    /// request id -> (payload, outcome)
    requests: HashMap<u8, (String, Answer)>,
}

impl Model {
    fn levels(&self, items: impl Iterator<Item = usize>) -> Vec<(usize, i64, i64, i64)> {
        items
            .map(|i| {
                let (a, r, v) = self.stock[&i];
                (i, a, r, v)
            })
            .collect()
    }

    /// Checks lines against stock: NotFound first, then short lines.
    fn refuse(&self, lines: &[(usize, i64)]) -> Option<Answer> {
        if lines.iter().any(|(i, _)| !self.stock.contains_key(i)) {
            return Some(Answer::NotFound);
        }
        let short: Vec<_> = lines
            .iter()
            .filter(|(i, q)| self.stock[i].0 < *q)
            .map(|(i, q)| (*i, *q, self.stock[i].0))
            .collect();
        (!short.is_empty()).then_some(Answer::Short(short))
    }

    fn change(&mut self, i: usize, d_avail: i64, d_resv: i64) {
        let s = self.stock.entry(i).or_insert((0, 0, 0));
        *s = (s.0 + d_avail, s.1 + d_resv, s.2 + 1);
    }

    /// Idempotent request: replay, conflict, or run `apply`.
    fn request(
        &mut self,
        id: u8,
        payload: String,
        apply: impl FnOnce(&mut Self) -> Answer,
    ) -> Answer {
        if let Some((p, answer)) = self.requests.get(&id) {
            return if *p == payload {
                replay(answer)
            } else {
                Answer::AlreadyExists
            };
        }
        let answer = apply(self);
        if is_definite(&answer) {
            self.requests.insert(id, (payload, answer.clone()));
        }
        answer
    }

    /// Whether `op` reuses an id for another payload (whose refusal a
    /// cluster gives only when the two meet in one partition).
    fn reuses_an_id(&self, op: &Op) -> bool {
        let payload = |op: &Op| match op {
            Op::Set {
                item,
                available,
                expected,
                ..
            } => format!("set {item} {available} {expected:?}"),
            Op::Decrement { lines, .. } => format!("decrement {}", canonical(lines)),
            Op::Adjust { item, delta, .. } => format!("adjust {item} {delta}"),
            Op::Reserve { lines, .. } => canonical(lines),
            Op::Commit { .. } | Op::Release { .. } => String::new(),
        };
        match op {
            Op::Set { id, .. } | Op::Decrement { id, .. } | Op::Adjust { id, .. } => self
                .requests
                .get(id)
                .is_some_and(|(p, _)| *p != payload(op)),
            Op::Reserve { id, .. } => self
                .reservations
                .get(id)
                .is_some_and(|(p, ..)| *p != payload(op)),
            Op::Commit { .. } | Op::Release { .. } => false,
        }
    }

    fn apply(&mut self, op: &Op) -> Answer {
        match op {
            Op::Set {
                id,
                item,
                available,
                expected,
            } => {
                let payload = format!("set {item} {available} {expected:?}");
                let (item, available, expected) = (*item, *available, *expected);
                self.request(*id, payload, |m| {
                    let (a, _, v) = m.stock.get(&item).copied().unwrap_or((0, 0, 0));
                    if expected.is_some_and(|e| e != v) {
                        return Answer::VersionMismatch;
                    }
                    m.change(item, available - a, 0);
                    Answer::Ok {
                        levels: m.levels([item].into_iter()),
                        replayed: false,
                    }
                })
            }
            Op::Decrement { id, lines } => {
                let payload = format!("decrement {}", canonical(lines));
                self.request(*id, payload, |m| {
                    if let Some(refusal) = m.refuse(lines) {
                        return refusal;
                    }
                    let held_then_committed = m.cluster.as_ref().is_some_and(|keys| {
                        let mut parts: Vec<_> = lines
                            .iter()
                            .map(|(i, _)| keys.partition_of(&item(*i).0))
                            .collect();
                        parts.sort();
                        parts.dedup();
                        parts.len() > 1
                    });
                    for (i, q) in lines {
                        if held_then_committed {
                            m.change(*i, -q, *q);
                            m.change(*i, 0, -q);
                        } else {
                            m.change(*i, -q, 0);
                        }
                    }
                    Answer::Ok {
                        levels: m.levels(lines.iter().map(|l| l.0)),
                        replayed: false,
                    }
                })
            }
            Op::Adjust { id, item, delta } => {
                let payload = format!("adjust {item} {delta}");
                let (item, delta) = (*item, *delta);
                self.request(*id, payload, |m| {
                    if let Some(refusal) = m.refuse(&[(item, -delta)]).filter(|_| delta < 0) {
                        return refusal;
                    }
                    if !m.stock.contains_key(&item) {
                        return Answer::NotFound;
                    }
                    m.change(item, delta, 0);
                    Answer::Ok {
                        levels: m.levels([item].into_iter()),
                        replayed: false,
                    }
                })
            }
            Op::Reserve { id, lines } => {
                let payload = canonical(lines);
                if let Some((p, _, answer, _)) = self.reservations.get(id) {
                    return if *p == payload {
                        replay(answer)
                    } else {
                        Answer::AlreadyExists
                    };
                }
                if let Some(refusal) = self.refuse(lines) {
                    if is_definite(&refusal) {
                        self.reservations
                            .insert(*id, (payload, State::Refused, refusal.clone(), None));
                    }
                    return refusal;
                }
                for (i, q) in lines {
                    self.change(*i, -q, *q);
                }
                let answer = Answer::Ok {
                    levels: self.levels(lines.iter().map(|l| l.0)),
                    replayed: false,
                };
                self.reservations
                    .insert(*id, (payload, State::Held, answer.clone(), None));
                answer
            }
            Op::Commit { id } | Op::Release { id } => {
                let commit = matches!(op, Op::Commit { .. });
                let Some((payload, state, _, fin)) = self.reservations.get(id).cloned() else {
                    return Answer::NotFound;
                };
                match (state, commit) {
                    (State::Refused, _) => Answer::NotFound,
                    (State::Committed, true) | (State::Released, false) => replay(&fin.unwrap()),
                    (State::Committed, false) | (State::Released, true) => Answer::WrongState,
                    (State::Held, _) => {
                        let lines = parse_canonical(&payload);
                        for (i, q) in &lines {
                            self.change(*i, if commit { 0 } else { *q }, -q);
                        }
                        let answer = Answer::Ok {
                            levels: self.levels(lines.iter().map(|l| l.0)),
                            replayed: false,
                        };
                        let entry = self.reservations.get_mut(id).unwrap();
                        entry.1 = if commit {
                            State::Committed
                        } else {
                            State::Released
                        };
                        entry.3 = Some(answer.clone());
                        answer
                    }
                }
            }
        }
    }
}

fn replay(answer: &Answer) -> Answer {
    match answer {
        Answer::Ok { levels, .. } => Answer::Ok {
            levels: levels.clone(),
            replayed: true,
        },
        other => other.clone(),
    }
}

/// Lines sorted by item: the same set of lines is the same payload. The
/// engine keeps a reservation's lines in request order, and so must the
/// model's answers: the reservation's first ordering is kept in the payload.
fn canonical(lines: &[(usize, i64)]) -> String {
    let mut sorted = lines.to_vec();
    sorted.sort_unstable();
    let key: Vec<String> = sorted.iter().map(|(i, q)| format!("{i}:{q}")).collect();
    let order: Vec<String> = lines.iter().map(|(i, q)| format!("{i}:{q}")).collect();
    format!("{}|{}", key.join(","), order.join(","))
}

fn parse_canonical(payload: &str) -> Vec<(usize, i64)> {
    payload
        .split('|')
        .nth(1)
        .unwrap()
        .split(',')
        .map(|l| {
            let (i, q) = l.split_once(':').unwrap();
            (i.parse().unwrap(), q.parse().unwrap())
        })
        .collect()
}

fn index_of(sku: &str, location: &str) -> usize {
    let s = SKUS.iter().position(|x| *x == sku).unwrap();
    let l = LOCATIONS.iter().position(|x| *x == location).unwrap();
    l * SKUS.len() + s
}

fn to_answer(result: Result<Changed, Error>) -> Answer {
    match result {
        Ok(changed) => Answer::Ok {
            levels: changed
                .levels
                .iter()
                .map(|l| {
                    (
                        index_of(&l.sku, &l.location),
                        l.available,
                        l.reserved,
                        l.version,
                    )
                })
                .collect(),
            replayed: changed.replayed,
        },
        Err(Error::UnknownItems(_) | Error::UnknownReservation(_)) => Answer::NotFound,
        Err(Error::InsufficientStock(short)) => Answer::Short(
            short
                .iter()
                .map(
                    |Shortage {
                         sku,
                         location,
                         requested,
                         available,
                     }| { (index_of(sku, location), *requested, *available) },
                )
                .collect(),
        ),
        Err(Error::AlreadyExists(_)) => Answer::AlreadyExists,
        Err(Error::ReservationClosed { .. }) => Answer::WrongState,
        Err(Error::VersionMismatch { .. }) => Answer::VersionMismatch,
        Err(other) => panic!("unexpected error {other:?}"),
    }
}

fn domain_lines(lines: &[(usize, i64)]) -> Lines {
    Lines::parse(
        "lines",
        lines
            .iter()
            .map(|(i, q)| {
                let (s, l) = item(*i);
                (s, l, *q)
            })
            .collect::<Vec<_>>()
            .into_iter(),
    )
    .unwrap()
}

fn domain_item(i: usize) -> Item {
    let (s, l) = item(i);
    Item::parse("", s, l).unwrap()
}

async fn run(engine: &Engine, op: &Op) -> Answer {
    let id = |prefix: &str, id: u8| RequestId::parse("id", format!("{prefix}{id}")).unwrap();
    match op {
        Op::Set {
            id: n,
            item,
            available,
            expected,
        } => to_answer(
            engine
                .set(
                    &id("q", *n),
                    &domain_item(*item),
                    Level::parse("a", *available).unwrap(),
                    *expected,
                )
                .await,
        ),
        Op::Decrement { id: n, lines } => {
            to_answer(engine.decrement(&id("q", *n), &domain_lines(lines)).await)
        }
        Op::Adjust { id: n, item, delta } => to_answer(
            engine
                .adjust(
                    &id("q", *n),
                    &domain_item(*item),
                    Delta::parse("d", *delta).unwrap(),
                    "",
                )
                .await,
        ),
        Op::Reserve { id: n, lines } => {
            let result = engine
                .reserve(
                    &id("r", *n),
                    &domain_lines(lines),
                    Ttl::parse("t", 600).unwrap(),
                )
                .await
                .map(|r| Changed {
                    levels: r.levels,
                    replayed: r.replayed,
                });
            to_answer(result)
        }
        Op::Commit { id: n } => to_answer(engine.commit(&id("r", *n)).await),
        Op::Release { id: n } => to_answer(engine.release(&id("r", *n)).await),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn scripts_agree_with_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let namespace = unique_namespace("model");
            let conn = shared_redis().await;
            let keys = Keyspace::new(namespace.clone(), 4);
            let markers = establish_markers(&mut conn.clone(), &keys).await;
            let engine = Engine::new(conn.clone(), keys, markers, EngineSettings::default());
            let mut model = Model {
                cluster: redis_cluster().then(|| Keyspace::new(namespace.clone(), 4)),
                ..Model::default()
            };
            let all_items: Vec<Item> = (0..ITEMS).map(domain_item).collect();
            for (step, op) in ops.iter().enumerate() {
                if model.cluster.is_some() && model.reuses_an_id(op) {
                    continue;
                }
                let expected = model.apply(op);
                let actual = run(&engine, op).await;
                assert_eq!(actual, expected, "step {step}: {op:?}");
                let (levels, _) = engine.get(&all_items).await.unwrap();
                for level in levels {
                    let i = index_of(&level.sku, &level.location);
                    let state = (level.available, level.reserved, level.version);
                    assert_eq!(Some(&state), model.stock.get(&i), "step {step}: item {i}");
                    assert!(state.0 >= 0 && state.1 >= 0, "never negative");
                }
            }
            delete_namespace(&mut conn.clone(), &namespace).await;
        });
    }
}

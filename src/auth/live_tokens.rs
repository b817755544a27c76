//! Every live api token's hash, held in memory, so that authenticating a
//! bearer token never waits on the database and a flood of made-up tokens
//! costs the database nothing.
//!
//! The set is loaded at start and again whenever the catalog version moves
//! (a token change moves it: migration 0006): on PostgreSQL at once, by the
//! replica agent's `LISTEN`, elsewhere within its one-second poll.
//!
//! A token that is not in the set was either made up or created a moment
//! ago, before this process heard of it. Such a token is never looked up by
//! itself: its request waits for the next *shared check*, one read of the
//! catalog version (and a reload of the set when it moved) that starts
//! after the request arrived, so a token that existed when it was sent is
//! found. Checks run one at a time and at most every [`CHECK_EVERY`],
//! whatever the number of unknown tokens; each peer may send at most
//! [`MISSES_PER_PEER`] unknown tokens a second to wait for one, the rest are
//! refused at once. A token in the set never waits for anything.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv6Addr},
    num::NonZeroU32,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use arc_swap::ArcSwap;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::{sync::Mutex, time::Instant};

use super::{Principal, PrincipalKind};
use crate::store::{Store, StoreError};

/// The shortest time between two shared checks.
pub const CHECK_EVERY: Duration = Duration::from_millis(100);

/// Unknown tokens a second each peer may have checked (burst: twice that).
pub const MISSES_PER_PEER: u32 = 10;

/// How long a shared check may take before its waiters are refused.
const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Peers told apart by the per-peer budget before forgotten ones are dropped.
const MAX_TRACKED_PEERS: usize = 10_000;

/// What happened to tokens that were not in memory (the metrics' source).
#[derive(Debug, Default)]
pub struct TokenStats {
    checks: AtomicU64,
    found: AtomicU64,
    unknown: AtomicU64,
    over_budget: AtomicU64,
}

impl TokenStats {
    /// Shared checks run (database reads of the catalog version).
    pub fn checks(&self) -> u64 {
        self.checks.load(Ordering::Relaxed)
    }

    /// Unknown tokens by outcome: found by a check, still unknown after
    /// one, refused without one (the peer was over its budget).
    pub fn misses(&self) -> [(&'static str, u64); 3] {
        [
            ("found", self.found.load(Ordering::Relaxed)),
            ("unknown", self.unknown.load(Ordering::Relaxed)),
            ("over_peer_budget", self.over_budget.load(Ordering::Relaxed)),
        ]
    }
}

/// The live tokens as of one catalog version.
#[derive(Default)]
struct Loaded {
    /// `None` until the first load.
    version: Option<i64>,
    by_hash: HashMap<String, Arc<Principal>>,
}

pub struct LiveTokens {
    loaded: ArcSwap<Loaded>,
    /// One load at a time (the agent's reloads and the shared checks').
    reload_lock: Mutex<()>,
    /// When the last shared check started; held while one runs.
    last_check: Mutex<Option<Instant>>,
    per_peer: DefaultKeyedRateLimiter<IpAddr>,
    stats: Arc<TokenStats>,
}

impl Default for LiveTokens {
    fn default() -> Self {
        let per_second = NonZeroU32::new(MISSES_PER_PEER).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(2 * MISSES_PER_PEER).unwrap_or(per_second);
        Self {
            loaded: ArcSwap::default(),
            reload_lock: Mutex::new(()),
            last_check: Mutex::new(None),
            per_peer: RateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst)),
            stats: Arc::default(),
        }
    }
}

impl LiveTokens {
    pub fn stats(&self) -> &Arc<TokenStats> {
        &self.stats
    }

    /// The principal of the live token with this hash, if this process
    /// knows it.
    pub fn get(&self, hash: &str) -> Option<Arc<Principal>> {
        self.loaded.load().by_hash.get(hash).cloned()
    }

    /// Loads the live tokens from `keyward_api_tokens` (revocations take
    /// effect here).
    pub async fn reload(&self, store: &Store) -> Result<(), StoreError> {
        let _one_at_a_time = self.reload_lock.lock().await;
        // The version first: a change between the two reads makes the next
        // check load again, never miss it.
        let version = store.catalog_version().await?;
        let by_hash = store
            .list_tokens()
            .await?
            .into_iter()
            .filter(|t| t.revoked_at.is_none())
            .map(|t| {
                let principal = Principal {
                    name: t.name,
                    kind: PrincipalKind::Token,
                    roles: t.roles,
                    scope: t.scope,
                };
                (t.token_hash, Arc::new(principal))
            })
            .collect();
        self.loaded.store(Arc::new(Loaded {
            version: Some(version),
            by_hash,
        }));
        Ok(())
    }

    /// A token this process does not know, perhaps created since its last
    /// load: waits for a shared check that starts after now (see the module
    /// documentation), then answers from the set. `None` at once when
    /// `peer` is over its budget.
    pub async fn find_new(
        &self,
        store: &Store,
        hash: &str,
        peer: Option<IpAddr>,
    ) -> Option<Arc<Principal>> {
        let arrived = Instant::now();
        if self.per_peer.check_key(&budget_key(peer)).is_err() {
            self.stats.over_budget.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.check_after(store, arrived).await;
        let found = self.get(hash);
        let outcome = if found.is_some() {
            &self.stats.found
        } else {
            &self.stats.unknown
        };
        outcome.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Returns once a shared check that started at or after `arrived` has
    /// run (this call's, or another's).
    async fn check_after(&self, store: &Store, arrived: Instant) {
        let mut last = self.last_check.lock().await;
        if let Some(started) = *last {
            if started >= arrived {
                return;
            }
            tokio::time::sleep_until(started + CHECK_EVERY).await;
        }
        let started = Instant::now();
        *last = Some(started);
        self.stats.checks.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(CHECK_TIMEOUT, self.check(store)).await {
            Ok(Ok(())) => {}
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "checking for new api tokens failed; unknown tokens are refused");
            }
            Err(_) => {
                tracing::warn!(timeout = ?CHECK_TIMEOUT, "checking for new api tokens timed out; unknown tokens are refused");
            }
        }
        if self.per_peer.len() > MAX_TRACKED_PEERS {
            self.per_peer.retain_recent();
        }
    }

    /// Reads the catalog version and reloads the set if it moved.
    async fn check(&self, store: &Store) -> Result<(), StoreError> {
        let version = store.catalog_version().await?;
        if self.loaded.load().version != Some(version) {
            self.reload(store).await?;
        }
        Ok(())
    }
}

/// Whom the per-peer budget counts: an IPv6 peer by its /64 (one host may
/// hold a whole /64), an IPv4 peer by its address.
fn budget_key(peer: Option<IpAddr>) -> IpAddr {
    match peer {
        Some(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_none() => {
            let [a, b, c, d, ..] = v6.segments();
            IpAddr::V6(Ipv6Addr::new(a, b, c, d, 0, 0, 0, 0))
        }
        Some(IpAddr::V6(v6)) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        Some(v4) => v4,
        None => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::auth::{token, Role, Scope};

    async fn store(dir: &tempfile::TempDir) -> Store {
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("k.db").display());
        let store = Store::connect(&url).await.unwrap();
        store.migrate().await.unwrap();
        store
    }

    #[test]
    fn peers_are_budgeted_by_address_and_ipv6_by_prefix() {
        let v4 = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7));
        assert_eq!(budget_key(Some(v4)), v4);
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(budget_key(Some(a)), budget_key(Some(b)));
        assert_ne!(budget_key(Some(a)), budget_key(Some(c)));
        let mapped: IpAddr = "::ffff:10.0.0.7".parse().unwrap();
        assert_eq!(budget_key(Some(mapped)), v4);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_of_unknown_tokens_costs_a_few_checks_and_a_new_token_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(&dir).await;
        let tokens = Arc::new(LiveTokens::default());
        tokens.reload(&store).await.unwrap();

        // 2,000 made-up tokens from 200 peers at once, while a token is
        // created that this process has not loaded.
        let flood: Vec<_> = (0..2_000u32)
            .map(|i| {
                let (tokens, store) = (Arc::clone(&tokens), store.clone());
                let peer = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i % 200));
                tokio::spawn(async move {
                    let fake = token::hash(&token::generate());
                    tokens.find_new(&store, &fake, Some(peer)).await
                })
            })
            .collect();
        let secret = token::generate();
        store
            .insert_token(
                "fresh",
                &token::hash(&secret),
                &[Role::Decrypt],
                &Scope::default(),
            )
            .await
            .unwrap();
        let fresh = tokens
            .find_new(
                &store,
                &token::hash(&secret),
                Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            )
            .await
            .expect("a token created before its first use is found on that use");
        assert_eq!(fresh.name, "fresh");
        for call in flood {
            assert!(call.await.unwrap().is_none());
        }
        let checks = tokens.stats().checks();
        assert!(
            (1..=5).contains(&checks),
            "2,001 unknown tokens at once cost {checks} database checks"
        );
        // Known now: no check at all.
        assert!(tokens.get(&token::hash(&secret)).is_some());

        // One peer's flood at once: beyond its budget, refused without
        // waiting for a check.
        let peer = Some(IpAddr::V4(Ipv4Addr::new(10, 9, 9, 9)));
        let flood: Vec<_> = (0..100)
            .map(|_| {
                let (tokens, store) = (Arc::clone(&tokens), store.clone());
                tokio::spawn(async move {
                    let fake = token::hash(&token::generate());
                    tokens.find_new(&store, &fake, peer).await
                })
            })
            .collect();
        for call in flood {
            assert!(call.await.unwrap().is_none());
        }
        let [_, _, (_, over_budget)] = tokens.stats().misses();
        assert!(
            over_budget >= 100 - 2 * u64::from(MISSES_PER_PEER) - 5,
            "{over_budget} of one peer's 100 unknown tokens were over its budget"
        );
    }
}

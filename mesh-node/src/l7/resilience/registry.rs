//! The resilience state of every targeted Service, and how it survives config updates.
//!
//! Each Service gets its own [`ServiceResilience`]: the compiled policy plus the state its
//! sections need (retry budget, circuit breaker, outlier detector, rate limiter). A
//! [`Registry`] is immutable once built (share it behind an `ArcSwap`); on every config
//! update the waypoint builds the next one with [`Registry::rebuild`], which hands each
//! Service the state it had wherever the section's configuration is unchanged: changing a
//! rate limit does not forget which endpoints are ejected, and an update that changes nothing
//! keeps everything. State of a changed section starts afresh; permits taken from the old one
//! stay valid and release into it.
//!
//! When several policies target the same Service, the first in `namespace/name` order applies
//! and the others are reported as conflicting for that Service ([`Registry::condition`]).

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use super::{
    Resilience, TrafficPolicyError,
    breaker::{CircuitBreaker, ConnectionPermit, Overflow, RequestPermit},
    compile,
    fault::FaultDecision,
    outlier::OutlierDetector,
    rate_limit::{RateDecision, RateLimiter},
    retry::{NoRetry, Outcome, Replay, RetryBudget},
};
use crate::policy::{PolicyId, status::Condition};

/// One Service's policy and state.
#[derive(Debug)]
pub struct ServiceResilience {
    policy: Arc<Resilience>,
    budget: Option<Arc<RetryBudget>>,
    breaker: Option<Arc<CircuitBreaker>>,
    outliers: Option<Arc<OutlierDetector>>,
    rate_limiter: Option<Arc<RateLimiter>>,
}

/// `previous`'s state when its configuration equals `config`, fresh state otherwise.
fn keep_or_new<C: PartialEq + Copy, S>(
    config: Option<C>,
    previous: Option<&Arc<S>>,
    config_of: impl Fn(&S) -> C,
    new: impl Fn(C) -> S,
) -> Option<Arc<S>> {
    let config = config?;
    match previous {
        Some(state) if config_of(state) == config => Some(state.clone()),
        _ => Some(Arc::new(new(config))),
    }
}

impl ServiceResilience {
    /// Fresh state for `policy`.
    pub fn new(policy: Arc<Resilience>) -> Self {
        Self::carried_over(policy, None)
    }

    fn carried_over(policy: Arc<Resilience>, previous: Option<&Self>) -> Self {
        let budget = keep_or_new(
            policy.retries.as_ref().map(|r| r.budget),
            previous.and_then(|p| p.budget.as_ref()),
            RetryBudget::limits,
            RetryBudget::new,
        );
        let breaker = keep_or_new(
            policy.connection_pool,
            previous.and_then(|p| p.breaker.as_ref()),
            CircuitBreaker::limits,
            CircuitBreaker::new,
        );
        let outliers = keep_or_new(
            policy.outlier_detection,
            previous.and_then(|p| p.outliers.as_ref()),
            OutlierDetector::policy,
            OutlierDetector::new,
        );
        let rate_limiter = keep_or_new(
            policy.rate_limit,
            previous.and_then(|p| p.rate_limiter.as_ref()),
            RateLimiter::policy,
            RateLimiter::new,
        );
        Self {
            policy,
            budget,
            breaker,
            outliers,
            rate_limiter,
        }
    }

    pub fn policy(&self) -> &Resilience {
        &self.policy
    }

    pub fn breaker(&self) -> Option<&CircuitBreaker> {
        self.breaker.as_deref()
    }

    /// Present with `outlierDetection`; the caller keeps its endpoints current with
    /// [`OutlierDetector::set_endpoints`].
    pub fn outliers(&self) -> Option<&OutlierDetector> {
        self.outliers.as_deref()
    }

    pub fn retry_budget(&self) -> Option<&RetryBudget> {
        self.budget.as_deref()
    }

    pub fn rate_limiter(&self) -> Option<&RateLimiter> {
        self.rate_limiter.as_deref()
    }

    /// The rate limit verdict for a request (always `Allow` without `rateLimit`).
    pub fn check_rate(&self, route: &str, source: Option<&str>) -> RateDecision {
        self.rate_limiter
            .as_ref()
            .map_or(RateDecision::Allow, |l| l.check(route, source))
    }

    /// The faults to inject into a request (none without `fault`).
    pub fn fault(&self, rng: &mut fastrand::Rng) -> FaultDecision {
        self.policy
            .fault
            .map_or_else(FaultDecision::default, |f| f.decide(rng))
    }

    /// A request slot (always granted without `maxRequests`); hold it while the request is
    /// in flight upstream, retries included. An admitted request counts towards the retry
    /// budget; a refused one does not, as it never reaches the service.
    pub async fn admit(&self) -> Result<Option<RequestPermit>, Overflow> {
        let permit = match &self.breaker {
            Some(breaker) => Some(breaker.request().await?),
            None => None,
        };
        if let Some(budget) = &self.budget {
            budget.record_request();
        }
        Ok(permit)
    }

    /// A slot for a new upstream connection (always granted without `maxConnections`).
    pub fn connection(&self) -> Result<Option<ConnectionPermit>, Overflow> {
        self.breaker
            .as_ref()
            .map(|b| b.try_connection())
            .transpose()
    }

    /// The time limit of each try, if the policy sets one.
    pub fn per_try_timeout(&self) -> Option<Duration> {
        self.policy.retries.as_ref()?.per_try_timeout
    }

    /// After try number `tries` (1 for the first) to `endpoint` ended with `outcome`: records
    /// it for outlier detection, then decides whether to retry: `Ok(backoff)` to wait and
    /// retry, or why not. Call it after every try, successful ones included: a success
    /// resets the endpoint's error count (and is `NotRetriable`).
    pub fn after_try(
        &self,
        endpoint: Option<SocketAddr>,
        tries: u32,
        outcome: Outcome,
        replay: Replay,
        rng: &mut fastrand::Rng,
    ) -> Result<Duration, NoRetry> {
        if let (Some(outliers), Some(endpoint)) = (&self.outliers, endpoint) {
            outliers.record(endpoint, outcome);
        }
        match (&self.policy.retries, &self.budget) {
            (Some(retries), Some(budget)) => retries.next(budget, tries, outcome, replay, rng),
            _ => Err(NoRetry::NotRetriable),
        }
    }

    /// The candidates not ejected (all of them without `outlierDetection`).
    pub fn choose<'a, T>(
        &self,
        candidates: &'a [T],
        addr_of: impl Fn(&T) -> SocketAddr,
    ) -> Vec<&'a T> {
        match &self.outliers {
            Some(outliers) => outliers.choose(candidates, addr_of),
            None => candidates.iter().collect(),
        }
    }
}

/// A Service targeted by two policies; `ignored` does not apply to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    pub namespace: String,
    pub service: String,
    pub applied: PolicyId,
    pub ignored: PolicyId,
}

/// Every targeted Service's resilience.
#[derive(Debug, Default)]
pub struct Registry {
    /// namespace -> Service name -> state.
    services: HashMap<String, HashMap<String, Arc<ServiceResilience>>>,
    conflicts: Vec<Conflict>,
}

impl Registry {
    /// The registry for `policies` (the accepted ones), keeping this one's state wherever
    /// the configuration did not change.
    pub fn rebuild(&self, policies: impl IntoIterator<Item = Resilience>) -> Self {
        let mut policies: Vec<Arc<Resilience>> = policies.into_iter().map(Arc::new).collect();
        policies.sort_by(|a, b| a.id.cmp(&b.id));
        let mut next = Self::default();
        for policy in policies {
            for service in &policy.targets {
                let namespace = &policy.id.namespace;
                let services = next.services.entry(namespace.clone()).or_default();
                if let Some(taken) = services.get(service) {
                    next.conflicts.push(Conflict {
                        namespace: namespace.clone(),
                        service: service.clone(),
                        applied: taken.policy.id.clone(),
                        ignored: policy.id.clone(),
                    });
                    continue;
                }
                let previous = self.get(namespace, service);
                let state = match previous {
                    Some(p) if *p.policy == *policy => p.clone(),
                    _ => Arc::new(ServiceResilience::carried_over(
                        policy.clone(),
                        previous.map(Arc::as_ref),
                    )),
                };
                services.insert(service.clone(), state);
            }
        }
        next
    }

    /// The resilience of Service `namespace/service`, if a policy targets it.
    pub fn get(&self, namespace: &str, service: &str) -> Option<&Arc<ServiceResilience>> {
        self.services.get(namespace)?.get(service)
    }

    /// Services targeted by more than one policy.
    pub fn conflicts(&self) -> &[Conflict] {
        &self.conflicts
    }

    /// The `Accepted` condition of the object `id` given its compile result: the result's
    /// own, unless another policy took some of its Services (`Conflicted`).
    pub fn condition(
        &self,
        id: &PolicyId,
        compiled: &Result<Resilience, TrafficPolicyError>,
        generation: Option<i64>,
    ) -> Condition {
        let mut condition = compile::condition(compiled, generation);
        let lost: Vec<&Conflict> = self.conflicts.iter().filter(|c| &c.ignored == id).collect();
        if let (Ok(policy), false) = (compiled, lost.is_empty()) {
            let services: Vec<String> = lost
                .iter()
                .map(|c| format!("{} (taken by {})", c.service, c.applied.name))
                .collect();
            let rest = if lost.len() < policy.targets.len() {
                "applied to its other targets"
            } else {
                "it applies to none of its targets"
            };
            condition.status = "False".into();
            condition.reason = "Conflicted".into();
            condition.message = format!(
                "not applied to {}: a policy earlier in name order targets them; {rest}",
                services.join(", ")
            );
        }
        condition
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::l7::resilience::TrafficPolicy;

    fn compile(name: &str, spec: serde_json::Value) -> Resilience {
        TrafficPolicy::compile("shop", name, Some(1), &spec).expect("a valid policy")
    }

    fn spec(rps: u32) -> serde_json::Value {
        json!({
            "targetRefs": [{"group": "", "kind": "Service", "name": "reviews"}],
            "retries": {"attempts": 2},
            "connectionPool": {"maxConnections": 1},
            "outlierDetection": {"consecutiveErrors": 1, "maxEjectionPercent": 50},
            "rateLimit": {"requestsPerSecond": rps, "burst": 1},
        })
    }

    fn endpoint(i: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, i], 80))
    }

    #[tokio::test(start_paused = true)]
    async fn an_unchanged_policy_keeps_its_state() {
        let first = Registry::default().rebuild([compile("p", spec(1))]);
        let state = first.get("shop", "reviews").expect("targeted").clone();
        let _connection = state.connection().expect("a slot");
        let again = first.rebuild([compile("p", spec(1))]);
        let same = again.get("shop", "reviews").expect("still targeted");
        assert!(Arc::ptr_eq(&state, same));
        assert_eq!(same.connection().err(), Some(Overflow::Connections));
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_section_starts_afresh_and_the_others_keep_their_state() {
        let first = Registry::default().rebuild([compile("p", spec(1))]);
        let state = first.get("shop", "reviews").expect("targeted");
        let outliers = state.outliers().expect("outlier detection");
        outliers.set_endpoints([endpoint(1), endpoint(2)]);
        let _ = state.after_try(
            Some(endpoint(1)),
            1,
            Outcome::ConnectFailure,
            Replay::Idempotent,
            &mut fastrand::Rng::with_seed(1),
        );
        assert!(outliers.is_ejected(endpoint(1)));
        assert_eq!(state.check_rate("r", None), RateDecision::Allow);
        assert_ne!(state.check_rate("r", None), RateDecision::Allow);

        let next = first.rebuild([compile("p", spec(2))]);
        let state = next.get("shop", "reviews").expect("still targeted");
        assert!(
            state.outliers().expect("kept").is_ejected(endpoint(1)),
            "the outlier state survived a rate limit change"
        );
        assert_eq!(
            state.check_rate("r", None),
            RateDecision::Allow,
            "the new rate limit has a fresh bucket"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_policy_in_name_order_wins_a_service() {
        let a = compile("a", spec(1));
        let b = compile("b", spec(2));
        let registry = Registry::default().rebuild([b.clone(), a]);
        let state = registry.get("shop", "reviews").expect("targeted");
        assert_eq!(state.policy().id.name, "a");
        let [conflict] = registry.conflicts() else {
            panic!("one conflict: {:?}", registry.conflicts());
        };
        assert_eq!(conflict.ignored.name, "b");
        let condition = registry.condition(&b.id, &Ok(b.clone()), Some(1));
        assert_eq!(
            (condition.status.as_str(), condition.reason.as_str()),
            ("False", "Conflicted")
        );
        assert!(
            condition.message.contains("reviews (taken by a)")
                && condition.message.contains("applies to none of its targets"),
            "{}",
            condition.message
        );
        let winner = registry.get("shop", "reviews").expect("targeted").policy();
        let accepted = registry.condition(&winner.id, &Ok(winner.clone()), Some(1));
        assert_eq!(accepted.status, "True");
    }

    #[tokio::test(start_paused = true)]
    async fn a_service_without_sections_admits_everything() {
        let registry = Registry::default().rebuild([compile(
            "p",
            json!({"targetRefs": [{"kind": "Service", "name": "reviews"}]}),
        )]);
        let state = registry.get("shop", "reviews").expect("targeted");
        assert!(state.admit().await.is_ok());
        assert!(state.connection().is_ok());
        assert_eq!(state.check_rate("r", None), RateDecision::Allow);
        assert_eq!(
            state.after_try(
                None,
                1,
                Outcome::ConnectFailure,
                Replay::Idempotent,
                &mut fastrand::Rng::with_seed(1)
            ),
            Err(NoRetry::NotRetriable)
        );
        assert!(registry.get("shop", "ratings").is_none());
        assert!(registry.get("other", "reviews").is_none());
    }
}

use super::*;

fn policy(retry_on: RetryOn) -> RetryPolicy {
    RetryPolicy {
        attempts: 2,
        per_try_timeout: None,
        retry_on,
        retriable_status_codes: vec![StatusCode::CONFLICT],
        budget: BudgetLimits::default(),
    }
}

fn all() -> RetryOn {
    RetryOn {
        server_error: true,
        gateway_error: true,
        connect_failure: true,
        reset: true,
        retriable_status_codes: true,
    }
}

fn status(code: u16) -> Outcome {
    Outcome::Status(StatusCode::from_u16(code).expect("a valid status"))
}

#[test]
fn each_condition_retries_only_its_outcomes() {
    let gateway = policy(RetryOn {
        gateway_error: true,
        ..RetryOn::default()
    });
    assert!(gateway.is_retriable(status(503)));
    assert!(gateway.is_retriable(Outcome::Timeout));
    assert!(gateway.is_retriable(Outcome::Reset));
    assert!(!gateway.is_retriable(status(500)));
    assert!(!gateway.is_retriable(status(409)));

    let server = policy(RetryOn {
        server_error: true,
        ..RetryOn::default()
    });
    assert!(server.is_retriable(status(500)));
    assert!(server.is_retriable(Outcome::ConnectFailure));
    assert!(!server.is_retriable(status(404)));

    let connect = policy(RetryOn {
        connect_failure: true,
        ..RetryOn::default()
    });
    assert!(connect.is_retriable(Outcome::ConnectFailure));
    assert!(!connect.is_retriable(Outcome::Reset));
    assert!(!connect.is_retriable(Outcome::Timeout));
    assert!(!connect.is_retriable(status(503)));

    let reset = policy(RetryOn {
        reset: true,
        ..RetryOn::default()
    });
    assert!(reset.is_retriable(Outcome::Reset));
    assert!(!reset.is_retriable(Outcome::Timeout));

    let codes = policy(RetryOn {
        retriable_status_codes: true,
        ..RetryOn::default()
    });
    assert!(codes.is_retriable(status(409)));
    assert!(!codes.is_retriable(status(503)));
    assert!(!policy(all()).is_retriable(status(200)));
}

#[test]
fn attempts_count_retries_after_the_first_try() {
    let p = policy(all());
    assert!(p.should_retry(1, Outcome::Reset, Replay::Idempotent));
    assert!(p.should_retry(2, Outcome::Reset, Replay::Idempotent));
    assert!(!p.should_retry(3, Outcome::Reset, Replay::Idempotent));
    let none = RetryPolicy {
        attempts: 0,
        ..policy(all())
    };
    assert!(!none.should_retry(1, Outcome::ConnectFailure, Replay::Idempotent));
}

#[test]
fn only_connect_failures_repeat_a_non_idempotent_request() {
    let p = policy(all());
    let post = Replay::of(&Method::POST, true);
    assert_eq!(post, Replay::NotIdempotent);
    assert!(p.should_retry(1, Outcome::ConnectFailure, post));
    assert!(!p.should_retry(1, Outcome::Reset, post));
    assert!(!p.should_retry(1, Outcome::Timeout, post));
    assert!(!p.should_retry(1, status(503), post));
    assert_eq!(Replay::of(&Method::PUT, true), Replay::Idempotent);
    assert_eq!(
        Replay::of(&Method::from_bytes(b"PURGE").expect("a method"), true),
        Replay::NotIdempotent
    );
}

#[test]
fn a_body_that_was_not_buffered_is_never_retried() {
    let p = policy(all());
    let replay = Replay::of(&Method::GET, false);
    assert_eq!(replay, Replay::NotReplayable);
    assert!(!p.should_retry(1, Outcome::ConnectFailure, replay));
}

#[test]
fn backoff_grows_from_25ms_with_jitter_and_stays_bounded() {
    let p = policy(all());
    let mut rng = fastrand::Rng::with_seed(7);
    let mut firsts = std::collections::BTreeSet::new();
    for _ in 0..1000 {
        let first = p.backoff(1, &mut rng);
        assert!(
            first >= Duration::from_micros(12_500) && first <= BASE_BACKOFF,
            "{first:?}"
        );
        firsts.insert(first);
        let second = p.backoff(2, &mut rng);
        assert!(
            second >= BASE_BACKOFF && second <= 2 * BASE_BACKOFF,
            "{second:?}"
        );
        let late = p.backoff(u32::MAX, &mut rng);
        assert!(late >= MAX_BACKOFF / 2 && late <= MAX_BACKOFF, "{late:?}");
    }
    assert!(
        firsts.len() > 100,
        "the waits are jittered: {}",
        firsts.len()
    );
}

#[tokio::test(start_paused = true)]
async fn the_budget_limits_retries_to_a_share_of_requests() {
    let budget = RetryBudget::new(BudgetLimits {
        percent: 20,
        min_retries_per_second: 0,
    });
    for _ in 0..100 {
        budget.record_request();
    }
    let allowed = (0..100).filter(|_| budget.try_retry()).count();
    assert_eq!(allowed, 20, "20% of 100 requests");
    // More requests make room for more retries.
    for _ in 0..10 {
        budget.record_request();
    }
    assert!(budget.try_retry());
    assert!(budget.try_retry());
    assert!(!budget.try_retry());
}

#[tokio::test(start_paused = true)]
async fn the_floor_allows_a_few_retries_per_second_without_traffic() {
    let budget = RetryBudget::new(BudgetLimits {
        percent: 20,
        min_retries_per_second: 3,
    });
    assert_eq!((0..10).filter(|_| budget.try_retry()).count(), 3);
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!((0..10).filter(|_| budget.try_retry()).count(), 3);
}

#[tokio::test(start_paused = true)]
async fn old_requests_leave_the_window() {
    let budget = RetryBudget::new(BudgetLimits {
        percent: 50,
        min_retries_per_second: 0,
    });
    for _ in 0..10 {
        budget.record_request();
    }
    tokio::time::advance(Duration::from_secs(9)).await;
    assert!(budget.try_retry(), "requests of 9 s ago still count");
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(!budget.try_retry(), "requests of 10 s ago no longer count");
    // Long gaps (wrapping the window many times) do not resurrect old counts.
    tokio::time::advance(Duration::from_secs(1000)).await;
    assert!(!budget.try_retry());
}

#[tokio::test(start_paused = true)]
async fn next_charges_the_budget_only_for_retries_it_allows() {
    let p = policy(all());
    let budget = RetryBudget::new(BudgetLimits {
        percent: 0,
        min_retries_per_second: 1,
    });
    let mut rng = fastrand::Rng::with_seed(1);
    assert_eq!(
        p.next(&budget, 1, status(200), Replay::Idempotent, &mut rng),
        Err(NoRetry::NotRetriable)
    );
    assert_eq!(
        p.next(&budget, 3, status(503), Replay::Idempotent, &mut rng),
        Err(NoRetry::AttemptsExhausted)
    );
    assert!(
        p.next(&budget, 1, status(503), Replay::Idempotent, &mut rng)
            .is_ok()
    );
    assert_eq!(
        p.next(&budget, 1, status(503), Replay::Idempotent, &mut rng),
        Err(NoRetry::BudgetExhausted)
    );
}

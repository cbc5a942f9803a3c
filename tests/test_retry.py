from webhook.retry import RetryPolicy, backoff_delay, exhausted

POLICY = RetryPolicy(max_attempts=5, backoff_base=2.0, backoff_cap=60.0)


def test_delay_doubles_per_attempt_between_half_and_full_step() -> None:
    assert backoff_delay(1, POLICY, rand=lambda: 0.0) == 1.0
    assert backoff_delay(1, POLICY, rand=lambda: 1.0) == 2.0
    assert backoff_delay(3, POLICY, rand=lambda: 0.0) == 4.0
    assert backoff_delay(3, POLICY, rand=lambda: 1.0) == 8.0


def test_delay_never_exceeds_the_cap() -> None:
    assert backoff_delay(30, POLICY, rand=lambda: 1.0) == 60.0


def test_jitter_spreads_retries() -> None:
    delays = {backoff_delay(4, POLICY) for _ in range(50)}
    assert len(delays) > 1
    assert all(8.0 <= d <= 16.0 for d in delays)


def test_retry_after_is_honoured_up_to_the_cap() -> None:
    assert backoff_delay(1, POLICY, retry_after=30, rand=lambda: 0.0) == 30.0
    assert backoff_delay(1, POLICY, retry_after=3600, rand=lambda: 0.0) == 60.0
    assert backoff_delay(5, POLICY, retry_after=1, rand=lambda: 1.0) == 32.0


def test_budget() -> None:
    assert not exhausted(4, POLICY)
    assert exhausted(5, POLICY)

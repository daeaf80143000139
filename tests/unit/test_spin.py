from runtime.spin import SpinPolicy


def test_window_follows_recent_waits_within_bounds():
    s = SpinPolicy(100e-6, 2e-3)
    assert s.window == 100e-6
    for _ in range(30):
        s.observe(400e-6)
    assert abs(s.window - 800e-6) < 50e-6  # twice the typical wait
    for _ in range(30):
        s.observe(10.0)  # long calls: sleep almost at once, leave the cores to the callee
    assert s.window == 100e-6
    for _ in range(40):
        s.observe(10e-6)
    assert s.window == 100e-6


def test_an_actor_spins_through_a_decode_gap_and_sleeps_through_an_attention():
    """The actor's bounds (runtime.worker): a split decode's TEE compute between two offloads
    (~0.3-1 ms) must not put the worker to sleep -- waking it costs 100-200 us, a third of
    the gap (with a 1 ms cap, 0.6 ms gaps fell past it) -- while a prefill's 10 ms
    attentions must leave the cores to the TEE."""
    from runtime.worker import IDLE_SPIN_MAX_S, IDLE_SPIN_MIN_S

    for gap in (0.3e-3, 0.6e-3, 1.0e-3):
        p = SpinPolicy(IDLE_SPIN_MIN_S, IDLE_SPIN_MAX_S)
        for _ in range(50):
            p.observe(gap)
        assert p.window > gap, gap
    p = SpinPolicy(IDLE_SPIN_MIN_S, IDLE_SPIN_MAX_S)
    for _ in range(50):
        p.observe(10e-3)
    assert p.window == IDLE_SPIN_MIN_S

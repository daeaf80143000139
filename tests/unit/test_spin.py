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

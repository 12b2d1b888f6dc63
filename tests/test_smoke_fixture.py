def test_trained_run_writes_checkpoints(trained_run):
    assert (trained_run / "best.pt").is_file() and (trained_run / "last.pt").is_file()

"""One file per mode: each `run(config, workdir, mesh) -> dict` reads top to bottom."""

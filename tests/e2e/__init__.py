"""End-to-end processes against a real broker (tansu) and Postgres: a triggerer that embeds the
manager, run next to `outbox committer` processes, both killed and restarted by the tests."""

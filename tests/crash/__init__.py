"""Crash tests: a triggerer process killed with SIGKILL and restarted (see ``triggerer``)."""

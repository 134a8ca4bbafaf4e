"""Runnable examples: the producers and triggers of the ack-channel design, on outbox."""

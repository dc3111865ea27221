"""The two ends of a session: the sender, the receiver, and the processes a test or demo starts."""

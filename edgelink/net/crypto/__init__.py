"""End-to-end encryption for the network path (on top of libp2p's Noise)."""
